"""Which evaluation a run reports: the final epoch, the best epoch, and each dataset's own best epoch.

A run evaluates after the epochs of its schedule (``eval.every``, always after the last). What ``results.json`` holds:

- ``final``: the evaluation after the last epoch, the weights the run ends with. The headline figure: it involves
  no choice that looks at the test images.
- ``best``: the evaluated epoch whose mean ``eval.select_metric`` over datasets is highest (``srcc+plcc``: of the
  two summed, the official PromptIQA choice). With ``eval.select_on:
  test`` (the default, as the release does) the held-out part itself decides, so the figure is optimistic; with
  ``train_holdout`` a seeded share of each training part (:func:`carve_holdout`, not trained on) decides, and the
  held-out figures of that epoch are reported.
- ``best_per_dataset``: for each dataset its own best evaluated epoch on the held-out part, which is what the release's
  log reports as "Best" (it keeps the best value of each dataset separately); the most optimistic of the three.

The paper does not say which of these its Table 1 reports (docs/training.md#final-and-best).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..data import IQADataset
from ..data.transforms import TestTransform
from .config import ConfigError, TrainConfig
from .evaluate import mean_metrics

logger = logging.getLogger(__name__)

# Keys of an evaluation record that a result block keeps.
_BLOCK_KEYS = ("epoch", "step", "mean", "datasets", "prompt_sets", "selection")


def carve_holdout(ds: IQADataset, fraction: float, seed: int) -> tuple[IQADataset, IQADataset]:
    """Split a training dataset into what is trained on and a holdout for choosing the best epoch.

    Whole content groups move (a full-reference set's reference image with all its distorted versions; otherwise
    each image path), in an order drawn from ``seed`` and the dataset's name, until at least ``fraction`` of the
    images (and at least 2) are held out; at least one group stays for training.

    Returns:
        (training part, holdout): the holdout is scored like the test part (full images, no augmentation).

    Raises:
        ConfigError: the training part has a single content group, so nothing can be held out.
    """
    name = ds.entry.name
    all_groups = ds.table.groups()
    groups = [all_groups[r] for r in ds.rows]
    unique = list(dict.fromkeys(groups))
    if len(unique) < 2:
        raise ConfigError(f"eval.select_on: train_holdout: the training part of {name!r} has {len(ds.rows)} image(s) "
                          f"in {len(unique)} content group(s); nothing can be held out of it")
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    target = max(2, math.ceil(fraction * len(ds.rows)))
    chosen: set[str] = set()
    count = 0
    for i in rng.permutation(len(unique)):
        if count >= target or len(chosen) == len(unique) - 1:
            break
        chosen.add(unique[i])
        count += sizes[unique[i]]
    train_rows = [r for r, g in zip(ds.rows, groups, strict=True) if g not in chosen]
    hold_rows = [r for r, g in zip(ds.rows, groups, strict=True) if g in chosen]
    if len(hold_rows) < 2:
        logger.warning("%s: the holdout for choosing the best epoch has %d image(s); its correlations are undefined",
                       name, len(hold_rows))
    train = IQADataset(ds.entry, ds.phase, ds.table, train_rows, ds.transform)
    holdout = IQADataset(ds.entry, "val", ds.table, hold_rows, TestTransform(ds.entry.resize))
    return train, holdout


def metric_value(row: Mapping[str, Any], metric: str) -> float | None:
    """``row[metric]``, or for ``srcc+plcc`` the sum of the two (the official PromptIQA code keeps the epoch with the
    largest sum of SRCC + PLCC over datasets; with a fixed set of datasets the mean's largest is the sum's)."""
    if metric == "srcc+plcc":
        srcc, plcc = row.get("srcc"), row.get("plcc")
        return None if srcc is None or plcc is None else float(srcc) + float(plcc)
    return row.get(metric)


def split_off_holdouts(cfg: TrainConfig, train: list[IQADataset]) -> tuple[list[IQADataset], dict[str, IQADataset]]:
    """``eval.holdout_fraction`` of each training dataset held out (seeded by the run seed) to choose the best epoch:
    (what is trained on, holdouts by name)."""
    kept, holdouts = [], {}
    for ds in train:
        rest, holdout = carve_holdout(ds, cfg.eval.holdout_fraction, cfg.seed)
        kept.append(rest)
        holdouts[ds.entry.name] = holdout
        logger.info("%s: %d of %d training images held out to choose the best epoch (eval.select_on: "
                    "train_holdout); %d trained on", ds.entry.name, len(holdout), len(ds), len(rest))
    return kept, holdouts


def selection_view(record: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The part of an evaluation record that the best epoch is chosen on: its holdout figures when it has them."""
    if record is None:
        return None
    return record.get("selection") or record


def block(record: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation record reduced to a result block (``epoch``, ``step``, ``mean``, ``datasets`` ...)."""
    return {k: record[k] for k in _BLOCK_KEYS if k in record}


def best_per_dataset(evals: Sequence[Mapping[str, Any]], metric: str = "srcc") -> dict[str, Any] | None:
    """Each dataset's figures at its own best evaluation by ``metric`` (a tie goes to the later epoch, as in the
    release), with that epoch; per prompt set too when the evaluations have several.

    Returns:
        ``{'datasets': {name: {..., 'epoch': e}}, 'mean': {...}[, 'prompt_sets': {set: {'datasets', 'mean'}}]}``, or
        None without evaluations.
    """
    if not evals:
        return None
    out = _per_dataset_best([(r["epoch"], r["datasets"]) for r in evals], metric)
    sets = evals[-1].get("prompt_sets")
    if sets:
        out["prompt_sets"] = {ps: _per_dataset_best([(r["epoch"], r["prompt_sets"][ps]["datasets"]) for r in evals
                                                     if ps in r.get("prompt_sets", {})], metric) for ps in sets}
    return out


def _per_dataset_best(evals: Sequence[tuple[int, Mapping[str, Any]]], metric: str) -> dict[str, Any]:
    names = list(dict.fromkeys(n for _, per in evals for n in per))
    chosen: dict[str, dict[str, Any]] = {}
    for name in names:
        best: tuple[float, int, Mapping[str, Any]] | None = None
        for epoch, per in evals:
            value = metric_value(per.get(name, {}), metric)
            if value is None or not math.isfinite(value):
                continue
            if best is None or value >= best[0]:
                best = (value, epoch, per[name])
        if best is not None:
            chosen[name] = {**best[2], "epoch": best[1]}
        else:  # no finite value at any epoch: show the last one (nan), so a broken dataset shows
            epoch, per = evals[-1]
            chosen[name] = {**per.get(name, {}), "epoch": epoch}
    return {"datasets": chosen, "mean": mean_metrics({n: _finite_or_nan(v) for n, v in chosen.items()})}


def _finite_or_nan(row: Mapping[str, Any]) -> dict[str, float]:
    return {m: (math.nan if row.get(m) is None else float(row[m])) for m in ("srcc", "plcc", "krcc")}
