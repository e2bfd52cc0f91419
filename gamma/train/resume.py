"""What ``--resume`` may change (docs/training.md#interruptions).

The learning rate of every epoch is a function of the configuration and the 0-based epoch (:func:`planned_lr`, or a
stage's own ``Objective.lr_at``), set at the start of each epoch; nothing about the schedule is carried in the
checkpoint but the configuration it was written with. So a resumed run whose schedule settings changed (``epochs``,
``optim.lr``, ``optim.min_lr``, ``optim.scheduler``; for stage ``promptiqa`` also ``promptiqa.cosine_period`` and
``promptiqa.lr_schedule``) goes on as the schedule over the new settings would have been had the run been planned with
them from the start: extending a finished 1-epoch cosine run to 2 epochs trains epoch 2 at half the peak rate, never
at the old plan's floor. Only a length the run has already reached or passed is refused: there is nothing left to
train at it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, config_to_dict

logger = logging.getLogger(__name__)

SCHEDULE_KEYS = ("epochs", "optim.lr", "optim.min_lr", "optim.scheduler")
PROMPTIQA_SCHEDULE_KEYS = ("promptiqa.cosine_period", "promptiqa.lr_schedule")
# Settings that do not change what is trained (and the folder's own name) are not worth a warning. A holdout for
# choosing the best epoch does: its images are not trained on.
_IGNORED = {"overwrite", "workers", "eval", "log", "splits", "output_dir", "device", "ddp", "name", "checkpoint"}
_MATTER = {"eval.select_on", "eval.holdout_fraction"}


def planned_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch`` in Gamma's recipe: cosine annealing from ``optim.lr`` to ``optim.min_lr``
    over ``epochs``, stepped once per epoch (the closed form of ``CosineAnnealingLR(T_max=epochs)``); ``optim.lr``
    throughout with ``optim.scheduler: constant``."""
    o = cfg.optim
    if o.scheduler != "cosine":
        return o.lr
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


def schedule_keys(cfg: TrainConfig) -> tuple[str, ...]:
    """The dotted keys the learning rate of ``cfg``'s stage depends on."""
    return SCHEDULE_KEYS + (PROMPTIQA_SCHEDULE_KEYS if cfg.stage == "promptiqa" else ())


def check_resume(old: dict[str, Any], cfg: TrainConfig, epoch: int, lr_at: Callable[[int], float], saved_lr: float,
                 path: Path) -> None:
    """Compare a checkpoint's configuration ``old`` with the resumed run's ``cfg``: refuse a length the run has
    already reached, log a re-planned schedule with the learning rate of the next epoch, warn about other changes.

    Args:
        old: the configuration the checkpoint was written with (plain data; empty for checkpoints without one).
        cfg: the resumed run's configuration.
        epoch: the checkpoint's epoch in progress (0-based; the number of whole epochs trained).
        lr_at: the learning rate of each 0-based epoch under ``cfg``.
        saved_lr: the learning rate in the checkpoint's optimiser (that of the last epoch trained).
        path: the checkpoint (for messages).

    Raises:
        ConfigError: ``epochs`` is at or below the epochs already trained (and differs from the checkpoint's).
    """
    if not old:
        return
    old_flat, new_flat = _flat(old), _flat(config_to_dict(cfg))
    old_epochs = old_flat.get("epochs", cfg.epochs)
    if cfg.epochs < epoch or (cfg.epochs == epoch and old_epochs != epoch):
        raise ConfigError(f"epochs={cfg.epochs}: the run in {path.parent} has already trained {epoch} of its "
                          f"{old_epochs} planned epochs, so nothing is left to train at that length; resume with "
                          f"epochs > {epoch} (or without changing epochs), or start over with --restart")
    keys = schedule_keys(cfg)
    changed = [k for k in keys if old_flat.get(k) != new_flat.get(k)]
    if changed and epoch < cfg.epochs:
        what = ", ".join(f"{k} {old_flat.get(k)} -> {new_flat.get(k)}" for k in changed)
        logger.warning("resuming %s with a new learning-rate schedule (%s): re-planned as if the run had been planned "
                       "with these settings from the start; epoch %d of %d trains at lr %.3g (the last trained epoch "
                       "ran at lr %.3g)", path, what, epoch + 1, cfg.epochs, lr_at(epoch), saved_lr)
    others = sorted(k for k in set(old_flat) | set(new_flat)
                    if k not in keys and (k.split(".")[0] not in _IGNORED or k in _MATTER)
                    and old_flat.get(k) != new_flat.get(k))
    if others:
        logger.warning("resuming %s with a different configuration (%s): the run is no longer the one it started as",
                       path, ", ".join(others[:8]) + (" ..." if len(others) > 8 else ""))


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
