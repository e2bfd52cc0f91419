"""The training run: build data and model, train epoch by epoch, evaluate, checkpoint, resume.

The recipe is the paper's (docs/model.md#training-protocol): the training parts of every dataset entry concatenated and
shuffled together, MSE between the predicted score and the normalised MOS, Adam over ``model.trainable_parameters()``,
cosine annealing stepped once per epoch. What a run writes into its folder ``<output_dir>/<name>/split_<k>/``:

- ``config.yaml``: the resolved configuration;
- ``last.pth``: resumable state after every epoch (and every ``checkpoint.every_steps`` steps), written atomically;
- ``best.pth``: weights of the epoch with the best mean SRCC over datasets (one dataset improving is not enough),
  chosen on the held-out part or on a holdout of the training part (``eval.select_on``, :mod:`gamma.train.selection`);
- ``metrics.jsonl`` (every record) and ``metrics.csv`` (one row per evaluation); TensorBoard under ``tb/``;
- ``predictions/<dataset>.csv`` of the best epoch, ``predictions_final/<dataset>.csv`` of the last one;
- ``results.json`` at the end (``final``, ``best`` and ``best_per_dataset`` figures) and ``table.md`` / ``.csv`` /
  ``.json`` (the same in the layout of the paper's Table 1); ``train.log``.

Resuming (``--resume``) restores weights, optimiser, grad scaler, counters and RNG states; the data order and every
augmentation are functions of (seed, epoch, position) (:mod:`gamma.train.sampling`) and the learning rate one of
(configuration, epoch), so a resumed run computes the same losses as an uninterrupted one, from an epoch boundary or
from a mid-epoch checkpoint; a changed schedule is re-planned (:mod:`gamma.train.resume`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..archs import GammaModel
from ..archs.precision import check_precision, resolve_precision, tf32_mode
from ..data import IQADataset, build_dataset, collate
from ..factory import create_model
from ..hub import KNOWN_WEIGHTS, PromptSetError, WeightsNotFoundError, resolve_weights
from ..weights import load_into
from .checkpoint import (
    LAST,
    load_training_state,
    rank_rng_state,
    rng_state,
    save_best,
    save_training_state,
    set_rng_state,
    write_json,
)
from .config import ConfigError, TrainConfig, config_to_dict
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_buffers
from .evaluate import autocast, evaluate, median_table, write_table
from .objective import Objective, mse_sum
from .resume import check_resume, planned_lr
from .run_folder import MetricsLog, finished_results, log_summary, open_run, run_results, write_predictions
from .sampling import EpochPlan, SeededView, SlotBatchSampler
from .selection import block, metric_value, selection_view, split_off_holdouts

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the weights were not updated by the failing step."""


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM arrived; a resumable checkpoint was written (``path``)."""

    def __init__(self, path: Path | None, signum: int) -> None:
        name = signal.Signals(signum).name if signum else "signal"
        super().__init__(f"stopped by {name}; resumable checkpoint: {path} (continue with --resume)")
        self.path = path
        self.signum = signum


# ------------------------------------------------------------------------------------------------- state
@dataclass
class Progress:
    """Counters and results that a checkpoint carries (plain data)."""

    epoch: int = 0  # epoch in progress (0-based); == epochs when training is done
    step_in_epoch: int = 0  # optimiser steps already done in `epoch`
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # sum of squared errors of `epoch` so far (for the epoch's mean loss)
    epoch_samples: int = 0
    pending_eval: bool = False  # the checkpoint was written after an epoch, before its evaluation
    best: dict[str, Any] | None = None  # {'epoch', 'step', 'mean', 'datasets'[, 'selection']} of the best evaluation
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Run:
    """Everything a run's functions share (built once by :func:`prepare`)."""

    cfg: TrainConfig
    run_dir: Path
    dist: DistInfo
    model: GammaModel  # the bare model
    net: torch.nn.Module  # what the training forward calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]  # the learning rate of each 0-based epoch (set at the epoch's start)
    scaler: torch.amp.GradScaler
    plan: EpochPlan | Any  # the objective's own plan has at least `steps_per_epoch`; None when evaluating only
    train_view: SeededView
    eval_sets: dict[str, IQADataset]
    log: MetricsLog | None  # rank 0 only
    select_sets: dict[str, IQADataset] = field(default_factory=dict)  # eval.select_on train_holdout: the holdouts
    progress: Progress = field(default_factory=Progress)
    step_losses: list[float] = field(default_factory=list)  # losses of the steps run by this process (this call)
    stop_signal: int = 0
    objective: Objective | None = None  # a stage's own data, loss and evaluation (None: Gamma's)


# ------------------------------------------------------------------------------------------------ building
def build_model(cfg: TrainConfig) -> GammaModel:
    """The model to train, its random parts (routers, adapter) initialised from the run seed."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    # A known name (uniqa, gamma, gamma_sdp) is found through its environment variable or the weight cache.
    try:
        pretrained = resolve_weights(path=m.pretrained) if m.pretrained else None
    except WeightsNotFoundError as exc:  # name the option, and where a relative path was looked for
        given = str(m.pretrained)
        where = "" if given in KNOWN_WEIGHTS else f" (resolved to {Path(given).expanduser().absolute()})"
        raise ConfigError(f"model.pretrained: {given!r}{where}: {exc}") from None
    try:
        model = create_model(m.name, pretrained=pretrained, allow_unsafe=m.allow_unsafe,
                             prompt_set_override=m.prompt_set_override, **m.overrides)
    except PromptSetError as exc:
        raise prompt_set_conflict(exc) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}") from exc
    if cfg.stage == "attiqa_finetune" and cfg.attiqa.finetune == "linear_probe":
        model.set_stage("probe")  # only the regressor trains (docs/attiqa.md#trainer-stages)
    return model


def prompt_set_conflict(exc: PromptSetError) -> ConfigError:
    """The option file's words for a prompt set that contradicts the one ``model.pretrained`` records."""
    return ConfigError(f"model.overrides.prompt_set: {exc.path} (model.pretrained) records prompt set "
                       f"{exc.recorded!r}, the prompts its weights were trained with; {exc.requested!r} contradicts "
                       f"it. Drop model.overrides.prompt_set, or set model.prompt_set_override=true to use "
                       f"{exc.requested!r} prompts with these weights deliberately (a prompt ablation)")


def build_datasets(cfg: TrainConfig) -> tuple[list[IQADataset], dict[str, IQADataset]]:
    """Training datasets (one per ``data`` entry) and held-out datasets by name (``data`` + ``eval_data``).

    With ``eval.select_on: train_holdout`` use :func:`split_off_holdouts` on the training datasets."""
    train = [build_dataset(e, "train") for e in cfg.data] if not cfg.eval_only else []
    wanted = set(cfg.eval.datasets) if cfg.eval.datasets is not None else None
    held = {}
    for e in (*cfg.data, *cfg.eval_data):
        if wanted is None or e.name in wanted:
            held[e.name] = build_dataset(e, e.eval_key)
    return train, held


def _seed_worker(worker_id: int) -> None:
    # Augmentation is seeded per sample (SeededView); this keeps numpy / random in workers distinct and
    # reproducible too, and leaves Ctrl-C to the main process (which saves a checkpoint before it stops).
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(run: Run, epoch: int, start_step: int) -> DataLoader:
    workers = run.cfg.workers
    return DataLoader(
        run.train_view,
        batch_sampler=SlotBatchSampler(run.plan, epoch, start_step),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=run.dist.device.type == "cuda",
        worker_init_fn=_seed_worker if workers else None,
        generator=torch.Generator().manual_seed(run.cfg.seed + epoch),
        persistent_workers=False,
    )


def prepare(cfg: TrainConfig, dist: DistInfo, run_dir: Path, log: MetricsLog | None,
            objective: Objective | None = None) -> Run:
    """Build model, data, optimiser and schedule for a run (nothing is trained or loaded from a checkpoint yet)."""
    if cfg.amp == "fp16" and dist.device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=none on CPU")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
        torch.use_deterministic_algorithms(True, warn_only=True)
    if objective is None:
        train_sets, eval_sets = build_datasets(cfg)
    else:
        train_sets, eval_sets = objective.train_sets, objective.eval_sets
    if not cfg.eval_only and not train_sets:
        raise ConfigError("data: no training datasets; list at least one entry under data:")
    select_sets: dict[str, IQADataset] = {}
    if objective is not None and objective.select_sets is not None:
        select_sets = objective.select_sets
    elif cfg.eval.select_on == "train_holdout" and not cfg.eval_only:
        train_sets, select_sets = split_off_holdouts(cfg, train_sets)
    own = objective is not None and objective.build_model is not None
    model = (objective.build_model(cfg) if own else build_model(cfg)).to(dist.device)
    if objective is not None and objective.configure_model is not None:
        objective.configure_model(model)
    if cfg.eval.precision != "fp32":  # fail now, not after the first epoch
        try:
            check_precision(resolve_precision(cfg.eval.precision, dist.device), dist.device)
        except ValueError as exc:
            raise ConfigError(f"eval.precision: {exc}") from None
    params = model.trainable_parameters()
    if not params:
        raise ConfigError("the model has no trainable parameters")
    o = cfg.optim
    lr_at = objective.lr_at if objective is not None and objective.lr_at is not None else partial(planned_lr, cfg)
    optimizer = torch.optim.Adam(params, lr=lr_at(0), betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")
    net: torch.nn.Module = objective.wrap(model) if objective is not None and objective.wrap is not None else model
    if dist.enabled and not cfg.eval_only:
        # DDP broadcasts every buffer before each forward unless told not to; only BatchNorm statistics need it
        net = DistributedDataParallel(net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                      find_unused_parameters=cfg.ddp.find_unused_parameters,
                                      broadcast_buffers=_has_batch_norm(model))
    sizes = [len(d) for d in train_sets] or [1]
    if objective is not None and objective.plan is not None:
        plan = objective.plan(cfg, dist, sizes) if train_sets else None
    else:
        if cfg.drop_last and train_sets and sum(sizes) < cfg.batch_size:
            raise ConfigError(f"drop_last: the training set has {sum(sizes)} images, fewer than one batch of "
                              f"{cfg.batch_size}, so every batch would be dropped; set drop_last=false or a smaller "
                              "batch_size")
        plan = EpochPlan(sizes, cfg.batch_size, cfg.seed, cfg.sampler, dist.world_size, dist.rank, cfg.grad_accum,
                         cfg.max_steps_per_epoch, drop_last=cfg.drop_last)
    if train_sets:
        logger.info("training on %d images from %d dataset(s) (%s); %d steps per epoch of %d images, %d epochs, "
                    "%d process%s", sum(sizes), len(train_sets),
                    ", ".join(f"{d.entry.name} {len(d)}" for d in train_sets), plan.steps_per_epoch, cfg.batch_size,
                    cfg.epochs, dist.world_size, "es" if dist.world_size > 1 else "")
        logger.info("model: %s; %.1f M parameters, %.1f M trainable", cfg.model.name or cfg.model.pretrained,
                    model.num_parameters() / 1e6, model.num_parameters(trainable_only=True) / 1e6)
    return Run(cfg=cfg, run_dir=run_dir, dist=dist, model=model, net=net, optimizer=optimizer, lr_at=lr_at,
               scaler=scaler, plan=plan, train_view=SeededView(train_sets), eval_sets=eval_sets, log=log,
               select_sets=select_sets, objective=objective)


def _has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def restore(run: Run, path: Path) -> None:
    """Load a training checkpoint into ``run`` (weights, optimiser, scaler, counters, RNG). The optimiser's settings
    and the learning rate come from the configuration (a changed schedule is re-planned, :func:`check_resume`)."""
    ckpt = load_training_state(path)
    load_into(run.model, ckpt, strict=True)
    ex = ckpt.extra
    run.optimizer.load_state_dict(ex["optimizer"])
    _replan(run, ex, path)
    if ex.get("scaler") is not None:
        run.scaler.load_state_dict(ex["scaler"])
    run.progress = Progress(**_progress_fields(ex["progress"]))
    set_rng_state(rank_rng_state(ex, run.dist.rank, run.dist.world_size), run.dist.device)
    p = run.progress
    logger.info("resumed from %s: epoch %d, step %d of it (global step %d)", path, p.epoch + 1, p.step_in_epoch,
                p.global_step)


def _replan(run: Run, ex: dict[str, Any], path: Path) -> None:
    """Check the resumed configuration against the checkpoint's (:func:`check_resume`) and give the optimiser the
    configuration's settings and the learning rate of the epoch in progress (``load_state_dict`` restored the
    checkpoint's)."""
    epoch = int(ex["progress"].get("epoch", 0))
    check_resume(ex.get("train_config") or {}, run.cfg, epoch, run.lr_at, current_lr(run), path)
    o = run.cfg.optim
    for group in run.optimizer.param_groups:
        group.update(lr=run.lr_at(epoch), betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def _progress_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's counters as :class:`Progress` fields (a stage-promptiqa checkpoint of gamma <= 0.x kept its
    loss as ``loss_sum`` over ``loss_steps`` steps)."""
    out = dict(saved)
    if "loss_sum" in out:
        steps = out.pop("loss_steps", 0)
        out["epoch_loss_sum"], out["epoch_samples"] = out.pop("loss_sum"), steps
    return {k: v for k, v in out.items() if k in Progress.__dataclass_fields__}


# -------------------------------------------------------------------------------------------------- training
@contextmanager
def _stop_on_signals(run: Run):
    """SIGINT / SIGTERM set ``run.stop_signal``; the loop saves and stops after the current step. A second SIGINT
    interrupts at once."""
    def handler(signum, frame):  # noqa: ARG001 - signal API
        if run.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stop_signal = signum
        logger.warning("%s received: finishing this step, saving a checkpoint and stopping (again to abort)",
                       signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def save_state(run: Run, name: str = LAST) -> Path | None:
    """Write the resumable checkpoint (rank 0; other ranks wait). Every rank must call it: it gathers each rank's
    RNG state and ends in a barrier."""
    path = run.run_dir / name
    rng_per_rank = all_gather_objects(rng_state(run.dist.device), run.dist)
    if run.dist.is_main:
        save_training_state(path, run.model, optimizer=run.optimizer, scheduler=None, scaler=run.scaler,
                            progress=run.progress.to_dict(), train_config=config_to_dict(run.cfg),
                            rng_per_rank=rng_per_rank)
    barrier(run.dist)
    return path


def current_lr(run: Run) -> float:
    return float(run.optimizer.param_groups[0]["lr"])


def train_one_epoch(run: Run) -> None:
    """Train from ``run.progress`` (epoch, step_in_epoch) to the end of the epoch.

    Raises:
        NonFiniteLossError: a step's loss is NaN/inf (checked over all processes before the weights change).
        TrainingInterrupted: a stop signal arrived; a resumable checkpoint was written first.
    """
    cfg, p, plan, obj = run.cfg, run.progress, run.plan, run.objective
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr_at(p.epoch)
    run.net.train()
    own_loader = obj is not None and obj.loader is not None
    batches = iter(obj.loader(run, p.epoch, p.step_in_epoch) if own_loader else make_loader(run, p.epoch,
                                                                                              p.step_in_epoch))
    bar = None
    if cfg.log.progress and run.dist.is_main:
        bar = tqdm(total=plan.steps_per_epoch, initial=p.step_in_epoch, desc=f"epoch {p.epoch + 1}/{cfg.epochs}",
                   dynamic_ncols=True, leave=False)
    window: list[float] = []  # step losses since the last 'train' record
    t0 = time.perf_counter()
    try:
        for step in range(p.step_in_epoch, plan.steps_per_epoch):
            step_loss, n_real, stop_asked = _forward_backward(run, batches, step)
            if not math.isfinite(step_loss):
                raise _non_finite_loss(run, step_loss, step)
            _update_weights(run)
            p.global_step += 1
            p.step_in_epoch = step + 1
            p.epoch_loss_sum += step_loss * n_real
            p.epoch_samples += n_real
            run.step_losses.append(step_loss)
            window.append(step_loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{current_lr(run):.2e}")
            if run.log is not None and (cfg.log.every_steps and p.global_step % cfg.log.every_steps == 0):
                _log_steps(run, window, time.perf_counter() - t0)
                window, t0 = [], time.perf_counter()
            last_step = p.step_in_epoch == plan.steps_per_epoch
            if stop_asked:
                run.stop_signal = run.stop_signal or signal.SIGTERM  # the signal may have reached another process only
                if not last_step:  # (after the last step, fit() stops once the epoch is evaluated and saved)
                    raise TrainingInterrupted(save_state(run), run.stop_signal)
            if cfg.checkpoint.every_steps and p.global_step % cfg.checkpoint.every_steps == 0 and not last_step:
                save_state(run)
    finally:
        if bar is not None:
            bar.close()
    del batches  # (its worker processes end now, not at the next epoch's start)


def _forward_backward(run: Run, batches: Iterator[dict[str, Any]], step: int) -> tuple[float, float, bool]:
    """Forward and backward passes of one optimiser step (gradients accumulate in the parameters): Gamma's
    micro-batches, or the objective's ``step``.

    Returns:
        the step's mean loss over all processes, what it is the mean over (the step's real samples), and whether any
        process was asked to stop (agreed on by every process in the same all-reduce as the loss).
    """
    dev = run.dist.device
    run.optimizer.zero_grad(set_to_none=True)
    if run.objective is not None and run.objective.step is not None:
        local, n_real = run.objective.step(run, batches, step)
    else:
        n_real = run.plan.samples_in_step(step)
        local = _micro_batches(run, batches, n_real)
    flags = torch.stack([local.to(dev, torch.float64),
                         torch.tensor(float(run.stop_signal != 0), dtype=torch.float64, device=dev)])
    flags = all_reduce_sum(flags, run.dist)
    return float(flags[0]) / n_real, n_real, float(flags[1]) > 0


def _micro_batches(run: Run, batches: Iterator[dict[str, Any]], n_real: int) -> torch.Tensor:
    """Gamma's step: ``grad_accum`` micro-batches through ``loss_sum``; returns this process's loss sum."""
    cfg, dev, world = run.cfg, run.dist.device, run.dist.world_size
    sq_sum = torch.zeros((), dtype=torch.float64, device=dev)
    loss_sum = run.objective.loss_sum if run.objective is not None and run.objective.loss_sum else mse_sum
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        images = batch["img"].to(dev, non_blocking=True)
        sync = run.net.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else nullcontext()
        with sync, tf32_mode(cfg.tf32):  # TF32 only when asked for (train: tf32); evaluation is exact fp32
            with autocast(dev, cfg.amp):
                pred = run.net(images, scene=batch["scene"])
            sq = loss_sum(pred.float(), batch)  # (), summed over the micro-batch's real samples
            # Sum over this micro-batch / real samples of the whole step, times world size because DDP averages
            # gradients over processes: the gradient is exactly that of the step's mean squared error.
            loss = sq * (world / n_real)
            run.scaler.scale(loss).backward()
        sq_sum += sq.detach().double()
    return sq_sum


def _non_finite_loss(run: Run, step_loss: float, step: int) -> NonFiniteLossError:
    p, last = run.progress, run.run_dir / LAST
    return NonFiniteLossError(
        f"training loss is {step_loss} at epoch {p.epoch + 1}, step {step + 1} (global step "
        f"{p.global_step + 1}, lr {current_lr(run):.3g}); stopped before updating the weights. "
        f"Last good checkpoint: {last if last.exists() else 'none yet'}. "
        "Check the labels (mos_range), lower optim.lr, or use amp=none / amp=bf16 instead of fp16.")


def _update_weights(run: Run) -> None:
    """The optimiser step on the accumulated gradients (clipped first when ``optim.grad_clip`` is set)."""
    if run.cfg.optim.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.trainable_parameters(), run.cfg.optim.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()


def _log_steps(run: Run, window: list[float], seconds: float) -> None:
    """One 'train' record: mean loss and throughput of the steps in ``window``."""
    p = run.progress
    run.log.write({"kind": "train", "epoch": p.epoch + 1, "step": p.global_step, "loss": float(np.mean(window)),
                   "lr": current_lr(run), "images_per_s": len(window) * run.cfg.batch_size / max(seconds, 1e-9)})


def evaluate_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Evaluate, log, and update the best checkpoint (by the mean of ``eval.select_metric`` over datasets, on the
    held-out parts or, with ``eval.select_on: train_holdout``, on the holdouts of the training parts)."""
    cfg, p = run.cfg, run.progress
    t0 = time.perf_counter()
    workers = cfg.eval.workers if cfg.eval.workers is not None else cfg.workers
    broadcast_buffers(run.model, run.dist)  # one set of BatchNorm statistics on every process (the saved one)
    if run.objective is not None:
        result = run.objective.evaluate(run)
    else:
        result = evaluate(run.model, run.eval_sets, run.dist.device, eval_cfg=cfg.eval, workers=workers,
                          dist_info=run.dist, progress=cfg.log.progress)
    record = {"kind": "eval", "epoch": epoch, "step": p.global_step,
              "train_loss": p.epoch_loss_sum / p.epoch_samples if p.epoch_samples else None,
              "mean": result["mean"], "datasets": result["datasets"]}
    if "prompt_sets" in result:
        record["prompt_sets"] = result["prompt_sets"]
    extra = result.get("record", {})
    record.update(extra)
    if "selection" in result:
        record["selection"] = result["selection"]
    elif run.select_sets:
        chosen_on = evaluate(run.model, run.select_sets, run.dist.device, eval_cfg=cfg.eval, workers=workers,
                             dist_info=run.dist, progress=cfg.log.progress, headline_only=True)
        record["selection"] = {"mean": chosen_on["mean"], "datasets": chosen_on["datasets"]}
    record["seconds"] = time.perf_counter() - t0
    p.history.append(record)
    improved = improves(selection_view(p.best), selection_view(record)["mean"], cfg.eval.select_metric)
    if improved:
        p.best = block(record)
    if run.dist.is_main:
        run.log.write({k: v for k, v in record.items() if k not in extra})
        summary = ", ".join(f"{n} {v['srcc']:.3f}/{v['plcc']:.3f}" for n, v in result["datasets"].items())
        chosen = (f"; holdout mean {record['selection']['mean']['srcc']:.4f}/{record['selection']['mean']['plcc']:.4f}"
                  if "selection" in record else "")
        logger.info("epoch %d eval (SRCC/PLCC): %s; mean %.4f/%.4f%s%s", epoch, summary, result["mean"]["srcc"],
                    result["mean"]["plcc"], chosen, " (best)" if improved else "")
        if improved:
            if cfg.checkpoint.save_best and not cfg.eval_only:
                save_best(run.run_dir, run.model, cfg.checkpoint.format, {"epoch": epoch, **record},
                          config_to_dict(cfg))
            write_predictions(run, result["predictions"])
        if epoch == cfg.epochs or cfg.eval_only:  # (an evaluation-only run's one evaluation is its final)
            write_predictions(run, result["predictions"], "predictions_final")
    return record


def improves(best: dict[str, Any] | None, mean: dict[str, float], metric: str = "srcc") -> bool:
    """Whether an evaluation with mean metrics ``mean`` beats ``best``: the mean over datasets must rise (one dataset
    improving while the mean falls is not better; the release's defect)."""
    score = metric_value(mean, metric)
    return score is not None and math.isfinite(score) and (best is None or score > metric_value(best["mean"], metric))


def _should_eval(cfg: TrainConfig, epoch: int) -> bool:
    """Evaluate after 1-based ``epoch``?"""
    if epoch == cfg.epochs:
        return True
    return bool(cfg.eval.every) and epoch % cfg.eval.every == 0


def fit(run: Run) -> None:
    """Train the remaining epochs of ``run`` (evaluating and checkpointing as configured)."""
    cfg, p = run.cfg, run.progress
    if p.pending_eval:  # a kill between an epoch's checkpoint and its evaluation
        _finish_epoch_eval(run, p.epoch)
    if p.epoch == 0 and p.step_in_epoch == 0 and cfg.eval.at_start and not p.history:
        evaluate_epoch(run, 0)
    while p.epoch < cfg.epochs:
        train_one_epoch(run)
        done = p.epoch + 1
        if run.dist.is_main:
            upcoming = f", next lr {run.lr_at(done):.3g}" if done < cfg.epochs else ""
            logger.info("epoch %d/%d: train loss %.5f, lr %.3g%s", done, cfg.epochs,
                        p.epoch_loss_sum / max(p.epoch_samples, 1), current_lr(run), upcoming)
            run.log.write({"kind": "epoch", "epoch": done, "step": p.global_step,
                           "train_loss": p.epoch_loss_sum / max(p.epoch_samples, 1), "lr": current_lr(run)})
        evaluating = _should_eval(cfg, done)
        p.epoch, p.step_in_epoch, p.pending_eval = done, 0, evaluating
        save_state(run)
        if cfg.checkpoint.keep_epochs:  # every rank: save_state ends in collectives (it writes on rank 0 only)
            save_state(run, f"epoch_{done:03d}.pth")
        if evaluating:
            _finish_epoch_eval(run, done)
        p.epoch_loss_sum, p.epoch_samples = 0.0, 0
        if _agreed_stop(run) and p.epoch < cfg.epochs:
            raise TrainingInterrupted(run.run_dir / LAST, run.stop_signal or signal.SIGTERM)


def _agreed_stop(run: Run) -> bool:
    """Whether any process has been asked to stop (every process gets the same answer)."""
    flag = torch.tensor([float(run.stop_signal != 0)], dtype=torch.float64, device=run.dist.device)
    return float(all_reduce_sum(flag, run.dist)[0]) > 0


def _finish_epoch_eval(run: Run, epoch: int) -> None:
    evaluate_epoch(run, epoch)
    run.progress.pending_eval = False
    save_state(run)


# ------------------------------------------------------------------------------------------------ one run
def train(cfg: TrainConfig, dist: DistInfo, resume: bool = False,
          objective: Objective | Callable[[Path], Objective] | None = None) -> dict[str, Any]:
    """Run one training (one split): returns its results (also written to ``results.json``). ``objective``
    replaces Gamma's data, loss and evaluation (:class:`Objective`); given as a function of the run folder, it is
    built once the folder is locked (a stage that writes files there first). ``resume`` of a finished run (at the
    same ``epochs``) returns its results and leaves the folder as it is."""
    if resume and (done := finished_results(cfg)) is not None:
        return done
    with open_run(cfg, dist, resume) as (run_dir, log):
        if callable(objective) and not isinstance(objective, Objective):
            objective = objective(run_dir)
        run = prepare(cfg, dist, run_dir, log, objective)
        if resume and (run_dir / LAST).exists():
            restore(run, run_dir / LAST)
            if log is not None:
                log.truncate_after(run.progress.global_step, drop_eval_at_step=run.progress.pending_eval)
        t0 = time.perf_counter()
        with _stop_on_signals(run):
            try:
                if cfg.eval_only:
                    evaluate_epoch(run, 0)
                else:
                    fit(run)
            except TrainingInterrupted as exc:
                if dist.is_main:
                    logger.warning("%s", exc)  # (here, so that train.log has it too)
                raise
        results = run_results(run, time.perf_counter() - t0)
        if objective is not None and objective.results is not None:
            objective.results(run, results)
        if dist.is_main:
            write_json(run_dir / "results.json", results)
            if results["final"] or results["best"]:
                write_table(median_table([results]), run_dir, cfg.name)
            log_summary(results)
        return results
