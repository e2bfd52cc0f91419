"""Dataset protocols of ATTIQA and PromptIQA: FLIVE's patch rows left out, reference-grouped splits checked and
computed, and the shipped option files asking for both (docs/paper-protocols.md, docs/datasets.md)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from gamma.data import build_dataset, save_splits
from gamma.data.datasets import is_patch
from gamma.data.registry import DATASETS
from gamma.data.splits import leaking_groups
from gamma.data.splits import main as make_splits_main
from gamma.train.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _photo(path: Path, seed: int, size: int = 24) -> None:
    """A small crop of a real photo (skimage's astronaut), shifted by ``seed``."""
    img = skdata.astronaut()
    y, x = (seed * 7) % (img.shape[0] - size), (seed * 13) % (img.shape[1] - size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img[y : y + size, x : x + size]).save(path)


# ------------------------------------------------------------------------------------------------------ FLIVE
def flive_like(root: Path, pictures: int = 8, patches: int = 3) -> dict:
    """A FLIVE-like dataset in pyiqa's layout (its scripts/process_flive.py): meta header 'img_name/patch_name, mos,
    split', every whole picture first, then the patches '<folder>/<picture>_patch_<k>.jpg', and one official split
    ({1: train / val / test}) that indexes pictures and patches alike (a patch on the side of its picture)."""
    names = [f"voc_emotic_ava/pic{i:03d}.jpg" for i in range(pictures)]
    patch_names = [f"voc_emotic_ava/pic{i:03d}_patch_{k}.jpg" for i in range(pictures) for k in range(1, patches + 1)]
    for j, n in enumerate(names + patch_names):
        _photo(root / "FLIVE_Database/database" / n, j)
    side = {i: (2 if i % 4 == 0 else 1 if i % 4 == 1 else 0) for i in range(pictures)}  # test, val, train
    rows = [(n, 40 + i, side[i]) for i, n in enumerate(names)]
    rows += [(n, 50 + j % 30, side[j // patches]) for j, n in enumerate(patch_names)]
    meta = root / "meta_info/meta_info_FLIVEDataset.csv"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text("img_name/patch_name,mos,split\n" + "".join(f"{n},{m},{s}\n" for n, m, s in rows))
    split = {1: {k: [r for r, (_, _, s) in enumerate(rows) if s == code] for code, k in enumerate(("train", "val",
                                                                                                   "test"))}}
    with open(root / "meta_info/flive_official.pkl", "wb") as fh:
        pickle.dump(split, fh)
    return {"name": "flive", "root": "FLIVE_Database/database", "meta_file": "meta_info/meta_info_FLIVEDataset.csv",
            "split_file": "meta_info/flive_official.pkl", "eval_key": "test", "mos_range": [0, 100], "kind": "nr",
            "scene": "natural", "crop_size": 16, "data_root": str(root)}


def test_flive_patch_rows_left_out_in_every_phase(tmp_path):
    entry = flive_like(tmp_path)
    for phase, n_pictures in (("train", 4), ("test", 2)):
        full = build_dataset(entry, phase)
        kept = build_dataset({**entry, "exclude_patches": True}, phase)
        assert any(is_patch(p) for p in full.paths), "the unfiltered file holds patches"
        assert not any(is_patch(p) for p in kept.paths)
        assert len(kept) == n_pictures
        assert len(full) == n_pictures * 4  # each picture and its three patches
        assert set(kept.paths) == {p for p in full.paths if "_patch_" not in Path(p).name}
        item = kept[0]
        assert item["img"].shape[0] == 3 and item["path"].endswith(".jpg")
    everything = build_dataset({**entry, "exclude_patches": True, "split_index": "all"}, "test")
    assert len(everything) == 8


def test_exclude_patches_with_only_patches_is_an_error(tmp_path):
    entry = flive_like(tmp_path)
    meta = tmp_path / entry["meta_file"]
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], *(ln for ln in lines[1:] if "_patch_" in ln)]) + "\n")
    save_splits({1: {"train": [0, 1], "test": [2, 3]}}, tmp_path / "only.pkl")
    with pytest.raises(ValueError, match="patch"):
        build_dataset({**entry, "split_file": str(tmp_path / "only.pkl"), "exclude_patches": True}, "train")


def test_attiqa_options_read_flive_without_patches(tmp_path):
    files = [REPO / "options/attiqa/flive.yml", *sorted((REPO / "options/attiqa/cross").glob("*.yml"))]
    seen = 0
    for f in files:
        cfg = load_config(f, [f"data_root={tmp_path}", "model.pretrained=null", "model.name=attiqa_test"])
        for e in (*cfg.data, *cfg.eval_data):
            if e.name == "flive":
                assert e.exclude_patches, f"{f.name}: FLIVE entry without exclude_patches"
                seen += 1
    assert seen == len(files)
    entry = flive_like(tmp_path)
    cfg = load_config(REPO / "options/attiqa/flive.yml", [f"data_root={tmp_path}", "model.pretrained=null",
                                                         "model.name=attiqa_test"])
    ds = build_dataset(cfg.data[0].replace(crop_size=16, resize=0), "test")
    assert len(ds) == 2 and not any(is_patch(p) for p in ds.paths)
    assert entry["meta_file"] == cfg.data[0].meta_file


# ---------------------------------------------------------------------------------------- reference grouping
REFERENCES = {"live": 29, "csiq": 30, "tid2013": 25, "kadid10k": 81}  # PromptIQA's dataset_info.json


def fr_like(root: Path, name: str, refs: int, per_ref: int = 3) -> dict:
    """A full-reference dataset in pyiqa's meta layout (ref_name, dist_name, mos), reference by reference."""
    rows = [(f"refimgs/r{r:02d}.bmp", f"d/r{r:02d}_{k}.png", (r * per_ref + k) % 7 + 1)
            for r in range(refs) for k in range(per_ref)]
    for j, (_, d, _) in enumerate(rows):
        _photo(root / name / d, j, size=16)
    meta = root / f"meta_info/{name}.csv"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text("ref_name,dist_name,mos\n" + "".join(f"{r},{d},{m}\n" for r, d, m in rows))
    return {"name": f"my_{name}", "root": name, "meta_file": f"meta_info/{name}.csv", "kind": "fr",
            "mos_range": [0, 9], "crop_size": 8, "data_root": str(root)}


def pyiqa_reference_splits(groups: list[str], seed: int = 123) -> dict:
    """Splits as pyiqa's scripts/process_{live,csiq,tid}.py write them: shuffle the distinct references, the first
    int(0.8 * n) train, every row of a reference on its side (10 splits)."""
    random.seed(seed)
    refs = sorted(set(groups))
    out = {}
    for i in range(1, 11):
        random.shuffle(refs)
        train = set(refs[: int(0.8 * len(refs))])
        out[i] = {"train": [j for j, g in enumerate(groups) if g in train],
                  "val": [j for j, g in enumerate(groups) if g not in train], "test": []}
    return out


def test_leaking_split_file_is_an_error_naming_count_and_split(tmp_path):
    entry = fr_like(tmp_path, "live", 29)
    groups = [f"refimgs/r{r:02d}.bmp" for r in range(29) for _ in range(3)]
    rng = np.random.default_rng(0)
    splits = {}
    for k in (1, 2):  # rows shuffled one by one: references end up on both sides
        order = rng.permutation(len(groups)).tolist()
        splits[k] = {"train": sorted(order[:70]), "val": sorted(order[70:])}
    save_splits(splits, tmp_path / "rows.pkl")
    leaking = {k: {groups[r] for r in s["train"]} & {groups[r] for r in s["val"]} for k, s in splits.items()}
    assert all(leaking.values())
    unchecked = build_dataset({**entry, "split_file": "rows.pkl"}, "val")  # split_by null: read as given
    assert len(unchecked) == 17
    for k in (1, 2):
        with pytest.raises(ValueError, match=rf"split {k} puts {len(leaking[k])} of 29 reference image\(s\) on both"):
            build_dataset({**entry, "split_file": "rows.pkl", "split_by": "reference", "split_index": k}, "train")
    save_splits(pyiqa_reference_splits(groups), tmp_path / "byref.pkl")
    ok = build_dataset({**entry, "split_file": "byref.pkl", "split_by": "reference"}, "train")
    assert len(ok) == 23 * 3


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_pyiqa_format_reference_splits_leak_nothing(tmp_path, name):
    """The release's split files are not available here; pyiqa-format copies laid out as pyiqa's scripts lay them
    out (whole references per side) pass the check with 0 leaking references in each of 10 splits."""
    refs = REFERENCES[name]
    groups = [f"refimgs/r{r:02d}.bmp" for r in range(refs) for _ in range(2)]
    splits = pyiqa_reference_splits(groups)
    assert [len(leaking_groups(splits, k, "val", groups)) for k in range(1, 11)] == [0] * 10


def test_computed_reference_splits_follow_promptiqa(tmp_path):
    entry = {**fr_like(tmp_path, "tid", 25), "split_by": "reference", "split_mode": "computed"}
    train = build_dataset(entry, "train")
    held = build_dataset(entry, "val")
    refs = lambda ds: {Path(p).name.split("_")[0] for p in ds.paths}  # noqa: E731
    assert len(refs(train)) == 20 and len(refs(held)) == 5  # round(0.8 * 25) references, as toolkit.py
    assert not refs(train) & refs(held)
    assert sorted(train.rows + held.rows) == list(range(75))
    other = build_dataset({**entry, "split_index": 2}, "train")
    assert other.rows != train.rows  # a different split, not a copy
    seeded = build_dataset({**entry, "split_seed": 7}, "train")
    assert seeded.rows != train.rows
    # A relabelled copy (scripts/fr_labels.py keeps the rows in order) is split the same way.
    meta = tmp_path / entry["meta_file"]
    relabel = tmp_path / "meta_info/tid_ssim.csv"
    lines = meta.read_text().splitlines()
    relabel.write_text("\n".join([lines[0], *(f"{ln.rsplit(',', 1)[0]},0.{i % 9}" for i, ln in
                                              enumerate(lines[1:]))]) + "\n")
    copy = build_dataset({**entry, "name": "my_tid_ssim", "meta_file": "meta_info/tid_ssim.csv",
                          "mos_range": [0, 1]}, "train")
    assert copy.rows == train.rows
    nr = tmp_path / "meta_info/tid_nr.csv"
    nr.write_text("\n".join(["dist_name,mos", *(ln.split(",", 1)[1] for ln in lines[1:])]) + "\n")
    with pytest.raises(ValueError, match="reference column"):
        build_dataset({**entry, "kind": "nr", "meta_file": "meta_info/tid_nr.csv"}, "train")


def test_make_splits_check_reports_leaks(tmp_path, capsys):
    entry = fr_like(tmp_path, "csiq", 30, per_ref=2)
    meta = tmp_path / entry["meta_file"]
    out = tmp_path / "g.pkl"
    assert make_splits_main([str(meta), "--kind", "fr", "--count", "groups", "-o", str(out)]) == 0
    capsys.readouterr()
    assert make_splits_main([str(meta), "--kind", "fr", "--check", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10 and all(": 0 of 30 group(s)" in ln for ln in lines)
    save_splits({1: {"train": list(range(0, 60, 2)), "val": list(range(1, 60, 2))}}, tmp_path / "bad.pkl")
    assert make_splits_main([str(meta), "--kind", "fr", "--check", "-o", str(tmp_path / "bad.pkl")]) == 1
    assert "split 1: 30 of 30 group(s) on both sides" in capsys.readouterr().out


def test_promptiqa_options_split_synthetic_sets_by_reference(tmp_path):
    files = sorted((REPO / "options/promptiqa").glob("*.yml"))
    checked = set()
    for f in files:
        cfg = load_config(f, [f"data_root={tmp_path}", "model.pretrained=null", "model.name=promptiqa",
                              "stage=promptiqa", "eval_only=false"])
        for e in (*cfg.data, *cfg.eval_data):
            base = e.name.split("_")[0]
            if base in REFERENCES:
                assert e.split_by == "reference" and e.split_mode == "computed", f"{f.name}: {e.name}"
                checked.add(e.name)
    assert {"live", "csiq", "tid2013", "kadid10k", "tid2013_ssim", "kadid10k_lpips"} <= checked


def test_promptiqa_options_read_official_resolutions(tmp_path):
    cfg = load_config(REPO / "options/promptiqa/paper_12.yml", [f"data_root={tmp_path}"])
    roots = {e.name: e.root for e in cfg.data}
    assert roots["koniq10k"] == "koniq10k/1024x768"
    assert roots["spaq"] == "spaq/img_resize"
    official = load_config(REPO / "options/promptiqa/official_6.yml", [f"data_root={tmp_path}"])
    assert {e.name: e.root for e in official.data} == {**{e.name: e.root for e in official.data},
                                                       "koniq10k": "koniq10k/1024x768", "spaq": "spaq/img_resize"}
    # The smaller copies (the registry's folders) are the documented alternative: the entry's root on the command line.
    i = [e.name for e in official.data].index("koniq10k")
    small = load_config(REPO / "options/promptiqa/official_6.yml",
                        [f"data_root={tmp_path}", f"data.{i}.root=koniq10k/512x384"])
    assert small.data[i].root == "koniq10k/512x384" == build_default("koniq10k")


def build_default(name: str) -> str:
    return DATASETS[name].root
