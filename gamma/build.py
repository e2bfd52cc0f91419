"""Building a model with a checkpoint's weights: without initialising the weights the checkpoint replaces, and
checked against the architecture it was saved from. Used by every family's builder (:mod:`gamma.families`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .archs.precision import check_precision, resolve_precision
from .config import ModelConfig
from .weights import STORED_DTYPES, Checkpoint, CheckpointError, load_into

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=nn.Module)


def check_same_architecture(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raise :class:`CheckpointError` when a checkpoint's config and the wanted one differ in more than the prompts."""
    if type(saved) is not type(wanted):
        raise CheckpointError(f"{where} holds a {saved.family} model, not a {wanted.family} model")
    a, b = saved.to_dict(), wanted.to_dict()
    diff = [k for k in a if k not in ("prompt_set", "levels") and a[k] != b[k]]
    if diff:
        raise CheckpointError(f"{where} was saved from a different architecture ({', '.join(diff)} differ)")


def stored_and_target(ckpt: Checkpoint, precision: str | None, device: torch.device) -> tuple[str, str]:
    """The precision a checkpoint stores its image tower in, and the one the model will compute in on ``device``.

    ``precision=None`` keeps the stored one, or falls back to fp32 (logged) where the device runs it slower than
    fp32; an explicit precision is checked by :meth:`GammaModel.to_precision` as usual. Computing in another
    precision than a bf16 / fp16 file stores starts from its rounded weights, which is said in the log.
    """
    stored = ckpt.extra.get("precision", "fp32") if ckpt.kind == "native" else "fp32"
    if stored not in STORED_DTYPES:
        raise CheckpointError(f"{ckpt.path}: unknown stored precision {stored!r} (expected one of "
                              f"{', '.join(STORED_DTYPES)})")
    target = resolve_precision(precision if precision is not None else stored, device)
    if stored == "fp32":
        return stored, target
    if target == stored:
        try:
            check_precision(stored, device)
        except ValueError as exc:
            if precision is not None:
                raise
            why = str(exc).split(": ", 1)[-1].split(";")[0]  # e.g. "this CPU has none of amx_bf16, avx512_bf16"
            logger.warning("%s stores its image tower's weights in %s, which would run slower than fp32 here (%s): "
                           "computing in fp32 with those rounded weights instead", ckpt.path, stored, why)
            return stored, "fp32"
    else:
        logger.warning("%s stores its image tower's weights rounded to %s: the %s scores are those of the rounded "
                       "weights (convert the original file again for exact %s scores)", ckpt.path, stored, target,
                       target)
    return stored, target


# ------------------------------------------------------------------------------------------------ fast loading

# Constructors whose large results are made on the meta device while a model is built for loading.
_CONSTRUCTORS = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                           torch.empty_strided})
_LARGE = 1 << 16  # elements: every weight matrix of a ViT-B/16 CLIP; not the token buffers or the attention mask


class _LargeTensorsOnMeta(TorchFunctionMode):
    """While active (in this thread only), constructors make floating tensors of >= 65536 elements on the meta device.

    Building a model under it allocates and initialises none of its weight matrices (random init, the experts' deep
    copies: 3 of the 4.4 s it takes to build ViT-B/16 Gamma on 2 cores); small parameters and the buffers computed
    from the config (prompt tokens, pixel statistics, masks) are made as usual. :func:`gamma.weights.load_into` then
    swaps the checkpoint's (memory-mapped) tensors into the meta parameters.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONSTRUCTORS and kwargs.get("device") is None:
            shaped = func(*args, **{**kwargs, "device": "meta"})  # no storage: tells the size for free
            if shaped.numel() >= _LARGE and shaped.is_floating_point():  # weights; never token ids
                return shaped
        return func(*args, **kwargs)


def build_loaded(build: Callable[[], _M], ckpt: Checkpoint, strict: bool) -> _M:
    """``build()`` with ``ckpt`` loaded: without initialising the weights the checkpoint replaces, when it provides
    every one of them (our checkpoints and the release's); otherwise built and initialised as usual."""
    model = None
    if strict and ckpt.kind != "clip":
        with _LargeTensorsOnMeta():
            candidate = build()
        on_meta = {k for k, v in candidate.state_dict(keep_vars=True).items() if v.is_meta}
        stray = [n for n, b in _non_persistent_buffers(candidate) if b.is_meta] + _meta_attributes(candidate)
        if on_meta <= set(ckpt.state_dict) and not stray:
            model = candidate  # else the checkpoint cannot fill every weight: built the usual way below
    if model is None:
        model = build()
    load_into(model, ckpt, strict=strict)
    left = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    if left:  # a safety net (a strict load fills every key): never hand out weights without storage
        raise CheckpointError(f"{ckpt.path or 'checkpoint'} does not provide {', '.join(left[:6])}"
                              f"{' ...' if len(left) > 6 else ''}")
    return model


def _non_persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    persistent = set(model.state_dict(keep_vars=True))
    return [(n, b) for n, b in model.named_buffers() if n not in persistent]


def _meta_attributes(model: nn.Module) -> list[str]:
    """Plain tensor attributes (neither parameters nor buffers) left on the meta device: values the constructor
    computed from large tensors, which no checkpoint fills."""
    return [f"{prefix}.{name}" for prefix, module in model.named_modules() for name, value in vars(module).items()
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta]
