"""Stage ``promptiqa``: PromptIQA's training recipe and test protocol (docs/promptiqa.md#training-stage-promptiqa).

Training, as the official code does it (``train.py`` of chencn2020/PromptIQA):

- each dataset's training part is shuffled and cut into consecutive *chunks* of ``promptiqa.chunk`` (11) images,
  the incomplete last one dropped; the chunks of all datasets are shuffled together; this is redone every epoch;
- an optimiser step takes ``batch_size / chunk`` chunks (the official 44 = 4 x 11, one chunk per GPU); with W processes
  each takes ``batch_size / chunk / W`` of them and runs each chunk as its own forward, so BatchNorm always sees one
  chunk of one dataset, as on each official GPU;
- per chunk: random scaling (p = 0.5, all labels divided by c ~ U(max S, 1)) then random flipping (p = 0.1, S -> 1 - S)
  (:func:`gamma.data.promptiqa.draw_label_augment`); the *same* augmented labels are the prompt scores and the targets,
  because every image of the chunk is scored from the other ``chunk - 1`` (``score_leave_one_out``, the official
  ``expand``); L1 loss;
- images: the whole picture resized to the model's input (the official OpenCV path, :func:`gamma.io.
  load_promptiqa_image`), each training image flipped upside down with p = 0.5 (the official code calls it a
  horizontal flip: ``np.fliplr`` on a C x H x W array);
- Adam (lr 1e-5, weight decay 1e-5 in the option files) over every trainable parameter (all of PromptIQA), the
  learning rate set once per epoch on a half cosine over the run.

The label augmentation, the image flips and the chunk order are functions of (seed, epoch, step, chunk), so resuming
repeats the same run and the chunks do not depend on the number of processes or DataLoader workers.

Testing: for each held-out set, the ISPP is drawn from that dataset's *training* part (interval sampling: minimum,
``isp_count - 2`` evenly spaced, maximum; :func:`gamma.data.promptiqa.sample_ispp`), encoded once, and every test image
is scored against it; SRCC / PLCC / KRCC per dataset, final and best evaluations, and the 10-split median table as for
Gamma (:mod:`gamma.train.selection`, :func:`gamma.train.evaluate.median_table`). ``promptiqa.requirements`` adds new
requirements (relabelled pictures, :mod:`gamma.data.requirements`) to the held-out sets, and the adaptation table
(``adaptation.md``) reports them with the ISP scores as given and inverted, next to Gamma as it is and with a map
fit on the ISPs by :func:`gamma.adapt.fit` (``promptiqa.baselines``): a monotone map of its score, and ridge
regression on all its outputs (score, level probabilities, attribute scores: ``ADAPT_OUTPUTS["all"]`` of
:mod:`gamma.scorer`).

The same stage trains Gamma + ISP (``gamma_isp`` models: PromptIQA's prompt path on frozen Gamma features); those read
images with the dataset's own transforms (training crops, full test images), as Gamma does. With ``eval_only`` and a
Gamma model it evaluates that model on the held-out sets, its scores as they are or mapped (``promptiqa.mapping``:
``fit`` the monotone map of its score, ``fit_all`` ridge on all its outputs).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .. import adapt
from .._files import atomic_write
from ..adapt import ADAPT_OUTPUTS
from ..archs import GammaISP, GammaModel, PromptedIQA, PromptIQA
from ..data import IQADataset, build_dataset, collate
from ..data.promptiqa import draw_label_augment, random_vertical_flip, sample_ispp
from ..data.requirements import write_requirement
from ..data.transforms import TestTransform
from ..factory import create_model, list_models
from ..hub import WeightsNotFoundError, resolve_weights
from ..io import load_promptiqa_image
from ..metrics import evaluate_scores
from ..prompts import ATTRIBUTES
from ..weights import load_into
from .checkpoint import LAST, load_training_state, save_best, save_training_state, set_rng_state, write_json
from .config import ConfigError, TrainConfig, config_to_dict
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cleanup,
    setup,
)
from .evaluate import METRICS, mean_metrics, median_table, predict, write_table
from .loop import NonFiniteLossError
from .run_folder import MetricsLog, finished_results, open_run, split_config
from .sampling import SeededView, Slot
from .selection import best_per_dataset, block, carve_holdout, selection_view

logger = logging.getLogger(__name__)

#: Row labels of the adaptation table for the Gamma baselines: its score as it is, mapped onto the ISP scores by a
#: monotone map of the score, and by ridge regression on all its outputs (``ADAPT_OUTPUTS["all"]``).
GAMMA_AS_IS = "Gamma as is"
GAMMA_MAPPED = "Gamma + mapping"
GAMMA_MAPPED_ALL = "Gamma + mapping (all outputs)"
#: What each ``promptiqa.mapping`` fits on the ISPs: the Gamma outputs mapped (``ADAPT_OUTPUTS``' key) and the map.
MAPPINGS: dict[str, tuple[str, str]] = {"fit": ("score", "monotone"), "fit_all": ("all", "ridge")}
#: The two halves of the adaptation table: the ISP scores as given, and inverted (1 - s).
PROMPT_VARIANTS: tuple[str, ...] = ("isps", "inverted_isps")


# ------------------------------------------------------------------------------------------------ checks
def check_config(cfg: TrainConfig) -> None:
    """The stage's own cross-field checks (each error names its key)."""
    p = cfg.promptiqa
    if p.chunk < 2:
        raise ConfigError(f"promptiqa.chunk must be >= 2 (each image is scored from the other chunk - 1), got "
                          f"{p.chunk}")
    if cfg.batch_size % p.chunk:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a whole number of chunks of promptiqa.chunk "
                          f"({p.chunk}), e.g. {p.chunk * max(1, round(cfg.batch_size / p.chunk))}")
    if cfg.grad_accum != 1:
        raise ConfigError("grad_accum: stage promptiqa accumulates over chunks already (batch_size / promptiqa.chunk "
                          "chunks per step); leave grad_accum at 1")
    for key in ("scale_p", "flip_p", "vflip_p"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise ConfigError(f"promptiqa.{key} must be in [0, 1], got {getattr(p, key)}")
    for key in ("isp_count", "cosine_period"):
        value = getattr(p, key)
        if value is not None and value < 1:
            raise ConfigError(f"promptiqa.{key} must be >= 1 or null, got {value}")
    if p.isp_draws < 1:
        raise ConfigError(f"promptiqa.isp_draws must be >= 1, got {p.isp_draws}")
    if p.isp_draws > 1 and p.isp_sampling != "random":
        raise ConfigError("promptiqa.isp_draws > 1 needs promptiqa.isp_sampling: random (interval sampling always "
                          "draws the same prompt)")
    if p.baselines and not p.gamma:
        raise ConfigError("promptiqa.baselines needs promptiqa.gamma (the Gamma to report as it is and mapped)")
    names = [e.name for e in (*cfg.data, *cfg.eval_data)]
    for i, req in enumerate(p.requirements):
        if req.source not in names:
            raise ConfigError(f"promptiqa.requirements.{i}.source: no data or eval_data entry named {req.source!r}; "
                              f"entries: {', '.join(names) or '(none)'}")
        if req.name in names:
            raise ConfigError(f"promptiqa.requirements.{i}.name: {req.name!r} is already a dataset entry's name")
        names.append(req.name)
    if (p.mapping != "none" or p.baselines) and isp_count(cfg) < adapt.MIN_PAIRS:
        keys = " and ".join(k for k, on in (("promptiqa.mapping", p.mapping != "none"),
                                            ("promptiqa.baselines", p.baselines)) if on)
        raise ConfigError(f"promptiqa.isp_count: {keys} fit a map on the ISPs, which needs at least "
                          f"{adapt.MIN_PAIRS} of them (with fewer any map passes through them); the prompt has "
                          f"{isp_count(cfg)} (promptiqa.isp_count, else promptiqa.chunk - 1)")
    if cfg.amp != "none":
        raise ConfigError("amp: stage promptiqa trains in fp32 (the official recipe has no mixed precision)")


def isp_count(cfg: TrainConfig) -> int:
    """ISPs in a test prompt: ``promptiqa.isp_count``, else ``chunk - 1`` (what training prompts with)."""
    return cfg.promptiqa.isp_count or cfg.promptiqa.chunk - 1


# ------------------------------------------------------------------------------------------------ data
class WholeImages(Dataset):
    """The rows of an :class:`IQADataset`, each image the whole picture resized to ``size`` x ``size`` the way the
    official PromptIQA code loads it (:func:`gamma.io.load_promptiqa_image`); items as the dataset's."""

    def __init__(self, ds: IQADataset, size: int, backend: str = "cv2") -> None:
        self.ds, self.size, self.backend = ds, size, backend
        self.entry, self.labels, self.paths = ds.entry, ds.labels, ds.paths

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"img": load_promptiqa_image(self.paths[i], self.size, backend=self.backend),
                "mos": torch.tensor(self.labels[i], dtype=torch.float32), "scene": self.ds.scenes[i],
                "dataset": self.entry.name, "path": self.paths[i], "index": self.ds.rows[i]}


def model_view(model: nn.Module, ds: IQADataset, backend: str) -> Dataset:
    """How ``model`` reads ``ds``: PromptIQA the whole picture at its input size (train and test); Gamma + ISP and
    Gamma the dataset's own transforms (training crops; full test images through Gamma's crop protocol)."""
    if isinstance(model, PromptIQA):
        return WholeImages(ds, model.config.image_size, backend)
    return ds


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


class ChunkPlan:
    """Which chunks each process trains on at each step of an epoch (a pure function of the seed and the epoch).

    Args:
        sizes: training images of each dataset (in concatenation order).
        chunk: images per chunk.
        chunks_per_step: chunks per optimiser step over all processes.
        seed: run seed.
        world_size, rank: the processes, this one.
        max_steps: cut epochs after this many steps (None: whole epochs).
    """

    def __init__(self, sizes: Sequence[int], chunk: int, chunks_per_step: int, seed: int, world_size: int = 1,
                 rank: int = 0, max_steps: int | None = None) -> None:
        if chunks_per_step % world_size:
            raise ConfigError(f"batch_size gives {chunks_per_step} chunk(s) per step, which {world_size} processes "
                              "cannot share evenly; make batch_size / promptiqa.chunk a multiple of the process count")
        self.sizes, self.chunk, self.per_step = [int(n) for n in sizes], chunk, chunks_per_step
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.total_chunks = sum(n // chunk for n in self.sizes)
        steps = self.total_chunks // chunks_per_step
        if steps < 1:
            raise ConfigError(f"the training parts give {self.total_chunks} chunk(s) of {chunk} images (sizes "
                              f"{self.sizes}), fewer than one step of {chunks_per_step}; lower batch_size")
        self.steps_per_epoch = min(steps, max_steps) if max_steps else steps

    def chunks(self, epoch: int) -> list[np.ndarray]:
        """Every chunk of the epoch (concatenated-dataset indices, (chunk,) each) in the order trained."""
        out = []
        for d, (n, off) in enumerate(zip(self.sizes, self.offsets, strict=True)):
            perm = np.random.default_rng(_mix(self.seed, epoch, d, 0xC0)).permutation(n)
            out += [perm[i * self.chunk : (i + 1) * self.chunk] + off for i in range(n // self.chunk)]
        order = np.random.default_rng(_mix(self.seed, epoch, 0xC1)).permutation(len(out))
        return [out[i] for i in order]

    def step_chunks(self, step: int) -> list[int]:
        """Positions (in the epoch's chunk order) of this process's chunks at ``step``."""
        return [step * self.per_step + j for j in range(self.rank, self.per_step, self.world_size)]

    def slots(self, epoch: int, start_step: int = 0) -> Iterator[list[Slot]]:
        """This process's chunks from ``start_step`` on, as :class:`Slot` lists (the image augmentation of a dataset's
        own transform is seeded per slot)."""
        chunks = self.chunks(epoch)
        for step in range(start_step, self.steps_per_epoch):
            for pos in self.step_chunks(step):
                yield [Slot(int(i), _mix(self.seed, epoch, pos, k), 1.0) for k, i in enumerate(chunks[pos])]


def chunk_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The generator of one chunk's label augmentation and image flips (``position`` in the epoch's chunk order)."""
    return torch.Generator().manual_seed(_mix(seed, epoch, position, 0xA6))


class _ChunkSampler(torch.utils.data.Sampler):
    def __init__(self, plan: ChunkPlan, epoch: int, start_step: int) -> None:
        self.plan, self.epoch, self.start_step = plan, epoch, start_step

    def __iter__(self) -> Iterator[list[Slot]]:
        return self.plan.slots(self.epoch, self.start_step)

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start_step) * len(self.plan.step_chunks(0))


class LeaveOneOut(nn.Module):
    """``forward(images, scores)`` = ``model.score_leave_one_out``: what DistributedDataParallel wraps."""

    def __init__(self, model: PromptedIQA) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor | list[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
        return self.model.score_leave_one_out(images, scores)


# ------------------------------------------------------------------------------------------------ run state
@dataclass
class EvalSet:
    """One held-out set: its test images, the training images its ISPP comes from, and the labels of both."""

    name: str
    test: IQADataset
    prompt_source: IQADataset  # the training part (full images, no augmentation)


@dataclass
class Run:
    cfg: TrainConfig
    run_dir: Path
    dist: DistInfo
    model: nn.Module
    log: MetricsLog | None
    eval_sets: list[EvalSet]
    select_sets: list[EvalSet]
    train_sets: list[IQADataset] = field(default_factory=list)
    net: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    plan: ChunkPlan | None = None
    progress: dict[str, Any] = field(default_factory=lambda: {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0, "loss_steps": 0, "pending_eval": False,
        "best": None, "history": []})
    step_losses: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ building
def resolve_gamma(cfg: TrainConfig) -> str:
    """The Gamma weights ``promptiqa.gamma`` names: a file or known weight name, else the final weights
    (``last.pth``) of the run of that name in ``output_dir`` (same split)."""
    value = cfg.promptiqa.gamma
    try:
        return os.fspath(resolve_weights(path=value))
    except WeightsNotFoundError:
        run = Path(cfg.output_dir) / value / f"split_{cfg.split_index}" / LAST
        if run.is_file():
            return os.fspath(run)
        raise ConfigError(f"promptiqa.gamma: {value!r} is neither a weights file, a known weight name, nor a finished "
                          f"run in {cfg.output_dir} ({run} does not exist)") from None


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model of the run, its random parts initialised from the run seed."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    overrides = dict(m.overrides)
    name = m.name
    if name is not None and name.startswith("gamma_isp") and "gamma_weights" not in overrides and not m.pretrained:
        if cfg.promptiqa.gamma is None:
            raise ConfigError(f"model.name: {name} needs a Gamma: set promptiqa.gamma or "
                              "model.overrides.gamma_weights")
        overrides["gamma_weights"] = resolve_gamma(cfg)
    if cfg.promptiqa.vit_weights and not m.pretrained and name in list_models("promptiqa"):
        overrides.setdefault("vit_weights", cfg.promptiqa.vit_weights)  # where official training starts
    pretrained = resolve_weights(path=m.pretrained) if m.pretrained else None
    try:
        model = create_model(name, pretrained=pretrained, allow_unsafe=m.allow_unsafe, **overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}") from exc
    if not isinstance(model, (PromptedIQA, GammaModel)):
        raise ConfigError(f"model: stage promptiqa takes PromptIQA, Gamma + ISP or (eval_only) Gamma models, got "
                          f"{type(model).__name__}")
    if isinstance(model, GammaModel) and not cfg.eval_only:
        raise ConfigError("model: a Gamma model has no prompt input; stage promptiqa only evaluates it (eval_only: "
                          "true, with promptiqa.mapping: fit or fit_all to map its outputs onto the ISPs' scale)")
    return model


def _check_unit_labels(ds: IQADataset, what: str) -> None:
    labels = np.asarray(ds.labels, dtype=np.float64)
    lo, hi = float(labels.min()), float(labels.max())
    if lo < 0 or hi > 1:
        raise ConfigError(f"dataset {ds.entry.name!r}: its {what} labels fall in [{lo:.4g}, {hi:.4g}] after "
                          f"normalising with mos_range {list(ds.entry.mos_range)}; PromptIQA's scores must be in "
                          "[0, 1] (the official code asserts it), so give a mos_range that covers them")


def requirement_entries(cfg: TrainConfig, run_dir: Path, dist: DistInfo) -> list:
    """Write ``promptiqa.requirements`` into ``<run_dir>/requirements/`` (rank 0) and return their entries."""
    if not cfg.promptiqa.requirements:
        return []
    sources = {e.name: e for e in (*cfg.data, *cfg.eval_data)}
    entries = []
    error = None
    if dist.is_main:
        try:
            entries = [write_requirement(r, sources[r.source], run_dir / "requirements")
                       for r in cfg.promptiqa.requirements]
        except (OSError, ValueError) as exc:  # other ranks must hear about it before they block
            error = f"promptiqa.requirements: {exc}"
    error = broadcast_object(error, dist)
    if error:
        raise ConfigError(error)
    return broadcast_object(entries, dist)


def build_eval_sets(cfg: TrainConfig, entries: Sequence, requirements: Sequence) -> list[EvalSet]:
    wanted = set(cfg.eval.datasets) if cfg.eval.datasets is not None else None
    out = []
    for e in (*entries, *requirements):
        if wanted is not None and e.name not in wanted and e not in requirements:
            continue
        test = build_dataset(e, e.eval_key)
        source = build_dataset(e, "train", transform=TestTransform(e.resize))
        if e.split_index == "all":
            logger.warning("%s: split_index all, so its ISPP comes from the images it is tested on", e.name)
        out.append(EvalSet(e.name, test, source))
    return out


def prepare(cfg: TrainConfig, dist: DistInfo, run_dir: Path, log: MetricsLog | None) -> Run:
    """Build model, data and optimiser (nothing trained or restored yet)."""
    requirements = requirement_entries(cfg, run_dir, dist)
    train_sets = [] if cfg.eval_only else [build_dataset(e, "train") for e in cfg.data]
    eval_sets = build_eval_sets(cfg, [*cfg.data, *cfg.eval_data], requirements)
    select_sets: list[EvalSet] = []
    if cfg.eval.select_on == "train_holdout" and not cfg.eval_only:
        kept = []
        for ds in train_sets:
            rest, holdout = carve_holdout(ds, cfg.eval.holdout_fraction, cfg.seed)
            kept.append(rest)
            source = IQADataset(rest.entry, "train", rest.table, rest.rows, TestTransform(rest.entry.resize))
            select_sets.append(EvalSet(ds.entry.name, holdout, source))
        train_sets = kept
    for ds in train_sets:
        _check_unit_labels(ds, "training")
    for s in (*eval_sets, *select_sets):
        _check_unit_labels(s.prompt_source, "prompt (training-part)")
    model = build_model(cfg).to(dist.device)
    run = Run(cfg=cfg, run_dir=run_dir, dist=dist, model=model, log=log, eval_sets=eval_sets, select_sets=select_sets)
    if cfg.eval_only:
        return run
    if not train_sets:
        raise ConfigError("data: no training datasets; list at least one entry under data:")
    p = cfg.promptiqa
    run.train_sets = [model_view(model, ds, p.decode) for ds in train_sets]
    run.plan = ChunkPlan([len(d) for d in train_sets], p.chunk, cfg.batch_size // p.chunk, cfg.seed, dist.world_size,
                         dist.rank, cfg.max_steps_per_epoch)
    params = model.trainable_parameters()
    o = cfg.optim
    run.optimizer = torch.optim.Adam(params, lr=lr_at(cfg, 0), betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    net: nn.Module = LeaveOneOut(model)
    if dist.enabled:
        net = DistributedDataParallel(net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                      find_unused_parameters=cfg.ddp.find_unused_parameters)
    run.net = net
    if dist.is_main:
        logger.info("training %s (%.2f M parameters, %.2f M trainable) on %d chunks of %d per epoch from %s; %d steps "
                    "of %d chunk(s), %d epochs, %d process%s", cfg.model.name or cfg.model.pretrained,
                    model.num_parameters() / 1e6, model.num_parameters(trainable_only=True) / 1e6,
                    run.plan.total_chunks, p.chunk, ", ".join(f"{d.entry.name} {len(d)}" for d in train_sets),
                    run.plan.steps_per_epoch, run.plan.per_step, cfg.epochs, dist.world_size,
                    "es" if dist.world_size > 1 else "")
    return run


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2``, t = epoch / period
    within the cycle (the official ``adjust_learning_rate``: one half cosine over the run); constant without
    ``optim.scheduler: cosine``."""
    o = cfg.optim
    if o.scheduler != "cosine":
        return o.lr
    period = cfg.promptiqa.cosine_period or cfg.epochs
    t = (epoch % period) / period
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------------ training
def train_step(run: Run, batches: Iterator[dict[str, Any]], epoch: int, step: int) -> float:
    """One optimiser step over this process's chunks; returns the step's mean L1 loss over all chunks.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite (checked over all processes before the weights change).
    """
    cfg, p, dev = run.cfg, run.cfg.promptiqa, run.dist.device
    mine = run.plan.step_chunks(step)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for j, pos in enumerate(mine):
        batch = next(batches)
        gen = chunk_generator(cfg.seed, epoch, pos)
        labels = batch["mos"].float()
        target = draw_label_augment(labels, p.scale_p, p.flip_p, gen).apply(labels)  # prompts and targets alike
        images = batch["img"]
        if p.vflip_p > 0:
            images = random_vertical_flip(images, p.vflip_p, gen)
        sync = run.net.no_sync() if run.dist.enabled and j < len(mine) - 1 else nullcontext()
        with sync:
            pred = run.net(_to(images, dev), target.to(dev))
            loss = F.l1_loss(pred.float(), target.to(dev))
            (loss / len(mine)).backward()  # DDP averages over processes: the gradient of the mean over all chunks
        loss_sum += loss.detach().double()
    total = float(all_reduce_sum(loss_sum, run.dist)) / run.plan.per_step
    if not math.isfinite(total):
        last = run.run_dir / LAST
        raise NonFiniteLossError(f"training loss is {total} at epoch {epoch + 1}, step {step + 1}; stopped before "
                                 f"updating the weights. Last good checkpoint: {last if last.exists() else 'none'}. "
                                 "Lower optim.lr.")
    run.optimizer.step()
    return total


def train_epoch(run: Run) -> None:
    cfg, prog, plan = run.cfg, run.progress, run.plan
    epoch = prog["epoch"]
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(cfg, epoch)
    run.net.train()
    loader = DataLoader(SeededView(run.train_sets), batch_sampler=_ChunkSampler(plan, epoch, prog["step_in_epoch"]),
                        num_workers=cfg.workers, collate_fn=collate, pin_memory=run.dist.device.type == "cuda")
    batches = iter(loader)
    bar = None
    if cfg.log.progress and run.dist.is_main:
        bar = tqdm(total=plan.steps_per_epoch, initial=prog["step_in_epoch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   dynamic_ncols=True, leave=False)
    t0, window = time.perf_counter(), []
    try:
        for step in range(prog["step_in_epoch"], plan.steps_per_epoch):
            loss = train_step(run, batches, epoch, step)
            prog["global_step"] += 1
            prog["step_in_epoch"] = step + 1
            prog["loss_sum"] += loss
            prog["loss_steps"] += 1
            run.step_losses.append(loss)
            window.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if run.log is not None and cfg.log.every_steps and prog["global_step"] % cfg.log.every_steps == 0:
                run.log.write({"kind": "train", "epoch": epoch + 1, "step": prog["global_step"],
                               "loss": float(np.mean(window)), "lr": run.optimizer.param_groups[0]["lr"],
                               "images_per_s": len(window) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)})
                t0, window = time.perf_counter(), []
            if (cfg.checkpoint.every_steps and prog["global_step"] % cfg.checkpoint.every_steps == 0
                    and prog["step_in_epoch"] < plan.steps_per_epoch):
                save_state(run)
    finally:
        if bar is not None:
            bar.close()


def save_state(run: Run, name: str = LAST) -> None:
    """The resumable checkpoint (rank 0 writes; every process waits for it)."""
    if run.dist.is_main:
        save_training_state(run.run_dir / name, run.model, optimizer=run.optimizer, scheduler=None, scaler=None,
                            progress=copy.deepcopy(run.progress), train_config=config_to_dict(run.cfg))
    barrier(run.dist)


def restore(run: Run, path: Path) -> None:
    ckpt = load_training_state(path)
    load_into(run.model, ckpt, strict=True)
    run.optimizer.load_state_dict(ckpt.extra["optimizer"])
    run.progress = dict(ckpt.extra["progress"])
    set_rng_state(ckpt.extra["rng"])
    logger.info("resumed from %s: epoch %d, step %d of it", path, run.progress["epoch"] + 1,
                run.progress["step_in_epoch"])


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def score_with_prompt(model: PromptedIQA, test: Dataset, isp_images: list[torch.Tensor], isp_scores: np.ndarray,
                      cfg: TrainConfig, dist: DistInfo, flip_seed: int) -> np.ndarray:
    """Scores (N,) of every image of ``test`` against the ISPP, gathered over processes (each scores every
    ``world_size``-th image). The prompt is encoded once; with ``promptiqa.ispp_flip`` (the official quirk) its images
    are flipped anew, and it is re-encoded, for every batch."""
    model.eval()
    dev = dist.device
    mine = list(range(dist.rank, len(test), dist.world_size))
    workers = cfg.eval.workers if cfg.eval.workers is not None else cfg.workers
    loader = DataLoader(Subset(test, mine), batch_size=cfg.eval.batch_size, num_workers=workers, collate_fn=collate)
    same_size = len({tuple(x.shape) for x in isp_images}) == 1
    prompt_images: torch.Tensor | list[torch.Tensor] = torch.stack(isp_images) if same_size else isp_images
    scores = torch.as_tensor(isp_scores, dtype=torch.float32)
    isp = None if cfg.promptiqa.ispp_flip else model.encode_prompt(_to(prompt_images, dev), scores)
    out: list[float] = []
    for b, batch in enumerate(loader):
        if cfg.promptiqa.ispp_flip:
            gen = torch.Generator().manual_seed(_mix(flip_seed, dist.rank, b))
            flipped = [random_vertical_flip(x[None], 0.5, gen)[0] for x in isp_images]
            isp = model.encode_prompt(_to(torch.stack(flipped) if same_size else flipped, dev), scores)
        out.extend(model(_to(batch["img"], dev), prompt=isp).double().cpu().tolist())
    parts = all_gather_objects(out, dist)
    full = np.empty(len(test), dtype=np.float64)
    for rank, part in enumerate(parts):
        full[rank :: dist.world_size] = part
    return full


def _to(images: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [x.to(device, non_blocking=True) for x in images]


class AssessedOutputs(nn.Module):
    """``forward(images, scene)``: the outputs ``names`` of a Gamma model's :meth:`~gamma.archs.GammaModel.assess`,
    stacked as columns (B, k) in that order (names as in :data:`gamma.scorer.ADAPT_OUTPUTS`: ``score``, ``std``,
    ``p_<level>``, attribute names), so that :func:`gamma.train.evaluate.predict` scores them with the model's
    test-time crop protocol."""

    def __init__(self, model: GammaModel, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)
        self.attributes = bool(set(self.names) & set(ATTRIBUTES))

    def forward(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        a = self.model.assess(images, scene, attributes=self.attributes)
        columns = {"score": a.score, "std": a.std, **a.level_columns(), **(a.attributes or {})}
        return torch.stack([columns[name] for name in self.names], dim=-1)  # (B, k)


class Evaluator:
    """Scores held-out sets the stage's way for one evaluation: prompted models against ISPPs drawn from each set's
    training part, Gamma models as they are or mapped (docs/promptiqa.md#the-test-protocol).

    ``mapping`` is a ``promptiqa.mapping`` value: ``none`` (Gamma's score as it is), ``fit`` (:func:`gamma.adapt.fit`'s
    monotone map of the score) or ``fit_all`` (its ridge regression on ``ADAPT_OUTPUTS["all"]``), each fitted on the
    ISPs of the draw and applied to the test images' same outputs; prompted models ignore it.
    """

    def __init__(self, run: Run) -> None:
        self.run, self.cfg, self.dist = run, run.cfg, run.dist
        self._gamma_cache: dict[tuple[str, str, str], np.ndarray] = {}

    def prompt_rows(self, s: EvalSet, draw: int) -> np.ndarray:
        """Positions in ``s.prompt_source`` of the ISPP of draw ``draw``."""
        p = self.cfg.promptiqa
        gen = np.random.default_rng(_mix(p.isp_seed, zlib.crc32(s.name.encode()), draw))
        return sample_ispp(s.prompt_source.labels, isp_count(self.cfg), p.isp_sampling, gen)

    def scores(self, model: nn.Module, s: EvalSet, draw: int, inverted: bool, mapping: str = "none") -> np.ndarray:
        """Scores of ``s``'s test images by ``model`` with the ISPP of draw ``draw`` (its scores inverted or not)."""
        rows = self.prompt_rows(s, draw)
        isp_scores = np.asarray(s.prompt_source.labels, dtype=np.float64)[rows]
        if inverted:
            isp_scores = 1.0 - isp_scores
        if isinstance(model, PromptedIQA):
            view = model_view(model, s.prompt_source, self.cfg.promptiqa.decode)
            images = [view[int(i)]["img"] for i in rows]
            test = model_view(model, s.test, self.cfg.promptiqa.decode)
            return score_with_prompt(model, test, images, isp_scores, self.cfg, self.dist,
                                     _mix(self.cfg.promptiqa.isp_seed, zlib.crc32(s.name.encode()), draw))
        if mapping == "none":
            return self.gamma_scores(model, s.test, s.name, "test")
        outputs, method = MAPPINGS[mapping]
        names = ADAPT_OUTPUTS[outputs]
        test_x = self.gamma_outputs(model, s.test, s.name, "test", outputs)  # (N,) scores or (N, k) outputs
        isp_x = self.gamma_outputs(model, Subset(s.prompt_source, [int(i) for i in rows]), s.name, f"isp{draw}",
                                   outputs)  # (n,) or (n, k)
        try:
            fitted = adapt.fit(isp_x, isp_scores, names, method=method)
        except adapt.NotEnoughPairsError:
            raise  # (check_config refuses too few ISPs before anything runs)
        except ValueError as exc:  # constant ISP scores or outputs: no map, no ranking (nan SRCC, '-' in the table)
            logger.warning("%s, ISP draw %d: no %s map of Gamma's %s fits the ISPs (%s); every image gets the ISP "
                           "scores' mean", s.name, draw, method, outputs, exc)
            return np.full(len(s.test), float(isp_scores.mean()))
        return fitted.predict(test_x)

    def gamma_scores(self, model: GammaModel, ds: Dataset, name: str, part: str) -> np.ndarray:
        """A Gamma model's scores (N,) of ``ds`` with the run's test-time crop protocol (``eval.crop_mode`` ...)."""
        return self.gamma_outputs(model, ds, name, part)

    def gamma_outputs(self, model: GammaModel, ds: Dataset, name: str, part: str, outputs: str = "score"
                      ) -> np.ndarray:
        """A Gamma model's ``ADAPT_OUTPUTS[outputs]`` of ``ds`` with the run's test-time crop protocol: its scores
        (N,) (the model's forward) for ``score``, else (N, k) columns in that order (:meth:`GammaModel.assess`).
        Cached per (outputs, set, part) for the evaluation."""
        key = (outputs, name, part)
        if key not in self._gamma_cache:
            e = self.cfg.eval
            model.eval()
            own = copy.copy(model.crop_protocol)  # (a Gamma + ISP model's Gamma keeps its own protocol)
            model.set_crop_protocol(mode=e.crop_mode, num=e.crops, seed=e.crop_seed)
            workers = e.workers if e.workers is not None else self.cfg.workers
            net = model if outputs == "score" else AssessedOutputs(model, ADAPT_OUTPUTS[outputs])
            try:
                self._gamma_cache[key] = predict(net, ds, self.dist.device, batch_size=e.batch_size,
                                                 workers=workers, dist_info=self.dist)
            finally:
                model.crop_protocol = own
        return self._gamma_cache[key]

    def metrics(self, model: nn.Module, s: EvalSet, inverted: bool = False, mapping: str = "none"
                ) -> tuple[dict[str, float], np.ndarray]:
        """SRCC / PLCC / KRCC of one set (mean over ``isp_draws`` prompts, with ``<metric>_std`` when several) and the
        first draw's scores."""
        labels = np.asarray(s.test.labels, dtype=np.float64)
        per_draw, first = [], None
        draws = self.cfg.promptiqa.isp_draws if (isinstance(model, PromptedIQA) or mapping != "none") else 1
        for d in range(draws):
            scores = self.scores(model, s, d, inverted, mapping)
            first = scores if first is None else first
            per_draw.append(evaluate_scores(scores, labels))
        out: dict[str, float] = {m: float(np.mean([r[m] for r in per_draw])) for m in METRICS}
        out["n"] = per_draw[0]["n"]
        if draws > 1:
            out.update({f"{m}_std": float(np.std([r[m] for r in per_draw])) for m in METRICS})
            out["draws"] = draws
        return out, first

    def evaluate(self, model: nn.Module, sets: Sequence[EvalSet], inverted: bool = False, mapping: str = "none"
                 ) -> dict[str, Any]:
        per, preds = {}, {}
        for s in sets:
            per[s.name], scores = self.metrics(model, s, inverted, mapping)
            preds[s.name] = scores.tolist()
        return {"datasets": per, "mean": mean_metrics(per), "predictions": preds}


def model_label(cfg: TrainConfig, model: nn.Module) -> str:
    """The run's row in the adaptation table."""
    kind = {PromptIQA: "PromptIQA", GammaISP: "Gamma + ISP"}.get(type(model), "Gamma")
    if isinstance(model, GammaModel):
        kind = {"fit": GAMMA_MAPPED, "fit_all": GAMMA_MAPPED_ALL}.get(cfg.promptiqa.mapping, GAMMA_AS_IS)
    return f"{kind} ({cfg.name})"


def adaptation(run: Run, ev: Evaluator) -> dict[str, dict[str, dict[str, Any]]]:
    """The adaptation table's rows: {method: {isps | inverted_isps: {dataset: metrics}}} for the run's model (and,
    with ``promptiqa.baselines``, Gamma as it is, with a monotone map of its score and with ridge on all its outputs,
    each fitted on the ISPs)."""
    cfg, sets = run.cfg, run.eval_sets
    mapping = cfg.promptiqa.mapping
    rows = {model_label(cfg, run.model): {v: ev.evaluate(run.model, sets, v == "inverted_isps", mapping)["datasets"]
                                          for v in PROMPT_VARIANTS}}
    if cfg.promptiqa.baselines:
        gamma = run.model.gamma if isinstance(run.model, GammaISP) else create_model(pretrained=resolve_gamma(cfg))
        gamma = gamma.to(run.dist.device)
        gev = Evaluator(run)
        for label, how in ((GAMMA_AS_IS, "none"), (GAMMA_MAPPED, "fit"), (GAMMA_MAPPED_ALL, "fit_all")):
            rows[label] = {v: gev.evaluate(gamma, sets, v == "inverted_isps", how)["datasets"] for v in PROMPT_VARIANTS}
    return rows


def evaluate_epoch(run: Run, epoch: int, final: bool) -> dict[str, Any]:
    """Evaluate, log, keep the best; after the last epoch also the adaptation table."""
    cfg, prog = run.cfg, run.progress
    t0 = time.perf_counter()
    broadcast_buffers(run.model, run.dist)  # one set of BatchNorm statistics on every process (the saved one)
    ev = Evaluator(run)
    mapping = cfg.promptiqa.mapping
    was_training = run.model.training
    try:
        result = ev.evaluate(run.model, run.eval_sets, mapping=mapping)
        record = {"kind": "eval", "epoch": epoch, "step": prog["global_step"],
                  "train_loss": prog["loss_sum"] / prog["loss_steps"] if prog["loss_steps"] else None,
                  "mean": result["mean"], "datasets": result["datasets"]}
        if run.select_sets:
            chosen = ev.evaluate(run.model, run.select_sets, mapping=mapping)
            record["selection"] = {"mean": chosen["mean"], "datasets": chosen["datasets"]}
        if final and (cfg.promptiqa.inverted_isps or cfg.promptiqa.baselines):
            record["adaptation"] = adaptation(run, ev)
    finally:
        run.model.train(was_training)
    record["seconds"] = time.perf_counter() - t0
    prog["history"].append(record)
    score = selection_view(record)["mean"][cfg.eval.select_metric]
    best = prog["best"]
    improved = math.isfinite(score) and (best is None or score > selection_view(best)["mean"][cfg.eval.select_metric])
    if improved:
        prog["best"] = block(record)
    if run.dist.is_main:
        run.log.write({k: v for k, v in record.items() if k != "adaptation"})
        summary = ", ".join(f"{n} {v['srcc']:.3f}/{v['plcc']:.3f}" for n, v in result["datasets"].items())
        logger.info("epoch %d eval (SRCC/PLCC): %s; mean %.4f/%.4f%s", epoch, summary, result["mean"]["srcc"],
                    result["mean"]["plcc"], " (best)" if improved else "")
        if improved and cfg.checkpoint.save_best and not cfg.eval_only:
            save_best(run.run_dir, run.model, cfg.checkpoint.format, {"epoch": epoch, **block(record)},
                      config_to_dict(cfg))
        if final:
            write_predictions(run, result["predictions"])
    return record


def write_predictions(run: Run, predictions: dict[str, list[float]]) -> None:
    folder = run.run_dir / "predictions_final"
    folder.mkdir(exist_ok=True)
    for s in run.eval_sets:
        buf = io.StringIO()
        buf.write("path,label,pred\n")
        for path, label, pred in zip(s.test.paths, s.test.labels, predictions[s.name], strict=True):
            buf.write(f"{os.path.relpath(path, s.test.entry.image_root)},{label:.6f},{pred:.6f}\n")
        text = buf.getvalue()
        atomic_write(folder / f"{s.name}.csv", lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ tables
def adaptation_markdown(rows: dict[str, dict[str, dict[str, Any]]], title: str = "") -> str:
    """The adaptation table: held-out SRCC of each method on each set, with the ISP scores as given and inverted."""
    datasets = list(dict.fromkeys(d for r in rows.values() for v in r.values() for d in v))
    lines = [title] if title else []
    for variant, heading in (("isps", "ISP scores as given"), ("inverted_isps", "ISP scores inverted (1 - s)")):
        lines += ["", f"Held-out SRCC, {heading}:", "", "| method | " + " | ".join(datasets) + " |",
                  "|---" * (len(datasets) + 1) + "|"]
        for method, r in rows.items():
            cells = [_cell(r.get(variant, {}).get(d)) for d in datasets]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip() + "\n"


def _cell(metrics: dict[str, Any] | None) -> str:
    if not metrics or metrics.get("srcc") is None or not math.isfinite(metrics["srcc"]):
        return "-"
    text = f"{metrics['srcc']:.3f}"
    return text + (f" ± {metrics['srcc_std']:.3f}" if "srcc_std" in metrics else "")


def compared_rows(cfg: TrainConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Adaptation rows of the runs named in ``promptiqa.compare_runs`` (their final evaluation)."""
    rows = {}
    for name in cfg.promptiqa.compare_runs:
        path = Path(cfg.output_dir) / name / f"split_{cfg.split_index}" / "results.json"
        try:
            final = json.loads(path.read_text(encoding="utf-8")).get("final") or {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"promptiqa.compare_runs: cannot read {path} ({exc}); has run {name!r} "
                              "finished?") from None
        if not final.get("adaptation"):
            raise ConfigError(f"promptiqa.compare_runs: {path} has no adaptation rows (run {name!r} needs "
                              "promptiqa.inverted_isps or promptiqa.baselines)")
        rows.update(final["adaptation"])
    return rows


# ------------------------------------------------------------------------------------------------ one run
def train(cfg: TrainConfig, dist: DistInfo, resume: bool = False) -> dict[str, Any]:
    """Train (or with ``eval_only`` evaluate) one split; returns the results (also in ``results.json``)."""
    check_config(cfg)
    with open_run(cfg, dist, resume) as (run_dir, log):
        run = prepare(cfg, dist, run_dir, log)
        if resume and not cfg.eval_only and (run_dir / LAST).exists():
            restore(run, run_dir / LAST)
            if log is not None:
                log.truncate_after(run.progress["global_step"], drop_eval_at_step=run.progress.get("pending_eval"))
        t0 = time.perf_counter()
        if cfg.eval_only:
            evaluate_epoch(run, 0, final=True)
        else:
            fit(run)
        results = _results(run, time.perf_counter() - t0)
        if dist.is_main:
            write_json(run_dir / "results.json", results)
            write_table(median_table([results]), run_dir, cfg.name)
            rows = {**compared_rows(cfg), **((results["final"] or {}).get("adaptation") or {})}
            if rows:
                md = adaptation_markdown(rows, f"Adaptation to the held-out sets' requirements from {isp_count(cfg)} "
                                               f"ISPs ({cfg.promptiqa.isp_sampling} sampling), split "
                                               f"{cfg.split_index}.")
                atomic_write(run_dir / "adaptation.md", lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))
                for line in md.strip().splitlines():
                    logger.info("%s", line)
        return results


def fit(run: Run) -> None:
    """Train the remaining epochs, evaluating as ``eval.every`` says (always after the last) and checkpointing.

    The checkpoint after an epoch is written before its evaluation (marked pending, so that a run killed during the
    evaluation evaluates on resuming), and evaluations leave the random state of training alone.
    """
    cfg, prog = run.cfg, run.progress
    if prog.get("pending_eval"):
        _finish_eval(run, prog["epoch"])
    if prog["epoch"] == 0 and prog["step_in_epoch"] == 0 and cfg.eval.at_start and not prog["history"]:
        with torch.random.fork_rng(devices=[]):
            evaluate_epoch(run, 0, final=False)
    while prog["epoch"] < cfg.epochs:
        train_epoch(run)
        done = prog["epoch"] + 1
        if run.dist.is_main:
            loss = prog["loss_sum"] / max(prog["loss_steps"], 1)
            logger.info("epoch %d/%d: train loss %.5f", done, cfg.epochs, loss)
            run.log.write({"kind": "epoch", "epoch": done, "step": prog["global_step"], "train_loss": loss,
                           "lr": run.optimizer.param_groups[0]["lr"]})
        evaluating = done == cfg.epochs or bool(cfg.eval.every and done % cfg.eval.every == 0)
        prog.update(epoch=done, step_in_epoch=0, pending_eval=evaluating)
        if not evaluating:  # (an evaluation reports the epoch's loss first)
            prog.update(loss_sum=0.0, loss_steps=0)
        save_state(run)
        if cfg.checkpoint.keep_epochs:
            save_state(run, f"epoch_{done:03d}.pth")
        if evaluating:
            _finish_eval(run, done)


def _finish_eval(run: Run, epoch: int) -> None:
    with torch.random.fork_rng(devices=[]):  # (DataLoaders draw their seeds from the global generator)
        evaluate_epoch(run, epoch, final=epoch == run.cfg.epochs)
    run.progress.update(pending_eval=False, loss_sum=0.0, loss_steps=0)
    save_state(run)


def _final_block(record: dict[str, Any]) -> dict[str, Any]:
    out = block(record)
    if "adaptation" in record:
        out["adaptation"] = record["adaptation"]
    return out


def _results(run: Run, seconds: float) -> dict[str, Any]:
    cfg, prog = run.cfg, run.progress
    evals = [h for h in prog["history"] if h["kind"] == "eval"]
    finished = cfg.eval_only or prog["epoch"] >= cfg.epochs
    return {
        "run_dir": str(run.run_dir), "name": cfg.name, "stage": "promptiqa", "split_index": cfg.split_index,
        "finished": finished, "eval_only": cfg.eval_only, "epochs": prog["epoch"], "global_step": prog["global_step"],
        "seconds": seconds, "headline": "final",
        "final": _final_block(evals[-1]) if evals and finished else None,
        "best": None if prog["best"] is None else {**prog["best"], "selected_on": cfg.eval.select_on},
        "best_per_dataset": best_per_dataset(evals, cfg.eval.select_metric),
        "evaluated_epochs": [h["epoch"] for h in evals],
        "selection": {"on": cfg.eval.select_on, "metric": cfg.eval.select_metric,
                      "holdout_fraction": cfg.eval.holdout_fraction if run.select_sets else None,
                      "holdout_images": {s.name: len(s.test) for s in run.select_sets}},
        "isp": {"count": isp_count(cfg), "sampling": cfg.promptiqa.isp_sampling, "draws": cfg.promptiqa.isp_draws},
        "parameters": {"total": run.model.num_parameters(),
                       "trainable": run.model.num_parameters(trainable_only=True)},
        "history": prog["history"],
        "step_losses": list(run.step_losses),
    }


# ------------------------------------------------------------------------------------------------ the stage
def run(cfg: TrainConfig, resume: bool = False, all_splits: bool = False) -> dict[str, Any]:
    """Stage ``promptiqa``: one split (``cfg.split_index``), or every split of ``cfg.splits`` and the median table."""
    dist = setup(cfg.device, cfg.ddp.backend, cfg.ddp.timeout_s)
    try:
        if not all_splits:
            return train(cfg, dist, resume=resume)
        results = []
        for k in cfg.splits:
            cfg_k = split_config(cfg, k)
            previous = finished_results(cfg_k) if resume else None
            if previous is not None:
                results.append(previous)
                continue
            results.append(train(cfg_k, dist, resume=resume))
        out: dict[str, Any] = {"splits": results, "table": median_table(results)}
        if dist.is_main:
            files = write_table(out["table"], Path(cfg.output_dir) / cfg.name, cfg.name)
            out["files"] = {k: str(v) for k, v in files.items()}
        return out
    finally:
        cleanup(dist)
