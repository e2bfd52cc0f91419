"""Held-out evaluation (per dataset SRCC / PLCC / KRCC) and the 10-split median table.

Scores come from the model in eval mode, i.e. its test-time crop protocol (by default the release's 10 random 224
crops, seeded and independent of the batch), so they do not depend on the batch size or on how the images are spread
over processes: under DDP each process scores every ``world_size``-th image and the scores are gathered before the
correlations are computed, which makes a 2-process evaluation equal to a 1-process one.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
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
from ..archs.precision import exact_fp32, place
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

    fp32 computation is exact (no TF32: :func:`gamma.archs.precision.exact_fp32`); ``amp`` autocasts the forward
    (for a caller that wants it; :func:`evaluate` scores at the model's own precision instead).

    ``model(images, scene=...)`` returns (B,) scores, or (B, k) rows of k numbers per image (several outputs, e.g.
    :class:`gamma.train.promptiqa.AssessedOutputs`); the result is then (N, k), its shape taken from the first batch.
    Images of one batch that differ in size are scored in groups of equal size; scores do not depend on grouping.
    """
    info = dist_info or DistInfo(device=device)
    mine = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    scores: list[Any] = []  # a float per image, or a list of k floats
    bar = _progress(loader, progress and info.is_main, desc)
    for batch in bar:
        images = batch["img"]
        images = list(images) if isinstance(images, torch.Tensor) else images
        scenes = batch["scene"]
        out = None  # (B,) or (B, k), shaped after the first group's output
        for idx in _same_size_groups(images):
            x = torch.stack([images[i] for i in idx]).to(device, non_blocking=True)
            with autocast(device, amp), exact_fp32():
                s = model(x, scene=[scenes[i] for i in idx])
            if out is None:
                out = torch.empty((len(images), *s.shape[1:]), dtype=torch.float64)
            out[idx] = s.float().cpu().double()
        scores.extend(out.tolist())
    parts = all_gather_objects(scores, info)
    tail = next((np.shape(part[0]) for part in parts if part), ())  # () for scores, (k,) for rows
    full = np.empty((len(dataset), *tail), dtype=np.float64)
    for rank, part in enumerate(parts):
        if part:  # (a process with no image sent [], which does not broadcast to (0, k))
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
             eval_cfg: Any, workers: int = 0, dist_info: DistInfo | None = None,
             progress: bool = False, headline_only: bool = False) -> dict[str, Any]:
    """Per-dataset correlations of the model's scores with the normalised labels.

    The scores are those of the model's own precision: ``eval_cfg.precision`` (fp32, exact: no autocast and no TF32;
    or a converted copy), never the training run's autocast (``amp``), which rounds every score (bf16: steps of
    ~0.004 near 0.6) and adds ties to SRCC / KRCC.

    With ``eval_cfg.prompt_sets`` the same weights are scored once per prompt set (paper Table 15); the headline
    figures (``datasets``, ``mean``, ``predictions``) are those of :func:`headline_prompt_set`.

    Args:
        model: the bare model (not a DDP wrapper); it is put in eval mode and its crop protocol set from ``eval_cfg``.
        datasets: name -> held-out dataset (``IQADataset``: items with ``img``/``scene``, attribute ``labels``).
        eval_cfg: :class:`gamma.train.config.EvalCfg` (crop protocol, batch size, experts kept, prompt sets,
            precision: not fp32 scores a copy of the model converted with ``to_precision``).
        headline_only: score with the headline prompt set alone (choosing the best epoch needs no other).

    Returns:
        ``{'datasets': {name: {'srcc', 'plcc', 'krcc', 'n'}}, 'mean': {'srcc', 'plcc', 'krcc'},
        'predictions': {name: [score, ...]}}``, with prompt sets also ``'prompt_sets': {set: {'datasets', 'mean'}}``;
        the same on every process.
    """
    precision = getattr(eval_cfg, "precision", "fp32")
    if precision != "fp32":
        # The trained weights stay fp32 and the model untouched: a converted copy is scored, then dropped. Autocast
        # (amp) would also cast what to_precision keeps in fp32, so the copy runs without it.
        scored = place(copy.deepcopy(model), None, precision)
        return evaluate(scored, datasets, device, eval_cfg=dataclasses.replace(eval_cfg, precision="fp32"),
                        workers=workers, dist_info=dist_info, progress=progress,
                        headline_only=headline_only)
    was_training = model.training
    own = model.config.prompt_set
    sets = list(eval_cfg.prompt_sets or [own])
    headline = headline_prompt_set(own, sets)
    if headline_only:
        sets = [headline]
    model.eval()
    model.set_crop_protocol(mode=eval_cfg.crop_mode, num=eval_cfg.crops, seed=eval_cfg.crop_seed)
    keep_only_experts(model, eval_cfg.keep_only_experts)
    by_set: dict[str, dict[str, Any]] = {}
    try:
        for prompt_set in sets:
            model.set_prompt_set(prompt_set)
            per: dict[str, dict[str, float]] = {}
            preds: dict[str, list[float]] = {}
            tag = f" ({prompt_set} prompts)" if len(sets) > 1 else ""
            for name, ds in datasets.items():
                scores = predict(model, ds, device, batch_size=eval_cfg.batch_size, workers=workers,
                                 dist_info=dist_info, progress=progress, desc=f"eval {name}{tag}")
                per[name] = evaluate_scores(scores, np.asarray(ds.labels, dtype=np.float64))
                preds[name] = scores.tolist()
            by_set[prompt_set] = {"datasets": per, "mean": mean_metrics(per), "predictions": preds}
    finally:
        model.set_prompt_set(own)
        keep_only_experts(model, None)
        model.train(was_training)
        if was_training:
            drop_scoring_caches(model)
    out = dict(by_set[headline])
    if eval_cfg.prompt_sets and not headline_only:
        out["prompt_sets"] = {ps: {"datasets": r["datasets"], "mean": r["mean"]} for ps, r in by_set.items()}
    return out


def drop_scoring_caches(model: torch.nn.Module) -> None:
    """Free what scoring cached for the weights as they were (the fused MoAE kernels' stacked expert weights): the
    next optimiser step makes it stale, and training would hold it (GPU memory) until the next evaluation."""
    for module in model.modules():
        kernel = getattr(module, "kernel", None)
        if kernel is not None and hasattr(kernel, "_cache"):
            kernel._cache = None


def headline_prompt_set(own: str, sets: Sequence[str]) -> str:
    """The prompt set whose figures lead (and choose the best epoch): the model's own when listed, else the first."""
    return own if own in sets else sets[0]


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


#: Result blocks of a split's ``results.json`` that the table summarises, in row order (``final`` leads).
TABLE_KINDS: tuple[str, ...] = ("final", "best", "best_per_dataset")


def split_blocks(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The result blocks (``final``, ``best``, ``best_per_dataset``) of one split's ``results.json``.

    A file written before gamma reported the final epoch has ``last`` instead of ``final`` (the same evaluation for a
    finished run) and no ``best_per_dataset``; it is read as such.
    """
    blocks: dict[str, Mapping[str, Any]] = {}
    final = result.get("final")
    if final is None and result.get("last") and result.get("finished", True):
        final = result["last"]
    for kind, part in (("final", final), ("best", result.get("best")),
                       ("best_per_dataset", result.get("best_per_dataset"))):
        if part and isinstance(part, Mapping) and isinstance(part.get("datasets"), Mapping):
            blocks[kind] = part
    return blocks


def evaluated_epochs(result: Mapping[str, Any]) -> list[int]:
    """The epochs a split was evaluated after (from its history when the file predates ``evaluated_epochs``)."""
    if result.get("evaluated_epochs") is not None:
        return [int(e) for e in result["evaluated_epochs"]]
    return [int(h["epoch"]) for h in result.get("history") or [] if h.get("kind") == "eval"]


def median_table(split_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median over splits of each dataset's SRCC / PLCC / KRCC (docs/model.md#evaluation-protocol), one row per
    result kind (``final``, ``best``, ``best_per_dataset``; docs/training.md#final-and-best) and prompt set.

    Args:
        split_results: one ``results.json`` per split.

    Returns:
        ``{'splits': [k, ...], 'rows': [{'kind', 'prompt_set', 'label', 'datasets': {name: {'srcc': median, 'plcc',
        'krcc', 'n_splits', 'per_split': {metric: [values]}}}, 'mean': {...}, 'epochs': [per split]}, ...],
        'headline': kind, 'which': kind, 'datasets': ..., 'mean': ... (the headline row), 'evaluated_epochs',
        'selected_on', 'eval_only', 'prompt_sets'}``; datasets in Table 1 order.

    Raises:
        ValueError: no results, or a split without any evaluation to report (the message names it).
    """
    if not split_results:
        raise ValueError("no split results to summarise")
    blocks = [split_blocks(r) for r in split_results]
    for r, b in zip(split_results, blocks, strict=True):
        if not b:
            raise ValueError(f"split {r.get('split_index', '?')} has no evaluation results (neither 'final' nor "
                             "'best'); has it finished?")
    kinds = [k for k in TABLE_KINDS if all(k in b for b in blocks)]
    if not kinds:
        raise ValueError("the splits have no result kind in common (" + "; ".join(
            f"split {r.get('split_index', '?')}: {', '.join(b)}" for r, b in zip(split_results, blocks, strict=True))
            + ")")
    eval_only = all(r.get("eval_only") for r in split_results)
    if eval_only:  # one evaluation, no epochs to choose from
        kinds = kinds[:1]
    headline = kinds[0]
    sets = _common_prompt_sets([b[headline] for b in blocks])
    rows = []
    for prompt_set in sets or [None]:
        for kind in kinds:
            parts = [_datasets_of(b[kind], prompt_set) for b in blocks]
            rows.append({"kind": kind, "prompt_set": prompt_set, "datasets": _medians(parts),
                         "epochs": [b[kind].get("epoch") for b in blocks]})
    for row in rows:
        row["mean"] = {m: float(np.mean([row["datasets"][n][m] for n in row["datasets"]])) for m in METRICS}
    head_set = split_results[0].get("headline_prompt_set") if sets else None
    head = next((r for r in rows if r["kind"] == headline and r["prompt_set"] in (head_set, None)), rows[0])
    epochs = {str(r.get("split_index")): evaluated_epochs(r) for r in split_results}
    distinct = {tuple(v) for v in epochs.values()}
    selected = sorted({str((r.get("selection") or {}).get("on", "test")) for r in split_results})
    table = {
        "splits": [r.get("split_index") for r in split_results],
        "headline": headline, "which": headline,  # ('which': the name older readers know)
        "eval_only": eval_only, "prompt_sets": sets,
        "selected_on": selected[0] if len(selected) == 1 else selected,
        "holdout_fraction": (split_results[0].get("selection") or {}).get("holdout_fraction"),
        "evaluated_epochs": list(distinct.pop()) if len(distinct) == 1 else epochs,
        "rows": rows, "datasets": head["datasets"], "mean": head["mean"],
    }
    for row in rows:
        row["label"] = _row_label(row, table)
    return table


def _common_prompt_sets(parts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Prompt sets every split was scored with (in the first split's order); [] without prompt sets."""
    first = list(parts[0].get("prompt_sets") or {})
    return [ps for ps in first if all(ps in (p.get("prompt_sets") or {}) for p in parts)]


def _datasets_of(part: Mapping[str, Any], prompt_set: str | None) -> Mapping[str, Any]:
    return part["prompt_sets"][prompt_set]["datasets"] if prompt_set is not None else part["datasets"]


def _medians(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    names: list[str] = []
    for per in parts:
        names.extend(n for n in per if n not in names)
    out: dict[str, Any] = {}
    for name in _order(names):
        rows = [per[name] for per in parts if name in per]
        entry: dict[str, Any] = {"n_splits": len(rows), "per_split": {}}
        for m in METRICS:
            values = [float(row[m]) if row.get(m) is not None else math.nan for row in rows]
            entry["per_split"][m] = values
            finite = [v for v in values if math.isfinite(v)]
            entry[m] = statistics.median(finite) if finite else math.nan
        if any("epoch" in row for row in rows):  # best per dataset: the epoch each split chose
            entry["per_split"]["epoch"] = [row.get("epoch") for row in rows]
        out[name] = entry
    return out


def _row_label(row: Mapping[str, Any], table: Mapping[str, Any]) -> str:
    if table["eval_only"]:
        text = "evaluation"
    elif row["kind"] == "final":
        epochs = {e for e in row["epochs"] if e is not None}
        text = f"final (epoch {epochs.pop()})" if len(epochs) == 1 else "final"
    elif row["kind"] == "best":
        on = table["selected_on"]
        text = ("best (selected on a holdout of the training part)" if on == "train_holdout"
                else "best (selected on the held-out split)" if on == "test" else "best")
    else:
        text = "best per dataset (as the release logs)"
    return f"{row['prompt_set']} prompts, {text}" if row["prompt_set"] else text


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
    """The median table in the layout of the paper's Table 1: a column per dataset, cells SRCC/PLCC, one row per
    result kind (and prompt set), followed by what each row is and which epochs were evaluated."""
    rows = table.get("rows") or [{"label": table.get("which", ""), "datasets": table["datasets"],
                                  "mean": table["mean"]}]
    names = list(rows[0]["datasets"])
    lines = ["| " + label + " | " + " | ".join(_title(n) for n in names) + " | mean |",
             "|---" * (len(names) + 2) + "|"]
    for row in rows:
        cells = [f"{_fmt(row['datasets'][n]['srcc'])}/{_fmt(row['datasets'][n]['plcc'])}" if n in row["datasets"]
                 else "-" for n in names]
        cells.append(f"{_fmt(row['mean']['srcc'])}/{_fmt(row['mean']['plcc'])}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(_notes(table)) + "\n"


def _notes(table: Mapping[str, Any]) -> list[str]:
    splits = ", ".join(str(s) for s in table["splits"])
    notes = [f"Median over {len(table['splits'])} split(s) ({splits}) of SRCC/PLCC on each split's held-out part."]
    epochs = table.get("evaluated_epochs")
    if isinstance(epochs, Mapping):
        notes.append("Evaluated epochs: " + "; ".join(f"split {k}: {_epochs(v)}" for k, v in epochs.items()) + ".")
    elif epochs is not None:
        notes.append(f"Evaluated epochs: {_epochs(epochs)}.")
    kinds = [r["kind"] for r in table.get("rows", [])]
    if table.get("eval_only"):
        notes.append("Evaluation only: the given weights, no training.")
    if "final" in kinds and not table.get("eval_only"):
        notes.append("- final (the headline): the weights after the last epoch; nothing was chosen on test images.")
    if "best" in kinds:
        chosen = ", ".join(str(e) for e in next(r for r in table["rows"] if r["kind"] == "best")["epochs"])
        if table.get("selected_on") == "train_holdout":
            share = table.get("holdout_fraction")
            where = (f"a holdout of {share:.0%} of each training part (not trained on)" if share
                     else "a holdout of each training part (not trained on)")
            notes.append(f"- best: in each split the evaluated epoch with the best mean SRCC over datasets on {where}, "
                         f"reported on the held-out part; epochs chosen: {chosen}.")
        else:
            notes.append("- best: in each split the evaluated epoch with the best mean SRCC over datasets on the "
                         f"held-out part itself, so the test images choose it (optimistic); epochs chosen: {chosen}.")
    if "best_per_dataset" in kinds:
        notes.append("- best per dataset: each dataset's own best evaluated epoch on the held-out part, the 'Best' of "
                     "the release's log (the most optimistic).")
    if table.get("prompt_sets"):
        notes.append("- prompt sets: the same weights scored with each set (naive: 'bad image' ... 'perfect image'; "
                     "quality: 'bad-quality image' ...; sdp: scene-based differential prompts); "
                     "docs/training.md#prompt-analysis-table-15.")
    return notes


def _epochs(epochs: Sequence[int]) -> str:
    return ", ".join(str(e) for e in epochs) or "none"


def table_csv(table: Mapping[str, Any]) -> str:
    """One line per (prompt set and) dataset, then the mean; columns ``<kind>_srcc``, ``<kind>_plcc``, ``<kind>_krcc``
    for each result kind (``final_srcc`` ... ``best_srcc`` ...)."""
    rows = table.get("rows") or [{"kind": table.get("which", "value"), "prompt_set": None,
                                  "datasets": table["datasets"], "mean": table["mean"]}]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    sets = list(dict.fromkeys(r["prompt_set"] for r in rows))
    with_sets = sets != [None]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*(["prompt_set"] if with_sets else []), "dataset", "title",
                *(f"{k}_{m}" for k in kinds for m in METRICS), "n_splits"])
    for ps in sets:
        mine = {r["kind"]: r for r in rows if r["prompt_set"] == ps}
        lead = mine[kinds[0]]
        for name in lead["datasets"]:
            values = [_csv_number(mine[k]["datasets"].get(name, {}).get(m)) for k in kinds for m in METRICS]
            w.writerow([*([ps] if with_sets else []), name, _title(name), *values, lead["datasets"][name]["n_splits"]])
        values = [_csv_number(mine[k]["mean"][m]) for k in kinds for m in METRICS]
        w.writerow([*([ps] if with_sets else []), "mean", "mean", *values, len(table["splits"])])
    return buf.getvalue()


def _csv_number(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.6f}"


def write_table(table: Mapping[str, Any], out_dir: str | Path, label: str = "Gamma") -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``table.json`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = {"md": out / "table.md", "csv": out / "table.csv", "json": out / "table.json"}
    md, csv_text = table_markdown(table, label), table_csv(table)
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))
    atomic_write(paths["csv"], lambda tmp: Path(tmp).write_text(csv_text, encoding="utf-8"))
    write_json(paths["json"], table)
    return paths
