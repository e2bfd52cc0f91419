"""Process-group setup for ``torchrun`` and the few collective helpers the trainer needs.

A run is distributed when ``WORLD_SIZE`` > 1 in the environment (``torchrun --nproc_per_node=N train.py ...``). The
backend is NCCL on CUDA and gloo on CPU unless the config says otherwise. Without ``WORLD_SIZE`` every helper is a
no-op on one process, so the same code runs both ways.

One process group per process: the trainer's entry point (:func:`gamma.train.main.main`) joins it once, passes the
:class:`DistInfo` down through every chained stage and leaves it at exit. A stage that calls :func:`setup` itself while
the group exists reuses it, and its :func:`cleanup` leaves the group alone (only the caller that created it destroys
it): destroying and re-creating the default group inside one torchrun process breaks NCCL communicators and the
rendezvous store.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None when not distributed
    owns_group: bool = False  # this DistInfo's setup() created the process group (its cleanup() destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def cuda_index(requested: int | None, local_rank: int, world_size: int, count: int) -> int:
    """The CUDA device index of one process.

    Args:
        requested: the index the configuration names (``cuda:N``), or None (``cuda`` / ``auto``).
        local_rank: torchrun's ``LOCAL_RANK``; world_size: processes in the run; count: CUDA devices this process sees.

    One process: the requested index (0 by default). Several: each process takes ``cuda:LOCAL_RANK``; when each
    process sees a single GPU (a scheduler that sets ``CUDA_VISIBLE_DEVICES`` per task) it takes that one. An explicit
    index under torchrun would put every process on one GPU (NCCL refuses duplicate GPUs), so it is refused unless it
    is ``cuda:0`` with one visible device per process.

    Raises:
        ValueError: the device does not exist, or an explicit index under several processes.
    """
    if count < 1:
        raise ValueError("device: CUDA asked for, but no CUDA device is visible")
    if world_size <= 1:
        index = 0 if requested is None else requested
    elif requested is not None and not (requested == 0 and count == 1):
        raise ValueError(f"device: cuda:{requested} with {world_size} processes would put every process on one GPU; "
                         "use device=cuda (or auto): each process takes cuda:LOCAL_RANK. Choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES")
    elif count == 1:
        index = 0  # one visible GPU per process (CUDA_VISIBLE_DEVICES set per task)
    elif local_rank < count:
        index = local_rank
    else:
        raise ValueError(f"device: LOCAL_RANK {local_rank} but only {count} CUDA device(s) visible; start at most "
                         f"{count} processes per node (--nproc_per_node)")
    if index >= count:
        raise ValueError(f"device: cuda:{index} does not exist ({count} CUDA device(s))")
    return index


def pick_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto`` -> this process's CUDA device (:func:`cuda_index`) when CUDA is available, else cpu; otherwise the
    named device (checked)."""
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", cuda_index(None, local_rank, world_size, torch.cuda.device_count()))
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"device: cannot parse {spec!r} ({exc}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {spec!r} asked for, but CUDA is not available here; use device=cpu")
        device = torch.device("cuda", cuda_index(device.index, local_rank, world_size, torch.cuda.device_count()))
    return device


def setup(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by torchrun's environment (if any) and pick this process's device.

    When the group already exists (the trainer's entry point joined it), it is reused and the returned
    :class:`DistInfo` does not own it: :func:`cleanup` then leaves it for its creator.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    dev = pick_device(device, local_rank, world)
    if world <= 1:
        return DistInfo(device=dev)
    if dist.is_initialized():
        backend = dist.get_backend()
    elif backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("ddp.backend=nccl needs CUDA devices; use ddp.backend=gloo (or auto) on CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
                    backend=backend, owns_group=owns)
    if owns:
        logger.info("process %d of %d on %s (%s)", info.rank, info.world_size, dev, backend)
    return info


def cleanup(info: DistInfo) -> None:
    """Leave the process group, if ``info``'s :func:`setup` created it (a stage handed the group keeps it)."""
    global _LONG_GROUP
    if info.enabled and info.owns_group and dist.is_initialized():
        _LONG_GROUP = None
        dist.destroy_process_group()


_LONG_GROUP: Any = None  # gloo group for waits longer than the NCCL timeout (wait_for_main)


def wait_for_main(info: DistInfo, hours: float = 48.0) -> None:
    """Barrier for work that rank 0 does alone and that may outlast ``ddp.timeout_s`` (teacher labelling, CLIP
    pretraining): a gloo group of its own with a long timeout, so NCCL's watchdog does not abort the waiting ranks.
    Every rank must call it."""
    global _LONG_GROUP
    if not info.enabled:
        return
    if _LONG_GROUP is None:
        _LONG_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=hours))
    dist.barrier(group=_LONG_GROUP)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``tensor`` over processes (returned; the input is not modified)."""
    if not info.enabled:
        return tensor.clone()
    out = tensor.detach().clone().to(info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, info: DistInfo, src: int = 0) -> None:
    """Give every process rank ``src``'s buffers of ``module`` (in place).

    DDP copies rank 0's buffers to the others at the start of each training forward, and that forward then updates
    each process's BatchNorm running statistics with its own micro-batch: after training the processes hold slightly
    different statistics. Evaluating (each process scoring a share of the images) and saving (rank 0) need one set.
    Only the buffers a checkpoint holds travel (non-persistent ones are constants or caches).
    """
    if not info.enabled:
        return
    persistent = set(module.state_dict(keep_vars=True))  # constants and caches (non-persistent) are equal already
    for name, buf in module.named_buffers():
        if name not in persistent:
            continue
        if info.backend == "nccl" or buf.device.type == "cpu":
            dist.broadcast(buf, src=src)
        else:  # gloo with a CUDA tensor: through the CPU
            tmp = buf.detach().cpu()
            dist.broadcast(tmp, src=src)
            buf.copy_(tmp)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()
