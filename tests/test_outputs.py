"""The user-facing entry points of the extra outputs: Scorer, `gamma score` and pyiqa.

- Gamma: attribute scores, the level distribution and the automatic scene as columns (values equal the model API's),
  through resume and sharded runs;
- PromptIQA scoring against a prompt file (the same reader for prompt and targets, the prompt encoded once);
- adapting Gamma to a prompt file (gamma.adapt through Scorer.adapt and --isp);
- the pyiqa metric ``promptiqa``.

Tiny models (gamma_test, gamma_test_sdp, promptiqa_test) saved as real checkpoint files; real skimage pictures.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close, perturb_moae, perturb_promptiqa, read_rows
from PIL import Image

import gamma
from gamma.adapt import NotEnoughPairsError
from gamma.archs.promptiqa import PromptIQA
from gamma.cli import main
from gamma.data.promptiqa import random_vertical_flip
from gamma.io import load_image, load_promptiqa_image
from gamma.metrics import srcc
from gamma.prompt_file import PromptFileError, read_prompt_file
from gamma.prompts import ATTRIBUTES, LEVELS
from gamma.scorer import Scorer
from gamma.weights import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--workers", "1", "--device", "cpu"]  # (tests choose their device)
RTOL, ATOL = 1e-5, 1e-6  # scores and probabilities are O(1); batching moves them by ~1e-7
DIST = ["std", *(f"p_{level}" for level in LEVELS)]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Six different real pictures, small, PNG and JPEG, two of them the same size (batched together)."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.thumbnail((112, 112))
        paths.append(root / f"{name}.{'png' if i % 2 else 'jpg'}")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory) -> Path:
    """Five more pictures for prompts, in a sub-folder of the folder the prompt CSVs go in."""
    from skimage import data

    root = tmp_path_factory.mktemp("prompt")
    (root / "ispp").mkdir()
    for name in ("hubble_deep_field", "coins", "moon", "page", "retina"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.thumbnail((96, 96))
        img.save(root / "ispp" / f"{name}.png")
    return root


def write_prompt(folder: Path, scores: list[float], name: str = "isp.csv") -> Path:
    """A prompt CSV in ``folder`` naming its images relative to itself (ispp/<picture>.png)."""
    images = sorted((folder / "ispp").glob("*.png"))[: len(scores)]
    path = folder / name
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "score"])
        writer.writerows([[f"ispp/{p.name}", s] for p, s in zip(images, scores, strict=True)])
    return path


@pytest.fixture(scope="module")
def sdp_file(tmp_path_factory) -> Path:
    """gamma_test_sdp with MoAE blocks that matter, as our checkpoint (it records its prompt set)."""
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test_sdp")
    perturb_moae(model)
    return save_checkpoint(model, tmp_path_factory.mktemp("w") / "sdp.pth")


@pytest.fixture(scope="module")
def naive_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    return save_checkpoint(gamma.create_model("gamma_test"), tmp_path_factory.mktemp("w") / "naive.pth")


@pytest.fixture(scope="module")
def piqa_file(tmp_path_factory) -> Path:
    """promptiqa_test made sensitive to its prompt (see helpers.perturb_promptiqa), as our checkpoint."""
    torch.manual_seed(0)
    return save_checkpoint(perturb_promptiqa(gamma.create_model("promptiqa_test")),
                           tmp_path_factory.mktemp("w") / "piqa.pth")


def assert_same_table(a: list[list[str]], b: list[list[str]]) -> None:
    """Same header and names, strings equal; numbers equal up to float32 rounding (RTOL/ATOL: the same image in
    another batch moves by ~2 ulp, see test_cli_columns_resume...) plus the printed precision (1e-6: two values
    that close may round to neighbouring 6-decimal strings)."""
    assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b]
    for ra, rb in zip(a[1:], b[1:], strict=True):
        for col, va, vb in zip(a[0], ra, rb, strict=True):
            if col in ("name", "scene"):
                assert va == vb, (ra[0], col)
            else:
                assert_close(float(va), float(vb), rtol=RTOL, atol=ATOL + 1e-6, msg=f"{ra[0]} {col}")


# ------------------------------------------------------------------------------------------------ Gamma columns
def test_attribute_distribution_and_scene_columns_equal_the_model_api(photos, sdp_file):
    scorer = Scorer(sdp_file, device="cpu", crops="five", scene="auto", attributes=True, distribution=True,
                    batch_size=4, num_workers=2)
    df = scorer.score(photos)
    model = gamma.create_model(pretrained=sdp_file)
    model.set_crop_protocol(mode="five")
    assert list(df.columns) == ["name", "score", *DIST, "scene", *(f"p_{s}" for s in model.auto_scenes),
                                *ATTRIBUTES]
    assert df.attrs["attributes_from"] == model.tower_description() and "MoAE towers" in df.attrs["attributes_from"]
    with torch.inference_mode():
        for row, path in zip(df.itertuples(index=False), photos, strict=True):
            out = model.assess(load_image(path)[None], "auto", attributes=True)
            assert row.scene == out.scenes[0]
            expected = {"score": out.score, "std": out.std, **out.level_columns(), **out.attributes,
                        **{f"p_{s}": out.scene_probabilities[:, k] for k, s in enumerate(model.auto_scenes)}}
            actual = {k: getattr(row, k) for k in expected}
            assert_close(actual, {k: float(v[0]) for k, v in expected.items()}, rtol=RTOL, atol=ATOL, msg=row.name)
    assert df["scene"].isin(model.auto_scenes).all()


def test_a_named_scene_overrides_auto(photos, sdp_file):
    scorer = Scorer(sdp_file, device="cpu", crops="center", scene="auto")
    auto = scorer.score(photos)
    named = next(s for s in ("face", "underwater", "aigc") if s != auto["scene"][0])
    df = scorer.score(photos, scene=named)
    assert list(df.columns) == ["name", "score"]  # a named scene: no scene column
    model = gamma.create_model(pretrained=sdp_file)
    model.set_crop_protocol(mode="center")
    with torch.inference_mode():
        expected = [float(model(load_image(p)[None], scene=named)) for p in photos]
    assert_close(df["score"], expected, rtol=RTOL, atol=ATOL)
    assert abs(df["score"][0] - auto["score"][0]) > 1e-4  # image 0 was scored with another scene under auto


def test_auto_on_a_single_set_model_adds_no_scene_column(photos, naive_file):
    df = Scorer(naive_file, device="cpu", crops="center", scene="auto", distribution=True).score(photos[:2])
    assert list(df.columns) == ["name", "score", *DIST]
    assert_close(df[DIST[1:]].sum(axis=1), [1.0, 1.0], rtol=0, atol=1e-6)


def test_cli_columns_resume_and_json_keep_the_extra_columns(photos, sdp_file, tmp_path, capsys):
    args = ["score", *map(str, photos), "--weights", str(sdp_file), "--crops", "five", "--scene", "auto",
            "--attributes", "--distribution", *FAST]
    full = tmp_path / "full.csv"
    assert main([*args, "--out", str(full)]) == 0
    err = capsys.readouterr().err
    model = gamma.create_model(pretrained=sdp_file)
    assert f"attribute scores from {model.tower_description()}" in err
    rows = read_rows(full)
    df = Scorer(sdp_file, device="cpu", crops="five", scene="auto", attributes=True, distribution=True).score(photos)
    assert rows[0] == list(df.columns)
    expected = [list(df.columns)] + [[f"{v:.6f}" if isinstance(v, float) else str(v) for v in r]
                                     for r in df.itertuples(index=False)]
    assert_same_table(rows, expected)
    # A killed run: two rows and a half-written one (and the record it wrote first); --resume completes it without
    # duplicates. The re-scored images meet other batch-mates than in the full run (the two same-size pictures are
    # split), and float32 matmuls over 1 or 2 rows round differently: ~2 ulp (2.4e-7 measured), which can flip the
    # 6th printed decimal; so the rows are compared with tolerances, not as strings.
    cut = tmp_path / "cut.csv"
    cut.write_text("\n".join(",".join(r) for r in rows[:3]) + "\n" + ",".join(rows[3])[:25])
    (tmp_path / "cut.csv.meta.json").write_text((tmp_path / "full.csv.meta.json").read_text())
    assert main([*args, "--out", str(cut), "--resume"]) == 0
    assert_same_table(read_rows(cut), rows)
    assert read_rows(cut)[1:3] == rows[1:3]  # the rows written before the kill are kept as they were
    # Resuming with other columns is refused, naming both.
    assert main(["score", *map(str, photos), "--weights", str(sdp_file), "--crops", "five", "--scene", "auto",
                 *FAST, "--out", str(cut), "--resume"]) == 2
    assert "columns" in capsys.readouterr().err
    # JSON Lines: the scene as a string, numbers as numbers.
    jsonl = tmp_path / "s.jsonl"
    assert main([*args, "--out", str(jsonl)]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert list(records[0]) == rows[0] and [r["scene"] for r in records] == [r[rows[0].index("scene")]
                                                                            for r in rows[1:]]
    assert all(isinstance(r["sharpness"], float) for r in records)


def test_parts_of_a_sharded_run_keep_the_extra_columns_through_the_merge(photos, sdp_file, tmp_path, capsys):
    """Parts left by a crashed 2-process run, with the extra fields, merged by a one-process --resume."""
    args = ["score", *map(str, photos), "--weights", str(sdp_file), "--crops", "center", "--scene", "auto",
            "--attributes", "--distribution", *FAST]
    reference = tmp_path / "reference.csv"
    assert main([*args, "--out", str(reference)]) == 0
    rows = read_rows(reference)
    header = rows[0]
    records = []
    for i, row in enumerate(rows[1:]):
        values = {c: (v if c in ("name", "scene") else float(v)) for c, v in zip(header, row, strict=True)}
        records.append({"index": i, "name": values.pop("name"), "score": values.pop("score"), "mos": None,
                        **values, "error": None})
    out = tmp_path / "scores.csv"
    rank0 = "".join(json.dumps(records[i]) + "\n" for i in (0, 2))  # rank 0 got through inputs 0 and 2
    (tmp_path / ".scores.csv.rank0-of-2.jsonl").write_text(rank0)
    (tmp_path / ".scores.csv.rank1-of-2.jsonl").write_text(json.dumps(records[1]) + "\n" + '{"index": 3, "na')
    # What rank 0 of that run recorded about its parts: the reference run's record, with the parts' fields.
    record = json.loads((tmp_path / "reference.csv.meta.json").read_text())
    (tmp_path / ".scores.csv.parts.meta.json").write_text(json.dumps({**record, "columns": list(records[0])}))
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert "scored 6 image(s)" in capsys.readouterr().err
    assert_same_table(read_rows(out), rows)
    assert not list(tmp_path.glob(".scores.csv.rank*"))
    # Parts written without the extra columns cannot be continued by a run that writes them.
    plain = {k: records[0][k] for k in ("index", "name", "score", "mos", "error")}
    (tmp_path / ".other.csv.rank0-of-2.jsonl").write_text(json.dumps(plain) + "\n")
    (tmp_path / ".other.csv.parts.meta.json").write_text(json.dumps({**record, "columns": list(records[0])}))
    assert main([*args, "--out", str(tmp_path / "other.csv"), "--resume"]) == 2
    assert "cannot resume from .other.csv.rank0-of-2.jsonl" in capsys.readouterr().err
    # Parts scored with other weights (their record says so) are not merged with this run's rows.
    part = tmp_path / ".third.csv.rank0-of-2.jsonl"
    part.write_text(json.dumps(records[0]) + "\n")
    other_weights = {**record["weights"], "sha256": "0" * 64, "path": "/elsewhere/Gamma.pth"}
    (tmp_path / ".third.csv.parts.meta.json").write_text(
        json.dumps({**record, "columns": list(records[0]), "weights": other_weights, "scene": "underwater"}))
    assert main([*args, "--out", str(tmp_path / "third.csv"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume the part files of third.csv" in err and "weights: Gamma.pth (sha256 000000000000…) in the " \
        f"file, {sdp_file.name}" in err and "scene: underwater in the file, auto in this run" in err
    assert part.read_text() == json.dumps(records[0]) + "\n" and not (tmp_path / "third.csv").exists()


@pytest.mark.slow
def test_torchrun_two_processes_write_the_extra_columns_of_one(photos, sdp_file, tmp_path):
    args = ["score", *map(str, photos), "--weights", str(sdp_file), "--crops", "center", "--scene", "auto",
            "--attributes", "--distribution", *FAST, "--batch-size", "2"]
    one = tmp_path / "one.csv"
    assert main([*args, "--out", str(one)]) == 0
    two = tmp_path / "two.csv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gamma", *args,
           "--out", str(two)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored 6 image(s) in 2 processes" in done.stderr
    assert done.stderr.count("attribute scores from") == 1  # said once, by rank 0
    assert_same_table(read_rows(two), read_rows(one))


# ------------------------------------------------------------------------------------------------ PromptIQA
def _promptiqa_expected(model: PromptIQA, targets: list[Path], pairs, scores: list[float]) -> torch.Tensor:
    size = model.config.image_size
    with torch.inference_mode():
        images = torch.stack([load_promptiqa_image(p, size) for p in targets])
        prompt = torch.stack([load_promptiqa_image(p, size) for p in pairs.images])
        return model(images, prompt=(prompt, scores))


def test_promptiqa_scores_from_files_equal_the_model_on_load_promptiqa_image(photos, prompt_dir, piqa_file):
    scores = [0.1, 0.35, 0.6, 0.9]
    csv_path = write_prompt(prompt_dir, scores)
    df = Scorer(piqa_file, device="cpu", prompt=csv_path, batch_size=4, num_workers=2).score(photos)
    assert list(df.columns) == ["name", "score"] and df.attrs["prompt"] == str(csv_path)
    model = gamma.create_model(pretrained=piqa_file)
    expected = _promptiqa_expected(model, photos, read_prompt_file(csv_path), scores)
    assert_close(df["score"], expected, rtol=RTOL, atol=ATOL)
    # The prompt matters (the comparison above is not between two prompt-blind numbers).
    flipped = write_prompt(prompt_dir, [1 - s for s in scores], "reversed.csv")
    other = Scorer(piqa_file, device="cpu", prompt=flipped).score(photos)
    assert float(np.abs(other["score"] - df["score"]).max()) > 1e-3


def test_the_prompt_is_encoded_once_per_run(photos, prompt_dir, piqa_file):
    model = gamma.create_model(pretrained=piqa_file)
    calls, batches = [], []
    encode, features = model.encode_prompt, model.image_features
    model.encode_prompt = lambda *a, **k: calls.append(1) or encode(*a, **k)
    model.image_features = lambda pixels: batches.append(pixels.shape[0]) or features(pixels)
    scorer = Scorer(model=model, device="cpu", prompt=write_prompt(prompt_dir, [0.2, 0.4, 0.6, 0.8]), batch_size=2,
                    num_workers=0)
    scorer.score(photos[:5])
    assert calls == [1] and batches == [4, 2, 2, 1]  # the 4 prompt images once, then the targets in batches


def test_cli_scores_with_promptiqa_and_a_prompt_file(photos, prompt_dir, piqa_file, tmp_path, capsys):
    scores = [0.15, 0.5, 0.55, 0.95]
    csv_path = write_prompt(prompt_dir, scores)
    out = tmp_path / "p.csv"
    assert main(["score", *map(str, photos), "--model", "promptiqa_test", "--weights", str(piqa_file),
                 "--isp", str(csv_path), *FAST, "--out", str(out)]) == 0
    rows = read_rows(out)
    assert rows[0] == ["name", "score"]
    expected = _promptiqa_expected(gamma.create_model(pretrained=piqa_file), photos, read_prompt_file(csv_path),
                                   scores)
    assert_close([float(r[1]) for r in rows[1:]], expected, rtol=0, atol=1e-6)
    # The same prompt on a 0..100 scale with --mos-range: the same scores, and a mos column.
    hundred = write_prompt(prompt_dir, [100 * s for s in scores], "hundred.csv")
    assert main(["score", *map(str, photos), "--weights", str(piqa_file), "--isp", str(hundred),
                 "--mos-range", "0", "100", *FAST, "--out", str(tmp_path / "h.csv")]) == 0
    h = read_rows(tmp_path / "h.csv")
    assert h[0] == ["name", "score", "mos"] and [r[1] for r in h[1:]] == [r[1] for r in rows[1:]]
    assert_close([float(r[2]) for r in h[1:]], [100 * float(r[1]) for r in h[1:]], rtol=0, atol=1e-3)
    # The option's former name, --prompt-file, still works (with a warning): the same rows.
    old = tmp_path / "old.csv"
    assert main(["score", *map(str, photos), "--model", "promptiqa_test", "--weights", str(piqa_file),
                 "--prompt-file", str(csv_path), *FAST, "--out", str(old)]) == 0
    assert read_rows(old) == rows


@pytest.mark.parametrize("case", ["missing image", "undecodable image", "not a number", "one pair", "out of range",
                                  "no header"])
def test_a_bad_prompt_file_is_a_clear_error(case, photos, prompt_dir, piqa_file, naive_file, capsys):
    bad = prompt_dir / f"bad_{case.replace(' ', '_')}.csv"
    good = ["ispp/coins.png,0.2", "ispp/moon.png,0.7"]
    text, message = {
        "missing image": ("image,score\n" + "\n".join(good) + "\nispp/gone.png,0.5\n", r"not found.*gone\.png"),
        "undecodable image": ("image,score\n" + "\n".join(good) + "\nispp/broken.jpg,0.5\n",
                              r"prompt image .*broken\.jpg: "),
        "not a number": ("image,score\n" + good[0] + "\nispp/moon.png,high\n", r":3: the score 'high' is not a number"),
        "one pair": ("image,score\n" + good[0] + "\n", "at least 2 image-score pairs, got 1"),
        "out of range": ("image,score\n" + good[0] + "\nispp/moon.png,7\n",
                         r"score 7, but PromptIQA was trained on scores in \[0, 1\].*--mos-range"),
        "no header": ("\n".join(good) + "\n", "header names an image column"),
    }[case]
    bad.write_text(text)
    (prompt_dir / "ispp" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(PromptFileError, match=message):
        Scorer(piqa_file, device="cpu", prompt=bad)
    assert main(["score", str(photos[0]), "--weights", str(piqa_file), "--isp", str(bad), *FAST]) == 2
    err = capsys.readouterr().err
    assert bad.name in err and "Traceback" not in err
    if case != "out of range":  # any scale is fine for adapting Gamma; the rest is wrong for every model
        assert main(["score", str(photos[0]), "--weights", str(naive_file), "--isp", str(bad), *FAST]) == 2
        assert bad.name in capsys.readouterr().err


def test_promptiqa_without_a_prompt_says_what_to_pass(photos, piqa_file, capsys):
    scorer = Scorer(piqa_file, device="cpu")
    with pytest.raises(ValueError, match=r"isp='isp.csv'"):
        scorer.score(photos[0])
    assert main(["score", str(photos[0]), "--weights", str(piqa_file), *FAST]) == 2
    assert "--isp" in capsys.readouterr().err
    for option in (["--attributes"], ["--scene", "face"], ["--crops", "center"]):
        assert main(["score", str(photos[0]), "--weights", str(piqa_file), *option, *FAST]) == 2
        capsys.readouterr()


def test_prompt_flip_is_off_by_default_and_reproduces_the_official_quirk(photos, prompt_dir, piqa_file):
    scores = [0.1, 0.3, 0.7, 0.9]
    csv_path = write_prompt(prompt_dir, scores)
    targets = photos[:4]
    plain = Scorer(piqa_file, device="cpu", prompt=csv_path).score(targets)["score"].to_numpy()
    again = Scorer(piqa_file, device="cpu", prompt=csv_path).score(targets)["score"].to_numpy()
    assert np.array_equal(plain, again)  # deterministic by default
    flipped = Scorer(piqa_file, device="cpu", prompt=csv_path, prompt_flip=True, seed=3, batch_size=4).score(targets)
    model = gamma.create_model(pretrained=piqa_file)
    size = model.config.image_size
    prompt = torch.stack([load_promptiqa_image(p, size) for p in read_prompt_file(csv_path).images])
    generator = torch.Generator().manual_seed(3)
    assert bool((torch.rand(4, generator=torch.Generator().manual_seed(3)) < 0.5).any())  # some image is flipped
    with torch.inference_mode():
        images = torch.stack([load_promptiqa_image(p, size) for p in targets])
        expected = model(images, prompt=(random_vertical_flip(prompt, generator=generator), scores))
    assert_close(flipped["score"], expected, rtol=RTOL, atol=ATOL)
    assert float(np.abs(flipped["score"].to_numpy() - plain).max()) > 1e-4


# ------------------------------------------------------------------------------------------------ adapting Gamma
def _gamma_scores(file: Path, paths: list[Path]) -> np.ndarray:
    return Scorer(file, device="cpu", crops="center").score(paths)["score"].to_numpy()


def test_adapt_refuses_three_pairs_or_fewer(prompt_dir, naive_file, photos, capsys):
    scorer = Scorer(naive_file, device="cpu", crops="center")
    with pytest.raises(NotEnoughPairsError, match="at least 4 .* got 3"):
        scorer.adapt(write_prompt(prompt_dir, [1, 2, 3], "three.csv"))
    assert scorer.adaptation is None and scorer.columns() == ["name", "score"]
    assert main(["score", str(photos[0]), "--weights", str(naive_file), "--isp",
                 str(prompt_dir / "three.csv"), *FAST]) == 2
    assert "at least 4" in capsys.readouterr().err


@pytest.mark.parametrize("scale", ["mos", "dmos"])
def test_adapt_detects_the_direction_and_reports_the_fit(scale, prompt_dir, naive_file, photos):
    images = sorted((prompt_dir / "ispp").glob("*.png"))
    s = _gamma_scores(naive_file, images)
    targets = list(1 + 40 * (s - 0.5)) if scale == "mos" else list(100 - 500 * (s - 0.5))  # DMOS: lower is better
    csv_path = write_prompt(prompt_dir, targets, f"{scale}.csv")
    scorer = Scorer(naive_file, device="cpu", crops="center", prompt=csv_path)
    report = scorer.adaptation.report
    assert report.method == "monotone" and report.features == ("score",) and report.pairs == 5
    assert report.direction == ("increasing" if scale == "mos" else "decreasing")
    assert report.srcc == pytest.approx(1.0) and report.rmse < 1e-6 * max(map(abs, targets))
    assert np.isfinite([report.loo_srcc, report.loo_plcc, report.loo_rmse]).all()
    on_prompt = scorer.score(images)
    assert_close(on_prompt["adapted"], targets, rtol=1e-6, atol=1e-6)  # a monotone relation is reproduced
    df = scorer.score(photos)
    assert list(df.columns) == ["name", "score", "adapted"]
    assert srcc(df["adapted"], df["score"]) == pytest.approx(1.0 if scale == "mos" else -1.0)
    assert df.attrs["adaptation"]["prompt"] == str(csv_path) and df.attrs["adaptation"]["direction"] == report.direction


def test_adapt_on_all_outputs_is_ridge_on_the_model_apis_outputs(prompt_dir, sdp_file, photos):
    images = sorted((prompt_dir / "ispp").glob("*.png"))
    csv_path = write_prompt(prompt_dir, [3.1, 1.2, 4.4, 2.0, 3.9], "all.csv")
    scorer = Scorer(sdp_file, device="cpu", crops="center", scene="natural")
    adaptation = scorer.adapt(csv_path, outputs="all")
    assert adaptation.report.method == "ridge" and adaptation.features == ("score", *DIST[1:], *ATTRIBUTES)
    assert scorer.columns() == ["name", "score", "adapted"]
    model = gamma.create_model(pretrained=sdp_file)
    model.set_crop_protocol(mode="center")

    def table(paths: list[Path]) -> dict[str, list[float]]:
        with torch.inference_mode():
            outs = [model.assess(load_image(p)[None], "natural", attributes=True) for p in paths]
        rows = [{"score": float(o.score), **{k: float(v) for k, v in {**o.level_columns(), **o.attributes}.items()}}
                for o in outs]
        return {k: [r[k] for r in rows] for k in adaptation.features}

    refit = gamma.adapt.fit(table(images), [3.1, 1.2, 4.4, 2.0, 3.9])
    assert refit.report.strength == adaptation.report.strength
    assert_close(scorer.score(photos)["adapted"], refit.predict(table(photos)), rtol=1e-4, atol=1e-4)


def test_cli_adapts_gamma_to_a_prompt_file(prompt_dir, naive_file, photos, tmp_path, capsys):
    csv_path = write_prompt(prompt_dir, [62, 20, 75, 41, 58], "cli.csv")
    out = tmp_path / "a.csv"
    assert main(["score", *map(str, photos), "--weights", str(naive_file), "--crops", "center", "--isp",
                 str(csv_path), *FAST, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"adapted to {csv_path} (column adapted): monotone map of score" in err and "leave-one-out" in err
    rows = read_rows(out)
    assert rows[0] == ["name", "score", "adapted"]
    expected = Scorer(naive_file, device="cpu", crops="center", prompt=csv_path).score(photos)["adapted"]
    assert_close([float(r[2]) for r in rows[1:]], expected, rtol=0, atol=1e-5)
    assert main(["score", str(photos[0]), "--weights", str(naive_file), "--adapt-outputs", "all", *FAST]) == 2
    assert "--isp" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ pyiqa
def test_pyiqa_promptiqa_metric(prompt_dir, piqa_file, photos):
    pyiqa = pytest.importorskip("pyiqa")
    assert "promptiqa" in pyiqa.list_models(metric_mode="NR")
    scores = [0.2, 0.4, 0.65, 0.8]
    csv_path = write_prompt(prompt_dir, scores, "pyiqa.csv")
    metric = pyiqa.create_metric("promptiqa", device="cpu", isp=str(csv_path),
                                 pretrained_model_path=str(piqa_file))
    assert (metric.lower_better, metric.score_range, metric.metric_mode) == (False, "0, 1", "NR")
    from_file = metric(str(photos[0]))
    scorer = Scorer(piqa_file, device="cpu", isp=csv_path)
    assert from_file.shape == (1, 1)
    assert_close(from_file[0], scorer.score(photos[0])["score"], rtol=RTOL, atol=ATOL)  # the same reader
    # Tensors of any size; the prompt is encoded once, however many calls.
    seen: list[int] = []
    features = metric.net.net.image_features
    metric.net.net.image_features = lambda pixels: seen.append(pixels.shape[0]) or features(pixels)
    x = torch.rand(2, 3, 70, 90)
    first, second = metric(x), metric(x)
    assert first.shape == (2, 1) and torch.equal(first, second) and seen == [2, 2]
    model = gamma.create_model(pretrained=piqa_file)
    prompt = torch.stack([load_promptiqa_image(p, 48) for p in read_prompt_file(csv_path).images])
    with torch.inference_mode():
        assert_close(first[:, 0], model(x, prompt=(prompt, scores)), rtol=RTOL, atol=ATOL)
    # as a loss: gradients reach the input
    loss = pyiqa.create_metric("promptiqa", device="cpu", as_loss=True, isp=str(csv_path),
                               pretrained_model_path=str(piqa_file))
    y = torch.rand(1, 3, 48, 48, requires_grad=True)
    loss(y).sum().backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0
