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
  learning rate set once per epoch on a half cosine over the run (``promptiqa.cosine_period`` and
  ``promptiqa.lr_schedule``: the paper's "cosine annealing for every 50 epochs" read as restarts or as PyTorch's
  ``CosineAnnealingLR(T_max=50)``, which climbs back).

The label augmentation, the image flips and the chunk order are functions of (seed, epoch, step, chunk), so resuming
repeats the same run and the chunks do not depend on the number of processes or DataLoader workers. The run itself
is the trainer's loop (:func:`gamma.train.loop.train` with an :class:`~gamma.train.loop.Objective`): checkpoints,
``--resume`` mid-epoch, save-and-stop on SIGINT / SIGTERM, DDP, final and best are those of every stage.

Testing (:mod:`gamma.train.promptiqa_eval`): each held-out set is scored against an ISPP drawn from that dataset's
*training* part; SRCC / PLCC / KRCC per dataset, final and best evaluations, and the 10-split median table as for
Gamma. ``promptiqa.requirements`` adds relabelled pictures (:mod:`gamma.data.requirements`) to the held-out sets,
and the adaptation table (``adaptation.md``) reports them with the ISP scores as given and inverted, next to Gamma as
it is and mapped onto the ISPs (``promptiqa.baselines``).

The same stage trains Gamma + ISP (``gamma_isp`` models: PromptIQA's prompt path on frozen Gamma features); those read
images with the dataset's own transforms (training crops, full test images), as Gamma does. With ``eval_only`` and a
Gamma model it evaluates that model on the held-out sets, its scores as they are or mapped (``promptiqa.mapping``:
``fit`` the monotone map of its score, ``fit_all`` ridge on all its outputs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .. import adapt
from .._files import atomic_write
from ..archs import PromptedIQA
from ..data import IQADataset, build_dataset, collate
from ..data.promptiqa import draw_label_augment, random_vertical_flip
from ..data.requirements import write_requirement
from ..data.transforms import TestTransform
from ..factory import create_model, list_models
from ..families import is_family
from ..hub import PromptSetError, resolve_weights
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, broadcast_object
from .loop import Run, prompt_set_conflict, train
from .objective import Objective
from .promptiqa_eval import (  # noqa: F401 - the test protocol's names, also reached through this module
    GAMMA_AS_IS,
    GAMMA_MAPPED,
    GAMMA_MAPPED_ALL,
    MAPPINGS,
    PROMPT_VARIANTS,
    AssessedOutputs,
    EvalSet,
    Evaluator,
    WholeImages,
    adaptation,
    adaptation_markdown,
    compared_rows,
    isp_count,
    mix_seed,
    model_view,
    resolve_gamma,
    takes_isp,
    to_device,
)
from .run_folder import finished_results
from .sampling import SeededView, Slot
from .selection import carve_holdout

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------ data
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
            perm = np.random.default_rng(mix_seed(self.seed, epoch, d, 0xC0)).permutation(n)
            out += [perm[i * self.chunk : (i + 1) * self.chunk] + off for i in range(n // self.chunk)]
        order = np.random.default_rng(mix_seed(self.seed, epoch, 0xC1)).permutation(len(out))
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
                yield [Slot(int(i), mix_seed(self.seed, epoch, pos, k), 1.0) for k, i in enumerate(chunks[pos])]


def chunk_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The generator of one chunk's label augmentation and image flips (``position`` in the epoch's chunk order)."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, position, 0xA6))


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of a step's shared label augmentation (``promptiqa.label_draw: step``): every chunk of the step,
    on every process, starts from the same state, as every official process reseeds ``random`` alike."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, step, 0xA7))


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


# ------------------------------------------------------------------------------------------------ building
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
        model = create_model(name, pretrained=pretrained, allow_unsafe=m.allow_unsafe,
                             prompt_set_override=m.prompt_set_override, **overrides)
    except PromptSetError as exc:
        raise prompt_set_conflict(exc) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}") from exc
    if not (takes_isp(model) or is_family(model, "gamma")):
        raise ConfigError(f"model: stage promptiqa takes PromptIQA, Gamma + ISP or (eval_only) Gamma models, got "
                          f"{type(model).__name__}")
    if is_family(model, "gamma") and not cfg.eval_only:
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


# ------------------------------------------------------------------------------------------------ the recipe
def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` (the official
    ``adjust_learning_rate``: one half cosine over the run), constant without ``optim.scheduler: cosine``.
    With ``promptiqa.cosine_period`` P: ``lr_schedule: cosine_restart`` takes t = (epoch mod P) / P (back to ``lr``
    every P epochs), ``cosine_tmax`` t = epoch / P (``CosineAnnealingLR(T_max=P)``: down over P epochs, then up)."""
    o = cfg.optim
    if o.scheduler != "cosine":
        return o.lr
    period = cfg.promptiqa.cosine_period or cfg.epochs
    t = (epoch % period if cfg.promptiqa.lr_schedule == "cosine_restart" else epoch) / period
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def train_step(run: Run, batches: Iterator[dict[str, Any]], step: int) -> tuple[torch.Tensor, float]:
    """One optimiser step's forward and backward passes over this process's chunks (the loop's ``Objective.step``).

    Returns:
        this process's sum of chunk L1 losses and the chunks of the step over all processes (the loop averages).
    """
    cfg, p, dev, plan = run.cfg, run.cfg.promptiqa, run.dist.device, run.plan
    epoch = run.progress.epoch
    mine = plan.step_chunks(step)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for j, pos in enumerate(mine):
        batch = next(batches)
        gen = chunk_generator(cfg.seed, epoch, pos)
        labels = batch["mos"].float()
        label_gen = gen if p.label_draw == "chunk" else step_generator(cfg.seed, epoch, step)
        target = draw_label_augment(labels, p.scale_p, p.flip_p, label_gen).apply(labels)  # prompts and targets alike
        images = batch["img"]
        if p.vflip_p > 0:
            images = random_vertical_flip(images, p.vflip_p, gen)
        sync = run.net.no_sync() if run.dist.enabled and j < len(mine) - 1 else nullcontext()
        with sync:
            pred = run.net(to_device(images, dev), target.to(dev))
            loss = F.l1_loss(pred.float(), target.to(dev))
            (loss / len(mine)).backward()  # DDP averages over processes: the gradient of the mean over all chunks
        loss_sum += loss.detach().double()
    return loss_sum, float(plan.per_step)


def chunk_loader(run: Run, train_sets: Sequence[IQADataset], epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
    """The epoch's chunks from ``start_step`` on, each image read as the run's model reads it.

    The DataLoader draws its workers' base seed from the global generator when an epoch starts (as it always has for
    this stage); resuming mid-epoch it must not draw again, because the checkpoint's generator state is already past
    that draw (the dropout of the remaining steps then repeats the uninterrupted run's)."""
    view = SeededView([model_view(run.model, ds, run.cfg.promptiqa.decode) for ds in train_sets])
    loader = DataLoader(view, batch_sampler=_ChunkSampler(run.plan, epoch, start_step), num_workers=run.cfg.workers,
                        collate_fn=collate, pin_memory=run.dist.device.type == "cuda")
    if start_step == 0:
        return iter(loader)
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def objective(cfg: TrainConfig, dist: DistInfo) -> Callable[[Path], Objective]:
    """The stage as the loop's :class:`~gamma.train.loop.Objective`, built in the (locked) run folder."""
    p = cfg.promptiqa

    def build(run_dir: Path) -> Objective:
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

        def evaluate(run: Run) -> dict[str, Any]:
            final = cfg.eval_only or run.progress.epoch >= cfg.epochs
            was_training = run.model.training
            with torch.random.fork_rng(devices=[]):  # (DataLoaders draw their seeds from the global generator)
                try:
                    ev = Evaluator(run)
                    result = ev.evaluate(run.model, eval_sets, mapping=p.mapping)
                    if select_sets:
                        chosen = ev.evaluate(run.model, select_sets, mapping=p.mapping)
                        result["selection"] = {"mean": chosen["mean"], "datasets": chosen["datasets"]}
                    if final and (p.inverted_isps or p.baselines):
                        result["record"] = {"adaptation": adaptation(run, ev, eval_sets)}
                finally:
                    run.model.train(was_training)
            return result

        return Objective(
            train_sets=train_sets, eval_sets={s.name: s.test for s in eval_sets}, loss_sum=None, evaluate=evaluate,
            build_model=build_model, wrap=LeaveOneOut, lr_at=lambda epoch: lr_at(cfg, epoch),
            plan=lambda c, d, sizes: ChunkPlan(sizes, p.chunk, c.batch_size // p.chunk, c.seed, d.world_size,
                                               d.rank, c.max_steps_per_epoch),
            loader=lambda run, epoch, start: chunk_loader(run, train_sets, epoch, start), step=train_step,
            select_sets={s.name: s.test for s in select_sets}, results=_results)

    return build


def _results(run: Run, out: dict[str, Any]) -> None:
    """The stage's own entries in ``results.json``: the final adaptation rows, the test prompts, parameter counts."""
    cfg = run.cfg
    evals = [h for h in run.progress.history if h["kind"] == "eval"]
    if out["final"] is not None and "adaptation" in evals[-1]:
        out["final"]["adaptation"] = evals[-1]["adaptation"]
    out["stage"] = "promptiqa"
    out["isp"] = {"count": isp_count(cfg), "sampling": cfg.promptiqa.isp_sampling, "draws": cfg.promptiqa.isp_draws}
    out["parameters"] = {"total": run.model.num_parameters(),
                         "trainable": run.model.num_parameters(trainable_only=True)}


# ------------------------------------------------------------------------------------------------ the stage
def train_split(cfg: TrainConfig, dist: DistInfo, resume: bool = False) -> dict[str, Any]:
    """Train (or with ``eval_only`` evaluate) one split in the trainer's loop; returns the results (also in
    ``results.json``) and writes the adaptation table (``adaptation.md``) when the run has its rows."""
    check_config(cfg)
    if resume and (done := finished_results(cfg)) is not None:  # finished: its folder is left as it is
        return done
    results = train(cfg, dist, resume=resume, objective=objective(cfg, dist))
    if dist.is_main:
        rows = {**compared_rows(cfg), **((results["final"] or {}).get("adaptation") or {})}
        if rows:
            md = adaptation_markdown(rows, f"Adaptation to the held-out sets' requirements from {isp_count(cfg)} "
                                           f"ISPs ({cfg.promptiqa.isp_sampling} sampling), split {cfg.split_index}.")
            run_dir = Path(results["run_dir"])
            atomic_write(run_dir / "adaptation.md", lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))
            for line in md.strip().splitlines():
                logger.info("%s", line)
    return results
