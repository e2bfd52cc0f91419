"""Held-out evaluation (per dataset SRCC / PLCC / KRCC) and the 10-split median table.

Scores come from the model in eval mode, i.e. its test-time crop protocol (by default the release's 10 random 224
crops, seeded and independent of the batch), so they do not depend on the batch size or on how the images are spread
over processes: under DDP each process scores every ``world_size``-th image and the scores are gathered before the
correlations are computed, which makes a 2-process evaluation equal to a 1-process one.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .._files import atomic_write
from ..archs import keep_only_experts
from ..data import DATASETS, collate
from ..metrics import evaluate_scores
from .checkpoint import write_json
from .distributed import DistInfo, all_gather_objects

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("srcc", "plcc", "krcc")


def autocast(device: torch.device, amp: str):
    """The autocast context of an ``amp`` setting ('none' | 'bf16' | 'fp16')."""
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=none on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, device: torch.device, *, batch_size: int = 8,
            workers: int = 0, amp: str = "none", dist_info: DistInfo | None = None,
            progress: bool = False, desc: str = "") -> np.ndarray:
    """Scores (N,) of every image of ``dataset`` (items with ``img`` and ``scene``), gathered over processes.

    Images of one batch that differ in size are scored in groups of equal size; scores do not depend on grouping.
    """
    info = dist_info or DistInfo(device=device)
    mine = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    scores: list[float] = []
    bar = _progress(loader, progress and info.is_main, desc)
    for batch in bar:
        images = batch["img"]
        images = list(images) if isinstance(images, torch.Tensor) else images
        scenes = batch["scene"]
        out = torch.empty(len(images), dtype=torch.float64)
        for idx in _same_size_groups(images):
            x = torch.stack([images[i] for i in idx]).to(device, non_blocking=True)
            with autocast(device, amp):
                s = model(x, scene=[scenes[i] for i in idx])
            out[idx] = s.float().cpu().double()
        scores.extend(out.tolist())
    parts = all_gather_objects(scores, info)
    full = np.empty(len(dataset), dtype=np.float64)
    for rank, part in enumerate(parts):
        full[rank :: info.world_size] = part
    return full


def _same_size_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    return list(groups.values())


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def evaluate(model: torch.nn.Module, datasets: Mapping[str, torch.utils.data.Dataset], device: torch.device, *,
             eval_cfg: Any, amp: str = "none", workers: int = 0, dist_info: DistInfo | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Per-dataset correlations of the model's scores with the normalised labels.

    Args:
        model: the bare model (not a DDP wrapper); it is put in eval mode and its crop protocol set from ``eval_cfg``.
        datasets: name -> held-out dataset (``IQADataset``: items with ``img``/``scene``, attribute ``labels``).
        eval_cfg: :class:`gamma.train.config.EvalCfg` (crop protocol, batch size, experts kept).

    Returns:
        ``{'datasets': {name: {'srcc', 'plcc', 'krcc', 'n'}}, 'mean': {'srcc', 'plcc', 'krcc'},
        'predictions': {name: [score, ...]}}``; the same on every process.
    """
    was_training = model.training
    model.eval()
    model.set_crop_protocol(mode=eval_cfg.crop_mode, num=eval_cfg.crops, seed=eval_cfg.crop_seed)
    keep_only_experts(model, eval_cfg.keep_only_experts)
    try:
        per: dict[str, dict[str, float]] = {}
        preds: dict[str, list[float]] = {}
        for name, ds in datasets.items():
            scores = predict(model, ds, device, batch_size=eval_cfg.batch_size, workers=workers, amp=amp,
                             dist_info=dist_info, progress=progress, desc=f"eval {name}")
            per[name] = evaluate_scores(scores, np.asarray(ds.labels, dtype=np.float64))
            preds[name] = scores.tolist()
    finally:
        keep_only_experts(model, None)
        model.train(was_training)
    return {"datasets": per, "mean": mean_metrics(per), "predictions": preds}


def mean_metrics(per: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over datasets (nan when any dataset's value is nan: a broken dataset must show)."""
    out = {}
    for m in METRICS:
        values = [float(v[m]) for v in per.values()]
        out[m] = float(np.mean(values)) if values else math.nan
    return out


# ------------------------------------------------------------------------------------------------ the table
def _order(names: Sequence[str]) -> list[str]:
    """Dataset names in the paper's Table 1 order (registered ones), then the rest in the order given."""
    registered = [n for n in DATASETS if n in names]
    return registered + [n for n in names if n not in DATASETS]


def median_table(split_results: Sequence[Mapping[str, Any]], which: str = "best") -> dict[str, Any]:
    """Median over splits of each dataset's SRCC / PLCC / KRCC (docs/model.md#evaluation-protocol).

    Args:
        split_results: one ``results.json`` per split: ``{'split_index': k, which: {'datasets': {name: {...}}}}``.
        which: the result of each split to use: ``'best'`` (epoch with the best mean SRCC) or ``'last'``.

    Returns:
        ``{'splits': [k, ...], 'datasets': {name: {'srcc': median, 'plcc': ..., 'krcc': ..., 'n_splits': m,
        'per_split': {metric: [values]}}}, 'mean': {...}}`` in Table 1 order.
    """
    if not split_results:
        raise ValueError("no split results to summarise")
    names: list[str] = []
    for r in split_results:
        part = r.get(which)
        if not part or "datasets" not in part:
            raise ValueError(f"split {r.get('split_index', '?')} has no {which!r} evaluation results")
        for n in part["datasets"]:
            if n not in names:
                names.append(n)
    table: dict[str, Any] = {}
    for name in _order(names):
        rows = [r[which]["datasets"][name] for r in split_results if name in r[which]["datasets"]]
        entry: dict[str, Any] = {"n_splits": len(rows), "per_split": {}}
        for m in METRICS:
            values = [float(row[m]) if row.get(m) is not None else math.nan for row in rows]
            entry["per_split"][m] = values
            finite = [v for v in values if math.isfinite(v)]
            entry[m] = statistics.median(finite) if finite else math.nan
        table[name] = entry
    mean = {m: float(np.mean([table[n][m] for n in table])) for m in METRICS}
    return {"splits": [r.get("split_index") for r in split_results], "which": which, "datasets": table, "mean": mean}


def _title(name: str) -> str:
    info = DATASETS.get(name)
    return info.title if info is not None else name


def _fmt(v: float) -> str:
    """Paper style: .957 (three decimals, no leading zero); nan as '-'."""
    if v is None or not math.isfinite(v):
        return "-"
    text = f"{v:.3f}"
    return text.replace("0.", ".", 1) if text.startswith("0.") else text.replace("-0.", "-.", 1)


def table_markdown(table: Mapping[str, Any], label: str = "Gamma") -> str:
    """The median table in the layout of the paper's Table 1: one row, a column per dataset, cells SRCC/PLCC."""
    names = list(table["datasets"])
    head = "| | " + " | ".join(_title(n) for n in names) + " | mean |"
    rule = "|---" * (len(names) + 2) + "|"
    cells = [f"{_fmt(table['datasets'][n]['srcc'])}/{_fmt(table['datasets'][n]['plcc'])}" for n in names]
    cells.append(f"{_fmt(table['mean']['srcc'])}/{_fmt(table['mean']['plcc'])}")
    row = f"| {label} | " + " | ".join(cells) + " |"
    splits = ", ".join(str(s) for s in table["splits"])
    note = (f"\nMedian over {len(table['splits'])} split(s) ({splits}) of SRCC/PLCC on each split's held-out part "
            f"({table['which']} epoch by mean SRCC).\n")
    return "\n".join([head, rule, row]) + "\n" + note


def table_csv(table: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "title", "srcc", "plcc", "krcc", "n_splits"])
    for name, e in table["datasets"].items():
        w.writerow([name, _title(name), *(f"{e[m]:.6f}" for m in METRICS), e["n_splits"]])
    w.writerow(["mean", "mean", *(f"{table['mean'][m]:.6f}" for m in METRICS), len(table["splits"])])
    return buf.getvalue()


def write_table(table: Mapping[str, Any], out_dir: str | Path, label: str = "Gamma") -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``table.json`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = {"md": out / "table.md", "csv": out / "table.csv", "json": out / "table.json"}
    md, csv_text = table_markdown(table, label), table_csv(table)
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))
    atomic_write(paths["csv"], lambda tmp: Path(tmp).write_text(csv_text, encoding="utf-8"))
    write_json(paths["json"], table)
    return paths
