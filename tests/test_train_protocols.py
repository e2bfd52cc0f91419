"""Paper protocols in the trainer: Table 15 as an evaluation of one model with several prompt sets, final and best
figures (best chosen on the held-out part or on a holdout of the training part), the evaluation schedule, the
release's drop_last, and the release's image decoding as a per-dataset switch."""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import perturb_moae, write_noise_dataset
from PIL import Image, ImageFile

import gamma
from gamma.data import DatasetEntry, build_dataset, read_meta
from gamma.io import ImageDecodeError, load_image, load_image_release
from gamma.train.config import ConfigError, load_config
from gamma.train.evaluate import median_table, table_csv, table_markdown
from gamma.train.main import main
from gamma.train.sampling import EpochPlan
from gamma.train.selection import carve_holdout
from gamma.weights import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _entry(name: str, folder: str, lo: float, hi: float, **more) -> dict:
    return {"name": name, "root": f"{folder}/img", "meta_file": f"{folder}/meta.csv",
            "split_file": f"{folder}/split.pkl", "mos_range": [lo, hi], **more}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Two datasets (60 pictures on 0-100, 30 on 1-5 of another scene) and a base option file for the tiny model."""
    root = tmp_path_factory.mktemp("protocols")
    write_noise_dataset(root / "data", "alpha", 60, 0, 100, seed=3, size=(40, 48))
    write_noise_dataset(root / "data", "beta", 30, 1, 5, seed=4, size=(48, 40))
    options = {
        "name": "tiny", "output_dir": str(root / "runs"), "epochs": 2, "batch_size": 8, "workers": 0,
        "device": "cpu", "model": {"name": "gamma_test_sdp"}, "optim": {"lr": 3e-3, "scheduler": "constant"},
        "data_root": str(root / "data"),
        "data": [_entry("alpha", "alpha", 0, 100), _entry("beta", "beta", 1, 5, scene="aigc")],
        "eval": {"crops": 2},
        "log": {"every_steps": 1, "progress": False, "tensorboard": False},
    }
    (root / "base.yml").write_text(yaml.safe_dump(options, sort_keys=False))
    return root


def run(workspace: Path, *overrides: str) -> dict:
    return main(["-opt", str(workspace / "base.yml"), *overrides])


# ------------------------------------------------------------------------------------- Table 15: prompt sets
def test_table15_option_files_evaluate_one_sdp_model_with_each_prompt_set(monkeypatch):
    monkeypatch.setenv("GAMMA_DATA_ROOT", "/datasets")
    options = REPO / "options" / "ablation"
    table = load_config(options / "prompts_table15.yml")
    assert table.eval_only and table.model.pretrained == "gamma_sdp"
    assert table.model.overrides["prompt_set"] == "sdp"  # an SDP-trained model
    assert table.eval.prompt_sets == ["naive", "quality", "sdp"]
    assert table.eval.datasets == ["livec", "koniq10k", "live", "csiq", "agiqa3k", "uwiqa", "ava"]
    for row, sets in (("general", ["naive"]), ("quality", ["quality"]), ("sdp", ["sdp"])):
        cfg = load_config(options / f"prompts_{row}.yml")
        assert cfg.eval_only and cfg.model.pretrained == "gamma_sdp" and cfg.eval.prompt_sets == sets
        retrain = load_config(options / f"prompts_{row}_retrain.yml")
        assert not retrain.eval_only and retrain.eval.prompt_sets is None
        assert retrain.model.overrides.get("prompt_set", "naive") == {"general": "naive"}.get(row, row)
        assert retrain.name.endswith("_retrain")
    shown = main(["-opt", str(options / "prompts_table15.yml"), "--print_config"])["config"]
    assert shown["eval"]["prompt_sets"] == ["naive", "quality", "sdp"] and shown["eval_only"] is True


def test_prompt_sets_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"eval\.prompt_sets\.1: unknown prompt set 'qualty' \(did you mean"):
        load_config(None, ["eval.prompt_sets=[naive,qualty]"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, ["eval.prompt_sets=[sdp,sdp]"])
    with pytest.raises(ConfigError, match="holdout_fraction"):
        load_config(None, ["eval.holdout_fraction=1.5"])


def test_set_prompt_set_changes_only_the_text_side(tiny_sdp_model):
    model = tiny_sdp_model.eval()
    perturb_moae(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdp = model(x, scene="aigc")
        model.set_prompt_set("quality")
        quality = model(x, scene="aigc")
        model.set_prompt_set("sdp")
        again = model(x, scene="aigc")
    assert not torch.allclose(sdp, quality, rtol=0, atol=1e-6)
    assert torch.equal(sdp, again)  # the same ops on the same weights
    assert model.config.prompt_set == "sdp" and list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="prompt_set"):
        model.set_prompt_set("fancy")


def test_prompt_analysis_scores_one_model_with_three_prompt_sets_and_writes_a_table(workspace):
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test_sdp")
    perturb_moae(model)
    weights = save_checkpoint(model, workspace / "sdp_model.pth")
    common = ["eval_only=true", f"model.pretrained={weights}"]
    out = run(workspace, "name=t15", *common, "eval.prompt_sets=[naive,quality,sdp]")
    sets = out["final"]["prompt_sets"]
    assert list(sets) == ["naive", "quality", "sdp"] and out["headline_prompt_set"] == "sdp"
    plccs = {ps: r["datasets"]["beta"]["plcc"] for ps, r in sets.items()}
    assert len(set(plccs.values())) == 3, plccs  # the text side differs, so do the scores
    # The sdp row is the model scored as it is; the naive row is the same file loaded as a naive-prompt model.
    plain = run(workspace, "name=t15_plain", *common)
    assert sets["sdp"]["datasets"] == plain["final"]["datasets"]
    # Loading it with other prompts than it records must be said to be deliberate (model.prompt_set_override).
    with pytest.raises(ConfigError, match=r"records prompt set 'sdp'.*'naive' contradicts it.*"
                       r"model\.prompt_set_override=true"):
        run(workspace, "name=t15_naive", *common, "model.overrides.prompt_set=naive")
    assert not (workspace / "runs" / "t15_naive" / "split_1" / "results.json").exists()
    naive = run(workspace, "name=t15_naive", *common, "model.overrides.prompt_set=naive",
                "model.prompt_set_override=true")
    assert sets["naive"]["datasets"] == naive["final"]["datasets"]
    md = (Path(out["run_dir"]) / "table.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines()[2:5]]
    assert rows == ["naive prompts, evaluation", "quality prompts, evaluation", "sdp prompts, evaluation"]
    assert "Evaluated epochs: 0." in md and "Evaluation only" in md
    summary = main(["--table", str(workspace / "runs" / "t15")])["table"]  # the median table of its split folders
    assert [(r["prompt_set"], r["kind"]) for r in summary["rows"]] == [("naive", "final"), ("quality", "final"),
                                                                      ("sdp", "final")]
    quality = sets["quality"]["datasets"]["alpha"]["srcc"]
    assert summary["rows"][1]["datasets"]["alpha"]["srcc"] == pytest.approx(quality)


# -------------------------------------------------------------------------------------------- final and best
def _history(out: dict) -> dict[int, dict]:
    return {h["epoch"]: h for h in out["history"]}


def test_final_and_best_are_both_reported_and_differ_when_the_best_epoch_is_not_the_last(workspace):
    """Evaluated on labels turned the other way round from its training labels, a run gets worse as it trains, so
    its best evaluated epoch is an early one (the untrained model at epoch 0, or epoch 1) and not the last."""
    flipped = _entry("alpha_flipped", "alpha", 0, 100, lower_better=True)
    out = run(workspace, "name=flip", "epochs=3", "eval.at_start=true", "data=[{name: alpha, root: alpha/img, "
              "meta_file: alpha/meta.csv, split_file: alpha/split.pkl, mos_range: [0, 100]}]",
              f"eval_data=[{json.dumps(flipped)}]", "eval.datasets=[alpha_flipped]")
    history = _history(out)
    assert out["evaluated_epochs"] == [0, 1, 2, 3] and out["headline"] == "final"
    assert out["final"]["epoch"] == 3 and out["final"]["datasets"] == history[3]["datasets"]
    srcc = {e: h["mean"]["srcc"] for e, h in history.items()}
    assert srcc[0] - srcc[3] > 0.1, srcc  # training moved it away from the flipped labels
    best = out["best"]
    assert best["epoch"] == max(srcc, key=lambda e: (srcc[e], -e)) != 3 and best["selected_on"] == "test"
    assert best["datasets"] == history[best["epoch"]]["datasets"]
    table = json.loads((Path(out["run_dir"]) / "table.json").read_text())
    rows = {r["kind"]: r for r in table["rows"]}
    assert list(rows) == ["final", "best", "best_per_dataset"] and table["headline"] == "final"
    assert rows["final"]["datasets"]["alpha_flipped"]["srcc"] == pytest.approx(srcc[3])
    assert rows["best"]["datasets"]["alpha_flipped"]["srcc"] == pytest.approx(srcc[best["epoch"]])
    assert rows["final"]["datasets"]["alpha_flipped"]["srcc"] != rows["best"]["datasets"]["alpha_flipped"]["srcc"]
    md = (Path(out["run_dir"]) / "table.md").read_text()
    assert "| final (epoch 3) |" in md and "| best (selected on the held-out split) |" in md
    assert "Evaluated epochs: 0, 1, 2, 3." in md and f"epochs chosen: {best['epoch']}" in md
    header = (Path(out["run_dir"]) / "table.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["dataset", "title", "final_srcc", "final_plcc", "final_krcc"]
    assert "best_srcc" in header and "best_per_dataset_srcc" in header


def test_best_per_dataset_is_each_datasets_own_best_epoch(workspace):
    out = run(workspace, "name=per_dataset", "epochs=3")
    history = _history(out)
    for name, row in out["best_per_dataset"]["datasets"].items():
        values = [history[e]["datasets"][name]["srcc"] for e in out["evaluated_epochs"]]
        assert row["srcc"] == max(values)
        assert history[row["epoch"]]["datasets"][name]["srcc"] == row["srcc"]
        assert row["epoch"] == max(e for e in out["evaluated_epochs"] if history[e]["datasets"][name]["srcc"]
                                   == row["srcc"])  # a tie goes to the later epoch, as in the release


def test_evaluation_schedule_every_n_epochs_and_the_last(workspace):
    out = run(workspace, "name=every", "epochs=5", "eval.every=2", "max_steps_per_epoch=1")
    assert out["evaluated_epochs"] == [2, 4, 5]
    assert "Evaluated epochs: 2, 4, 5." in (Path(out["run_dir"]) / "table.md").read_text()
    assert (Path(out["run_dir"]) / "predictions_final" / "alpha.csv").is_file()


def test_best_can_be_chosen_on_a_holdout_of_the_training_part(workspace):
    out = run(workspace, "name=holdout", "epochs=3", "eval.select_on=train_holdout", "eval.holdout_fraction=0.25")
    sel = out["selection"]
    assert sel["on"] == "train_holdout" and sel["holdout_fraction"] == 0.25
    assert sel["holdout_images"] == {"alpha": 12, "beta": 6}  # 25% of the 48 and 24 training images
    log = (Path(out["run_dir"]) / "train.log").read_text()
    assert "training on 54 images" in log  # 72 minus the holdouts
    history = _history(out)
    chosen = {e: h["selection"]["mean"]["srcc"] for e, h in history.items()}
    best = out["best"]
    assert best["epoch"] == max(chosen, key=lambda e: (chosen[e], -e)) and best["selected_on"] == "train_holdout"
    assert best["datasets"] == history[best["epoch"]]["datasets"]  # the held-out figures of the chosen epoch
    assert set(best["selection"]["datasets"]) == {"alpha", "beta"}
    md = (Path(out["run_dir"]) / "table.md").read_text()
    assert "best (selected on a holdout of the training part)" in md and "25% of each training part" in md


def test_holdout_is_seeded_disjoint_and_keeps_content_groups_together(tmp_path):
    folder = tmp_path / "fr"
    (folder / "img").mkdir(parents=True)
    rows = []
    for ref in range(10):  # 10 reference pictures x 4 distorted versions
        for k in range(4):
            name = f"r{ref}_{k}.png"
            Image.new("RGB", (8, 8), (ref * 20, k * 50, 0)).save(folder / "img" / name)
            rows.append((f"ref{ref}.png", name, f"{ref + k / 4:.2f}"))
    with open(folder / "meta.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ref_name", "dist_name", "mos"])
        w.writerows(rows)
    entry = DatasetEntry.from_dict({"name": "fr", "root": str(folder / "img"), "meta_file": str(folder / "meta.csv"),
                                    "kind": "fr", "mos_range": [0, 10], "split_index": "all"})
    ds = build_dataset(entry, "train")
    train, hold = carve_holdout(ds, 0.2, seed=7)
    assert sorted(train.rows + hold.rows) == ds.rows and not set(train.rows) & set(hold.rows)
    assert len(hold) == 8  # 20% of 40 = 8: two whole reference groups
    groups = read_meta(folder / "meta.csv", "fr").groups()
    assert not {groups[r] for r in hold.rows} & {groups[r] for r in train.rows}
    assert carve_holdout(ds, 0.2, seed=7)[1].rows == hold.rows
    assert carve_holdout(ds, 0.2, seed=8)[1].rows != hold.rows
    assert hold.phase == "val" and hold[0]["img"].shape == (3, 8, 8)  # scored whole, like the test part


# -------------------------------------------------------------------------------------------- table readers
def test_results_json_of_older_gamma_is_still_summarised(tmp_path):
    """A results.json from before final/best: 'last' (the final evaluation) and 'best'."""
    def old(k: int, final: float, best: float) -> dict:
        per = lambda v: {"koniq10k": {"srcc": v, "plcc": v, "krcc": v, "n": 10}}  # noqa: E731
        return {"split_index": k, "finished": True, "best": {"epoch": 1, "mean": {}, "datasets": per(best)},
                "last": {"epoch": 2, "mean": {}, "datasets": per(final)},
                "history": [{"kind": "eval", "epoch": 1}, {"kind": "eval", "epoch": 2}]}

    for k, (final, best) in enumerate([(0.8, 0.9), (0.7, 0.95), (0.6, 0.85)], start=1):
        (tmp_path / f"split_{k}").mkdir()
        (tmp_path / f"split_{k}" / "results.json").write_text(json.dumps(old(k, final, best)))
    table = main(["--table", str(tmp_path)])["table"]
    assert [r["kind"] for r in table["rows"]] == ["final", "best"] and table["headline"] == "final"
    assert table["datasets"]["koniq10k"]["srcc"] == pytest.approx(0.7)
    assert table["rows"][1]["datasets"]["koniq10k"]["srcc"] == pytest.approx(0.9)
    assert table["evaluated_epochs"] == [1, 2]
    with pytest.raises(ValueError, match="split 4 has no evaluation results"):
        median_table([{"split_index": 4, "finished": True, "history": []}])


def test_table_markdown_and_csv_of_several_kinds():
    per = lambda s, p: {"live": {"srcc": s, "plcc": p, "krcc": s, "n": 5}}  # noqa: E731
    results = [{"split_index": k, "finished": True, "evaluated_epochs": [5, 10],
                "final": {"epoch": 10, "datasets": per(0.90 + k / 100, 0.91)},
                "best": {"epoch": 5, "datasets": per(0.95, 0.96)},
                "best_per_dataset": {"datasets": {"live": {"srcc": 0.97, "plcc": 0.97, "krcc": 0.9, "epoch": 5}}},
                "selection": {"on": "test"}} for k in (1, 2, 3)]
    table = median_table(results)
    md = table_markdown(table, "Gamma")
    assert md.splitlines()[0] == "| Gamma | LIVE | mean |"
    assert "| final (epoch 10) | .920/.910 | .920/.910 |" in md
    assert "| best (selected on the held-out split) | .950/.960 |" in md
    assert "Evaluated epochs: 5, 10." in md and "epochs chosen: 5, 5, 5" in md
    lines = list(csv.reader(io.StringIO(table_csv(table))))
    assert lines[1][:2] == ["live", "LIVE"] and float(lines[1][2]) == pytest.approx(0.92)
    assert float(lines[1][lines[0].index("best_srcc")]) == pytest.approx(0.95)


# --------------------------------------------------------------------------------------------------- drop_last
def test_drop_last_leaves_out_the_partial_batch(workspace):
    plan = EpochPlan([10, 7], batch_size=4, seed=1)
    dropped = EpochPlan([10, 7], batch_size=4, seed=1, drop_last=True)
    assert (plan.steps_per_epoch, dropped.steps_per_epoch) == (5, 4)
    assert [s.index for b in dropped.micro_batches(0) for s in b] == plan.order(0).tolist()[:16]
    out = run(workspace, "name=drop", "epochs=1", "drop_last=true", "batch_size=16")  # 72 images: 4 steps, not 5
    assert out["global_step"] == 4 and len(out["step_losses"]) == 4
    with pytest.raises(ConfigError, match="fewer than one batch"):
        run(workspace, "name=drop_big", "epochs=1", "drop_last=true", "batch_size=80")


# ------------------------------------------------------------------------------------------ release decoding
def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea()).resize((64, 48), Image.BICUBIC)


def test_release_decoding_skips_exif_and_accepts_truncated_files(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated by 90 degrees
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(_jpeg(photo, exif=exif.tobytes()))
    assert load_image(rotated).shape == (3, 64, 48)  # gamma: as displayed
    assert load_image_release(rotated).shape == (3, 48, 64)  # release: as stored
    truncated = tmp_path / "truncated.jpg"
    whole_file = _jpeg(photo)
    truncated.write_bytes(whole_file[: len(whole_file) * 3 // 5])
    with pytest.raises(ImageDecodeError, match="truncated.jpg: corrupt or truncated"):
        load_image(truncated)
    x = load_image_release(truncated)
    with Image.open(io.BytesIO(whole_file)) as whole:  # the decoded top rows are the file's own
        top = torch.from_numpy(np.asarray(whole.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[:, :8]
    assert x.shape == (3, 48, 64) and torch.allclose(x[:, :8], top, atol=2 / 255)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # PIL's global is back
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image_release(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image_release(b"plain text, not a picture")


def test_release_decoding_in_one_thread_never_lets_truncated_files_through_in_another(tmp_path, photo):
    truncated = _jpeg(photo)[:900]
    failures, successes, errors = [], [], []

    def gamma_decodes() -> None:
        for _ in range(40):
            try:
                load_image(truncated)
                errors.append("gamma decoded a truncated file")
            except ImageDecodeError:
                failures.append(1)

    def release_decodes() -> None:
        for _ in range(40):
            successes.append(load_image_release(truncated).shape)

    threads = [threading.Thread(target=f) for f in (gamma_decodes, release_decodes, gamma_decodes, release_decodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(failures) == 80 and len(successes) == 80
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_switch_per_dataset_entry(tmp_path, photo):
    folder = tmp_path / "ava_like"
    (folder / "img").mkdir(parents=True)
    for i in range(4):
        (folder / "img" / f"{i}.jpg").write_bytes(_jpeg(photo.rotate(90 * i)))
    (folder / "img" / "2.jpg").write_bytes(_jpeg(photo)[:900])  # one truncated file, as AVA has
    (folder / "meta.csv").write_text("image,mos\n" + "".join(f"{i}.jpg,{i + 1}\n" for i in range(4)))
    base = {"name": "mine", "root": str(folder / "img"), "meta_file": str(folder / "meta.csv"), "mos_range": [1, 5],
            "split_index": "all"}
    strict = build_dataset(base, "test")
    with pytest.raises(ImageDecodeError, match=r"2\.jpg: corrupt or truncated.*dataset 'mine'"):
        strict[2]
    release = build_dataset({**base, "decode": "release"}, "test")
    assert release[2]["img"].shape == (3, 48, 64)
    assert torch.equal(release[0]["img"], strict[0]["img"])  # an ordinary file decodes the same either way
    with pytest.raises(ValueError, match="decode must be one of gamma, release"):
        DatasetEntry.from_dict({**base, "decode": "pil"})
    cfg = load_config(None, [f"data=[{json.dumps({**base, 'decode': 'release'})}]"])
    assert cfg.data[0].decode == "release"
