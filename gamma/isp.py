"""An ISP set (PromptIQA's image-score pairs) ready to score against: decoded the way the model reads images, encoded
once, or flipped per batch as the official test code does. Written once for the ``Scorer`` and the pyiqa wrapper.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from .archs.precision import exact_fp32
from .data.promptiqa import random_vertical_flip
from .prompt_file import PromptPairs

logger = logging.getLogger(__name__)

#: Pictures of the default ISP set: shipped with scikit-image (``skimage.data``), no download.
DEFAULT_ISP_PICTURES: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "camera", "rocket")
DEFAULT_ISP_SIZE = 224  # every picture is resized (bilinear) to this square first
DEFAULT_ISP_SOURCE = "<default ISP set: skimage.data pictures, distortion d = k/10, score 1 - d>"


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
        # checks the pairs now; without flips every batch reuses these features (IEEE fp32 on a GPU too: no TF32)
        with torch.no_grad(), exact_fp32():
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


@functools.lru_cache(maxsize=1)
def _default_pairs() -> PromptPairs:
    from skimage import data  # scikit-image: a dependency of the pyiqa extra (pyiqa needs it)

    images, scores = [], []
    for k in range(10):
        d = k / 10
        array = getattr(data, DEFAULT_ISP_PICTURES[k % len(DEFAULT_ISP_PICTURES)])()
        picture = Image.fromarray(array).convert("RGB").resize((DEFAULT_ISP_SIZE, DEFAULT_ISP_SIZE),
                                                              Image.Resampling.BILINEAR)
        if d > 0:
            picture = picture.filter(ImageFilter.GaussianBlur(4 * d))
            noisy = np.asarray(picture, dtype=np.float64) + np.random.default_rng(k).normal(0, 50 * d, (224, 224, 3))
            picture = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
        images.append(picture)
        scores.append(round(1.0 - d, 6))
    return PromptPairs(tuple(images), tuple(scores), DEFAULT_ISP_SOURCE)


def default_isp_set() -> PromptPairs:
    """The ISP set a model that needs one scores against when none is given (the ``promptiqa`` pyiqa metric).

    Ten pairs made without a download: for k = 0 ... 9, picture k mod 5 of :data:`DEFAULT_ISP_PICTURES` (scikit-image's
    ``skimage.data``), resized to 224 x 224 (bilinear), distorted with strength d = k / 10 (a Gaussian blur of radius
    4 d, then Gaussian noise of standard deviation 50 d on the 0-255 scale, seeded with k) and scored 1 - d. So the
    scores say "less distortion is better" on a [0.1, 1] scale: a generic technical-quality task, not any dataset's
    MOS. A warning in the log names it whenever it is used; pass an ISP set of your task for meaningful scores.
    """
    pairs = _default_pairs()
    logger.warning("no ISP set given: scoring against %s (docs/usage.md); pass isp=... for your task's scale",
                   DEFAULT_ISP_SOURCE)
    return pairs


__all__ = ["DEFAULT_ISP_PICTURES", "IspPrompt", "default_isp_set"]
