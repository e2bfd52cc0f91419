"""An ISP set (PromptIQA's image-score pairs) ready to score against: decoded the way the model reads images, encoded
once, or flipped per batch as the official test code does. Written once for the ``Scorer`` and the pyiqa wrapper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data.promptiqa import random_vertical_flip


class IspPrompt:
    """The prompt a model that takes an ISP set (:attr:`gamma.families.Scoring.takes_isp`) scores against.

    Args:
        model: the model (PromptIQA, Gamma + ISP).
        images: the ISP images (n, 3, H, W), already read as the model reads its targets.
        scores: their scores (n,), in [0, 1].
        flip: flip each ISP image upside down with p = 0.5 for every batch, as the official test code does (the
            scores then depend on the batch; for exact reproduction only); seeded by ``seed``.
        seed: the flips' seed.

    Raises:
        ValueError: scores outside [0, 1], fewer than 2 pairs (the model's own check, run now).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, scores: torch.Tensor, *, flip: bool = False,
                 seed: int = 0) -> None:
        self.images, self.scores = images, scores.to(torch.float32)
        self.flip = bool(flip)
        self._generator = torch.Generator().manual_seed(int(seed)) if flip else None
        with torch.inference_mode():  # checks the pairs now; without flips every batch reuses these features
            encoded = model.encode_prompt(images, self.scores)
        self._encoded = None if flip else encoded

    def for_batch(self) -> Any:
        """What ``model(batch, prompt=...)`` takes for the next batch: the encoded ISP features, or new flips."""
        if self._generator is None:
            return self._encoded
        return random_vertical_flip(self.images, generator=self._generator), self.scores

    def to(self, device: torch.device | str) -> IspPrompt:
        """The images, scores and encoding moved to ``device``."""
        self.images, self.scores = self.images.to(device), self.scores.to(device)
        if self._encoded is not None:
            self._encoded = self._encoded.to(device)
        return self


__all__ = ["IspPrompt"]
