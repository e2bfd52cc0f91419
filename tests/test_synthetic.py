"""The synthetic dataset generator of the offline demo: files, labels, splits, determinism."""

import csv
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from gamma.data import DatasetEntry, build_dataset, load_split_file
from gamma.data.synthetic import (
    DEMO_SPECS,
    DISTORTIONS,
    META_FILE,
    SPLIT_FILE,
    SyntheticCfg,
    caption,
    content_splits,
    distort,
    generate,
    generate_for_entries,
    normalised_quality,
    spec_for,
)
from gamma.train.pretrain import read_captions

SMALL = {"num_contents": 10, "versions": 7, "size": 48}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, **SMALL)
    return root


def _rows(folder: Path) -> tuple[list[str], list[list[str]]]:
    with open(folder / META_FILE, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _normalised(spec, mos: np.ndarray) -> np.ndarray:
    lo, hi = spec.mos_range
    y = (mos - lo) / (hi - lo)
    return 1 - y if spec.label == "dmos" else y


@pytest.mark.parametrize("spec", DEMO_SPECS, ids=lambda s: s.name)
def test_files_and_meta_format(data_root, spec):
    folder = data_root / spec.name
    header, rows = _rows(folder)
    assert header[:2] == ["image_name", "mos"]
    assert len(rows) == SMALL["num_contents"] * SMALL["versions"]
    lo, hi = spec.mos_range
    for r in rows:
        img = Image.open(folder / r[0])
        assert img.size == (SMALL["size"], SMALL["size"]) and img.mode == "RGB"
        assert lo <= float(r[1]) <= hi
        assert r[2]  # a caption


@pytest.mark.parametrize("spec", DEMO_SPECS, ids=lambda s: s.name)
def test_labels_follow_distortion_strength(data_root, spec):
    _, rows = _rows(data_root / spec.name)
    y = _normalised(spec, np.array([float(r[1]) for r in rows]))
    # Pristine pictures score above the distorted versions of the same source on average.
    pristine = np.array([y[i] for i, r in enumerate(rows) if r[4] == "none"])
    distorted = np.array([y[i] for i, r in enumerate(rows) if r[4] != "none"])
    assert pristine.mean() > distorted.mean() + 0.1
    # For one distortion alone, a stronger distortion means a lower label.
    single = [(float(r[5]), y[i]) for i, r in enumerate(rows) if "+" not in r[4] and r[4] != "none"]
    s, q = zip(*single, strict=True)
    assert spearmanr(s, q)[0] < -0.6
    # The label is the spec's noise-free quality plus small rater noise.
    clean = [normalised_quality(spec, list(zip(r[4].split("+"), map(float, r[5].split("+")), strict=True)))
             if r[4] != "none" else normalised_quality(spec, []) for r in rows]
    assert np.abs(np.array(clean) - y).max() < 6 * spec.rater_noise


@pytest.mark.parametrize("spec", DEMO_SPECS, ids=lambda s: s.name)
def test_splits_hold_out_whole_contents(data_root, spec):
    folder = data_root / spec.name
    _, rows = _rows(folder)
    content = [int(r[3]) for r in rows]
    splits = load_split_file(folder / SPLIT_FILE)
    assert sorted(splits) == list(range(1, 11))
    held_out_sets = set()
    for k, part in splits.items():
        train, val = set(part["train"]), set(part["val"])
        assert train.isdisjoint(val) and train | val == set(range(len(rows)))
        train_content = {content[i] for i in train}
        val_content = {content[i] for i in val}
        assert train_content.isdisjoint(val_content), f"split {k} shares a source picture"
        assert len(val_content) == round(0.2 * SMALL["num_contents"])
        held_out_sets.add(frozenset(val_content))
    assert len(held_out_sets) > 1  # the 10 splits differ


def test_datasets_differ_in_scale_and_bias(data_root):
    means = {}
    for spec in DEMO_SPECS:
        _, rows = _rows(data_root / spec.name)
        means[spec.name] = _normalised(spec, np.array([float(r[1]) for r in rows])).mean()
    assert {s.mos_range for s in DEMO_SPECS} == {(0.0, 100.0), (1.0, 5.0), (0.0, 1.0)}
    assert any(s.label == "dmos" for s in DEMO_SPECS)
    assert max(means.values()) - min(means.values()) > 0.1  # same distortions, different label bias


def test_deterministic_by_seed(tmp_path):
    spec = spec_for("synth_underwater", SyntheticCfg(num_contents=3, versions=4))

    def digest(root: Path) -> str:
        generate(root, specs=[spec], size=40, seed=7)
        h = hashlib.sha256()
        for f in sorted((root / spec.name).rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()

    first = digest(tmp_path / "a")
    assert digest(tmp_path / "b") == first
    generate(tmp_path / "c", specs=[spec], size=40, seed=8)
    other = (tmp_path / "c" / spec.name / META_FILE).read_bytes()
    assert other != (tmp_path / "a" / spec.name / META_FILE).read_bytes()


def test_regenerates_only_when_settings_change(tmp_path):
    spec = spec_for("synth_natural", SyntheticCfg(num_contents=2, versions=3))
    generate(tmp_path, specs=[spec], size=32)
    meta = tmp_path / spec.name / META_FILE
    stamp = meta.stat().st_mtime_ns
    generate(tmp_path, specs=[spec], size=32)
    assert meta.stat().st_mtime_ns == stamp  # complete and unchanged: kept
    generate(tmp_path, specs=[spec], size=40)
    assert Image.open(tmp_path / spec.name / "images" / "c000_v00.png").size == (40, 40)


def test_demo_entries_read_the_generated_files(tmp_path):
    from gamma.train.config import load_config

    cfg = load_config("options/demo_base.yml", [f"data_root={tmp_path}"])
    generate_for_entries(SyntheticCfg(num_contents=5, versions=3, size=80), cfg.data, cfg.data_root)
    for entry in cfg.data:
        train, val = build_dataset(entry, "train"), build_dataset(entry, "val")
        assert len(train) == 12 and len(val) == 3
        assert train[0]["img"].shape == (3, entry.crop_size, entry.crop_size)
        assert val[0]["img"].shape == (3, 80, 80)
        assert 0 <= float(train[0]["mos"]) <= 1
        assert len(read_captions(entry.meta_path)) == 15


def test_generate_for_entries_checks_paths(tmp_path):
    entry = DatasetEntry(name="synth_natural", root="synth_natural", meta_file="elsewhere.csv", split_file="s.pkl",
                         mos_range=(0, 100), data_root=str(tmp_path))
    with pytest.raises(ValueError, match="meta_file must be <root>/meta_info.csv"):
        generate_for_entries(SyntheticCfg(num_contents=2, versions=2), [entry])


def test_distortions_change_the_picture_more_when_stronger():
    rng = np.random.default_rng(0)
    from gamma.data.synthetic import make_content

    img = make_content(rng, 64, "natural")
    base = np.asarray(img, dtype=np.float64)
    for kind in DISTORTIONS:
        weak = np.abs(np.asarray(distort(img, kind, 0.2, np.random.default_rng(1)), dtype=np.float64) - base).mean()
        strong = np.abs(np.asarray(distort(img, kind, 1.0, np.random.default_rng(1)), dtype=np.float64) - base).mean()
        assert 0 < weak < strong, kind
    assert distort(img, "blur", 0.0, rng) is img
    with pytest.raises(ValueError, match="unknown distortion"):
        distort(img, "fog", 0.5, rng)


def test_captions_describe_the_distortions():
    assert caption("natural", []) == "a pristine photo"
    assert caption("underwater", [("blur", 0.9)]) == "a heavily blurred underwater photo"
    text = caption("aigc", [("noise", 0.1), ("jpeg", 0.5)])
    assert text == "a slightly noisy, moderately compressed AI-generated picture"


def test_content_splits_group_rows():
    contents = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    splits = content_splits(contents, seed=3)
    assert splits == content_splits(contents, seed=3)
    for part in splits.values():
        assert {contents[i] for i in part["train"]}.isdisjoint({contents[i] for i in part["val"]})
    assert pickle.loads(pickle.dumps(splits)) == splits


def test_read_captions_errors(tmp_path):
    f = tmp_path / "meta.csv"
    f.write_text("image_name,mos\na.png,1\n")
    with pytest.raises(ValueError, match="no 'caption' column"):
        read_captions(f)
    f.write_text("image_name,mos,caption\na.png,1,a photo\nb.png,2,\n")
    with pytest.raises(ValueError, match="line 3: empty 'caption'"):
        read_captions(f)
