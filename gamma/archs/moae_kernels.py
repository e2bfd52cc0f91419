"""Fused kernels for :class:`gamma.archs.moae.MoAE`: its formula, computed with fewer passes over large tensors.

With the experts' weights side by side, W1 = [W1_1; ...; W1_N] (N*H, D) and W2 = [W2_1 ... W2_N] (D, N*H), the routed
sum is two matmuls over all experts at once instead of 2N small ones:

    sum_k g_k (W2_k act(W1_k x + b1_k) + b2_k) = [g_1 a_1, ..., g_N a_N] @ W2^T + g @ B2,   a_k = act(W1_k x + b1_k)

- with autograd on (training), the stack is rebuilt on every call so that gradients flow to each expert;
- outside autograd (scoring), the stack is cached, QuickGELU's slope is folded into it (QuickGELU(z) =
  z sigmoid(1.702 z) = SiLU(1.702 z) / 1.702, so the experts' activation is one in-place SiLU), and alpha * g weights
  the activations in place; with ``int8=True`` the two large matmuls run in int8
  (:func:`gamma.archs.precision.int8_linear`).

The shared expert is computed exactly as the plain MLP computes it, and with alpha = 0 the routed term adds exact zeros:
alpha = 0 still gives the backbone bit for bit. tests/test_perf.py checks these kernels against the formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from .precision import Int8Weight, int8_linear

# QuickGELU(x) = x * sigmoid(1.702 x) = SiLU(1.702 x) / 1.702.
QUICK_GELU_SLOPE = 1.702


class FusedExperts:
    """The fused forward of one MoAE block, with its cache of stacked expert weights (not a module: no state_dict).

    Called as ``kernel(moae, x)`` by :meth:`MoAE.forward`; the cache is keyed on each expert parameter's storage,
    version, dtype and device, so an optimiser step, ``load_state_dict``, ``.to()`` or a precision change rebuilds it.

    Args:
        int8: run the two expert matmuls in int8 (inference only; the float weights stay the source).
    """

    def __init__(self, int8: bool = False) -> None:
        self.int8 = int8
        self._cache: tuple[tuple, tuple] | None = None

    def __call__(self, moae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not self.int8:
            return _forward_autograd(moae, x)
        return self._forward_inference(moae, x)

    def __getstate__(self) -> dict:
        return {"int8": self.int8, "_cache": None}  # copies and pickles rebuild the cache on first use

    def __repr__(self) -> str:
        return f"FusedExperts(int8={self.int8})"

    def _stacked_inference(self, moae: nn.Module) -> tuple:
        """(1.702 W1, 1.702 b1, W2 / 1.702, B2) for QuickGELU experts (else unscaled), W1 and W2 int8 with ``int8``."""
        params = [p for lin in _expert_linears(moae) for p in (lin.weight, lin.bias)]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        w1, b1, w2, b2 = _stacked(moae)
        if _is_quick_gelu(moae.useful_experts.gelu):  # folded in fp32: one rounding for bf16/fp16, as before for fp32
            dtype = w1.dtype
            w1, b1 = (w1.float() * QUICK_GELU_SLOPE).to(dtype), (b1.float() * QUICK_GELU_SLOPE).to(dtype)
            w2 = (w2.float() / QUICK_GELU_SLOPE).to(dtype)
        stacked = (Int8Weight.quantize(w1), b1, Int8Weight.quantize(w2), b2) if self.int8 else (w1, b1, w2, b2)
        self._cache = (key, stacked)
        return stacked

    def _forward_inference(self, moae: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """shared(x) + c B2 + [c_1 a_1, ..., c_N a_N] @ W2^T with c = alpha * g (T, N): one addmm adds it all."""
        w1, b1, w2, b2 = self._stacked_inference(moae)
        mlp = moae.useful_experts
        quick = _is_quick_gelu(mlp.gelu)
        *lead, dim = x.shape
        tokens = x.reshape(-1, dim)  # (T, D)
        gate = moae.gating(x).reshape(tokens.shape[0], -1)  # (T, N) fp32
        coef = (gate * moae.scale if moae.scale is not None else gate).to(b2.dtype)  # rounded once, after the softmax

        shared = mlp.c_fc(tokens)  # (T, H): the plain MLP's ops; QuickGELU in place gives the same values
        shared = shared.mul_((QUICK_GELU_SLOPE * shared).sigmoid_()) if quick else mlp.gelu(shared)
        shared = mlp.c_proj(shared)  # (T, D)

        hidden = int8_linear(tokens, w1, b1) if self.int8 else torch.addmm(b1, tokens, w1.t())  # (T, N*H)
        hidden = F.silu(hidden, inplace=True) if quick else mlp.gelu(hidden)
        hidden.view(tokens.shape[0], coef.shape[1], -1).mul_(coef.unsqueeze(-1))
        base = shared.add_(coef @ b2)  # (T, D)
        out = int8_linear(hidden, w2).add_(base) if self.int8 else torch.addmm(base, hidden, w2.t())
        return out.view(*lead, dim)


def _forward_autograd(moae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused form with autograd: the stack is rebuilt from the experts' parameters on each call."""
    w1, b1, w2, b2 = _stacked(moae)
    gate = moae.gating(x).to(b2.dtype)  # (..., N): fp32 softmax, in the experts' dtype (autocast casts their matmuls)
    hidden = moae.useful_experts.gelu(F.linear(x, w1, b1))  # (..., N*H)
    *lead, nh = hidden.shape
    n = moae.num_experts
    hidden = (hidden.view(*lead, n, nh // n) * gate.unsqueeze(-1)).view(*lead, nh)
    routed = F.linear(hidden, w2) + gate @ b2  # (..., D)
    if moae.scale is not None:
        routed = moae.scale * routed
    return moae.useful_experts(x) + routed


def _stacked(moae: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W1 (N*H, D), b1 (N*H,), W2 (D, N*H), B2 (N, D)): the experts' weights side by side."""
    linears = _expert_linears(moae)
    c_fc, c_proj = linears[0::2], linears[1::2]
    w1 = torch.cat([lin.weight for lin in c_fc], dim=0)
    b1 = torch.cat([lin.bias for lin in c_fc], dim=0)
    w2 = torch.cat([lin.weight for lin in c_proj], dim=1)
    b2 = torch.stack([lin.bias for lin in c_proj], dim=0)
    return w1, b1, w2, b2


def _expert_linears(moae: nn.Module) -> list[nn.Module]:
    """[c_fc_1, c_proj_1, c_fc_2, ...] of the adaptive experts, checked to hold float weights."""
    linears = [lin for expert in moae.experts.values() for lin in (expert.c_fc, expert.c_proj)]
    for lin in linears:
        if not isinstance(getattr(lin, "weight", None), torch.Tensor):
            raise TypeError(
                f"a MoAE expert layer is a {type(lin).__name__} without a float weight tensor (did "
                "torch.ao.quantization.quantize_dynamic replace it?); use GammaModel.to_precision('int8'), which "
                "quantizes the experts inside the fused kernels and keeps the state_dict layout"
            )
    return linears


def _is_quick_gelu(act: nn.Module) -> bool:
    """True for open_clip's QuickGELU, the activation whose slope the inference kernel folds into the weights."""
    return isinstance(act, QuickGELU)
