"""Mixture of Assessment Experts (MoAE): the MLP replacement of Gamma's last blocks.

    MoAE(h) = shared(h) + alpha * sum_k softmax(router(h))_k * expert_k(h)        (per token)

Submodule names follow the authors' release so its checkpoints load without renaming:
``useful_experts`` (shared expert), ``experts.expert_{k}``, ``gating.layer1`` (router) and ``scale`` (alpha).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

# QuickGELU(x) = x * sigmoid(1.702 x) = SiLU(1.702 x) / 1.702.
QUICK_GELU_SLOPE = 1.702


def _is_quick_gelu(act: nn.Module) -> bool:
    """True for open_clip's QuickGELU, the activation whose slope `MoAE._stacked_inference` folds into weights."""
    return isinstance(act, QuickGELU)


class Router(nn.Module):
    """Per-token softmax router over the adaptive experts."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x).softmax(dim=-1)  # (..., N)


class MoAE(nn.Module):
    """Shared expert (the pretrained MLP) plus ``num_experts`` routed full-size copies of it.

    Args:
        mlp: the pretrained block MLP (``c_fc``, activation, ``c_proj``); it becomes the shared expert as is, and each
            adaptive expert starts as an exact copy of it.
        num_experts: number of adaptive experts (>= 1).
        merge_factor: scale the routed sum by a trainable scalar initialised to 0; without it the sum is added as is.
        freeze_shared: keep the shared expert frozen (the paper's setting).
    """

    def __init__(self, mlp: nn.Module, num_experts: int, merge_factor: bool = True, freeze_shared: bool = True) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MoAE needs at least one adaptive expert, got {num_experts}")
        dim = mlp.c_fc.in_features
        self.num_experts = num_experts
        self.useful_experts = mlp
        self.experts = nn.ModuleDict({f"expert_{k}": copy.deepcopy(mlp) for k in range(num_experts)})
        self.gating = Router(dim, num_experts)
        self.scale = nn.Parameter(torch.zeros(())) if merge_factor else None
        self.useful_experts.requires_grad_(not freeze_shared)
        # Set by analysis tools: the last router weights, (..., N), detached.
        self.record_routing = False
        self.last_routing: torch.Tensor | None = None
        # Inference-only cache of the stacked expert weights with QuickGELU's slope folded in.
        self._inference_cache: tuple[tuple, tuple[torch.Tensor, ...]] | None = None
        # False selects the literal form (each expert called in turn); both give the same result up to rounding.
        self.fused = True
        # Expert indices kept by `keep_only_experts` (paper Table 6); None keeps all.
        self.kept_experts: tuple[int, ...] | None = None

    def _expert_params(self) -> list[nn.Parameter]:
        params = []
        for expert in self.experts.values():
            params += [expert.c_fc.weight, expert.c_fc.bias, expert.c_proj.weight, expert.c_proj.bias]
        return params

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W1 (N*H, D), b1 (N*H,), W2 (D, N*H), B2 (N, D)): the experts' weights side by side.

        Built on every call (autograd flows through the concatenation); outside autograd
        :meth:`_stacked_inference` keeps a cached copy instead.
        """
        experts = list(self.experts.values())
        w1 = torch.cat([e.c_fc.weight for e in experts], dim=0)
        b1 = torch.cat([e.c_fc.bias for e in experts], dim=0)
        w2 = torch.cat([e.c_proj.weight for e in experts], dim=1)
        b2 = torch.stack([e.c_proj.bias for e in experts], dim=0)
        return w1, b1, w2, b2

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights (..., N) for tokens x (..., D), after any expert mask."""
        gate = self.gating(x)
        if self.kept_experts is not None:
            # Table 6 protocol: the other experts' router weights are zeroed (not renormalised).
            mask = torch.zeros(self.num_experts, dtype=gate.dtype, device=gate.device)
            mask[list(self.kept_experts)] = 1.0
            gate = gate * mask
        if self.record_routing:
            self.last_routing = gate.detach()
        return gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not torch.is_grad_enabled() and _is_quick_gelu(self.useful_experts.gelu):
            return self._forward_inference(x)
        shared = self.useful_experts(x)  # (B, L, D)
        gate = self.routing(x)  # (B, L, N)
        routed = self._routed_fused(x, gate) if self.fused else self._routed_literal(x, gate)
        if self.scale is not None:
            routed = self.scale * routed
        return shared + routed

    def _routed_literal(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([expert(x) for expert in self.experts.values()], dim=-2)  # (B, L, N, D)
        return (outputs * gate.unsqueeze(-1)).sum(dim=-2)

    def _routed_fused(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # sum_k g_k (W2_k act(W1_k x + b1_k) + b2_k) = [g_1 a_1, ..., g_N a_N] @ [W2_1 ... W2_N]^T + g @ B2:
        # two matmuls over all experts at once instead of 2N small ones.
        w1, b1, w2, b2 = self._stacked()
        act = self.useful_experts.gelu
        hidden = act(F.linear(x, w1, b1))  # (B, L, N*H)
        *lead, nh = hidden.shape
        n = self.num_experts
        hidden = (hidden.view(*lead, n, nh // n) * gate.unsqueeze(-1)).view(*lead, nh)
        return F.linear(hidden, w2) + gate @ b2  # (B, L, D)

    def _stacked_inference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_stacked` with QuickGELU's slope folded in: (1.702 W1, 1.702 b1, W2 / 1.702, B2).

        Cached until an expert parameter changes (identity or version is the key); only built outside autograd.
        """
        params = self._expert_params()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._inference_cache is not None and self._inference_cache[0] == key:
            return self._inference_cache[1]
        w1, b1, w2, b2 = self._stacked()
        stacked = (w1 * QUICK_GELU_SLOPE, b1 * QUICK_GELU_SLOPE, w2 / QUICK_GELU_SLOPE, b2)
        self._inference_cache = (key, stacked)
        return stacked

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` outside autograd: the same function, computed with fewer passes over large tensors.

        With c = alpha * g (T, N) and a_k the experts' hidden activations,

            shared(x) + alpha * sum_k g_k expert_k(x) = shared(x) + c B2 + [c_1 a_1, ..., c_N a_N] @ [W2_1 ... W2_N]^T

        is one addmm whose input term is shared(x) + c B2. QuickGELU(z) = z * sigmoid(1.702 z) = SiLU(1.702 z) / 1.702,
        so with the slope folded into the stacked weights the experts' activation is one in-place SiLU; the weighting
        by c is in place too. The shared expert is computed exactly as the plain MLP computes it, and adding the
        routed term with alpha = 0 adds exact zeros: alpha = 0 still gives the backbone bit for bit.
        """
        w1, b1, w2, b2 = self._stacked_inference()
        mlp = self.useful_experts
        *lead, dim = x.shape
        tokens = x.reshape(-1, dim)  # (T, D)
        gate = self.routing(x).reshape(tokens.shape[0], -1)  # (T, N)
        coef = gate * self.scale if self.scale is not None else gate

        shared = mlp.c_fc(tokens)  # (T, H): the plain MLP's ops, QuickGELU in place (same values)
        shared.mul_((QUICK_GELU_SLOPE * shared).sigmoid_())
        shared = mlp.c_proj(shared)  # (T, D)

        hidden = torch.addmm(b1, tokens, w1.t())  # (T, N*H) = 1.702 * (x W1^T + b1)
        F.silu(hidden, inplace=True)
        hidden.view(tokens.shape[0], coef.shape[1], -1).mul_(coef.unsqueeze(-1))
        out = torch.addmm(shared.add_(coef @ b2), hidden, w2.t())  # (T, D)
        return out.view(*lead, dim)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, merge_factor={self.scale is not None}"


def keep_only_experts(module: nn.Module, keep: list[int] | None) -> None:
    """Zero the router weights of every expert not in ``keep`` in all MoAE blocks (``None`` restores all)."""
    for m in module.modules():
        if isinstance(m, MoAE):
            if keep is None:
                m.kept_experts = None
                continue
            bad = [k for k in keep if not 0 <= k < m.num_experts]
            if bad:
                raise ValueError(f"expert index {bad[0]} out of range for {m.num_experts} experts")
            m.kept_experts = tuple(sorted(set(keep)))
