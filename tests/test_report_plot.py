"""``gamma report`` (a self-contained HTML page of a scores file), ``gamma plot`` (figures of a real tiny training run)
and ``gamma analyze routing --plot`` (routing heat maps of the tiny model). Files written, sizes sane, nothing linked
from outside the page."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_two_dataset_run
from PIL import Image

import gamma
from gamma.cli import main
from gamma.report import SHOWN

pytest.importorskip("matplotlib", reason="figures need matplotlib (the analysis / demo extra)")
pytest.importorskip("pandas", reason="gamma report reads the scores with pandas")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two folders of pictures that scikit-image ships (the second one holds smaller copies)."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for folder, size in (("big", None), ("small", 96)):
        (root / folder).mkdir()
        for name in PHOTOS:
            img = Image.fromarray(getattr(data, name)())
            (img.resize((size, size)) if size else img).save(root / folder / f"{name}.jpg")
    return root


@pytest.fixture(scope="module")
def scores_csv(photos) -> Path:
    """``gamma score`` output of the tiny model over 10 photos, attributes included."""
    torch.manual_seed(0)
    from gamma.weights import save_checkpoint

    weights = save_checkpoint(gamma.create_model("gamma_test"), photos / "tiny.pt")
    out = photos / "scores.csv"
    assert main(["score", str(photos / "big"), str(photos / "small"), "--weights", str(weights), "--attributes",
                 "--crops", "center", "--out", str(out), "--no-progress"]) == 0
    return out


def _self_contained(text: str) -> None:
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert sources and all(s.startswith("data:") for s in sources), [s[:40] for s in sources if not s.startswith("d")]
    assert "<script" not in text


def test_report_of_ten_rows(scores_csv, photos, capsys):
    out = photos / "report.html"
    assert main(["report", str(scores_csv), "--images", "--root", "/", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    _self_contained(text)
    assert "10 rows, 10 scored" in text
    assert len(re.findall(r"data:image/jpeg;base64", text)) == 2 * min(SHOWN, 10)  # best and worst, with thumbnails
    assert text.count("data:image/png;base64") == 2  # histogram, attribute scatter plots
    assert str(photos / "big") in text and str(photos / "small") in text  # per-folder rows
    assert 20_000 < out.stat().st_size < 1_500_000


def test_report_of_jsonl_and_without_images(photos, scores_csv):
    import pandas as pd

    df = pd.read_csv(scores_csv)
    jsonl = photos / "scores.jsonl"
    df.to_json(jsonl, orient="records", lines=True)
    from gamma.report import write_report

    html = write_report(jsonl, photos / "plain.html").read_text(encoding="utf-8")
    assert "data:image/jpeg" not in html and "no thumbnail" in html
    assert "<h2>Best 10</h2>" in html and "<h2>Worst 10</h2>" in html


def test_report_of_20000_rows_is_bounded(photos, scores_csv):
    """A large scores file: thumbnails and scatter points are sampled, the page stays small and quick to write."""
    import pandas as pd

    base = pd.read_csv(scores_csv)
    rng = np.random.default_rng(0)
    big = base.sample(20_000, replace=True, random_state=0).reset_index(drop=True)
    big["score"] = np.clip(big["score"] + rng.normal(0, 0.05, len(big)), 0, 1)
    big.loc[::997, "score"] = np.nan  # some failures
    big["error"] = np.where(big["score"].isna(), "corrupt or truncated image header", "")
    path = photos / "big.csv"
    big.to_csv(path, index=False)
    from gamma.report import write_report

    t0 = time.perf_counter()
    out = write_report(path, photos / "big.html", images=True, root="/")
    seconds = time.perf_counter() - t0
    text = out.read_text(encoding="utf-8")
    _self_contained(text)
    failed = int(big["score"].isna().sum())
    assert f"20000 rows, {20000 - failed} scored, {failed} failed" in text
    assert len(re.findall(r"data:image/jpeg;base64", text)) == 2 * SHOWN
    assert "a random 5000 of" in text or out.stat().st_size < 3_000_000
    assert out.stat().st_size < 3_000_000 and seconds < 60


def test_report_refuses_a_file_without_scores(tmp_path, capsys):
    bad = tmp_path / "x.csv"
    bad.write_text("image,mos\na.jpg,3\n")
    assert main(["report", str(bad)]) == 2
    assert "no name / score column" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ gamma plot
@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A real two-split, two-epoch training run of the tiny SDP model on two small noise datasets."""
    from gamma.train.main import main as train_main

    root = tmp_path_factory.mktemp("plotrun")
    write_two_dataset_run(root, sizes=(16, 12), max_steps_per_epoch=3, splits=[1, 2], eval={"crops": 2})
    train_main(["-opt", str(root / "base.yml"), "--all_splits"])
    return root / "runs" / "tiny"


def _png_ok(path: Path, min_kb: int = 10) -> None:
    assert path.is_file() and min_kb * 1024 < path.stat().st_size < 2_000_000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and 300 < img.width < 3000 and 200 < img.height < 3000


def test_plot_a_split_folder(run_root, tmp_path, capsys):
    split = run_root / "split_1"
    assert main(["plot", str(split), "--out-dir", str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'training_curves.png'}" in capsys.readouterr().out
    _png_ok(tmp_path / "training_curves.png")


def test_plot_an_all_splits_folder(run_root, tmp_path):
    assert main(["plot", str(run_root), "--out-dir", str(tmp_path)]) == 0
    for name in ("training_curves_split_1.png", "training_curves_split_2.png", "table.png"):
        _png_ok(tmp_path / name)


def test_plot_says_when_there_is_nothing_to_plot(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ analyze --plot
def test_analyze_routing_plot(photos, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = ["analyze", "routing", f"big={photos / 'big'}", f"small={photos / 'small'}", "--model", "gamma_test",
            "--crops", "center", "--out-dir", str(out), "--plot"]
    assert main(argv) == 0
    assert f"wrote {out / 'routing_heatmap.png'}" in capsys.readouterr().out
    _png_ok(out / "routing_heatmap.png", min_kb=5)
