"""Mixture of Assessment Experts (MoAE): the MLP replacement of Gamma's last blocks.

    MoAE(h) = shared(h) + alpha * sum_k softmax(router(h))_k * expert_k(h)        (per token)

:meth:`MoAE.forward` computes this formula as written. By default a block runs the same sum through the fused kernels
of :mod:`gamma.archs.moae_kernels` (two matmuls over all experts instead of 2N small ones); tests/test_perf.py checks
that both agree. Routing is observable with a forward hook on :attr:`MoAE.gating`: its output is the per-token router
weights (:func:`watch_routing` does this for a whole model). The router's softmax runs in fp32 whatever the precision
(bf16/fp16 weights or autocast): the weights it hands the experts are rounded once, after it.

Submodule names follow the authors' release so its checkpoints load without renaming:
``useful_experts`` (shared expert), ``experts.expert_{k}``, ``gating.layer1`` (router) and ``scale`` (alpha).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .moae_kernels import FusedExperts


class Router(nn.Module):
    """Per-token softmax router over the adaptive experts."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, num_experts)
        # Expert indices kept by `keep_only_experts` (paper Table 6); None keeps all.
        self.kept_experts: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights (..., N) in fp32 for tokens x (..., D)."""
        gate = self.layer1(x).float().softmax(dim=-1)  # (..., N): fp32 under bf16/fp16 (a no-op in fp32)
        if self.kept_experts is not None:
            # Table 6 protocol: the other experts' router weights are zeroed (not renormalised).
            mask = torch.zeros(gate.shape[-1], dtype=gate.dtype, device=gate.device)
            mask[list(self.kept_experts)] = 1.0
            gate = gate * mask
        return gate


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
        self.num_experts = num_experts
        self.useful_experts = mlp
        self.experts = nn.ModuleDict({f"expert_{k}": copy.deepcopy(mlp) for k in range(num_experts)})
        self.gating = Router(mlp.c_fc.in_features, num_experts)
        self.scale = nn.Parameter(torch.zeros(())) if merge_factor else None
        self.useful_experts.requires_grad_(not freeze_shared)
        # How forward is computed: a kernel object (the fused kernels, with their own cache of stacked weights) or None
        # for the formula as written. Not a module: it holds no parameters and nothing of the state_dict.
        self.kernel: FusedExperts | None = FusedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """MoAE of tokens x (..., D)."""
        if self.kernel is not None:
            return self.kernel(self, x)  # the same sum, fused (gamma/archs/moae_kernels.py)
        shared = self.useful_experts(x)  # (..., D)
        gate = self.gating(x)  # (..., N) fp32
        routed = torch.stack([expert(x) for expert in self.experts.values()], dim=-2)  # (..., N, D)
        routed = (routed * gate.unsqueeze(-1)).sum(dim=-2)  # (..., D)
        if self.scale is not None:
            routed = self.scale * routed
        return shared + routed

    @property
    def kept_experts(self) -> tuple[int, ...] | None:
        """Experts kept by :func:`keep_only_experts` (None: all)."""
        return self.gating.kept_experts

    def extra_repr(self) -> str:
        kernel = "formula" if self.kernel is None else repr(self.kernel)
        return f"num_experts={self.num_experts}, merge_factor={self.scale is not None}, kernel={kernel}"


def keep_only_experts(module: nn.Module, keep: list[int] | None) -> None:
    """Zero the router weights of every expert not in ``keep`` in all MoAE blocks (``None`` restores all)."""
    for m in module.modules():
        if isinstance(m, MoAE):
            if keep is None:
                m.gating.kept_experts = None
                continue
            bad = [k for k in keep if not 0 <= k < m.num_experts]
            if bad:
                raise ValueError(f"expert index {bad[0]} out of range for {m.num_experts} experts")
            m.gating.kept_experts = tuple(sorted(set(keep)))


@contextlib.contextmanager
def watch_routing(module: nn.Module, hook: Callable[[MoAE, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, ``hook(moae, weights)`` receives the router weights (..., N) each time a MoAE block of
    ``module`` runs (detached, after any expert mask of :func:`keep_only_experts`)."""
    handles = [m.gating.register_forward_hook(_routing_hook(hook, m)) for m in module.modules() if isinstance(m, MoAE)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _routing_hook(hook: Callable[[MoAE, torch.Tensor], None], moae: MoAE) -> Callable:
    """A forward hook for ``moae.gating`` that passes its output, the router weights, to ``hook``."""

    def forward_hook(_router: nn.Module, _inputs: tuple, weights: torch.Tensor) -> None:
        hook(moae, weights.detach())

    return forward_hook
