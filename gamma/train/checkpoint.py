"""Run-folder files: the lock that keeps two runs apart, resumable training checkpoints, RNG state.

A training checkpoint is our model checkpoint (:func:`gamma.weights.save_checkpoint`: config + weights, written
atomically, loadable with ``weights_only=True``) with the training state in its extras: optimiser, scheduler and
grad-scaler state, progress counters, best metric, evaluation history and the RNG states of torch (CPU and the CUDA
device in use), numpy and Python of every process (each rank resumes its own streams). All of it is plain tensors,
numbers, strings, lists and dicts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_write
from ..weights import Checkpoint, CheckpointError, read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

LAST = "last.pth"  # resumable state, rewritten every epoch (and every checkpoint.every_steps steps)
BEST = "best"  # best.pth / best.safetensors: weights of the best epoch
LOCK = "run.lock"

try:  # POSIX advisory locks vanish with the process that holds them, even after kill -9
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunLockedError(RuntimeError):
    """Another live process is writing into the same run folder."""


class RunLock:
    """An exclusive lock on a run folder, held for the life of the run.

    The lock is an ``flock`` on ``<run_dir>/run.lock``: a second run into the same folder is refused while the first
    lives, and a run killed with ``kill -9`` leaves no stale lock behind (the file stays, the lock goes).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK
        self._fh = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunLockedError(f"{self.path.parent} is in use by another run ({holder}); two runs cannot write into "
                                 "one folder. Wait for it to finish, or choose another name= / output_dir=") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            if fcntl is not None:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------- RNG
def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """RNG states of torch (CPU and the CUDA device in use), numpy and Python, as ``weights_only``-loadable data.

    Args:
        device: the run's device. A CUDA state is taken only for a CUDA ``device`` (its own generator), or, with
            ``None``, for every device when CUDA is already initialised. A CPU run never initialises CUDA (which would
            claim memory on a GPU host and fails in forked DDP children).
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda_devices, cuda = [index], [torch.cuda.get_rng_state(index)]
    elif device is None and torch.cuda.is_initialized():
        cuda_devices = list(range(torch.cuda.device_count()))
        cuda = [torch.cuda.get_rng_state(i) for i in cuda_devices]
    else:
        cuda_devices, cuda = [], []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "cuda_devices": cuda_devices,
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what :func:`rng_state` captured. A CUDA state is restored only onto a CUDA ``device`` (the run's; the
    saved state of the device it was taken from, so a resumed rank continues its own stream), never in a CPU run."""
    torch.set_rng_state(state["torch"])
    device = torch.device(device) if device is not None else None
    cuda = state.get("cuda") or []
    if cuda and device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        saved = list(state.get("cuda_devices") or range(len(cuda)))
        # the state of the same device index if saved, else the first (one device per process: the rank's own)
        torch.cuda.set_rng_state(cuda[saved.index(index)] if index in saved else cuda[0], index)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def rank_rng_state(extra: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The RNG state a resumed process of ``rank`` restores from a checkpoint's extras: its own (``rng_per_rank``)
    when the checkpoint was written by as many processes, else rank 0's (``rng``; older checkpoints hold no more)."""
    per_rank = extra.get("rng_per_rank") or []
    if len(per_rank) == world_size and rank < len(per_rank):
        return per_rank[rank]
    if per_rank and world_size > 1:
        logger.warning("the checkpoint holds RNG states of %d process(es), this run has %d: every process restores "
                       "rank 0's", len(per_rank), world_size)
    return extra["rng"]


# ------------------------------------------------------------------------------------------------ checkpoints
def save_training_state(path: str | os.PathLike, model: torch.nn.Module, *, optimizer: torch.optim.Optimizer,
                        scheduler: Any, scaler: Any, progress: dict[str, Any], train_config: dict[str, Any],
                        rng_per_rank: list[dict[str, Any]] | None = None) -> Path:
    """Write a resumable checkpoint atomically (a kill during the write leaves the previous file intact).

    Args:
        path: the file (``last.pth``).
        model: the bare model (not the DDP wrapper).
        optimizer, scheduler, scaler: their ``state_dict()`` is stored (``scaler`` may be None).
        progress: counters, best metric and history (plain data).
        train_config: the resolved run configuration (plain data), checked on resume.
        rng_per_rank: every process's :func:`rng_state` in rank order (gathered by the caller); ``None``: this
            process's alone (CUDA state only if CUDA is already initialised).

    Raises:
        OSError: the file cannot be written (disk full ...); the message names it and the previous file is kept.
    """
    try:
        return save_checkpoint(
            model, path,
            kind="training_state",
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            progress=progress,
            rng=rng_per_rank[0] if rng_per_rank else rng_state(),
            rng_per_rank=rng_per_rank or [],
            train_config=train_config,
        )
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write checkpoint {path} ({exc.strerror or exc}); the previous checkpoint "
                                 "(if any) is unchanged") from exc


def load_training_state(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_training_state`.

    Raises:
        CheckpointError: missing, unreadable, or a weights-only file without training state.
    """
    ckpt = read_checkpoint(path)
    if ckpt.kind != "native" or ckpt.extra.get("kind") != "training_state":
        raise CheckpointError(f"{path} holds weights only, not a training state to resume from")
    for key in ("optimizer", "progress", "rng"):
        if key not in ckpt.extra:
            raise CheckpointError(f"{path}: training state lacks {key!r}; cannot resume exactly from it")
    return ckpt


def save_best(run_dir: Path, model: torch.nn.Module, fmt: str, metrics: dict[str, Any],
              train_config: dict[str, Any]) -> Path:
    """Weights of the best epoch (``best.pth``, or ``best.safetensors`` without the metrics)."""
    path = run_dir / f"{BEST}.{fmt}"
    if fmt == "safetensors":
        return save_checkpoint(model, path)
    return save_checkpoint(model, path, kind="weights", metrics=metrics, train_config=train_config)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (NaN written as null)."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=False) + "\n"
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN / inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return json_safe(obj.item())
    return obj
