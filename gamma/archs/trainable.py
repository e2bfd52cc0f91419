"""The base class of gamma's models: what they train is listed by method, never hidden from ``state_dict()``."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


class TrainableModule(nn.Module):
    """An ``nn.Module`` that lists its trainable parameters (those with ``requires_grad``; freezing is explicit)."""

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser updates."""
        return [p for _, p in self.named_trainable_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
