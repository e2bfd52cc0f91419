"""How a training recipe joins the one loop (:mod:`gamma.train.loop`): an :class:`Objective` says what a stage trains
on and for; Gamma's own recipe is the loop's default (MOS regression with :func:`mse_sum`).

The hooks that take ``run`` get the loop's :class:`gamma.train.loop.Run` (typed ``Any`` here: this module is what
the loop imports, not the other way round).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import TrainConfig
from .distributed import DistInfo


def mse_sum(pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Gamma's loss: the sum over a micro-batch of squared errors against the normalised MOS (padding slots weigh 0).

    Args:
        pred: the training forward's output (b,), float32.
        batch: the collated micro-batch (``mos``, ``weight``).
    """
    target = batch["mos"].to(pred.device, non_blocking=True).float()
    weight = batch["weight"].to(pred.device, non_blocking=True)
    return ((pred - target).square() * weight).sum()


@dataclass(frozen=True)
class Objective:
    """What a stage trains on and for, when it is not Gamma's MOS regression on the ``data`` entries (ATTIQA
    pretraining, :mod:`gamma.train.attiqa`; PromptIQA and Gamma + ISP, :mod:`gamma.train.promptiqa`). Everything else
    (optimiser, checkpoints, resume, DDP, signals, best and final, run folder) is the loop's own.

    ``train_sets`` / ``eval_sets``: datasets whose items are those of :class:`gamma.data.IQADataset` plus whatever
    ``loss_sum`` reads (the held-out predictions are written with the ``eval_sets``' paths and labels).
    ``loss_sum(pred, batch)``: the sum over the micro-batch's real samples of their loss, as :func:`mse_sum` (the step's
    loss is that sum over all micro-batches and processes divided by the number of real samples). ``evaluate(run)``:
    the figures of an evaluation, ``{'datasets': {name: {metric: value}}, 'mean': {...}, 'predictions': {eval-set
    name: [...]}}`` as :func:`gamma.train.evaluate.evaluate` returns them, optionally ``'selection'`` (the figures on
    ``select_sets``) and ``'record'`` (more keys for the run's history, not for the metrics log).
    ``configure_model(model)``: called on the new model before its trainable parameters go to the optimiser.

    The optional hooks replace one more part of Gamma's recipe each:

    - ``build_model(cfg)``: the model (else :func:`gamma.train.loop.build_model`); ``wrap(model)``: the module the
      training step calls (what DDP wraps; else the model);
    - ``plan(cfg, dist, sizes)``: the epoch plan (``steps_per_epoch``; else :class:`~gamma.train.sampling.EpochPlan`);
      ``loader(run, epoch, start_step)``: the iterable of the epoch's batches from ``start_step`` on;
      ``step(run, batches, step)``: one step's forward and backward passes, returning this process's loss sum (a
      float64 tensor) and the divisor that makes the sum over all processes the step's loss (else Gamma's micro-batches
      through ``loss_sum``);
    - ``lr_at(epoch)``: the learning rate of each 0-based epoch (else :func:`gamma.train.resume.planned_lr`);
    - ``select_sets``: holdouts chosen by the objective (its ``evaluate`` then returns ``'selection'``), instead of the
      loop carving them for ``eval.select_on: train_holdout``;
    - ``results(run, out)``: adds the stage's own entries to ``results.json``.
    """

    train_sets: list[torch.utils.data.Dataset]
    eval_sets: dict[str, torch.utils.data.Dataset]
    loss_sum: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor] | None
    evaluate: Callable[[Any], dict[str, Any]]
    configure_model: Callable[[torch.nn.Module], None] | None = None
    build_model: Callable[[TrainConfig], torch.nn.Module] | None = None
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    plan: Callable[[TrainConfig, DistInfo, list[int]], Any] | None = None
    loader: Callable[[Any, int, int], Iterable[dict[str, Any]]] | None = None
    step: Callable[[Any, Iterator[dict[str, Any]], int], tuple[torch.Tensor, float]] | None = None
    lr_at: Callable[[int], float] | None = None
    select_sets: dict[str, torch.utils.data.Dataset] | None = None
    results: Callable[[Any, dict[str, Any]], None] | None = None
