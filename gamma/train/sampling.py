"""The order in which training samples are drawn, as a pure function of (seed, epoch).

The training set is the concatenation of every entry's train part. Each epoch visits ``N`` sample positions:

- ``uniform``: one random permutation of the concatenation — every image once per epoch, so each dataset is drawn
  in proportion to its size (the paper's mixed training);
- ``balanced``: every dataset gets an equal share of the ``N`` positions (its images cycled in shuffled rounds,
  small datasets repeated, large ones subsampled), then the positions are shuffled.

Position ``p`` of epoch ``e`` also fixes the seed of that sample's augmentation (flip and crop), so a sample's pixels
do not depend on which worker or process loads it. Optimiser step ``s`` takes positions ``[s*B, (s+1)*B)`` of the
epoch's order, ``B`` the global batch; its ``B`` slots are cut into ``world_size * grad_accum`` equal micro-batches.
Hence the whole run is a function of the seed alone: resuming at any step, changing the number of DataLoader workers
or spreading the batch over processes gives the same samples (and up to float rounding the same gradients).

When a step has fewer than ``B`` samples left (the epoch's last step) and the batch is split, the missing slots are
filled with weight-0 copies so that every process and micro-batch keeps the same shape; the loss ignores them.
With ``drop_last`` (the release's training loader) that last, partial step is left out instead: each epoch then
trains on ``B * floor(N / B)`` of its ``N`` positions, and the images left out change from epoch to epoch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

SAMPLERS: tuple[str, ...] = ("uniform", "balanced")

# Mixes (seed, epoch, position) into one 63-bit augmentation seed (splitmix64-style constants).
_MASK = (1 << 63) - 1


def _mix(*values: int) -> int:
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


@dataclass(frozen=True)
class Slot:
    """One sample of a micro-batch: index into the concatenated dataset, augmentation seed, loss weight (0 or 1)."""

    index: int
    seed: int
    weight: float


class EpochPlan:
    """Which samples each process uses at each step of an epoch.

    Args:
        sizes: number of training samples of each dataset (in concatenation order).
        batch_size: samples per optimiser step over all processes and accumulation steps.
        seed: run seed.
        mode: 'uniform' or 'balanced'.
        world_size: number of processes; rank: this process.
        grad_accum: micro-batches per step and process.
        max_steps: cut the epoch after this many steps (None = whole epoch).
        drop_last: leave out the epoch's last step when it is partial (fewer than ``batch_size`` samples).
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int, mode: str = "uniform", world_size: int = 1,
                 rank: int = 0, grad_accum: int = 1, max_steps: int | None = None, drop_last: bool = False) -> None:
        if mode not in SAMPLERS:
            raise ValueError(f"unknown sampler {mode!r}; known samplers: {', '.join(SAMPLERS)}")
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"every training dataset needs at least one sample, got sizes {list(sizes)}")
        parts = world_size * grad_accum
        if batch_size % parts:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size x grad_accum = {world_size} x "
                             f"{grad_accum}; choose a batch that splits evenly")
        self.sizes = [int(n) for n in sizes]
        self.total = sum(self.sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.mode = mode
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.micro = batch_size // parts  # samples per micro-batch and process
        self.drop_last = drop_last
        steps = self.total // batch_size if drop_last else math.ceil(self.total / batch_size)
        if steps < 1:
            raise ValueError(f"drop_last with {self.total} samples and batch_size {batch_size}: no whole batch")
        self.steps_per_epoch = min(steps, max_steps) if max_steps else steps

    # ---------------------------------------------------------------------------------------------- order
    def order(self, epoch: int) -> torch.Tensor:
        """Concatenated-dataset indices (N,) in the order epoch ``epoch`` visits them."""
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5A5A))
        if self.mode == "uniform":
            return torch.randperm(self.total, generator=gen)
        offsets = [0]
        for n in self.sizes[:-1]:
            offsets.append(offsets[-1] + n)
        k = len(self.sizes)
        quotas = [self.total // k + (1 if d < self.total % k else 0) for d in range(k)]
        picks = []
        for off, n, quota in zip(offsets, self.sizes, quotas, strict=True):
            rounds = [torch.randperm(n, generator=gen) for _ in range(math.ceil(quota / n))]
            picks.append(torch.cat(rounds)[:quota] + off)
        mixed = torch.cat(picks)
        return mixed[torch.randperm(len(mixed), generator=gen)]

    def step_slots(self, order: torch.Tensor, epoch: int, step: int) -> list[Slot]:
        """The ``B`` slots of optimiser step ``step`` (global, before splitting into micro-batches)."""
        start = step * self.batch_size
        stop = min(start + self.batch_size, self.total)
        slots = [Slot(int(order[p]), _mix(self.seed, epoch, p), 1.0) for p in range(start, stop)]
        if self.world_size * self.grad_accum > 1:
            pad = self.batch_size - len(slots)
            slots += [Slot(slots[i % len(slots)].index, slots[i % len(slots)].seed, 0.0) for i in range(pad)]
        return slots

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[Slot]]:
        """This process's micro-batches from step ``start_step`` to the end of the epoch, in order.

        Micro-batch ``m`` of a step on rank ``r`` holds slots ``[(m * world + r) * micro, ... + micro)``.
        """
        order = self.order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            slots = self.step_slots(order, epoch, step)
            if self.world_size * self.grad_accum == 1:
                yield slots
                continue
            for m in range(self.grad_accum):
                lo = (m * self.world_size + self.rank) * self.micro
                yield slots[lo : lo + self.micro]

    def samples_in_step(self, step: int) -> int:
        """Real (weight-1) samples of step ``step`` over all processes."""
        return min(self.batch_size, self.total - step * self.batch_size)


class SlotBatchSampler(torch.utils.data.Sampler):
    """A DataLoader ``batch_sampler`` over :meth:`EpochPlan.micro_batches` (items are :class:`Slot` lists)."""

    def __init__(self, plan: EpochPlan, epoch: int, start_step: int = 0) -> None:
        self.plan = plan
        self.epoch = epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[list[Slot]]:
        return self.plan.micro_batches(self.epoch, self.start_step)

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.start_step) * self.plan.grad_accum


class SeededView(torch.utils.data.Dataset):
    """The concatenation of ``datasets``, indexed by :class:`Slot`: item ``Slot(i, seed, w)`` is sample ``i`` with its
    random augmentation drawn after ``torch.manual_seed(seed)``, plus ``weight``."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset]) -> None:
        self.datasets = list(datasets)
        self.offsets = []
        total = 0
        for d in self.datasets:
            self.offsets.append(total)
            total += len(d)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, index inside it) of a concatenated index."""
        if not 0 <= index < self.total:
            raise IndexError(f"index {index} out of range for {self.total} samples")
        d = bisect.bisect_right(self.offsets, index) - 1
        return d, index - self.offsets[d]

    def __getitem__(self, slot: Slot) -> dict:
        d, i = self.locate(slot.index)
        # The datasets' transforms draw from the global torch RNG; seeding it per sample (and restoring it after)
        # makes the augmentation a function of the slot alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(slot.seed)
            item = self.datasets[d][i]
        item["weight"] = torch.tensor(slot.weight, dtype=torch.float32)
        return item
