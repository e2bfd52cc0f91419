"""Figures of runs and experts (matplotlib, imported when a figure is drawn): ``gamma plot RUN_DIR``.

- :func:`plot_training_curves`: from a run folder's ``metrics.jsonl`` (docs/training.md, "The run folder"): the training
  loss over steps, and SRCC / PLCC per dataset per evaluated epoch with the final epoch and the selected best marked.
- :func:`plot_median_table`: an all-splits run's ``table.csv`` (the median over splits) as a figure.
- :func:`routing_heatmap_figure`: router weights, blocks x experts, as a heat map (the demo's Experts tab and
  ``gamma analyze routing --plot``).

Figures use matplotlib's object-oriented API on an Agg canvas (no pyplot state, no change to a notebook's backend).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

METRIC_NAMES = ("srcc", "plcc")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------------------------------------ run folders
def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a partial last line, from a run still writing, is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: not a JSON record, skipped", path, n)
    return records


def plot_training_curves(run_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Training loss and per-dataset SRCC / PLCC per evaluated epoch of one run folder, into the PNG ``path``.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
        ValueError: it holds neither training nor evaluation records.
    """
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a training run folder?)")
    records = read_metrics(metrics)
    train = [r for r in records if r.get("kind") == "train" and _finite(r.get("loss"))]
    evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get("datasets"), Mapping)]
    if not train and not evals:
        raise ValueError(f"{metrics}: no training or evaluation records to plot")
    results = _read_json(run_dir / "results.json")
    best_epoch = ((results or {}).get("best") or {}).get("epoch")
    fig = _figure(5.0 * (1 + len(METRIC_NAMES)), 3.8)
    axes = fig.subplots(1, 1 + len(METRIC_NAMES), squeeze=False)[0]
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, color="C0", label="train loss")
    epoch_loss = [(r["step"], r["train_loss"]) for r in evals if _finite(r.get("train_loss"))]
    if epoch_loss:
        ax.plot(*zip(*epoch_loss, strict=True), "o", color="C1", ms=4, label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    if ax.has_data():
        ax.legend(frameon=False, fontsize=8)
    names = list(dict.fromkeys(n for r in evals for n in r["datasets"]))
    epochs = [r["epoch"] for r in evals]
    for ax, metric in zip(axes[1:], METRIC_NAMES, strict=True):
        for k, name in enumerate(names):
            ys = [_get(r["datasets"].get(name), metric) for r in evals]
            ax.plot(epochs, ys, "-o", ms=3, color=f"C{k % 10}", label=name)
        means = [_get(r.get("mean"), metric) for r in evals]
        if evals:
            ax.plot(epochs, means, "--", color="black", lw=1.5, label="mean")
            ax.plot(epochs[-1], means[-1], "s", color="black", ms=8, mfc="none", label=f"final (epoch {epochs[-1]})")
        if best_epoch in epochs:
            i = epochs.index(best_epoch)
            ax.plot(best_epoch, means[i], "*", color="red", ms=12, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric.upper())
        ax.set_title(f"held-out {metric.upper()} per dataset")
        if ax.has_data():
            ax.legend(frameon=False, fontsize=7)
        else:
            ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_median_table(table_csv: str | os.PathLike, path: str | os.PathLike) -> Path:
    """An all-splits ``table.csv`` (median over splits per dataset) as grouped bars and the numbers, into ``path``."""
    with open(table_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{table_csv}: an empty table")
    kinds = [c[:-5] for c in rows[0] if c.endswith("_srcc")]
    names = [r["dataset"] for r in rows]
    fig = _figure(max(6.0, 1.1 * len(names) * len(kinds) ** 0.5 + 3), 6.5)
    ax, tab = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 2]})
    width = 0.8 / (2 * len(kinds))
    x = np.arange(len(names))
    for k, kind in enumerate(kinds):
        for m, metric in enumerate(METRIC_NAMES):
            values = [_number(r.get(f"{kind}_{metric}")) for r in rows]
            offset = (2 * k + m - (2 * len(kinds) - 1) / 2) * width
            ax.bar(x + offset, values, width, label=f"{kind} {metric.upper()}", color=f"C{2 * k + m}")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(min(0.0, *[_number(r.get(f"{k}_srcc")) or 0 for r in rows for k in kinds]), 1.0)
    ax.set_ylabel("median over splits")
    ax.legend(frameon=False, fontsize=8, ncol=len(kinds))
    n_splits = rows[-1].get("n_splits", "?")
    ax.set_title(f"median SRCC / PLCC over {n_splits} splits ({Path(table_csv).parent.name})")
    tab.axis("off")
    columns = [f"{k}_{m}" for k in kinds for m in METRIC_NAMES]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    table = tab.table(cellText=cells, rowLabels=names, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


# ------------------------------------------------------------------------------------------------ routing
def routing_heatmap_figure(weights: np.ndarray, rows: Sequence[str], *, title: str = "router weights",
                           columns: Sequence[str] | None = None) -> Any:
    """A heat map figure of ``weights`` (rows x experts), each cell annotated; returns the matplotlib Figure."""
    weights = np.asarray(weights, dtype=float)
    columns = list(columns) if columns is not None else [f"expert {k}" for k in range(weights.shape[1])]
    fig = _figure(1.3 + 1.1 * weights.shape[1], 1.2 + 0.45 * weights.shape[0])
    ax = fig.subplots()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(1.0 / max(weights.shape[1], 1),
                                                                   float(np.nanmax(weights)) if weights.size else 1))
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), list(rows))
    for (i, j), v in np.ndenumerate(weights):
        ax.text(j, i, "-" if not math.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="white" if v < 0.6 * image.norm.vmax else "black")
    fig.colorbar(image, ax=ax, label="mean router weight")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def distribution_figure(probabilities: Mapping[str, float], name: str = "") -> Any:
    """The level distribution (``bad`` ... ``perfect`` -> probability) as a bar chart; returns the Figure."""
    fig = _figure(5.0, 2.8)
    ax = fig.subplots()
    levels = list(probabilities)
    ax.bar(levels, [probabilities[k] for k in levels], color="#4477aa")
    for x, level in enumerate(levels):
        ax.text(x, probabilities[level] + 0.01, f"{probabilities[level]:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(0.5, 1.15 * max(probabilities.values(), default=0)))
    ax.set_ylabel("probability")
    ax.set_title(f"level distribution {name}".strip(), fontsize=9)
    fig.tight_layout()
    return fig


def plot_routing_heatmaps(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """``gamma analyze routing`` rows as heat maps: one panel per MoAE block, groups (datasets / scenes) x experts.

    The kind of figure of the paper's Fig. 4-5: which expert each kind of image is routed to, block by block.
    """
    groups = list(dict.fromkeys(str(r["group"]) for r in rows))
    blocks = sorted({int(r["block"]) for r in rows})
    experts = sorted({int(r["expert"]) for r in rows})
    if not groups or not blocks:
        raise ValueError("no routing rows to plot")
    table = {(str(r["group"]), int(r["block"]), int(r["expert"])): float(r["weight"]) for r in rows}
    fig = _figure(1.5 + (1.0 + 0.9 * len(experts)) * len(blocks), 1.3 + 0.45 * len(groups))
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    image = None
    for ax, block in zip(axes, blocks, strict=True):
        grid = np.array([[table.get((g, block, k), math.nan) for k in experts] for g in groups])
        image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(experts)), [f"E{k}" for k in experts])
        ax.set_yticks(range(len(groups)), groups if ax is axes[0] else [""] * len(groups))
        for (i, j), v in np.ndenumerate(grid):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_title(f"image block {block}", fontsize=9)
    fig.colorbar(image, ax=list(axes), label="mean router weight", fraction=0.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return Path(path)


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gamma plot``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (<output_dir>/<name>/split_<k>, with "
                        "metrics.jsonl), or an all-splits folder (<output_dir>/<name>, with table.csv and split_*/)")
    parser.add_argument("--out-dir", "-o", help="where the PNGs go (default: RUN_DIR)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``gamma plot`` on a ``gamma`` sub-command parser."""
    parser = subparsers.add_parser("plot", help="training curves and the median table of a run folder, as PNGs",
                                   description="Draw training_curves.png (loss; SRCC/PLCC per dataset per evaluated "
                                   "epoch, final and best marked) for each run folder found, and table.png for an "
                                   "all-splits folder's table.csv.")
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """``gamma plot``: prints the files written; 2 when RUN_DIR holds nothing to plot."""
    import sys

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"gamma: error: {run_dir} is not a folder", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_dir] if (run_dir / "metrics.jsonl").is_file() else sorted(
        p for p in run_dir.glob("split_*") if (p / "metrics.jsonl").is_file())
    written = []
    for folder in runs:
        name = "training_curves.png" if folder == run_dir else f"training_curves_{folder.name}.png"
        try:
            written.append(plot_training_curves(folder, out_dir / name))
        except ValueError as exc:
            print(f"gamma plot: {exc}", file=sys.stderr)
    if (run_dir / "table.csv").is_file():
        written.append(plot_median_table(run_dir / "table.csv", out_dir / "table.png"))
    if not written:
        print(f"gamma: error: {run_dir}: no metrics.jsonl (nor split_*/metrics.jsonl) and no table.csv to plot",
              file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _get(block: Any, metric: str) -> float:
    v = block.get(metric) if isinstance(block, Mapping) else None
    return float(v) if _finite(v) else math.nan


def _number(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _fmt(text: Any) -> str:
    v = _number(text)
    return "-" if not math.isfinite(v) else f"{v:.3f}"
