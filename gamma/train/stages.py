"""What a run is (an option file's ``stage:``) and the chaining of one stage to the next.

Every stage name maps to a :class:`Stage` in :data:`STAGES`:

- ``gamma``: Gamma's mixed-dataset training and evaluation (:func:`gamma.train.loop.train`; every split in turn with
  ``--all_splits``, then the median table);
- ``pretrain_clip``: contrastive pretraining of the CLIP backbone on captioned images
  (:func:`gamma.train.pretrain.run`);
- ``attiqa_pretrain``: ATTIQA's attribute-aware pretraining of a student on teacher labels
  (:func:`gamma.train.attiqa.pretrain`); ``attiqa_finetune``: MOS training of a student, as ``gamma``;
- ``promptiqa``: PromptIQA's recipe and test protocol, for PromptIQA and Gamma + ISP
  (:func:`gamma.train.promptiqa.train_split`).

Adding a stage (PromptIQA training, ATTIQA pretraining or fine-tuning ...) takes a function from the resolved
configuration to the stage's results, one row in :data:`STAGES`, its name in ``TrainConfig.stage`` and, when it has
options of its own, a section of :class:`gamma.train.config.TrainConfig`.

A stage registered with ``follow_ups`` names option files to run after it (``pretrain.then``): each runs with the
first stage's data, data root, output folder, split, seed, workers, overwrite and log settings, starting from the
weights it wrote (``model.pretrained``), then its own ``key=value`` overrides. Their held-out results are tabulated
side by side in the first stage's run folder (``summary.md`` / ``summary.json``).
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._files import atomic_write
from . import attiqa, pretrain, promptiqa
from .checkpoint import write_json
from .config import TrainConfig, config_to_dict, load_config
from .distributed import DistInfo, cleanup, setup
from .loop import train
from .run_folder import run_all_splits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One kind of run.

    ``run(cfg, resume=..., all_splits=..., dist=...)`` does the stage's work and returns its results; ``dist`` is the
    process's :class:`gamma.train.distributed.DistInfo` (joined once by :func:`gamma.train.main.main`; None: the
    stage joins the group itself through :func:`gamma.train.distributed.setup`, which reuses an existing one). A stage
    that others may follow returns the weights file they start from as ``results['backbone']`` and its run folder as
    ``results['run_dir']``, and ``follow_ups(cfg)`` lists the option files (each optionally followed by ``key=value``
    overrides) to run after it.
    """

    run: Callable[..., dict[str, Any]]
    follow_ups: Callable[[TrainConfig], list[str]] | None = None


@contextmanager
def process_group(cfg: TrainConfig, dist: DistInfo | None) -> Iterator[DistInfo]:
    """``dist`` when the caller holds the process group, else one joined here and left on exit."""
    if dist is not None:
        yield dist
        return
    own = setup(cfg.device, cfg.ddp.backend, cfg.ddp.timeout_s)
    try:
        yield own
    finally:
        cleanup(own)


def train_gamma(cfg: TrainConfig, resume: bool = False, all_splits: bool = False,
                dist: DistInfo | None = None) -> dict[str, Any]:
    """Stage ``gamma``: one split (``cfg.split_index``), or every split of ``cfg.splits`` with ``all_splits``."""
    with process_group(cfg, dist) as d:
        if all_splits:
            return run_all_splits(cfg, d, train, resume=resume)
        return train(cfg, d, resume=resume)


def pretrain_clip(cfg: TrainConfig, resume: bool = False, all_splits: bool = False,  # noqa: ARG001
                  dist: DistInfo | None = None) -> dict[str, Any]:
    """Stage ``pretrain_clip``: one pass of pretraining on ``cfg.split_index`` (there is nothing to resume), on rank 0
    alone (the other ranks wait without a timeout and read its result)."""
    with process_group(cfg, dist) as d:
        return pretrain.run(cfg, d)


def attiqa_finetune(cfg: TrainConfig, resume: bool = False, all_splits: bool = False,
                    dist: DistInfo | None = None) -> dict[str, Any]:
    """Stage ``attiqa_finetune``: MOS training of an ATTIQA student (docs/attiqa.md#trainer-stages), run as stage
    ``gamma`` runs (one split, or every split and the median table)."""
    attiqa.check_student(cfg)
    result = train_gamma(cfg, resume=resume, all_splits=all_splits, dist=dist)
    if cfg.attiqa.feature_similarity:  # the paper's feature analysis (docs/attiqa.md#option-files)
        result["feature_similarity"] = attiqa.feature_similarity(cfg, all_splits=all_splits)
    return result


def train_promptiqa(cfg: TrainConfig, resume: bool = False, all_splits: bool = False,
                    dist: DistInfo | None = None) -> dict[str, Any]:
    """Stage ``promptiqa``: one split, or every split of ``cfg.splits`` and the median table
    (:func:`gamma.train.promptiqa.train_split`)."""
    with process_group(cfg, dist) as d:
        if all_splits:
            return run_all_splits(cfg, d, promptiqa.train_split, resume=resume)
        return promptiqa.train_split(cfg, d, resume=resume)




STAGES: dict[str, Stage] = {
    "gamma": Stage(train_gamma),
    "pretrain_clip": Stage(pretrain_clip, follow_ups=lambda cfg: cfg.pretrain.then),
    "attiqa_pretrain": Stage(attiqa.pretrain, follow_ups=lambda cfg: cfg.attiqa.then),
    "attiqa_finetune": Stage(attiqa_finetune),
    "promptiqa": Stage(train_promptiqa),
}


def run_stage(cfg: TrainConfig, resume: bool = False, all_splits: bool = False,
              dist: DistInfo | None = None) -> dict[str, Any]:
    """Run ``cfg.stage`` and then the stages that follow it, all in the process group of ``dist`` (joined here and
    left at the end when None).

    Returns:
        the stage's results; for a stage with follow-ups also ``'stages'`` (their results by run name),
        ``'seconds_total'`` and, when any ran, ``'summary'`` (all but ``'stages'`` also in its ``results.json``).
    """
    with process_group(cfg, dist) as d:
        return _run_chain(cfg, resume, all_splits, d)


def _run_chain(cfg: TrainConfig, resume: bool, all_splits: bool, dist: DistInfo) -> dict[str, Any]:
    stage = STAGES[cfg.stage]
    t0 = time.perf_counter()
    result = stage.run(cfg, resume=resume, all_splits=all_splits, dist=dist)
    if stage.follow_ups is None:
        return result
    results = {}
    for item in stage.follow_ups(cfg):
        results.update(run_follow_up(item, cfg, Path(result["backbone"]), dist))
    result["stages"] = results
    result["seconds_total"] = time.perf_counter() - t0
    run_dir = Path(result["run_dir"])
    if dist.is_main:
        if results:
            result["summary"] = write_summary(run_dir, results, result["seconds_total"])
        write_json(run_dir / "results.json", {k: v for k, v in result.items() if k != "stages"})
    return result


def run_follow_up(item: str, cfg: TrainConfig, weights: Path, dist: DistInfo | None = None) -> dict[str, Any]:
    """Run one follow-up stage: ``item`` is an option file, optionally followed by ``key=value`` overrides.

    Returns:
        ``{run name: its results}``.
    """
    option_file = shlex.split(item)[0]
    logger.info("next stage: %s", item)
    result = run_stage(follow_up_config(item, cfg, weights), dist=dist)
    return {result.get("name", Path(option_file).stem): result}


def follow_up_config(item: str, cfg: TrainConfig, weights: Path) -> TrainConfig:
    """The configuration of one follow-up stage: its option file, then ``cfg``'s shared settings (data, data root,
    output folder, split, seed, workers, overwrite, log; ``model.pretrained = weights``), then the item's own
    ``key=value`` overrides, so that ``seed=N`` on the first stage's command line reaches every stage of the chain
    unless the item sets its own."""
    option_file, *own = shlex.split(item)
    shared = {"data": [e.to_dict() for e in cfg.data], "data_root": cfg.data_root, "output_dir": cfg.output_dir,
              "split_index": cfg.split_index, "seed": cfg.seed, "workers": cfg.workers, "overwrite": cfg.overwrite,
              "log": config_to_dict(cfg.log), "model.pretrained": str(weights)}
    follow_up = load_config(option_file, [*(f"{k}={json.dumps(v)}" for k, v in shared.items()), *own])
    follow_up.restart = cfg.restart  # only the first stage's command line may ask to replace an unfinished run
    return follow_up


def write_summary(run_dir: Path, stages: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Held-out SRCC / PLCC of each follow-up stage after its last epoch side by side (``summary.md`` /
    ``summary.json``)."""
    table: dict[str, Any] = {}
    for name, res in stages.items():
        final = res.get("final") or res.get("best") or {}
        table[name] = {"datasets": final.get("datasets", {}), "mean": final.get("mean", {}),
                       "epoch": final.get("epoch"), "seconds": res.get("seconds")}
    datasets = list(dict.fromkeys(d for row in table.values() for d in row["datasets"]))
    lines = ["| run | " + " | ".join(datasets) + " | mean |", "|---" * (len(datasets) + 2) + "|"]
    for name, row in table.items():
        cells = [f"{row['datasets'][d]['srcc']:.3f} / {row['datasets'][d]['plcc']:.3f}" if d in row["datasets"]
                 else "-" for d in datasets]
        mean = row["mean"]
        cells.append(f"{mean['srcc']:.3f} / {mean['plcc']:.3f}" if mean else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = ("Held-out SRCC / PLCC (content never seen in training), each run after its last epoch.\n\n"
            + "\n".join(lines)
            + f"\n\nTotal time {seconds:.0f} s.\n")
    atomic_write(run_dir / "summary.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    summary = {"runs": table, "seconds": seconds}
    atomic_write(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    for line in text.strip().splitlines():
        logger.info("%s", line)
    return summary
