"""gamma.data: registry, meta readers, splits, normalisation, DatasetEntry, build_dataset, transforms, batching.

Every file is written by the tests into tmp_path; images are tiny PNGs.
"""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gamma.data import (
    DATASETS,
    LIVEC_DROPPED_ROWS,
    UNIFIED_DATASETS,
    DatasetEntry,
    TestTransform,
    TrainTransform,
    all_split,
    balanced_weights,
    build_dataset,
    collate,
    denormalize_mos,
    ensure_min_side,
    get_dataset_info,
    load_split_file,
    make_splits,
    normalize_mos,
    read_meta,
    resize_short_side,
    save_splits,
    split_indices,
)
from gamma.data.splits import main as make_splits_main
from gamma.io import ImageDecodeError
from gamma.prompts import DATASET_SCENES

# ------------------------------------------------------------------------------------------------------ helpers


def write(path, text: str) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def coord_image(path, h: int, w: int) -> str:
    """PNG whose R channel is the row index and G the column index (h, w <= 256), so a crop reveals its offset."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    arr = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


def tiny_images(folder, names, size=(24, 32)) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        p = os.path.join(folder, n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)


def nr_dataset(tmp_path, n=10, mos=None, extra=""):
    """A custom-name NR dataset with n images and a 2-split pickle; returns the entry dict."""
    names = [f"img_{i:02d}.png" for i in range(n)]
    tiny_images(tmp_path / "imgs", names)
    mos = list(range(n)) if mos is None else mos
    rows = "".join(f"{a},{m},0.5\n" for a, m in zip(names, mos, strict=True))
    write(tmp_path / "meta.csv", "name,mos,std\n" + rows + extra)
    save_splits(make_splits(n, n_splits=2, seed=1), tmp_path / "splits.pkl")
    return {"name": "mine", "root": "imgs", "meta_file": "meta.csv", "split_file": "splits.pkl", "kind": "nr",
            "mos_range": [0, max(n - 1, 1)], "crop_size": 16, "data_root": str(tmp_path)}


# ----------------------------------------------------------------------------------------------------- registry


def test_registry_matches_design_table():
    expected = {  # docs/datasets.md#the-registered-datasets: label, (lo, hi)
        "live": ("DMOS", 1, 100), "csiq": ("DMOS", 0, 1), "tid2013": ("MOS", 0, 9), "kadid10k": ("MOS", 1, 5),
        "livec": ("MOS", 0, 100), "koniq10k": ("MOS", 0, 100), "spaq": ("MOS", 0, 100), "gfiqa20k": ("MOS", 0, 1),
        "agiqa3k": ("MOS", 0, 5), "uwiqa": ("MOS", 0, 1), "ava": ("MOS", 0, 10), "aadb": ("MOS", 0, 1),
        "exbedde": ("MOS", 0, 1), "eciqad": ("MOS", 1, 9),
        # Appendix B and ATTIQA's tables (docs/paper-protocols.md): ranges from their own papers
        "bid": ("MOS", 0, 5), "aigciqa2023": ("MOS", 0, 100), "flive": ("MOS", 0, 100),
    }
    assert set(DATASETS) == set(expected)
    assert set(UNIFIED_DATASETS) <= set(DATASETS) and len(UNIFIED_DATASETS) == 12
    for name, (label, lo, hi) in expected.items():
        info = DATASETS[name]
        assert info.lower_better == (label == "DMOS"), name
        assert info.mos_range == (lo, hi), name
        assert info.scene == DATASET_SCENES[name], name
        assert not os.path.isabs(info.root) and not os.path.isabs(info.meta_file), name
    assert {n for n, i in DATASETS.items() if i.resize} == {"uwiqa", "ava"}
    assert DATASETS["ava"].resize == 224 and DATASETS["ava"].eval_key == "test" and DATASETS["ava"].kind == "ava"
    assert {n for n, i in DATASETS.items() if i.kind == "fr"} == {"live", "csiq", "tid2013", "kadid10k"}
    assert DATASETS["livec"].kind == "livec"
    assert get_dataset_info("KonIQ-10k").name == "koniq10k"
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        get_dataset_info("nope")


# -------------------------------------------------------------------------------------------------- meta files


def test_nr_csv_extra_columns_ignored(tmp_path):
    f = write(tmp_path / "m.csv", "img_name,mos,std,split\n\na.png,32.5,19.1,train\nsub/b.png,40,1,val\n")
    t = read_meta(f, "nr")
    assert t.paths == ["a.png", "sub/b.png"] and t.mos.tolist() == [32.5, 40.0]
    assert [r.line for r in t.records] == [3, 4]  # blank line skipped, line numbers kept
    assert t.groups() == t.paths


def test_fr_csv_uses_dist_image_and_groups_by_reference(tmp_path):
    f = write(tmp_path / "m.csv", "ref_name,dist_name,dmos,std\nI01.bmp,I01_01_1.bmp,5.5,0.1\n"
              "I01.bmp,I01_01_2.bmp,4,0\nI02.bmp,I02_01_1.bmp,3,0\n")
    t = read_meta(f, "fr")
    assert t.paths == ["I01_01_1.bmp", "I01_01_2.bmp", "I02_01_1.bmp"]
    assert t.groups() == ["I01.bmp", "I01.bmp", "I02.bmp"]
    assert t.mos.tolist() == [5.5, 4.0, 3.0]


def test_ava_csv_keeps_votes(tmp_path):
    votes = ",".join(str(v) for v in range(1, 11))
    f = write(tmp_path / "m.csv", "img_name,MOS," + ",".join(f"c{i}" for i in range(1, 11)) + ",tag\n"
              f"953619.jpg,5.64,{votes},1\n953958.jpg,4.7,{votes},0\n")
    t = read_meta(f, "ava")
    assert t.paths == ["953619.jpg", "953958.jpg"] and t.mos.tolist() == [5.64, 4.7]
    assert t.records[0].votes == tuple(float(v) for v in range(1, 11))
    bad = write(tmp_path / "bad.csv", "img_name,MOS," + ",".join(f"c{i}" for i in range(1, 11)) + "\n"
                "x.jpg,5," + ",".join(["0"] * 9) + ",many\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: vote count c10"):
        read_meta(bad, "ava")


def test_livec_drops_first_seven_rows_before_split_indexing(tmp_path):
    rows = "".join(f"t{i}.bmp,{i},1\n" for i in range(LIVEC_DROPPED_ROWS)) + "".join(
        f"{i}.bmp,{10 + i},1\n" for i in range(5))
    f = write(tmp_path / "m.csv", "image,mos,std\n" + rows)
    t = read_meta(f, "livec")
    assert t.paths == [f"{i}.bmp" for i in range(5)] and t.dropped == 7
    assert t.records[0].line == 2 + LIVEC_DROPPED_ROWS
    # split row 0 is the first row after the dropped ones, as in pyiqa
    tiny_images(tmp_path / "img", t.paths)
    save_splits({1: {"train": [0, 1, 2], "val": [3, 4]}}, tmp_path / "s.pkl")
    ds = build_dataset({"name": "livec", "root": "img", "meta_file": "m.csv", "split_file": "s.pkl",
                        "data_root": str(tmp_path)}, "train")
    assert [os.path.basename(p) for p in ds.paths] == ["0.bmp", "1.bmp", "2.bmp"]
    short = write(tmp_path / "short.csv", "image,mos\n" + "a.bmp,1\n" * LIVEC_DROPPED_ROWS)
    with pytest.raises(ValueError, match="more than 7 data rows"):
        read_meta(short, "livec")


def test_custom_csv_with_scene_and_group(tmp_path):
    f = write(tmp_path / "m.csv",
              "Image,MOS,Scene,group,notes\na.png,3,underwater,g1,x\nb.png,4,,g1\nc.png,1,AIGC,,y\n")
    t = read_meta(f, "custom")
    assert t.paths == ["a.png", "b.png", "c.png"]
    assert [r.scene for r in t.records] == ["underwater", None, "aigc"]
    assert t.groups() == ["g1", "g1", "c.png"]
    bad = write(tmp_path / "bad.csv", "image,mos,scene\na.png,3,moon\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: unknown scene 'moon'"):
        read_meta(bad, "custom")
    with pytest.raises(ValueError, match="no 'mos' column"):
        read_meta(write(tmp_path / "c.csv", "image,score\na.png,3\n"), "custom")


def test_custom_csv_rows_take_entry_scene_unless_given(tmp_path):
    tiny_images(tmp_path / "i", ["a.png", "b.png"])
    write(tmp_path / "m.csv", "image,mos,scene\na.png,1,face\nb.png,2,\n")
    ds = build_dataset({"name": "own", "root": "i", "meta_file": "m.csv", "split_index": "all", "mos_range": [0, 2],
                        "scene": "aesthetics", "data_root": str(tmp_path)}, "test")
    assert ds.scenes == ["face", "aesthetics"]
    assert [ds[i]["scene"] for i in range(2)] == ["face", "aesthetics"]


@pytest.mark.parametrize(
    ("text", "kind", "match"),
    [
        ("name,mos\na.png,nan\n", "nr", r"line 2: column 2 \(mos\) is 'nan', not a finite number"),
        ("name,mos\na.png,1\nb.png,\n", "nr", r"line 3: column 2 \(mos\) is '', not a number"),
        ("name,mos\na.png,inf\n", "nr", "not a finite number"),
        ("name\na.png\n", "nr", r"line 1: header has 1 column"),
        ("name,mos\na.png\n", "nr", r"line 2: 1 column\(s\)"),
        ("a.png,3.5\nb.png,4\n", "nr", "looks like data, not a header"),
        ("ref,dist,mos\nr.png,d.png,3\n", "nr", r"full-reference meta file.*kind 'fr'"),
        ("ref,dist\nr.png,d.png\n", "fr", "at least 3"),
        ("name,mos\n,3\n", "nr", "empty image path"),
        ("name,mos\n", "nr", r"no data rows after the header"),
        ("", "nr", "empty meta file"),
        ("\n\n", "nr", "empty meta file"),
        ("name,mos\na.png,1\n", "xml", "unknown meta kind"),
    ],
)
def test_bad_meta_files_name_file_and_line(tmp_path, text, kind, match):
    f = write(tmp_path / "meta.csv", text)
    with pytest.raises(ValueError, match=match) as err:
        read_meta(f, kind)
    if kind != "xml":
        assert "meta.csv" in str(err.value)


def test_non_utf8_and_missing_meta_files(tmp_path):
    p = tmp_path / "bin.csv"
    p.write_bytes(b"name,mos\n\xff\xfe\x00garbage,1\n")
    with pytest.raises(ValueError, match=r"bin\.csv: not a UTF-8 text file"):
        read_meta(p, "nr")
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_meta(tmp_path / "nowhere.csv", "nr")


def test_duplicate_rows_warn_and_stay_together_in_splits(tmp_path, caplog):
    f = write(tmp_path / "m.csv", "name,mos\na.png,1\nb.png,2\na.png,1\nc.png,3\nd.png,4\n")
    with caplog.at_level(logging.WARNING, logger="gamma.data.meta"):
        t = read_meta(f, "nr")
    assert len(t) == 5 and t.duplicates == {"a.png": 2}  # rows kept: split files index them
    assert "listed more than once" in caplog.text and "a.png" in caplog.text
    for split in make_splits(len(t), t.groups(), n_splits=10, seed=3).values():
        assert (0 in split["train"]) == (2 in split["train"])


# ------------------------------------------------------------------------------------------------ normalisation


def test_normalisation_and_dmos_flip():
    assert normalize_mos(50, (0, 100), False) == pytest.approx(0.5)
    assert normalize_mos(3.0, (1, 5), False) == pytest.approx(0.5)
    assert normalize_mos(1, (1, 100), True) == pytest.approx(1.0)  # best DMOS -> 1
    assert normalize_mos(100, (1, 100), True) == pytest.approx(0.0)
    y = normalize_mos(np.array([0.1, 0.4]), (0, 1), True)
    np.testing.assert_allclose(y, [0.9, 0.6])
    np.testing.assert_allclose(denormalize_mos(y, (0, 1), True), [0.1, 0.4])
    with pytest.raises(ValueError, match="lo < hi"):
        normalize_mos(1, (5, 5), False)


def test_dataset_labels_normalised_with_dmos_flip(tmp_path):
    # a registered DMOS dataset laid out as in the release's bundle, under a data root
    write(tmp_path / "meta_info" / "meta_info_CSIQDataset.csv",
          "ref_name,dist_name,dmos\n1600.png,1600.AWGN.1.png,0.0\n1600.png,1600.AWGN.2.png,0.25\n"
          "bridge.png,bridge.BLUR.1.png,1.0\n")
    tiny_images(tmp_path / "CSIQ" / "dst_imgs", ["1600.AWGN.1.png", "1600.AWGN.2.png", "bridge.BLUR.1.png"])
    ds = build_dataset({"name": "csiq", "split_index": "all"}, "test", data_root=tmp_path)
    np.testing.assert_allclose(ds.labels, [1.0, 0.75, 0.0])
    item = ds[1]
    assert set(item) == {"img", "mos", "mos_raw", "scene", "dataset", "path", "index"}
    assert item["mos"].dtype == torch.float32 and item["mos"].shape == ()
    assert item["mos"].item() == pytest.approx(0.75) and item["mos_raw"] == 0.25
    assert item["scene"] == "natural" and item["dataset"] == "csiq" and item["index"] == 1
    assert item["img"].shape == (3, 24, 32)  # test phase: the full image


def test_out_of_range_mos_is_an_error_or_a_warning(tmp_path, caplog):
    d = nr_dataset(tmp_path, n=6, mos=[0, 1, 2, 3, 4, 9])
    d["split_index"] = "all"
    with pytest.raises(ValueError, match=r"meta\.csv, line 7: MOS 9 of 'img_05.png' is outside mos_range \[0, 5\]"):
        build_dataset(d, "test")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset({**d, "range_check": "warn"}, "test")
    assert "outside mos_range" in caplog.text and ds.labels.max() == pytest.approx(1.8)


def test_registered_datasets_warn_on_out_of_range_by_default(tmp_path, caplog):
    # The registry's ranges are the release's nominal ones; a label slightly outside must not stop a unified run.
    d = nr_dataset(tmp_path, n=6, mos=[0, 10, 20, 30, 40, 101])
    d = {**d, "name": "koniq10k", "split_index": "all", "mos_range": None}
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(d, "test")
    assert "outside mos_range" in caplog.text and ds.labels.max() == pytest.approx(1.01)
    with pytest.raises(ValueError, match="outside mos_range"):
        build_dataset({**d, "range_check": "error"}, "test")


# ----------------------------------------------------------------------------------------------------- splits


def test_make_splits_deterministic_and_seeded():
    a = make_splits(50, seed=7)
    assert a == make_splits(50, seed=7)
    assert a != make_splits(50, seed=8)
    assert sorted(a) == list(range(1, 11))
    for s in a.values():
        assert sorted(s["train"] + s["val"]) == list(range(50)) and len(s["train"]) == 40
    assert len({tuple(s["train"]) for s in a.values()}) > 1  # the ten splits differ


def test_make_splits_groups_never_straddle():
    groups = [f"ref{i % 7}" for i in range(70)]  # 7 references, 10 distortions each
    for s in make_splits(70, groups, seed=0).values():
        train_refs = {groups[i] for i in s["train"]}
        test_refs = {groups[i] for i in s["val"]}
        assert not train_refs & test_refs
        assert len(s["train"]) in (50, 60)  # whole groups, closest to 0.8 * 70 = 56
    with pytest.raises(ValueError, match="at least two groups"):
        make_splits(5, ["a"] * 5)
    with pytest.raises(ValueError, match="train_ratio"):
        make_splits(5, train_ratio=1.0)
    with pytest.raises(ValueError, match="groups has 2 entries for 5 items"):
        make_splits(5, ["a", "b"])


def test_all_split_and_test_key():
    assert all_split(3) == {1: {"train": [], "val": [0, 1, 2]}}
    assert set(make_splits(10, eval_key="test")[1]) == {"train", "test"}


def test_split_file_errors_name_file_and_index(tmp_path):
    f = tmp_path / "s.pkl"
    save_splits(make_splits(10, n_splits=10), f)
    splits = load_split_file(f)
    assert len(split_indices(splits, 10, "val", 10, str(f))) == 2
    with pytest.raises(ValueError, match=r"s\.pkl: split index 11 not found; the file has split\(s\) 1\.\.10"):
        split_indices(splits, 11, "train", 10, str(f))
    with pytest.raises(ValueError, match=r"split 1 has no 'test' part"):
        split_indices(splits, 1, "test", 10, str(f))
    with pytest.raises(ValueError, match=r"row 9 is out of range for a meta file of 5 rows"):
        split_indices({1: {"train": [0, 9]}}, 1, "train", 5, "x.pkl")
    with pytest.raises(ValueError, match=r"row -1 is out of range"):  # would silently wrap in Python
        split_indices({1: {"train": [0, -1]}}, 1, "train", 5, "x.pkl")
    with pytest.raises(ValueError, match="is not a row index"):
        split_indices({1: {"train": [0, "3"]}}, 1, "train", 5, "x.pkl")
    # numpy arrays and numpy ints (as some released pickles hold) are accepted
    assert split_indices({1: {"train": np.array([3, 1], dtype=np.int64)}}, 1, "train", 5) == [3, 1]


def test_split_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({1: {"train": [Evil()]}}))
    with pytest.raises(ValueError, match=r"evil\.pkl: not a readable split pickle.*refusing to load"):
        load_split_file(p)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pkl"):
        load_split_file(tmp_path / "junk.pkl")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="non-empty dict"):
        load_split_file(tmp_path / "list.pkl")
    np_pkl = tmp_path / "np.pkl"
    np_pkl.write_bytes(pickle.dumps({1: {"train": np.arange(3), "val": [np.int64(3)]}}))
    assert load_split_file(np_pkl)[1]["val"] == [3]


def test_build_dataset_split_errors(tmp_path):
    d = nr_dataset(tmp_path, n=10)
    with pytest.raises(ValueError, match=r"splits\.pkl: split index 5 not found"):
        build_dataset({**d, "split_index": 5}, "train")
    save_splits({1: {"train": list(range(10)), "val": []}}, tmp_path / "empty.pkl")
    with pytest.raises(ValueError, match=r"empty\.pkl: split 1 part 'val' is empty"):
        build_dataset({**d, "split_file": "empty.pkl"}, "val")
    with pytest.raises(FileNotFoundError, match="split file not found"):
        build_dataset({**d, "split_file": "nope.pkl"}, "train")
    # AVA-style held-out key
    save_splits(make_splits(10, eval_key="test"), tmp_path / "t.pkl")
    ds = build_dataset({**d, "split_file": "t.pkl", "eval_key": "test"}, "test")
    assert len(ds) == 2
    with pytest.raises(ValueError, match="has no 'val' part"):
        build_dataset({**d, "split_file": "t.pkl"}, "val")


def test_train_and_test_parts_partition_and_all_mode(tmp_path):
    d = nr_dataset(tmp_path, n=10)
    tr, te = build_dataset(d, "train"), build_dataset(d, "test")
    assert sorted(tr.rows + te.rows) == list(range(10)) and not set(tr.rows) & set(te.rows)
    assert len(build_dataset({**d, "split_index": "all", "split_file": None}, "test")) == 10


def test_overlapping_split_parts_warn(tmp_path, caplog):
    d = nr_dataset(tmp_path, n=6)
    save_splits({1: {"train": [0, 1, 2, 3], "val": [3, 4, 5]}}, tmp_path / "o.pkl")
    with caplog.at_level(logging.WARNING, logger="gamma.data.splits"):
        build_dataset({**d, "split_file": "o.pkl"}, "val")
    assert "shares 1 row(s)" in caplog.text


def test_make_splits_cli(tmp_path, capsys):
    meta = write(tmp_path / "fr.csv", "ref_name,dist_name,mos\n" + "".join(
        f"r{i % 5}.png,d{i}.png,{i}\n" for i in range(25)))
    out = tmp_path / "out" / "fr_10split.pkl"
    assert make_splits_main([meta, "-o", str(out), "--kind", "fr", "--seed", "5"]) == 0
    splits = load_split_file(out)
    assert sorted(splits) == list(range(1, 11))
    for s in splits.values():
        assert not {i % 5 for i in s["train"]} & {i % 5 for i in s["val"]}
    assert "5 groups" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # refuses to overwrite
        make_splits_main([meta, "-o", str(out), "--kind", "fr"])
    assert make_splits_main([meta, "-o", str(out), "--dataset", "kadid10k", "--force", "--all"]) == 0
    assert load_split_file(out) == {1: {"train": [], "val": list(range(25))}}
    assert make_splits_main([str(tmp_path / "missing.csv"), "-o", str(tmp_path / "x.pkl")]) == 2


# ----------------------------------------------------------------------------------------------- DatasetEntry


def test_entry_defaults_overrides_and_unknown_keys(tmp_path):
    e = DatasetEntry.from_dict({"name": "UWIQA", "split_index": 3})
    assert (e.name, e.scene, e.resize, e.kind, e.mos_range, e.split_index) == ("uwiqa", "underwater", 224, "nr",
                                                                              (0.0, 1.0), 3)
    assert DatasetEntry.from_dict({"name": "uwiqa", "resize": 0}).resize == 0
    assert DatasetEntry.from_dict("live").lower_better is True
    assert DatasetEntry.from_dict(e.to_dict()) == e
    assert e.replace(split_index=4).split_index == 4
    with pytest.raises(ValueError, match=r"unknown dataset key 'mos_rnage' \(did you mean 'mos_range'\?\)"):
        DatasetEntry.from_dict({"name": "live", "mos_rnage": [0, 1]})
    with pytest.raises(ValueError, match=r"unknown dataset key 'dataroot_target' \(did you mean 'root'\?\)"):
        DatasetEntry.from_dict({"name": "live", "dataroot_target": "/x"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        DatasetEntry.from_dict({"root": "x"})
    with pytest.raises(ValueError, match=r"'mydata' is not registered .* needs meta_file, mos_range"):
        DatasetEntry.from_dict({"name": "mydata", "root": "x"})
    with pytest.raises(ValueError, match="split_index must be an integer >= 1 or 'all'"):
        DatasetEntry.from_dict({"name": "live", "split_index": 0})
    with pytest.raises(ValueError, match="hflip must be true or false"):
        DatasetEntry.from_dict({"name": "live", "hflip": "yes"})
    with pytest.raises(ValueError, match="unknown scene"):
        DatasetEntry.from_dict({"name": "live", "scene": "space"})
    with pytest.raises(ValueError, match="needs a split_file"):
        DatasetEntry.from_dict({"name": "own", "root": "r", "meta_file": "m.csv", "mos_range": [0, 1]})


def test_relative_paths_resolve_against_data_root(tmp_path, monkeypatch):
    e = DatasetEntry.from_dict({"name": "koniq10k"}, data_root=tmp_path)
    assert e.meta_path == os.path.join(str(tmp_path), "meta_info", "meta_info_KonIQ10kDataset.csv")
    monkeypatch.setenv("GAMMA_DATA_ROOT", str(tmp_path / "env"))
    e2 = DatasetEntry.from_dict({"name": "koniq10k", "root": "/abs/koniq"})
    assert e2.image_root == "/abs/koniq"
    assert e2.split_path == os.path.join(str(tmp_path / "env"), "meta_info", "koniq_10split.pkl")
    with pytest.raises(FileNotFoundError, match=r"meta file not found.*\$GAMMA_DATA_ROOT is"):
        build_dataset(e2, "train")


def test_missing_images_are_named_and_counted(tmp_path, caplog):
    d = nr_dataset(tmp_path, n=10)
    d["split_index"] = "all"
    for i in (2, 5, 7):
        os.remove(tmp_path / "imgs" / f"img_{i:02d}.png")
    with pytest.raises(FileNotFoundError, match=r"3 of 10 image\(s\).*img_02\.png \(line 4\); img_05\.png"):
        build_dataset(d, "test")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset({**d, "skip_missing": True}, "test")
    assert len(ds) == 7 and "skipping them" in caplog.text and "3 of 10" in caplog.text
    with pytest.raises(FileNotFoundError, match="image folder itself does not exist"):
        build_dataset({**d, "root": "elsewhere"}, "test")
    with pytest.raises(ValueError, match="every image listed"):
        build_dataset({**d, "root": "elsewhere", "skip_missing": True}, "test")


def test_unreadable_image_names_file_and_meta_line(tmp_path):
    d = nr_dataset(tmp_path, n=4)
    d["split_index"] = "all"
    (tmp_path / "imgs" / "img_01.png").write_bytes(b"not a png")
    ds = build_dataset(d, "test")
    with pytest.raises(ImageDecodeError, match=r"img_01\.png: .*dataset 'mine', .*meta\.csv, line 3"):
        ds[1]


# ------------------------------------------------------------------------------------------------- transforms


def test_train_crop_offsets_vary_in_both_axes(tmp_path):
    img = torch.from_numpy(np.array(Image.open(coord_image(tmp_path / "c.png", 60, 80)))).permute(2, 0, 1) / 255.0
    t = TrainTransform(crop_size=32, hflip=False)
    gen = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(40):
        c = t(img, gen)
        assert c.shape == (3, 32, 32)
        offsets.add((round(c[0, 0, 0].item() * 255), round(c[1, 0, 0].item() * 255)))
    tops, lefts = {o[0] for o in offsets}, {o[1] for o in offsets}
    assert len(tops) > 5 and len(lefts) > 5 and max(tops) <= 28 and max(lefts) <= 48


def test_fr_dataset_train_crops_vary_vertically(tmp_path):
    # the release's paired crop always takes top offset 0 for full-reference sets; ours must not
    coord_image(tmp_path / "dst" / "d0.png", 64, 64)
    write(tmp_path / "m.csv", "ref_name,dist_name,mos\nr0.png,d0.png,3\nr1.png,d0.png,3\n")
    ds = build_dataset({"name": "fr_set", "kind": "fr", "root": "dst", "meta_file": "m.csv", "split_index": "all",
                        "mos_range": [0, 5], "crop_size": 32, "hflip": False, "data_root": str(tmp_path)}, "train")
    torch.manual_seed(0)
    tops = {round(ds[0]["img"][0, 0, 0].item() * 255) for _ in range(20)}
    assert len(tops) > 3


def test_hflip_happens_about_half_the_time(tmp_path):
    img = torch.zeros(3, 8, 8)
    img[:, :, 0] = 1.0  # bright left column
    t = TrainTransform(crop_size=8, hflip=True)
    gen = torch.Generator().manual_seed(1)
    flips = sum(t(img, gen)[0, 0, -1].item() == 1.0 for _ in range(200))
    assert 70 < flips < 130
    assert all(TrainTransform(crop_size=8, hflip=False)(img, gen)[0, 0, 0] == 1.0 for _ in range(20))


def test_small_images_upscaled_and_short_side_resize():
    small = torch.rand(3, 100, 150)
    up = ensure_min_side(small, 224)
    assert up.shape == (3, 224, 336) and 0 <= up.min() and up.max() <= 1
    assert TrainTransform(224)(small).shape == (3, 224, 224)
    big = torch.rand(3, 480, 640)
    assert resize_short_side(big, 224).shape == (3, 224, 298)
    assert TestTransform(resize=224)(big).shape == (3, 224, 298)
    assert TestTransform()(big) is big
    assert TrainTransform(224, resize=224)(big).shape == (3, 224, 224)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        TrainTransform(8)(torch.rand(1, 3, 8, 8))


def test_registered_resize_applies_at_test_time(tmp_path):
    tiny_images(tmp_path / "UWIQA" / "Image", ["a.png"], size=(300, 400))
    write(tmp_path / "UWIQA" / "uwiqa_mos.csv", "image,mos\na.png,0.5\n")
    ds = build_dataset({"name": "uwiqa", "split_index": "all"}, "test", data_root=tmp_path)
    assert ds[0]["img"].shape == (3, 224, 298)


# --------------------------------------------------------------------------------------------------- batching


def test_collate_stacks_same_size_and_keeps_strings():
    items = [{"img": torch.rand(3, 4, 4), "mos": torch.tensor(0.5), "scene": "face", "index": i, "mos_raw": 1.5}
             for i in range(3)]
    b = collate(items)
    assert b["img"].shape == (3, 3, 4, 4) and b["mos"].shape == (3,)
    assert b["scene"] == ["face"] * 3 and b["index"].tolist() == [0, 1, 2] and b["index"].dtype == torch.int64
    assert b["mos_raw"].dtype == torch.float64
    mixed = collate([{"img": torch.rand(3, 4, 4)}, {"img": torch.rand(3, 5, 4)}])
    assert isinstance(mixed["img"], list) and len(mixed["img"]) == 2
    with pytest.raises(ValueError, match="different keys"):
        collate([{"a": 1}, {"b": 1}])


def test_dataloader_batches_from_build_dataset(tmp_path):
    ds = build_dataset(nr_dataset(tmp_path, n=10), "train")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["img"].shape == (4, 3, 16, 16) and batch["mos"].shape == (4,) and len(batch["path"]) == 4


def test_balanced_weights():
    w = balanced_weights([range(10), range(30)])
    assert w.shape == (40,) and w.sum().item() == pytest.approx(1.0)
    assert w[:10].sum().item() == pytest.approx(0.5) and w[10:].sum().item() == pytest.approx(0.5)
    w1 = balanced_weights([range(10), range(30)], power=1.0)
    assert torch.allclose(w1, torch.full((40,), 1 / 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        balanced_weights([range(3), range(0)])
