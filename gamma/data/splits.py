"""Train/test splits: the pyiqa split pickle, read safely and checked, and a seeded split maker.

Format (pyiqa and the release): ``{split_index: {'train': [row, ...], 'val': [row, ...]}}`` with ``split_index`` from 1
and rows indexing the meta file's data rows from 0 (LIVEC: after its 7 dropped rows). AVA's file names its held-out
part ``'test'``. Split files are unpickled with a restricted unpickler that only rebuilds plain containers, numbers and
numpy arrays, so a split file cannot run code.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import pickle
import sys
from collections.abc import Sequence

import numpy as np

from .._files import atomic_write
from .meta import read_meta
from .registry import META_KINDS, get_dataset_info

logger = logging.getLogger(__name__)

#: The two parts of each split; ``eval_key`` names the held-out one ('val', or 'test' for AVA).
SPLIT_KEYS: tuple[str, ...] = ("train", "val", "test")

_SHOW = 5

# Globals a numpy-holding pickle needs (numpy 1 and 2 module names); nothing that can run arbitrary code.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "dict"),
    ("builtins", "tuple"), ("builtins", "int"), ("collections", "OrderedDict"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a split file holds only lists of row indices)")


def load_split_file(path: str | os.PathLike) -> dict:
    """Unpickle a split file safely.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a pickle, a pickle of something else, or one that would need code to load.
    """
    file = os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"split file not found: {file}")
    with open(file, "rb") as fh:
        data = fh.read()
    try:
        obj = _SafeUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - pickle raises many types on bad data
        raise ValueError(f"{file}: not a readable split pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{file}: a split file holds a non-empty dict {{split_index: {{'train': [...], 'val': "
                         f"[...]}}}}, got {type(obj).__name__}")
    return obj


def split_indices(splits: dict, split_index: int, key: str, n_rows: int, file: str = "<splits>") -> list[int]:
    """Row indices of part ``key`` of split ``split_index``, checked against a meta table of ``n_rows`` rows.

    Raises:
        ValueError: the split index or part is absent, or an index is not an integer in [0, n_rows); the message
            names the file, split, part and offending value.
    """
    entry = None
    for k in (split_index, str(split_index)):
        if k in splits:
            entry = splits[k]
            break
    if entry is None:
        available = sorted(splits, key=lambda k: (not isinstance(k, (int, np.integer)), str(k).zfill(12)))
        shown = f"{available[0]}..{available[-1]}" if len(available) > 3 else ", ".join(map(str, available))
        raise ValueError(f"{file}: split index {split_index!r} not found; the file has split(s) {shown}")
    if not isinstance(entry, dict):
        raise ValueError(f"{file}: split {split_index} is a {type(entry).__name__}, expected a dict with 'train' "
                         "and 'val' (or 'test') lists")
    if key not in entry:
        raise ValueError(f"{file}: split {split_index} has no {key!r} part (it has {sorted(map(str, entry))}); "
                         "set eval_key to the held-out part's name")
    rows = entry[key]
    if isinstance(rows, np.ndarray):
        rows = rows.ravel().tolist()
    if not isinstance(rows, (list, tuple, set, frozenset, range)):
        raise ValueError(f"{file}: split {split_index} part {key!r} is a {type(rows).__name__}, not a list of rows")
    out = []
    for pos, r in enumerate(rows):
        if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
            raise ValueError(f"{file}: split {split_index} part {key!r}, position {pos}: {r!r} is not a row index")
        r = int(r)
        if not 0 <= r < n_rows:  # a negative index would silently wrap around in Python
            raise ValueError(f"{file}: split {split_index} part {key!r}, position {pos}: row {r} is out of range for "
                             f"a meta file of {n_rows} rows; the split file does not belong to this meta file")
        out.append(r)
    if len(set(out)) != len(out):
        logger.warning("%s: split %s part %r lists %d row(s) more than once", file, split_index, key,
                       len(out) - len(set(out)))
    return out


def check_disjoint(splits: dict, split_index: int, eval_key: str, n_rows: int, file: str = "<splits>") -> int:
    """Log a warning when the train and held-out parts of a split share rows; returns how many they share."""
    train = set(split_indices(splits, split_index, "train", n_rows, file))
    held = set(split_indices(splits, split_index, eval_key, n_rows, file))
    shared = train & held
    if shared:
        logger.warning("%s: split %s shares %d row(s) between 'train' and %r (e.g. rows %s): test scores on it are "
                       "not held-out scores", file, split_index, len(shared), eval_key, sorted(shared)[:_SHOW])
    return len(shared)


def leaking_groups(splits: dict, split_index: int, eval_key: str, groups: Sequence[object],
                   file: str = "<splits>") -> list[object]:
    """The groups (reference images) with rows on both sides of split ``split_index``, in order of first row."""
    n = len(groups)
    train = {groups[r] for r in split_indices(splits, split_index, "train", n, file)}
    held = {groups[r] for r in split_indices(splits, split_index, eval_key, n, file)}
    both = train & held
    return list(dict.fromkeys(g for g in groups if g in both))


def check_grouped(splits: dict, split_index: int, eval_key: str, groups: Sequence[object],
                  file: str = "<splits>") -> None:
    """Raise ``ValueError`` when split ``split_index`` puts a reference image on both sides (for an entry that asks
    for reference-grouped splits: ``split_by: reference``); the message gives the count of leaking references."""
    leaks = leaking_groups(splits, split_index, eval_key, groups, file)
    if leaks:
        shown = ", ".join(map(str, leaks[:_SHOW])) + (" ..." if len(leaks) > _SHOW else "")
        raise ValueError(f"{file}: split {split_index} puts {len(leaks)} of {len(set(groups))} reference image(s) on "
                         f"both sides ('train' and {eval_key!r}): {shown}; the entry asks for reference-grouped "
                         "splits (split_by: reference). Use split_mode: computed, or a file written by "
                         "scripts/make_splits.py, or split_by: null to accept the file as it is")


# ------------------------------------------------------------------------------------------------------ making


def make_splits(
    n_items: int,
    groups: Sequence[object] | None = None,
    n_splits: int = 10,
    train_ratio: float = 0.8,
    seed: int = 123,
    eval_key: str = "val",
    count: str = "rows",
) -> dict[int, dict[str, list[int]]]:
    """Seeded random train/held-out splits in the pyiqa format, grouped so that no group is on both sides.

    Groups (reference images for full-reference sets, image paths otherwise) are shuffled and taken into the train
    part until it holds the number of items closest to ``train_ratio * n_items`` (``count='rows'``), or the first
    ``round(train_ratio * n_groups)`` of them (``count='groups'``: PromptIQA's official toolkit.py, which shuffles the
    reference indices and trains on the first 80 %), keeping both parts non-empty.
    Without ``groups`` every item is its own group. Row lists are sorted. The result depends only on the arguments.

    Args:
        n_items: rows of the meta table.
        groups: one hashable key per row; rows with the same key land on the same side.
        n_splits: number of splits, indexed 1..n_splits.
        train_ratio: target fraction of rows in the train part, in (0, 1).
        seed: random seed.
        eval_key: name of the held-out part ('val' as pyiqa, or 'test').
        count: what ``train_ratio`` counts, 'rows' or 'groups'.

    Returns:
        ``{i: {'train': rows, eval_key: rows}}`` for i in 1..n_splits.
    """
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 2:
        raise ValueError(f"n_items must be an integer >= 2, got {n_items!r}")
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 1:
        raise ValueError(f"n_splits must be an integer >= 1, got {n_splits!r}")
    if not (isinstance(train_ratio, (int, float)) and math.isfinite(train_ratio) and 0 < train_ratio < 1):
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio!r}")
    if eval_key not in ("val", "test"):
        raise ValueError(f"eval_key must be 'val' or 'test', got {eval_key!r}")
    if count not in ("rows", "groups"):
        raise ValueError(f"count must be 'rows' or 'groups', got {count!r}")
    if groups is None:
        gid = np.arange(n_items)
    else:
        if len(groups) != n_items:
            raise ValueError(f"groups has {len(groups)} entries for {n_items} items")
        ids: dict[object, int] = {}  # group -> id in order of first appearance: independent of hashing
        gid = np.fromiter((ids.setdefault(g, len(ids)) for g in groups), dtype=np.int64, count=n_items)
    n_groups = int(gid.max()) + 1
    if n_groups < 2:
        raise ValueError(f"cannot split {n_items} items in {n_groups} group: need at least two groups")

    sizes = np.bincount(gid, minlength=n_groups)
    target = train_ratio * n_items
    rng = np.random.default_rng(seed)
    out: dict[int, dict[str, list[int]]] = {}
    for k in range(1, n_splits + 1):
        order = rng.permutation(n_groups)
        if count == "groups":
            n_train_groups = min(max(round(train_ratio * n_groups), 1), n_groups - 1)
        else:
            cum = np.cumsum(sizes[order])[:-1]  # train sizes for prefixes of 1..G-1 groups
            n_train_groups = int(np.argmin(np.abs(cum - target))) + 1
        in_train = np.zeros(n_groups, dtype=bool)
        in_train[order[:n_train_groups]] = True
        mask = in_train[gid]
        out[k] = {"train": np.flatnonzero(mask).tolist(), eval_key: np.flatnonzero(~mask).tolist()}
    return out


def all_split(n_items: int, eval_key: str = "val") -> dict[int, dict[str, list[int]]]:
    """A single 'split' whose held-out part is the whole dataset (cross-dataset evaluation); train part empty."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    return {1: {"train": [], eval_key: list(range(n_items))}}


def save_splits(splits: dict, path: str | os.PathLike) -> None:
    """Write ``splits`` as a pickle (protocol 4, plain ints) atomically (:func:`gamma._files.atomic_write`)."""
    clean = {int(k): {str(p): [int(i) for i in rows] for p, rows in v.items()} for k, v in splits.items()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            pickle.dump(clean, fh, protocol=4)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/make_splits.py``: meta CSV in, split pickle out."""
    p = argparse.ArgumentParser(
        prog="make_splits.py",
        description="Write seeded train/held-out splits of a meta CSV as a pyiqa split pickle. Full-reference meta "
        "files (kind fr) are split by reference image, so no content is shared between train and test.",
    )
    p.add_argument("meta", help="meta CSV")
    p.add_argument("-o", "--output", required=True, help="split pickle to write")
    p.add_argument("--kind", choices=META_KINDS, help="meta format (default: the dataset's, else 'custom' when the "
                   "header has 'image' and 'mos' columns, else 'nr')")
    p.add_argument("--dataset", help="registered dataset name; sets --kind and --eval-key")
    p.add_argument("--n-splits", type=int, default=10)
    p.add_argument("--train-ratio", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--eval-key", choices=("val", "test"), help="name of the held-out part (default val; AVA test)")
    p.add_argument("--group-by", choices=("auto", "none"), default="auto",
                   help="auto: reference image (fr) or 'group' column (custom), else image path; none: every row alone")
    p.add_argument("--count", choices=("rows", "groups"), default="rows",
                   help="what --train-ratio counts: rows (default), or groups (PromptIQA's official split: 80%% of the "
                   "reference images)")
    p.add_argument("--check", action="store_true",
                   help="read the split pickle given as -o and report, per split, the groups (reference images) on "
                   "both sides, instead of writing one")
    p.add_argument("--all", action="store_true", help="one split whose held-out part is the whole dataset")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    kind, eval_key = args.kind, args.eval_key
    if args.dataset:
        try:
            info = get_dataset_info(args.dataset)
        except ValueError as exc:
            p.error(str(exc))
        kind = kind or info.kind
        eval_key = eval_key or info.eval_key
    if kind is None:
        kind = _guess_kind(args.meta)
    eval_key = eval_key or "val"
    if args.check:
        return _report_leaks(args.meta, kind, args.output, eval_key)
    if os.path.exists(args.output) and not args.force:
        p.error(f"{args.output} exists; pass --force to overwrite")
    try:
        table = read_meta(args.meta, kind)
        if args.all:
            splits = all_split(len(table), eval_key)
        else:
            groups = None if args.group_by == "none" else table.groups()
            splits = make_splits(len(table), groups, args.n_splits, args.train_ratio, args.seed, eval_key,
                                 count=args.count)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_splits(splits, args.output)
    first = splits[1]
    n_groups = len(set(table.groups())) if args.group_by == "auto" else len(table)
    print(f"wrote {len(splits)} split(s) of {len(table)} rows ({n_groups} groups, kind {kind}) to {args.output}: "
          f"split 1 has {len(first['train'])} train / {len(first[eval_key])} {eval_key}")
    return 0


def _report_leaks(meta: str, kind: str, split_file: str, eval_key: str) -> int:
    """``--check``: print, per split of ``split_file``, how many groups of ``meta`` sit on both sides."""
    try:
        table = read_meta(meta, kind)
        splits = load_split_file(split_file)
        groups = table.groups()
        counts = {k: len(leaking_groups(splits, k, eval_key, groups, split_file)) for k in sorted(splits)}
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, n in counts.items():
        print(f"{split_file}: split {k}: {n} of {len(set(groups))} group(s) on both sides")
    return 1 if any(counts.values()) else 0


def _guess_kind(meta: str) -> str:
    try:
        with open(meta, encoding="utf-8-sig") as fh:
            header = [h.strip().lower() for h in fh.readline().split(",")]
    except (OSError, UnicodeDecodeError):
        return "nr"  # read_meta reports the problem
    return "custom" if {"image", "mos"} <= set(header) else "nr"
