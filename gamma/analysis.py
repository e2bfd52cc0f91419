"""Expert analysis: which experts the routers use for which kind of image, and what each expert alone is worth.

- :func:`routing_statistics`: the mean router weight of every expert in every MoAE block of the image tower, for each
  group of images (a dataset or a scene) — the paper's expert-activation figure. :func:`write_routing` saves it as a
  CSV and a matplotlib figure.
- :func:`single_expert_evaluation`: SRCC / PLCC on a labelled set with all experts, then with only one expert kept
  (the others' router weights zeroed, :func:`gamma.keep_only_experts`) — the paper's Table 6.

Command line: ``gamma analyze routing ...`` and ``gamma analyze experts ...`` (see ``gamma analyze -h`` and
:mod:`gamma.cli`).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .archs.gamma import GammaModel
from .archs.moae import MoAE, keep_only_experts
from .metrics import plcc, srcc
from .prompts import DATASET_SCENES, canonical_scene
from .scorer import Scorer

logger = logging.getLogger(__name__)

ROUTING_COLUMNS = ["group", "scene", "tower", "block", "expert", "weight", "tokens", "images"]
EXPERT_COLUMNS = ["setting", "experts", "srcc", "plcc", "images"]


def image_moae_blocks(model: GammaModel) -> list[tuple[int, MoAE]]:
    """(block index, MoAE) of the image tower, in depth order."""
    blocks = model.clip_model.visual.transformer.resblocks
    return [(i, b.mlp) for i, b in enumerate(blocks) if isinstance(b.mlp, MoAE)]


class _RoutingAccumulator:
    """Sums router weights over tokens, per image-tower block, through :meth:`GammaModel.watch_routing`."""

    def __init__(self, model: GammaModel, blocks: list[tuple[int, MoAE]]) -> None:
        self.model = model
        self.index = {m: i for i, m in blocks}  # MoAE -> block index; the text tower's blocks are not counted
        self.sums = {i: torch.zeros(m.num_experts, dtype=torch.float64) for i, m in blocks}
        self.tokens = dict.fromkeys(self.sums, 0)
        self._watch = contextlib.ExitStack()

    def __enter__(self) -> _RoutingAccumulator:
        self._watch.enter_context(self.model.watch_routing(self._add))
        return self

    def __exit__(self, *exc: object) -> None:
        self._watch.close()

    def _add(self, module: MoAE, gate: torch.Tensor) -> None:
        index = self.index.get(module)
        if index is None:
            return
        flat = gate.reshape(-1, gate.shape[-1]).double()  # (B * L, N): every token, CLS included
        self.sums[index] += flat.sum(dim=0).cpu()
        self.tokens[index] += flat.shape[0]


def routing_statistics(
    model: GammaModel,
    groups: Mapping[str, Any],
    *,
    scenes: Mapping[str, str | None] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_images: int | None = None,
) -> list[dict[str, Any]]:
    """Mean router weight of each expert in each image-tower MoAE block, per group of images.

    Args:
        model: a Gamma model (its crop protocol applies: every token of every crop counts).
        groups: group name (a dataset or scene) -> images in any form :meth:`gamma.scorer.Scorer.score` accepts.
        scenes: group -> scene for SDP models (the scene picks the prompts, not the image routing, but SDP models need
            one to run); default: the group name if it is a dataset or scene name.
        batch_size: images per forward pass.
        device: where to run (default: the model's device).
        max_images: use at most this many images of each group (the first ones, in file order).

    Returns:
        rows with keys :data:`ROUTING_COLUMNS`, ``tower`` being ``image``.
    """
    blocks = image_moae_blocks(model)
    if not blocks:
        raise ValueError("this model has no MoAE blocks (moae_layers=0 or num_experts=0): nothing to analyse")
    device = device if device is not None else next(model.parameters()).device
    scorer = Scorer(model=model, device=device, batch_size=batch_size, num_workers=0)
    rows: list[dict[str, Any]] = []
    for group, images in groups.items():
        scene = (scenes or {}).get(group) or _scene_for(group, model)
        items = scorer.inputs.items(images)
        if max_images is not None:  # cut the inputs, not the results: a batch runs whole through the routers
            items = islice(items, max_images)
        with _RoutingAccumulator(model, blocks) as acc:
            results = scorer._score_items(items, scene, "skip")
            used = 0
            for r in results:
                if r.ok:
                    used += 1
                else:
                    logger.warning("skipping %s", r.error)
        if used == 0:
            logger.warning("group %s: no readable images", group)
        for i, _module in blocks:
            mean = (acc.sums[i] / max(acc.tokens[i], 1)).tolist()
            for k, w in enumerate(mean):
                rows.append({"group": group, "scene": scene or "", "tower": "image", "block": i, "expert": k,
                             "weight": w if acc.tokens[i] else math.nan, "tokens": acc.tokens[i], "images": used})
    return rows


def _scene_for(group: str, model: GammaModel) -> str | None:
    if model.config.prompt_set != "sdp":
        return None
    key = group.lower()
    if key in DATASET_SCENES:
        return DATASET_SCENES[key]
    try:
        return canonical_scene(key)
    except ValueError:
        raise ValueError(
            f"group {group!r} is neither a dataset nor a scene name: give its scene (scenes={{{group!r}: ...}}, "
            "CLI: NAME=PATH:SCENE)"
        ) from None


def write_routing(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, stem: str = "routing") -> list[Path]:
    """Write routing rows as ``<stem>.csv`` and a figure ``<stem>.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROUTING_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in ROUTING_COLUMNS})
    png_path = out / f"{stem}.png"
    plot_routing(rows, png_path)
    return [csv_path, png_path]


def plot_routing(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """One panel per MoAE block; in each, the mean weight of every expert as bars grouped by image group."""
    # The object-oriented API with an Agg canvas: no pyplot, no change to a notebook's global backend. Imported here:
    # matplotlib is an optional dependency (the `analysis` extra), needed only for the figure.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(r["group"] for r in rows))
    blocks = sorted({int(r["block"]) for r in rows})
    experts = sorted({int(r["expert"]) for r in rows})
    table = {(r["group"], int(r["block"]), int(r["expert"])): float(r["weight"]) for r in rows}
    cols = min(3, len(blocks))
    nrows = math.ceil(len(blocks) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(experts))
    for ax, block in zip(axes.flat, blocks, strict=False):
        for g, group in enumerate(groups):
            heights = [table.get((group, block, k), math.nan) for k in experts]
            ax.bar(x + (g - (len(groups) - 1) / 2) * width, heights, width, label=group)
        ax.axhline(1 / len(experts), color="grey", lw=0.8, ls="--")  # uniform routing
        ax.set_title(f"image block {block}")
        ax.set_xticks(x, [f"expert {k}" for k in experts])
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(blocks):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("mean router weight")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(groups), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)


# -------------------------------------------------------------------------------------------- Table 6
def single_expert_evaluation(
    model: GammaModel,
    images: Sequence[Any],
    labels: Sequence[float],
    *,
    scene: str | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """SRCC / PLCC of the model with all experts, then with each expert alone (paper Table 6).

    Args:
        images: one entry per label (paths, tensors ...; see :meth:`gamma.scorer.Scorer.score`).
        labels: normalised MOS (higher is better) or raw MOS; correlations do not depend on the scale.
        scene: scene for SDP models.

    Returns:
        rows with keys :data:`EXPERT_COLUMNS`; ``setting`` is ``all`` or ``only expert k``.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    blocks = image_moae_blocks(model)
    if not blocks:
        raise ValueError("this model has no MoAE blocks: nothing to ablate")
    device = device if device is not None else next(model.parameters()).device
    scorer = Scorer(model=model, device=device, batch_size=batch_size, num_workers=0)
    num_experts = blocks[0][1].num_experts
    settings: list[tuple[str, list[int] | None]] = [("all", None)]
    settings += [(f"only expert {k}", [k]) for k in range(num_experts)]
    y = np.asarray(labels, dtype=np.float64)
    rows = []
    try:
        for name, keep in settings:
            keep_only_experts(model, keep)  # both towers; the model's text-feature cache is keyed on the kept experts
            results = list(scorer.iter_scores(list(images), scene, on_error="skip"))
            pred = np.array([r.score for r in results], dtype=np.float64)
            ok = np.isfinite(pred) & np.isfinite(y)
            if ok.sum() < 3:
                raise ValueError(f"need at least 3 scored images with labels, got {int(ok.sum())}")
            rows.append({"setting": name, "experts": "all" if keep is None else " ".join(map(str, keep)),
                         "srcc": srcc(pred[ok], y[ok]), "plcc": plcc(pred[ok], y[ok]), "images": int(ok.sum())})
    finally:
        keep_only_experts(model, None)
    return rows


def write_rows(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})
    return path


def read_labels(meta: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[list[str], list[float]]:
    """Image paths and labels from a two-column CSV (path relative to ``root``, then MOS; more columns ignored).

    A first row whose label is not a number is taken as a header.
    """
    paths, labels = [], []
    base = Path(root) if root is not None else Path(meta).parent
    with open(meta, newline="", encoding="utf-8") as fh:
        for line_no, row in enumerate(csv.reader(fh), 1):
            if len(row) < 2:
                continue
            try:
                value = float(row[1])
            except ValueError:
                if line_no == 1:
                    continue
                raise ValueError(f"{meta}:{line_no}: label {row[1]!r} is not a number") from None
            paths.append(str(base / row[0]))
            labels.append(value)
    if not paths:
        raise ValueError(f"{meta}: no (path, label) rows")
    return paths, labels
