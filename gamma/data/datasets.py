"""Dataset entries (config data) and the torch Dataset built from one.

A :class:`DatasetEntry` is what a YAML list item holds: a dataset name plus overrides of the registry defaults. Paths
are relative to a data root (``data_root`` argument or field, else ``$GAMMA_DATA_ROOT``, else the working directory);
absolute paths are used as given. :func:`build_dataset` reads the meta file, selects the split part, checks labels and
files up front (so a bad row fails at start-up with its file and line, not hours into training), and returns an
:class:`IQADataset`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._dataclass_dict import from_dict, to_dict
from ..io import DECODERS, ImageDecodeError, load_image, load_image_release
from ..prompts import canonical_scene
from .meta import MetaTable, check_mos_range, normalize_mos, read_meta, validate_range
from .registry import DATASETS, META_KINDS, canonical_dataset
from .splits import check_disjoint, check_grouped, load_split_file, make_splits, split_indices
from .transforms import TestTransform, TrainTransform

logger = logging.getLogger(__name__)

#: Environment variable holding the default data root.
DATA_ROOT_ENV = "GAMMA_DATA_ROOT"

PHASES: tuple[str, ...] = ("train", "val", "test")

#: ``split_by`` values: None (the split file as given) or 'reference' (no reference image on both sides).
SPLIT_BY: tuple[str | None, ...] = (None, "reference")
#: ``split_mode`` values: read ``split_file``, or compute seeded splits from the meta file.
SPLIT_MODES: tuple[str, ...] = ("file", "computed")
#: What names a patch row in pyiqa's FLIVE meta file (scripts/process_flive.py there: '<picture>_patch_<k>.<ext>').
PATCH_MARK = "_patch_"

_SHOW = 5

# Option names of the release / pyiqa YAMLs -> ours, for a helpful error message.
_RELEASE_KEYS = {
    "dataroot_target": "root", "meta_info_file": "meta_file", "type": "kind", "augment": "resize/crop_size/hflip",
    "random_crop": "crop_size", "mos_normalize": "(always on)", "phase": "(an argument of build_dataset)",
}


@dataclass
class DatasetEntry:
    """One dataset of a training or evaluation run: a registered name plus overrides, or a custom dataset.

    Fields left ``None`` take the registry's value (registered names); custom datasets must give ``root``,
    ``meta_file`` and ``mos_range`` and default to ``kind='custom'``, ``lower_better=False``, ``scene='natural'``.
    """

    name: str  # registry name (e.g. 'koniq10k') or any name for a custom dataset
    root: str | None = None  # image folder; meta paths are relative to it
    meta_file: str | None = None  # meta CSV
    split_file: str | None = None  # split pickle; not needed with split_index 'all'
    split_index: int | str = 1  # which split (1..10 in the release's files), or 'all': every row, in every phase
    eval_key: str | None = None  # held-out part of the split file: 'val' (pyiqa) or 'test' (AVA)
    mos_range: tuple[float, float] | None = None  # (lo, hi) of the raw labels, for y = (mos - lo) / (hi - lo)
    lower_better: bool | None = None  # DMOS labels: y = 1 - y
    scene: str | None = None  # SDP scene of every image (a custom CSV may give one per row)
    kind: str | None = None  # meta format: 'nr' | 'fr' | 'ava' | 'livec' | 'custom'
    resize: int | None = None  # short side resized to this first (train and test); 0 = no resize
    crop_size: int = 224  # train crop side
    hflip: bool = True  # train-time random horizontal flip
    skip_missing: bool = False  # drop rows whose image file is missing (counted and logged) instead of failing
    check_files: bool = True  # check that every image exists when the dataset is built
    # MOS outside mos_range: 'error' or 'warn'. Default: 'warn' for registered datasets (their ranges are the release's
    # nominal ones, which real label files may overshoot slightly; the release trains on them as they are), 'error'
    # for a dataset whose range the user gave.
    range_check: str | None = None
    data_root: str | None = None  # root for relative paths (default $GAMMA_DATA_ROOT, else the working directory)
    # How images are decoded: 'gamma' (EXIF orientation applied, truncated files are errors, transparency composited
    # on white) or 'release' (the release's PIL open + convert('RGB') with truncated files allowed; docs/model.md).
    decode: str = "gamma"
    # Leave out the rows whose image is a patch of a picture (pyiqa's FLIVE meta file lists FLIVE's ~40k pictures,
    # then their patches, named '<picture>_patch_<k>.<ext>', and its official split indexes both): every phase keeps
    # whole pictures only (ATTIQA's FLIVE protocol; only MUSIQ trained on the patches).
    exclude_patches: bool = False
    # 'reference': the entry asks for reference-grouped splits (no reference image on both sides; PromptIQA's
    # synthetic datasets). A split file read for it is checked and a leak is an error; with split_mode 'computed' the
    # splits are made so. None: the split file as given, unchecked.
    split_by: str | None = None
    # 'file': the split pickle split_file; 'computed': seeded splits made in code from the meta file
    # (gamma.data.splits.make_splits: split_ratio of the rows train, seed split_seed; with split_by 'reference'
    # split_ratio of the references, as PromptIQA's official toolkit.py), so no split file is read or needed.
    split_mode: str = "file"
    split_seed: int = 123
    split_ratio: float = 0.8  # split_mode 'computed': the training part's share (ATTIQA's data-efficient 0.1 / 0.2)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"dataset name must be a non-empty string, got {self.name!r}")
        where = f"dataset {self.name!r}"  # (as the user wrote it)
        key = canonical_dataset(self.name)
        if key in DATASETS:
            self._take_registry_defaults(key)
        else:
            self._take_custom_defaults(where)
        self._check_paths(where)
        self.mos_range = check_mos_range(self.mos_range) if self.mos_range is not None else (None, None)
        for f in ("lower_better", "hflip", "skip_missing", "check_files", "exclude_patches"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{where}: {f} must be true or false, got {getattr(self, f)!r}")
        if self.kind not in META_KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r}; known kinds: {', '.join(META_KINDS)}")
        try:
            self.scene = canonical_scene(self.scene)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        self._check_split(where)
        self._check_sizes(where)
        if self.range_check not in ("error", "warn"):
            raise ValueError(f"{where}: range_check must be 'error' or 'warn', got {self.range_check!r}")
        if self.decode not in DECODERS:
            raise ValueError(f"{where}: decode must be one of {', '.join(DECODERS)}, got {self.decode!r}")

    def _take_registry_defaults(self, key: str) -> None:
        """A registered dataset: the canonical name, and the registry's value of every field left ``None``."""
        info = DATASETS[key]
        self.name = key
        self.range_check = self.range_check or "warn"
        for f in ("root", "meta_file", "split_file", "eval_key", "mos_range", "lower_better", "scene", "kind",
                  "resize"):
            if getattr(self, f) is None:
                setattr(self, f, getattr(info, f))

    def _take_custom_defaults(self, where: str) -> None:
        """A dataset of the user's own: it must say where it is and its label scale; the rest has defaults."""
        missing = [f for f in ("root", "meta_file", "mos_range") if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{where} is not registered ({', '.join(DATASETS)}), so it needs "
                             f"{', '.join(missing)}")
        self.kind = self.kind or "custom"
        self.lower_better = False if self.lower_better is None else self.lower_better
        self.scene = self.scene or "natural"
        self.eval_key = self.eval_key or "val"
        self.range_check = self.range_check or "error"

    def _check_paths(self, where: str) -> None:
        for f in ("root", "meta_file", "split_file", "data_root"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise ValueError(f"{where}: {f} must be a path string, got {type(v).__name__}")
            if v is not None:
                setattr(self, f, os.fspath(v))

    def _check_split(self, where: str) -> None:
        """``split_index`` as an int >= 1 (with a split file) or ``'all'``; ``eval_key`` names a held-out part."""
        si = self.split_index
        if isinstance(si, str) and si.strip().lower() == "all":
            self.split_index = "all"
        elif isinstance(si, str) and si.strip().isdigit():
            self.split_index = int(si)
        if self.split_index != "all" and (isinstance(self.split_index, bool) or not isinstance(self.split_index, int)
                                          or self.split_index < 1):
            raise ValueError(f"{where}: split_index must be an integer >= 1 or 'all', got {si!r}")
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"{where}: split_by must be null or one of {', '.join(SPLIT_BY[1:])}, got "
                             f"{self.split_by!r}")
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"{where}: split_mode must be one of {', '.join(SPLIT_MODES)}, got {self.split_mode!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"{where}: split_seed must be an integer, got {self.split_seed!r}")
        if (isinstance(self.split_ratio, bool) or not isinstance(self.split_ratio, (int, float))
                or not 0 < self.split_ratio < 1):
            raise ValueError(f"{where}: split_ratio must be a number between 0 and 1 (exclusive), got "
                             f"{self.split_ratio!r}")
        if self.split_index != "all" and self.split_mode == "file" and not self.split_file:
            raise ValueError(f"{where}: split_index {self.split_index} needs a split_file; use split_index: all "
                             "for the whole dataset, or make one with scripts/make_splits.py")
        if self.eval_key not in ("val", "test"):
            raise ValueError(f"{where}: eval_key must be 'val' or 'test', got {self.eval_key!r}")

    def _check_sizes(self, where: str) -> None:
        if self.resize is None:
            self.resize = 0
        for f, low in (("crop_size", 1), ("resize", 0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{where}: {f} must be an integer >= {low}, got {v!r}")

    # ------------------------------------------------------------------------------------------------ config

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], data_root: str | os.PathLike | None = None) -> DatasetEntry:
        """Build from a mapping (a YAML list item); a string is taken as a registered name.

        Args:
            d: the fields; unknown keys are an error that names them.
            data_root: default data root when ``d`` has none.

        Raises:
            ValueError: unknown key, wrong type or value; the message names the key.
        """
        if isinstance(d, str):
            d = {"name": d}
        if not isinstance(d, Mapping):
            raise ValueError(f"a dataset entry is a mapping with at least 'name', got {type(d).__name__}")
        if "name" not in d and set(d) <= {f.name for f in fields(cls)}:  # (an unknown key is the likelier mistake)
            raise ValueError(f"a dataset entry needs a 'name' (a registered one: {', '.join(DATASETS)}, or your own)")
        kw = dict(d)
        if data_root is not None and kw.get("data_root") is None:
            kw["data_root"] = os.fspath(data_root)
        label = f"dataset {d['name']!r}: " if "name" in d else ""
        return from_dict(cls, kw, typed=False, noun="dataset key", hints=_RELEASE_KEYS, label=label)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON friendly); ``from_dict(to_dict())`` gives the same entry."""
        return to_dict(self)

    def replace(self, **changes: Any) -> DatasetEntry:
        """A copy with some fields changed (e.g. ``split_index``)."""
        return DatasetEntry.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------------------------------------- paths

    def resolve(self, path: str | None) -> str | None:
        """``path`` made absolute: as given when absolute, else joined to the data root."""
        if path is None:
            return None
        p = os.path.expanduser(os.path.expandvars(path))
        if os.path.isabs(p):
            return p
        root = self.data_root if self.data_root is not None else os.environ.get(DATA_ROOT_ENV)
        return os.path.abspath(os.path.join(os.path.expanduser(root), p) if root else p)

    @property
    def image_root(self) -> str:
        return self.resolve(self.root)

    @property
    def meta_path(self) -> str:
        return self.resolve(self.meta_file)

    @property
    def split_path(self) -> str | None:
        return self.resolve(self.split_file)

    def _root_hint(self) -> str:
        if self.data_root is not None:
            return f"data_root is {self.data_root!r}"
        if os.environ.get(DATA_ROOT_ENV):
            return f"${DATA_ROOT_ENV} is {os.environ[DATA_ROOT_ENV]!r}"
        return f"relative paths resolve against the working directory; set data_root or ${DATA_ROOT_ENV}"


# ---------------------------------------------------------------------------------------------------- dataset


class IQADataset(Dataset):
    """Labelled images of one dataset and phase.

    Each item is a dict:
        ``img``: (3, H, W) float32 in [0, 1] (train: crop_size x crop_size);
        ``mos``: () float32, the normalised label (higher is better, [0, 1] when the label is in mos_range);
        ``mos_raw``: float, the label as written in the meta file;
        ``scene``: str, the SDP scene; ``dataset``: str, the entry's name;
        ``path``: str, the image file; ``index``: int, the row in the meta table.
    """

    def __init__(self, entry: DatasetEntry, phase: str, table: MetaTable, rows: Sequence[int], transform) -> None:
        self.entry = entry
        self.phase = phase
        self.table = table
        self.rows = list(rows)
        self.transform = transform
        root = entry.image_root
        recs = [table.records[i] for i in self.rows]
        self.paths = [os.path.join(root, r.path) for r in recs]
        self.scenes = [r.scene or entry.scene for r in recs]
        self.mos_raw = np.asarray([r.mos for r in recs], dtype=np.float64)
        self.labels = np.asarray(normalize_mos(self.mos_raw, entry.mos_range, entry.lower_better), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        try:
            img = load_image_release(path) if self.entry.decode == "release" else load_image(path)
        except ImageDecodeError as exc:
            raise ImageDecodeError(exc.source, f"{exc.reason} (dataset {self.entry.name!r}, "
                                   f"{self.table.where(self.rows[i])})") from None
        return {
            "img": self.transform(img),
            "mos": torch.tensor(self.labels[i], dtype=torch.float32),
            "mos_raw": float(self.mos_raw[i]),
            "scene": self.scenes[i],
            "dataset": self.entry.name,
            "path": path,
            "index": self.rows[i],
        }

    def __repr__(self) -> str:
        return (f"IQADataset({self.entry.name!r}, phase={self.phase!r}, split={self.entry.split_index!r}, "
                f"n={len(self)}, transform={self.transform!r})")


def build_dataset(
    entry: DatasetEntry | Mapping[str, Any] | str,
    phase: str = "train",
    transform=None,
    data_root: str | os.PathLike | None = None,
) -> IQADataset:
    """Read, check and wrap one dataset entry.

    Args:
        entry: a :class:`DatasetEntry`, its dict form, or a registered name.
        phase: 'train' (the split's 'train' part, train transform) or 'val' / 'test' (the held-out part named by
            ``entry.eval_key``, full images). With ``split_index: all`` every phase gets every row. The split is
            the entry's split file, or computed from the meta file (``split_mode: computed``); ``exclude_patches``
            then drops patch rows.
        transform: replaces the phase's default transform (a callable on a (3, H, W) tensor).
        data_root: data root for an entry given as a dict or name without one.

    Raises:
        FileNotFoundError: the meta file, the split file, or (without ``skip_missing``) image files are missing.
        ValueError: bad meta rows, labels outside mos_range, a split index or row out of range, a reference image on
            both sides of the split (``split_by: reference``), an empty result.
    """
    if not isinstance(entry, DatasetEntry):
        entry = DatasetEntry.from_dict(entry, data_root=data_root)
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    meta = entry.meta_path
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"dataset {entry.name!r}: meta file not found: {meta} ({entry._root_hint()})")
    table = read_meta(meta, entry.kind)

    if entry.split_index == "all":
        rows = list(range(len(table)))
        part = "all"
    else:
        part = "train" if phase == "train" else entry.eval_key
        splits, source = _splits_of(entry, table)
        rows = split_indices(splits, entry.split_index, part, len(table), source)
        if phase != "train":
            check_disjoint(splits, entry.split_index, entry.eval_key, len(table), source)
        if entry.split_by == "reference":
            check_grouped(splits, entry.split_index, entry.eval_key, table.groups(), source)
        if not rows:
            raise ValueError(f"dataset {entry.name!r}: {source}: split {entry.split_index} part {part!r} is empty")
    if entry.exclude_patches:
        rows = _whole_pictures(entry, table, rows, part)

    validate_range(table, entry.mos_range, entry.range_check, rows)

    if entry.check_files:
        rows = _check_files(entry, table, rows)

    if transform is None:
        transform = (TrainTransform(entry.crop_size, entry.resize, entry.hflip) if phase == "train"
                     else TestTransform(entry.resize))
    ds = IQADataset(entry, phase, table, rows, transform)
    logger.info("dataset %s (%s, split %s/%s): %d images from %s", entry.name, phase, entry.split_index, part,
                len(ds), meta)
    return ds


def _splits_of(entry: DatasetEntry, table: MetaTable) -> tuple[dict, str]:
    """The entry's splits and a name for messages: its split file, or splits computed from the meta table."""
    if entry.split_mode == "computed":
        grouped = entry.split_by == "reference"
        if grouped and table.kind not in ("fr", "custom"):
            raise ValueError(f"dataset {entry.name!r}: split_by 'reference' needs the meta file's reference column "
                             f"(kind 'fr', or a custom file's 'group' column); {table.file} is kind {table.kind!r}")
        splits = make_splits(len(table), table.groups(), entry.split_index, train_ratio=entry.split_ratio,
                             seed=entry.split_seed, eval_key=entry.eval_key, count="groups" if grouped else "rows")
        return splits, f"{table.file} (splits computed with seed {entry.split_seed}, ratio {entry.split_ratio:g})"
    split_file = entry.split_path
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"dataset {entry.name!r}: split file not found: {split_file} "
                                f"({entry._root_hint()}); make one with scripts/make_splits.py")
    return load_split_file(split_file), split_file


def is_patch(path: str) -> bool:
    """Whether a meta row's image is a patch of a picture (pyiqa's FLIVE naming, :data:`PATCH_MARK`)."""
    return PATCH_MARK in os.path.basename(path)


def _whole_pictures(entry: DatasetEntry, table: MetaTable, rows: list[int], part: str) -> list[int]:
    """``rows`` without the patch rows (``exclude_patches``), the count logged."""
    kept = [i for i in rows if not is_patch(table.records[i].path)]
    if len(kept) < len(rows):
        logger.info("dataset %s (%s): %d patch row(s) left out (exclude_patches), %d whole pictures kept",
                    entry.name, part, len(rows) - len(kept), len(kept))
    if not kept:
        raise ValueError(f"dataset {entry.name!r}: every one of the {len(rows)} row(s) of part {part!r} in "
                         f"{table.file} is a patch ('{PATCH_MARK}' in its file name); exclude_patches leaves none")
    return kept


def _check_files(entry: DatasetEntry, table: MetaTable, rows: list[int]) -> list[int]:
    root = entry.image_root
    missing = [i for i in rows if not os.path.isfile(os.path.join(root, table.records[i].path))]
    if not missing:
        return rows
    shown = "; ".join(f"{table.records[i].path} (line {table.records[i].line})" for i in missing[:_SHOW])
    more = f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
    msg = (f"dataset {entry.name!r}: {len(missing)} of {len(rows)} image(s) listed in {table.file} are missing "
           f"under {root}: {shown}{more}")
    if not entry.skip_missing:
        if not os.path.isdir(root):
            msg += f" (the image folder itself does not exist; {entry._root_hint()})"
        raise FileNotFoundError(msg + "; set skip_missing: true to train without them")
    logger.warning("%s; skipping them (skip_missing)", msg)
    gone = set(missing)
    kept = [i for i in rows if i not in gone]
    if not kept:
        raise ValueError(f"dataset {entry.name!r}: every image listed in {table.file} is missing under {root}")
    return kept


# ------------------------------------------------------------------------------------------------- batching


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch item dicts: tensors of one shape are stacked, tensors of different shapes (full test images) stay a
    list, numbers become a tensor, strings and anything else become lists."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = list(items[0])
    for it in items[1:]:
        if list(it) != keys:
            raise ValueError(f"items of one batch have different keys: {keys} vs {list(it)}")
    out: dict[str, Any] = {}
    for k in keys:
        vals = [it[k] for it in items]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            same = all(isinstance(v, torch.Tensor) and v.shape == v0.shape for v in vals)
            out[k] = torch.stack(vals) if same else vals
        elif isinstance(v0, (int, float)) and not isinstance(v0, bool) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals
        ):
            out[k] = torch.tensor(vals, dtype=torch.int64 if all(isinstance(v, int) for v in vals) else torch.float64)
        else:
            out[k] = vals
    return out


def balanced_weights(datasets: Sequence[Any], power: float = 0.0) -> torch.Tensor:
    """Per-sample weights for ``WeightedRandomSampler`` over ``ConcatDataset(datasets)``.

    A dataset of size n gets total mass proportional to ``n ** power``: ``power=0`` samples every dataset equally
    often (the optional balanced sampler), ``power=1`` reproduces uniform shuffling (sampling proportional to size).

    Returns:
        (sum of lengths,) float64 weights summing to 1.
    """
    if not datasets:
        raise ValueError("balanced_weights needs at least one dataset")
    if not (isinstance(power, (int, float)) and math.isfinite(power)):
        raise ValueError(f"power must be a finite number, got {power!r}")
    sizes = [len(d) for d in datasets]
    if any(n == 0 for n in sizes):
        raise ValueError(f"dataset {sizes.index(0)} is empty")
    mass = np.asarray(sizes, dtype=np.float64) ** power
    mass /= mass.sum()
    w = np.concatenate([np.full(n, m / n) for n, m in zip(sizes, mass, strict=True)])
    return torch.from_numpy(w)
