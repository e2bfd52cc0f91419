"""New assessment requirements for images that already have labels: the same pictures and split, new labels from a rule.

PromptIQA is meant to follow a requirement it was never trained on from ~10 image-score pairs. To test that, a
requirement is made by relabelling an existing dataset: the images, the split file and the content groups stay, the
labels change. A :class:`RequirementCfg` says how:

- ``invert: true``: ``1 - y``, y the source's normalised label: the same judgement on a DMOS-like scale;
- ``weights: {distortion: w, ...}``: ``prod(1 - w * s)`` over the distortions each picture carries (kind and strength
  from the synthetic datasets' ``distortion`` / ``strength`` meta columns, gamma/data/synthetic.py); a distortion
  without a weight does not count. ``{blur: 1}`` is "only blur counts"; weights that order two distortions the other
  way round from every training rater make a preference reversal;
- both: the weighted label, inverted.

:func:`write_requirement` writes the new labels as a meta file (same row order, so the split file still applies) and
returns the dataset entry that reads it. Full-reference metrics as new labels (PromptIQA's Table 3: SSIM, FSIM, LPIPS
on TID2013 / KADID-10k) are written by ``scripts/fr_labels.py`` in the same way.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import atomic_write
from .datasets import DatasetEntry
from .meta import normalize_mos, read_meta

logger = logging.getLogger(__name__)

#: Meta columns (by header name) that describe a synthetic picture's distortions: ``blur+noise`` / ``0.512+0.100``.
DISTORTION_COLUMN = "distortion"
STRENGTH_COLUMN = "strength"


@dataclass
class RequirementCfg:
    """One new requirement: a data entry's pictures relabelled (an item of ``promptiqa.requirements``)."""

    name: str  # the new dataset's name in results and tables
    source: str  # name of the data / eval_data entry whose pictures, split and groups it takes
    weights: dict[str, float] | None = None  # label = prod(1 - w * s) over each picture's distortions; None: the
    #                                          source's own normalised label
    invert: bool = False  # label = 1 - label (a DMOS-like scale)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a requirement needs a name, got {self.name!r}")
        if self.weights is None and not self.invert:
            raise ValueError(f"requirement {self.name!r}: give weights, invert: true, or both (otherwise the labels "
                             "are the source's own)")
        for kind, w in (self.weights or {}).items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not -1.0 <= float(w) <= 1.0:
                raise ValueError(f"requirement {self.name!r}: weights.{kind} must be a number in [-1, 1], got {w!r}")


def distortions_of(meta_file: str | os.PathLike, rows: int | None = None) -> list[list[tuple[str, float]]]:
    """Each data row's distortions ``[(kind, strength), ...]`` from a meta file's ``distortion`` / ``strength``
    columns (``none`` / ``0``: a pristine picture), in file order with blank lines skipped (as the meta readers do).

    Raises:
        ValueError: the columns are missing, a row's kinds and strengths do not pair up, a strength is not a number,
            or the file has another number of rows than ``rows`` (the message names the file and line).
    """
    with open(meta_file, newline="", encoding="utf-8") as fh:
        lines = [(n, r) for n, r in enumerate(csv.reader(fh), start=1) if r and any(c.strip() for c in r)]
    if not lines:
        raise ValueError(f"{meta_file}: empty meta file")
    header = [c.strip().lower() for c in lines[0][1]]
    missing = [c for c in (DISTORTION_COLUMN, STRENGTH_COLUMN) if c not in header]
    if missing:
        raise ValueError(f"{meta_file}: no {' / '.join(missing)} column, so distortion weights cannot be applied "
                         f"(columns: {', '.join(header)}); only invert: true works on this dataset")
    kind_col, strength_col = header.index(DISTORTION_COLUMN), header.index(STRENGTH_COLUMN)
    out = []
    for line, r in lines[1:]:
        kinds = r[kind_col].strip() if kind_col < len(r) else ""
        values = r[strength_col].strip() if strength_col < len(r) else ""
        if kinds in ("", "none"):
            out.append([])
            continue
        names, strengths = kinds.split("+"), values.split("+")
        if len(names) != len(strengths):
            raise ValueError(f"{meta_file}, line {line}: {len(names)} distortion(s) but {len(strengths)} strength(s)")
        try:
            out.append([(k.strip(), float(s)) for k, s in zip(names, strengths, strict=True)])
        except ValueError:
            raise ValueError(f"{meta_file}, line {line}: strength {values!r} is not a number") from None
    if rows is not None and len(out) != rows:
        raise ValueError(f"{meta_file}: {len(out)} data rows with distortion columns, but its table has {rows}")
    return out


def weighted_labels(distortions: list[list[tuple[str, float]]], weights: Mapping[str, float]) -> np.ndarray:
    """``prod(1 - w * s)`` per picture (N,), clipped to [0, 1]; distortions without a weight do not count."""
    out = np.ones(len(distortions), dtype=np.float64)
    for i, items in enumerate(distortions):
        for kind, s in items:
            out[i] *= 1.0 - float(weights.get(kind, 0.0)) * s
    return np.clip(out, 0.0, 1.0)


def requirement_labels(req: RequirementCfg, source: DatasetEntry) -> np.ndarray:
    """The new labels (N,) in [0, 1] of every row of ``source``'s meta file, in row order."""
    table = read_meta(source.meta_path, source.kind)
    if req.weights is not None:
        if table.dropped:
            raise ValueError(f"requirement {req.name!r}: {source.name!r} drops rows before indexing; weights need a "
                             "meta file whose rows are all indexed")
        labels = weighted_labels(distortions_of(source.meta_path, len(table)), req.weights)
    else:
        labels = np.asarray(normalize_mos(table.mos, source.mos_range, source.lower_better), dtype=np.float64)
        labels = np.clip(labels, 0.0, 1.0)
    return 1.0 - labels if req.invert else labels


def write_requirement(req: RequirementCfg, source: DatasetEntry, folder: str | os.PathLike) -> DatasetEntry:
    """Write ``req``'s labels as ``<folder>/<name>.csv`` and return the dataset entry that reads them.

    The file lists the source's rows in their order (``image, mos``, plus ``group`` when the source has content
    groups, e.g. a full-reference set's reference image), so the source's split file indexes it the same way.
    The entry keeps the source's images, split, scene and sizes; its labels are in [0, 1], higher meaning what the
    requirement says (``mos_range: [0, 1]``, not flipped).
    """
    table = read_meta(source.meta_path, source.kind)
    labels = requirement_labels(req, source)
    grouped = any(r.group is not None for r in table.records)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "mos", *(["group"] if grouped else [])])
    for rec, y in zip(table.records, labels, strict=True):
        w.writerow([rec.path, f"{y:.6f}", *([rec.group or rec.path] if grouped else [])])
    path = Path(folder) / f"{req.name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    logger.info("requirement %s: %d labels of %s written to %s (mean %.3f)", req.name, len(labels), source.name, path,
                float(labels.mean()))
    fields = {k: v for k, v in source.to_dict().items() if k not in ("name", "meta_file", "mos_range", "lower_better",
                                                                       "kind", "range_check")}
    return DatasetEntry.from_dict({**fields, "name": req.name, "meta_file": str(path.resolve()), "mos_range": [0, 1],
                                   "lower_better": False, "kind": "custom", "range_check": "error"})
