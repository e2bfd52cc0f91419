"""The paper's protocols as shipped option files: Gamma-T provenance, Appendix B (Tables 12-14), the datasets they need
(BID, AIGCIQA2023, FLIVE) and the converter of LIQE's split lists (docs/paper-protocols.md)."""

from __future__ import annotations

import csv
import importlib.util
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gamma
from gamma.data import DATASETS, DatasetEntry, build_dataset, get_dataset_info, load_split_file
from gamma.prompts import DATASET_SCENES
from gamma.train.config import load_config
from gamma.train.main import main

REPO = Path(__file__).resolve().parents[1]
OPTIONS = REPO / "options"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


liqe = _load_script("liqe_splits")


# ----------------------------------------------------------------------------------------------------- registry
def test_registry_has_the_appendix_and_attiqa_datasets():
    expected = {  # name: (scene, lower_better, range, kind, eval_key, images)
        "bid": ("natural", False, (0.0, 5.0), "nr", "val", 586),
        "aigciqa2023": ("aigc", False, (0.0, 100.0), "nr", "val", 2400),
        "flive": ("natural", False, (0.0, 100.0), "nr", "test", None),
    }
    for name, (scene, lower, rng, kind, eval_key, n) in expected.items():
        info = DATASETS[name]
        assert (info.scene, info.lower_better, info.mos_range, info.kind, info.eval_key, info.num_images) == (
            scene, lower, rng, kind, eval_key, n), name
        assert DATASET_SCENES[name] == scene
        assert info.meta_file.startswith("meta_info/meta_info_") and info.meta_file.endswith("Dataset.csv")
    assert DATASETS["flive"].meta_file == "meta_info/meta_info_FLIVEDataset.csv"  # pyiqa's own names
    assert DATASETS["flive"].split_file == "meta_info/flive_official.pkl"
    aliases = {"AIGC2023": "aigciqa2023", "AIGCIQA2023": "aigciqa2023", "PaQ-2-PiQ": "flive", "BID": "bid"}
    for alias, key in aliases.items():
        assert get_dataset_info(alias).name == key
    entry = DatasetEntry(name="aigc2023", split_index="all")
    assert entry.name == "aigciqa2023" and entry.scene == "aigc" and entry.mos_range == (0.0, 100.0)


def test_flive_held_out_part_is_the_official_test_set(tmp_path):
    root = tmp_path / "data"
    folder = root / "FLIVE_Database" / "database"
    names = [f"voc/img_{i}.jpg" for i in range(4)] + ["voc/img_0_patch_1.jpg"]
    rng = np.random.default_rng(0)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / n)
    (root / "meta_info").mkdir()
    (root / "meta_info" / "meta_info_FLIVEDataset.csv").write_text(
        "img_name/patch_name,mos,split\n" + "".join(f"{n},{60 + i},{i % 3}\n" for i, n in enumerate(names)))
    with open(root / "meta_info" / "flive_official.pkl", "wb") as fh:
        pickle.dump({1: {"train": [0, 4], "val": [1], "test": [2, 3]}}, fh)
    entry = DatasetEntry(name="flive", data_root=str(root))
    held = build_dataset(entry, entry.eval_key)
    assert [held[i]["path"].rsplit("/", 1)[-1] for i in range(len(held))] == ["img_2.jpg", "img_3.jpg"]
    assert float(held[0]["mos"]) == pytest.approx(0.62)


# ------------------------------------------------------------------------------------------- LIQE's split lists
def _liqe_lists(folder: Path, prefix: str, parts: dict[int, dict[str, list[str]]]) -> None:
    for k, lists in parts.items():
        (folder / str(k)).mkdir(parents=True, exist_ok=True)
        for part, paths in lists.items():
            (folder / str(k) / f"{prefix}_{part}_clip.txt").write_text(
                "".join(f"{p}\t{50 + i}\trealistic blur\tanimal\tinvalid\tinvalid\n" for i, p in enumerate(paths)))


def test_liqe_lists_map_to_meta_rows_by_path_suffix(tmp_path, caplog):
    # LIVE-like: the same file name in two distortion folders, listed relative to another folder than the meta's.
    meta = ["databaserelease2/jp2k/img1.bmp", "databaserelease2/jpeg/img1.bmp", "databaserelease2/jp2k/img2.bmp",
            "databaserelease2/wn/img3.bmp", "databaserelease2/wn/img4.bmp"]
    _liqe_lists(tmp_path / "splits2", "live", {
        1: {"train": ["jp2k/img1.bmp", "jp2k/img2.bmp", "wn/img4.bmp"], "val": ["wn/img3.bmp"],
            "test": ["jpeg/img1.bmp"]},
        2: {"train": ["jpeg/img1.bmp", "wn/img3.bmp", "wn/img4.bmp"], "test": ["jp2k/img1.bmp", "jp2k/img2.bmp"]},
    })
    with caplog.at_level(logging.WARNING):
        splits = liqe.convert(tmp_path / "splits2", "live", meta, splits=[1, 2])
    assert splits[1] == {"train": [0, 2, 4], "val": [3], "test": [1]}
    assert splits[2] == {"train": [1, 3, 4], "val": [], "test": [0, 2]}
    assert "live_val_clip.txt is missing" in caplog.text


def test_liqe_lists_errors_name_file_and_line(tmp_path):
    _liqe_lists(tmp_path / "a", "bid", {1: {"train": ["ImageDatabase/DatabaseImage0001.JPG", "ImageDatabase/x.JPG"]}})
    with pytest.raises(ValueError, match=r"bid_train_clip.txt, line 2: 'ImageDatabase/x.JPG' is not in the meta"):
        liqe.convert(tmp_path / "a", "bid", ["ImageDatabase/DatabaseImage0001.JPG"], splits=[1])
    _liqe_lists(tmp_path / "b", "live", {1: {"test": ["img1.bmp"]}})  # a bare name that two rows share
    with pytest.raises(ValueError, match=r"line 1: 'img1.bmp' matches 2 meta rows"):
        liqe.convert(tmp_path / "b", "live", ["jp2k/img1.bmp", "jpeg/img1.bmp"], splits=[1])
    with pytest.raises(FileNotFoundError, match="no bid_"):
        liqe.convert(tmp_path / "a", "bid", ["x"], splits=[2])


def test_liqe_splits_cli_writes_a_split_file_gamma_reads(tmp_path, capsys):
    meta = tmp_path / "meta_info" / "meta_info_BIDDataset.csv"
    meta.parent.mkdir()
    names = [f"ImageDatabase/DatabaseImage{i:04d}.JPG" for i in range(1, 11)]
    meta.write_text("image_name,mos\n" + "".join(f"{n},{i / 2}\n" for i, n in enumerate(names)))
    _liqe_lists(tmp_path / "splits2", "bid", {k: {"train": names[:7], "val": names[7:8], "test": names[8:]}
                                              for k in range(1, 11)})
    out = tmp_path / "meta_info" / "bid_liqe_10split.pkl"
    args = ["bid", str(tmp_path / "splits2"), "-o", str(out), "--data-root", str(tmp_path)]
    assert liqe.main(args) == 0
    assert "split 1 has 7 / 1 / 2 train / val / test" in capsys.readouterr().out
    splits = load_split_file(out)
    assert sorted(splits) == list(range(1, 11)) and splits[3] == {"train": list(range(7)), "val": [7], "test": [8, 9]}
    with pytest.raises(SystemExit):  # refuses to overwrite
        liqe.main(args)


# ---------------------------------------------------------------------------------------------- option files
def test_gamma_t_options_follow_the_release_where_it_has_configs(monkeypatch):
    monkeypatch.setenv("GAMMA_DATA_ROOT", "/datasets")
    koniq = load_config(OPTIONS / "task" / "koniq10k.yml")
    assert (koniq.optim.lr, koniq.epochs, koniq.batch_size, koniq.eval.every, koniq.seed) == (2e-4, 20, 8, 2, 123)
    assert koniq.optim.scheduler == "cosine" and koniq.optim.min_lr == 0.0  # T_max = epochs, eta_min 0
    livec = load_config(OPTIONS / "task" / "livec.yml")
    assert (livec.optim.lr, livec.epochs, livec.batch_size, livec.eval.every) == (2e-4, 50, 8, 1)
    for f in sorted((OPTIONS / "task").glob("*.yml")):
        if f.stem not in ("koniq10k", "livec"):
            cfg = load_config(f)
            assert (cfg.optim.lr, cfg.eval.every) == (2e-5, 1), f.name  # paper A.2; every epoch
    assert load_config(OPTIONS / "unified.yml").eval.every == 5  # the release's unified config


def test_appendix_b_options_have_the_tables_layout(monkeypatch):
    monkeypatch.setenv("GAMMA_DATA_ROOT", "/datasets")
    t12 = load_config(OPTIONS / "appendix_b" / "t12_liqe_setting.yml")
    assert [e.name for e in t12.data] == ["live", "csiq", "kadid10k", "bid", "livec", "koniq10k"]
    assert all(e.eval_key == "test" and e.split_file.endswith("_liqe_10split.pkl") for e in t12.data)
    assert t12.model.overrides == {"prompt_set": "sdp"} and not t12.eval_only
    t13 = load_config(OPTIONS / "appendix_b" / "t13_cross_dataset.yml")
    assert [e.name for e in t13.data] == ["tid2013", "spaq", "aigciqa2023"] and t13.eval_only
    assert all(e.split_index == "all" for e in t13.data) and t13.data[2].scene == "aigc"
    assert t13.model.pretrained == f"{t12.output_dir}/{t12.name}/split_1/best.pth"
    t13u = load_config(OPTIONS / "appendix_b" / "t13_unified_aigciqa2023.yml")
    assert t13u.eval_only and t13u.model.pretrained == "gamma_sdp" and [e.name for e in t13u.data] == ["aigciqa2023"]
    t14 = load_config(OPTIONS / "appendix_b" / "t14_qalign_setting.yml")
    assert [e.name for e in t14.data] == ["koniq10k", "spaq", "kadid10k"] and t14.model.overrides["prompt_set"] == "sdp"


def _fake_dataset(root: Path, name: str, n: int, three_parts: bool, rng: np.random.Generator) -> None:
    """``n`` small images of registered dataset ``name`` at its registry paths, in its meta format, with a split file
    (train / val / test when ``three_parts``, else train / held-out)."""
    info = DATASETS[name]
    lo, hi = info.mos_range
    (root / info.root).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / info.root / f"{name}_{i}.png")
        mos = f"{lo + (hi - lo) * (i + 0.5) / n:.4f}"
        rows.append([f"ref{i // 2}.png", f"{name}_{i}.png", mos] if info.kind == "fr" else [f"{name}_{i}.png", mos])
    if info.kind == "livec":
        rows = [[f"dropped_{k}.bmp", "50"] for k in range(7)] + rows
    meta = root / info.meta_file
    meta.parent.mkdir(parents=True, exist_ok=True)
    with open(meta, "w", newline="") as fh:
        csv.writer(fh).writerows([["ref_name", "dist_name", "mos"] if info.kind == "fr" else ["image", "mos"], *rows])
    if three_parts:
        split = {k: {"train": list(range(n - 3)), "val": [n - 3], "test": [n - 2, n - 1]} for k in range(1, 11)}
        target = root / "meta_info" / f"{name}_liqe_10split.pkl"
    else:
        split = {k: {"train": list(range(n - 2)), info.eval_key: [n - 2, n - 1]} for k in range(1, 11)}
        target = root / info.split_file
    with open(target, "wb") as fh:
        pickle.dump(split, fh)


def test_table_12_run_then_table_13_cross_dataset_test(tmp_path, monkeypatch):
    """t12_liqe_setting.yml trains (tiny model, two steps) and t13_cross_dataset.yml tests its checkpoint on every
    image of three unseen datasets, as shipped: only the model size, run length and output folder are overridden."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for name in ("live", "csiq", "kadid10k", "bid", "livec", "koniq10k"):
        _fake_dataset(data, name, 6, three_parts=True, rng=rng)
    for name in ("tid2013", "spaq", "aigciqa2023"):
        _fake_dataset(data, name, 5, three_parts=False, rng=rng)
    torch.save(gamma.create_model("gamma_test", moae_layers=0, num_experts=0).clip_model.state_dict(),
               tmp_path / "uniqa.pt")
    monkeypatch.setenv("GAMMA_DATA_ROOT", str(data))
    monkeypatch.setenv("GAMMA_UNIQA_WEIGHTS", str(tmp_path / "uniqa.pt"))
    common = [f"output_dir={tmp_path / 'runs'}", "workers=0", "eval.crops=1", "log.progress=false",
              "log.tensorboard=false"]
    t12 = main(["-opt", str(OPTIONS / "appendix_b" / "t12_liqe_setting.yml"), "model.name=gamma_test", "epochs=1",
                "max_steps_per_epoch=2", *common])
    assert t12["finished"] and list(t12["best"]["datasets"]) == ["live", "csiq", "kadid10k", "bid", "livec",
                                                                 "koniq10k"]
    assert all(m["n"] == 2 for m in t12["best"]["datasets"].values())  # the 'test' parts
    best = tmp_path / "runs" / "gamma_t12_liqe" / "split_1" / "best.pth"
    t13 = main(["-opt", str(OPTIONS / "appendix_b" / "t13_cross_dataset.yml"), "model.name=gamma_test",
                f"model.pretrained={best}", *common])
    assert list(t13["best"]["datasets"]) == ["tid2013", "spaq", "aigciqa2023"]
    assert all(m["n"] == 5 for m in t13["best"]["datasets"].values())  # every image, no split file read
