"""Reduced-precision inference: which precision a device runs well, and int8 linear layers.

``fp32`` is exact. ``bf16`` / ``fp16`` store the image tower's weights in that dtype (converted once, not autocast per
call); ``int8`` quantizes the image tower's MLP and expert matmuls dynamically (int8 weights, int8 activations per
token, int32 accumulation), for CPUs without fast bf16. :meth:`gamma.GammaModel.to_precision` applies them.

Which precision runs *fast* depends on the hardware: on this project's measurements a CPU with AMX or AVX512-BF16 runs
bf16 matmuls 2-7x faster than fp32, while fp16 on a CPU without AVX512-FP16/AMX-FP16 ran 100x *slower*; so a precision
the device lacks is an error (or, with ``allow_slow=True``, a logged warning), never a silent slowdown.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# /proc/cpuinfo flags that make a precision fast on a CPU (any one suffices).
CPU_FLAGS = {
    "bf16": ("amx_bf16", "avx512_bf16"),
    "fp16": ("amx_fp16", "avx512_fp16"),
    "int8": ("amx_int8", "avx512_vnni", "avx_vnni"),
}


def precision_of(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for a float dtype, else the dtype's name."""
    return next((name for name, d in FLOAT_DTYPES.items() if d == dtype), str(dtype).replace("torch.", ""))


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS or Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_precisions(device: torch.device | str) -> tuple[str, ...]:
    """Precisions that ``device`` runs at least as fast as fp32 (``fp32`` always)."""
    device = torch.device(device)
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return ("fp32", "fp16", "bf16") if bf16 else ("fp32", "fp16")
    if device.type == "cpu":
        flags = cpu_flags()
        return ("fp32",) + tuple(p for p, need in CPU_FLAGS.items() if flags.intersection(need))
    return ("fp32",)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Check a precision name; ``auto`` becomes the fastest precision ``device`` runs well (the choice is logged).

    ``auto``: bf16 on CUDA devices that have it (its fp32 exponent range cannot overflow), else fp16; bf16 on CPUs with
    AMX or AVX512-BF16; fp32 elsewhere. It never picks int8, whose scores agree less closely with fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    fast = fast_precisions(device)
    if device.type == "cuda":
        choice, why = ("bf16", "CUDA device") if "bf16" in fast else ("fp16", "CUDA device without bf16")
    elif "bf16" in fast:
        choice, why = "bf16", "CPU with " + " and ".join(sorted(cpu_flags() & set(CPU_FLAGS["bf16"])))
    else:
        choice, why = "fp32", "no faster precision known for this device"
    logger.info("precision 'auto' on %s: %s (%s)", device.type, choice, why)
    return choice


def default_device() -> torch.device:
    """CUDA when available, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def place(model: nn.Module, device: str | torch.device | None = None, precision: str | None = None) -> nn.Module:
    """The one place a model gets its device and precision: moved to ``device`` first (``None``: where it is), then
    computing in ``precision`` (``None``: as it is; ``auto`` resolved for the device it is now on).

    A model that computes in reduced precision has ``to_precision`` (Gamma: :meth:`gamma.GammaModel.to_precision`,
    which checks that the device runs it well); any other model runs in fp32, and another precision is an error.
    """
    if device is not None:
        model = model.to(device)
    if precision is None:
        return model
    to_precision = getattr(model, "to_precision", None)
    if to_precision is None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision not in ("fp32", "auto"):
            raise ValueError(f"precision={precision!r} applies to Gamma models; a {type(model).__name__} runs in "
                             "fp32")
        return model
    return to_precision(precision)


def check_precision(precision: str, device: torch.device | str, allow_slow: bool = False) -> None:
    """Refuse a precision that ``device`` cannot run, or runs slower than fp32 (unless ``allow_slow``: then warn).

    Raises:
        ValueError: int8 off the CPU (it is CPU dynamic quantization), or a precision slower than fp32 on this device
            without ``allow_slow``.
    """
    device = torch.device(device)
    if precision == "fp32":
        return
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"int8 is dynamic quantization for CPUs; on {device.type} use precision='bf16' or 'fp16'")
        if not hasattr(torch, "_int_mm"):
            raise ValueError(f"int8 needs torch._int_mm (torch >= 2.3), this is torch {torch.__version__}")
        if "int8" not in fast_precisions(device):
            # No VNNI: int8 matmuls exist on every x86 CPU with AVX2, but their speed-up is not known there.
            logger.warning("this CPU has none of %s: int8 matmuls may be no faster than fp32",
                           ", ".join(CPU_FLAGS["int8"]))
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision {precision!r} is implemented for CPU and CUDA, not {device.type}; use fp32")
    if precision in fast_precisions(device):
        return
    what = (f"this CPU has none of {', '.join(CPU_FLAGS[precision])}" if device.type == "cpu"
            else f"this CUDA device has no native {precision}")
    message = f"precision {precision!r} would run slower than fp32 here: {what}"
    if not allow_slow:
        alternatives = [p for p in fast_precisions(device) if p != precision]
        raise ValueError(f"{message}; use {' or '.join(repr(p) for p in alternatives)} "
                         "(or allow_slow=True to run it anyway, e.g. to check its agreement)")
    logger.warning("%s (allow_slow=True)", message)


# ------------------------------------------------------------------------------------------------------ int8
@dataclass(frozen=True)
class Int8Weight:
    """A weight (out, in) stored as int8 with one scale per output row: ``w ~ q * scale[:, None]``."""

    q: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) float32

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """Symmetric per-row quantization of a float weight (out, in)."""
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (out,)
        return cls((w / scale[:, None]).round_().to(torch.int8), scale)


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for x (..., in), x quantized per token (symmetric int8), with an int8 x int8 -> int32 matmul.

    Per-token scales (rather than one per tensor) keep a token with large activations from costing every other token
    its resolution. The result is float32.
    """
    lead, dim = x.shape[:-1], x.shape[-1]
    tokens = x.reshape(-1, dim).float()  # (T, in)
    x_scale = tokens.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127  # (T, 1)
    xq = (tokens / x_scale).round_().to(torch.int8)
    out = torch._int_mm(xq, weight.q.t()).float()  # (T, out), exact int32 sums
    out.mul_(x_scale).mul_(weight.scale)
    if bias is not None:
        out.add_(bias)
    return out.view(*lead, -1)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` that computes in int8 (:func:`int8_linear`).

    It adopts the float ``weight`` and ``bias`` under the same names, so the state_dict is unchanged, loading weights
    works as before (the int8 copy follows the weight's version) and :meth:`to_linear` restores the float layer exactly.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self._int8: tuple[tuple, Int8Weight] | None = None

    def int8_weight(self) -> Int8Weight:
        """The int8 weight, quantized again whenever the float weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._int8 is None or self._int8[0] != key:
            self._int8 = (key, Int8Weight.quantize(w))
        return self._int8[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"int8 layers run on the CPU, got input on {x.device}: call to_precision('fp32') first")
        return int8_linear(x, self.int8_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """The float layer, with the same parameter objects."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_int8": None}  # a cache: rebuilt on first use

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ------------------------------------------------------------------------------------------------ bf16 / fp16
class CastLayerNorm(nn.Module):
    """A LayerNorm computed in fp32 whose output is cast to ``dtype``, the input dtype of the matmuls that follow.

    It adopts the LayerNorm's ``weight`` and ``bias`` (kept fp32) under the same names: the state_dict is unchanged.
    """

    def __init__(self, norm: nn.LayerNorm, dtype: torch.dtype) -> None:
        super().__init__()
        self.normalized_shape, self.eps, self.dtype = norm.normalized_shape, norm.eps, dtype
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}, dtype={self.dtype}"


# ------------------------------------------------------------------------------------------------ TF32
# PyTorch >= 2.9 sets TF32 per backend with `fp32_precision` ("ieee" | "tf32"); mixing it with the legacy
# `allow_tf32` flags raises, so the new API is used wherever it exists. cuDNN convolutions default to TF32 on
# Ampere and newer GPUs (the patch embedding, PromptIQA's CNN, ATTIQA's ResNet), cuBLAS matmuls to IEEE fp32.
_NEW_TF32_API = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _tf32_flags() -> tuple:
    if _NEW_TF32_API:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_flags(matmul, conv) -> None:
    if _NEW_TF32_API:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:  # pragma: no cover - PyTorch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


@contextlib.contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """CUDA fp32 matmuls and cuDNN convolutions in TF32 (``enabled``, 10-bit mantissa, faster on Ampere and newer) or
    in IEEE fp32 inside the block; the previous settings come back after it. Setting the flags does not initialise
    CUDA, and they do not affect CPU computation."""
    saved = _tf32_flags()
    value = ("tf32" if enabled else "ieee") if _NEW_TF32_API else enabled
    _set_tf32_flags(value, value)
    try:
        yield
    finally:
        _set_tf32_flags(*saved)


def exact_fp32() -> contextlib.AbstractContextManager[None]:
    """Where fp32 is promised (scoring, evaluation): no TF32 in CUDA matmuls or cuDNN convolutions."""
    return tf32_mode(False)
