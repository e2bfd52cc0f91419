"""Meta-file readers: the pyiqa / release CSV formats and a plain custom CSV, plus MOS normalisation.

Every meta file starts with a header row (pyiqa reads them with ``pandas.read_csv``, which takes line 1 as the header);
blank lines are skipped, as pandas does, so that row indices in split files mean the same thing here and there.

Formats (``kind``):
    nr:     ``path, mos[, more columns ignored]``
    fr:     ``ref_name, dist_name, mos[, ...]``: the image is ``dist_name``; ``ref_name`` is kept as the record's group
            so that splits never share a reference image between train and test.
    ava:    ``name, MOS, c1..c10[, ...]``: the ten vote counts are kept when present.
    livec:  ``nr``, then the first 7 data rows are dropped before any indexing (pyiqa's LIVEChallengeDataset; the
            release's LIVEC split file indexes the remaining 1,162 rows).
    custom: columns found by header name: ``image`` and ``mos`` required, ``scene`` and ``group`` optional, others
            ignored (with a warning naming them).

Errors are ``ValueError`` (``FileNotFoundError`` for a missing file) whose message names the file and the line
(1-based, the header is line 1). Duplicate image paths are *not* an error: rows are what split files index, so
removing them would shift every index after them. They are reported once with a warning (count and first names), and
:func:`gamma.data.splits.make_splits` keeps duplicates of one path on the same side of a split.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..prompts import canonical_scene
from .registry import META_KINDS

logger = logging.getLogger(__name__)

#: Rows pyiqa's LIVEChallengeDataset drops from the top of the LIVEC meta file.
LIVEC_DROPPED_ROWS = 7

# Header names the custom format recognises (lower case).
_CUSTOM_IMAGE = ("image",)
_CUSTOM_MOS = ("mos",)
_CUSTOM_OPTIONAL = ("scene", "group")

_SHOW = 5  # how many offending names a message lists


@dataclass(frozen=True, slots=True)
class MetaRecord:
    """One labelled image of a meta file."""

    path: str  # image path as written in the file (relative to the dataset's image root)
    mos: float  # raw label as written (MOS or DMOS), finite
    line: int  # 1-based line number in the meta file (header = line 1)
    group: str | None = None  # content group for splitting: the reference image (fr) or the 'group' column (custom)
    scene: str | None = None  # per-row scene (custom format only)
    votes: tuple[float, ...] | None = None  # AVA's ten vote counts (scores 1..10)


@dataclass
class MetaTable:
    """The records of one meta file, in file order (row ``i`` is what split files call index ``i``)."""

    file: str
    kind: str
    header: list[str]
    records: list[MetaRecord]
    dropped: int = 0  # data rows dropped before indexing (LIVEC: 7)
    duplicates: dict[str, int] = field(default_factory=dict)  # path -> number of rows (only paths seen twice or more)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    @property
    def mos(self) -> np.ndarray:
        """Raw labels, (N,) float64."""
        return np.asarray([r.mos for r in self.records], dtype=np.float64)

    def groups(self) -> list[str]:
        """Split groups: the record's group where the format has one, else its path (duplicates stay together)."""
        return [r.group if r.group is not None else r.path for r in self.records]

    def where(self, index: int) -> str:
        """``'<file>, line <n>'`` of record ``index``, for messages."""
        return f"{self.file}, line {self.records[index].line}"


# ------------------------------------------------------------------------------------------------------- reading


def read_meta(path: str | os.PathLike, kind: str = "nr") -> MetaTable:
    """Read a meta CSV of format ``kind`` ('nr' | 'fr' | 'ava' | 'livec' | 'custom').

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown kind, no header, too few columns, a non-numeric or non-finite MOS, no data rows; the
            message names the file and line.
    """
    if kind not in META_KINDS:
        raise ValueError(f"unknown meta kind {kind!r}; known kinds: {', '.join(META_KINDS)}")
    file = os.fspath(path)
    rows = list(_csv_rows(file))
    if not rows:
        raise ValueError(f"{file}: empty meta file (no header, no rows)")
    (_, header), data = rows[0], rows[1:]
    header = [h.strip() for h in header]

    if kind == "custom":
        records = _parse_custom(file, header, data)
    else:
        records = _parse_positional(file, kind, header, data)

    dropped = 0
    if kind == "livec":
        if len(records) <= LIVEC_DROPPED_ROWS:
            raise ValueError(f"{file}: a LIVEC meta file needs more than {LIVEC_DROPPED_ROWS} data rows (the first "
                             f"{LIVEC_DROPPED_ROWS} are dropped, as pyiqa does); found {len(records)}")
        records, dropped = records[LIVEC_DROPPED_ROWS:], LIVEC_DROPPED_ROWS
    if not records:
        raise ValueError(f"{file}: no data rows after the header (line 1)")

    table = MetaTable(file=file, kind=kind, header=header, records=records, dropped=dropped)
    counts = Counter(table.paths)
    table.duplicates = {p: c for p, c in counts.items() if c > 1}
    if table.duplicates:
        extra = sum(table.duplicates.values()) - len(table.duplicates)
        names = ", ".join(list(table.duplicates)[:_SHOW])
        logger.warning("%s: %d image path(s) listed more than once (%d extra rows), e.g. %s; all rows are kept "
                       "(split files index rows), and make_splits keeps each path's rows on one side",
                       file, len(table.duplicates), extra, names)
    return table


def _csv_rows(file: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank CSV row; decoding and CSV errors become ``ValueError``."""
    if not os.path.isfile(file):
        if os.path.exists(file):
            raise ValueError(f"{file}: not a file")
        raise FileNotFoundError(f"meta file not found: {file}")
    line = 0
    try:
        with open(file, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            for fields in reader:
                # reader.line_num counts physical lines read so far (a quoted field may span lines)
                line = reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):  # blank line (pandas skips these)
                    continue
                yield line, fields
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise ValueError(f"{file}, line {line + 1}: malformed CSV ({exc})") from None


def _parse_float(file: str, line: int, text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{file}, line {line}: {column} is {text.strip()!r}, not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{file}, line {line}: {column} is {text.strip()!r}, not a finite number")
    return value


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# Positional column layout of each pyiqa format: (path column, mos column, group column or None, minimum columns).
_LAYOUT = {"nr": (0, 1, None, 2), "livec": (0, 1, None, 2), "ava": (0, 1, None, 2), "fr": (1, 2, 0, 3)}
_FORMAT_HINT = {
    "nr": "path, mos", "livec": "path, mos", "ava": "name, MOS, c1..c10", "fr": "ref_name, dist_name, mos",
}


def _parse_positional(file: str, kind: str, header: list[str], data: list[tuple[int, list[str]]]) -> list[MetaRecord]:
    path_col, mos_col, group_col, min_cols = _LAYOUT[kind]
    expect = _FORMAT_HINT[kind]
    if len(header) < min_cols:
        raise ValueError(f"{file}, line 1: header has {len(header)} column(s) {header}; a {kind!r} meta file has "
                         f"at least {min_cols} ({expect})")
    if is_number(header[mos_col]) and not is_number(header[path_col]):
        raise ValueError(f"{file}, line 1: looks like data, not a header ({header[:min_cols]}); meta files start "
                         f"with a header row ({expect})")
    mos_name = f"column {mos_col + 1} ({header[mos_col] or 'mos'})"
    records = []
    for line, fields in data:
        if len(fields) < min_cols:
            raise ValueError(f"{file}, line {line}: {len(fields)} column(s), a {kind!r} meta file needs at least "
                             f"{min_cols} ({expect})")
        path = fields[path_col].strip()
        if not path:
            raise ValueError(f"{file}, line {line}: empty image path in column {path_col + 1}")
        try:
            mos = float(fields[mos_col])
            if not math.isfinite(mos):
                raise ValueError
        except ValueError:
            mos = None
        if mos is None:  # slow path: the precise message
            try:
                _parse_float(file, line, fields[mos_col], mos_name)
            except ValueError as exc:
                if kind == "nr" and len(fields) >= 3 and is_number(fields[2]) and not is_number(fields[1]):
                    raise ValueError(f"{exc}; is this a full-reference meta file (ref_name, dist_name, mos)? "
                                     "then use kind 'fr'") from None
                raise
        group = fields[group_col].strip() if group_col is not None else None
        if group_col is not None and not group:
            raise ValueError(f"{file}, line {line}: empty reference name in column {group_col + 1}")
        votes = None
        if kind == "ava" and len(fields) >= 12:
            try:
                votes = tuple(map(float, fields[2:12]))
                if not all(map(math.isfinite, votes)):
                    raise ValueError
            except ValueError:  # slow path: name the column
                votes = tuple(_parse_float(file, line, fields[c], f"vote count c{c - 1}") for c in range(2, 12))
            if min(votes) < 0 or sum(votes) <= 0:
                raise ValueError(f"{file}, line {line}: vote counts must be >= 0 with a positive sum, got {votes}")
        records.append(MetaRecord(path=path, mos=mos, line=line, group=group, votes=votes))
    return records


def _parse_custom(file: str, header: list[str], data: list[tuple[int, list[str]]]) -> list[MetaRecord]:
    names = [h.lower() for h in header]

    def column(accepted: Sequence[str], required: bool) -> int | None:
        found = [i for i, n in enumerate(names) if n in accepted]
        if len(found) > 1:
            raise ValueError(f"{file}, line 1: column {accepted[0]!r} appears {len(found)} times in the header")
        if not found and required:
            raise ValueError(f"{file}, line 1: header {header} has no {accepted[0]!r} column; a custom meta file "
                             "has the header 'image,mos' (optional columns: scene, group); for a "
                             "pyiqa-style file whose columns are path, mos in that order, use kind 'nr'")
        return found[0] if found else None

    ci, cm = column(_CUSTOM_IMAGE, True), column(_CUSTOM_MOS, True)
    cs, cg = column(("scene",), False), column(("group",), False)
    ignored = [h for h, n in zip(header, names, strict=True) if n not in _CUSTOM_IMAGE + _CUSTOM_MOS + _CUSTOM_OPTIONAL]
    if ignored:
        logger.warning("%s: ignoring column(s) %s (a custom meta file uses image, mos, scene, group)", file, ignored)
    need = max(c for c in (ci, cm, cs, cg) if c is not None) + 1
    records = []
    for line, fields in data:
        if len(fields) < max(ci, cm) + 1:
            raise ValueError(f"{file}, line {line}: {len(fields)} column(s), the header names {len(header)}")
        fields = fields + [""] * (need - len(fields))  # trailing optional columns may be left off
        path = fields[ci].strip()
        if not path:
            raise ValueError(f"{file}, line {line}: empty image path in column {header[ci]!r}")
        mos = _parse_float(file, line, fields[cm], f"column {header[cm]!r}")
        scene = None
        if cs is not None and fields[cs].strip():
            try:
                scene = canonical_scene(fields[cs])
            except ValueError as exc:
                raise ValueError(f"{file}, line {line}: {exc}") from None
        group = (fields[cg].strip() or None) if cg is not None else None
        records.append(MetaRecord(path=path, mos=mos, line=line, group=group, scene=scene))
    return records


# ------------------------------------------------------------------------------------------------- normalisation


def check_mos_range(mos_range: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats; ``ValueError`` unless both are finite and ``lo < hi``."""
    try:
        lo, hi = (float(v) for v in mos_range)
    except (TypeError, ValueError):
        raise ValueError(f"mos_range must be two numbers [lo, hi], got {mos_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"mos_range must be finite with lo < hi, got {list(mos_range)}")
    return lo, hi


def normalize_mos(mos: float | np.ndarray, mos_range: Sequence[float], lower_better: bool) -> float | np.ndarray:
    """``y = (mos - lo) / (hi - lo)``, then ``1 - y`` when ``lower_better`` (DMOS), so higher is better in [0, 1]."""
    lo, hi = check_mos_range(mos_range)
    y = (np.asarray(mos, dtype=np.float64) - lo) / (hi - lo)
    if lower_better:
        y = 1.0 - y
    return float(y) if np.ndim(y) == 0 else y


def denormalize_mos(y: float | np.ndarray, mos_range: Sequence[float], lower_better: bool) -> float | np.ndarray:
    """Inverse of :func:`normalize_mos`: back to the dataset's own scale."""
    lo, hi = check_mos_range(mos_range)
    y = np.asarray(y, dtype=np.float64)
    if lower_better:
        y = 1.0 - y
    x = y * (hi - lo) + lo
    return float(x) if np.ndim(x) == 0 else x


def validate_range(table: MetaTable, mos_range: Sequence[float], on_error: str = "error",
                   indices: Sequence[int] | None = None) -> int:
    """Check that every label (of ``indices``, default all) lies in ``mos_range``.

    Args:
        table: the meta table.
        mos_range: (lo, hi).
        on_error: 'error' raises ``ValueError`` naming the file, line and value of the first offender (and the
            count); 'warn' logs the same and returns the count.
        indices: record indices to check.

    Returns:
        The number of labels outside the range.
    """
    if on_error not in ("error", "warn"):
        raise ValueError(f"range_check must be 'error' or 'warn', got {on_error!r}")
    lo, hi = check_mos_range(mos_range)
    idx = range(len(table)) if indices is None else indices
    bad = [i for i in idx if not lo <= table.records[i].mos <= hi]
    if bad:
        first = table.records[bad[0]]
        msg = (f"{table.file}, line {first.line}: MOS {first.mos:g} of {first.path!r} is outside mos_range "
               f"[{lo:g}, {hi:g}] ({len(bad)} label(s) outside in all); fix mos_range, or set range_check: warn "
               "to train with normalised labels outside [0, 1]")
        if on_error == "error":
            raise ValueError(msg)
        logger.warning(msg)
    return len(bad)


def to_mos(score: Any, lo: float, hi: float, lower_better: bool = False) -> Any:
    """Map normalised scores (0 = worst, 1 = best) back to a dataset's label scale.

    :func:`gamma.data.meta.denormalize_mos`, the inverse of the training normalisation ``y = (mos - lo) / (hi - lo)``
    (``y = 1 - y`` for DMOS-like labels, ``lower_better``), with the range given as two numbers; ``hi < lo`` reads
    as a reversed scale. Tensors give tensors.
    """
    return _with_range(denormalize_mos, score, lo, hi, lower_better)


def from_mos(mos: Any, lo: float, hi: float, lower_better: bool = False) -> Any:
    """Normalise labels on a dataset's scale to [0, 1], higher is better (:func:`gamma.data.meta.normalize_mos`; the
    inverse of :func:`to_mos`)."""
    return _with_range(normalize_mos, mos, lo, hi, lower_better)


def _with_range(convert: Callable[..., Any], values: Any, lo: float, hi: float, lower_better: bool) -> Any:
    if hi == lo:
        raise ValueError(f"MOS range must not be empty, got lo = hi = {lo}")
    # A reversed range (hi < lo) is the ordered one with the label direction flipped.
    mos_range, lower_better = ((lo, hi), lower_better) if lo < hi else ((hi, lo), not lower_better)
    torch = sys.modules.get("torch")  # a tensor can only come from a loaded torch (this module does not need it)
    if torch is not None and isinstance(values, torch.Tensor):
        out = convert(values.detach().cpu().numpy(), mos_range, lower_better)
        return torch.as_tensor(out, dtype=values.dtype, device=values.device)
    return convert(values, mos_range, lower_better)


# One input item: its display name and a function that decodes it into (3, H, W) in [0, 1].
