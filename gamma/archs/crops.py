"""Test-time crop protocols: where the fixed-size crops of a full-resolution image are taken, and how per-crop results
are averaged into one per image.

Offsets depend only on the image size and the protocol (never on the batch or on global RNG state), so a score is
reproducible and independent of batch composition. Identical windows (a 224x224 image has only one) are encoded once
(:func:`crop_features`) and weighted by how many of the protocol's crops fall on them (:func:`crop_mean`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CROP_MODES = ("random", "grid", "five", "center", "resize")

# Images smaller than the crop are upscaled whole, so memory grows with the aspect ratio; past this it is refused.
MAX_ASPECT_RATIO = 100


@dataclass(frozen=True)
class CropProtocol:
    """How an image is cut into ``size`` x ``size`` crops whose scores are averaged.

    Modes:
        random: ``num`` uniformly random offsets from a generator seeded with ``seed`` (the release's 10-crop protocol,
            made reproducible; the release draws from the global RNG).
        grid: ``num`` crops on an evenly spaced rows x cols grid (rows * cols = num, shaped like the image) that
            reaches all four borders (deterministic).
        five: the centre and the four corners (the release's alternative ``random_5crop_test``).
        center: the central crop only.
        resize: the whole image resized to ``size`` x ``size`` (one pass, aspect ratio not kept).
    """

    mode: str = "random"
    num: int = 10
    seed: int = 0
    size: int = 224

    def __post_init__(self) -> None:
        if self.mode not in CROP_MODES:
            raise ValueError(f"unknown crop mode {self.mode!r}; known modes: {', '.join(CROP_MODES)}")
        if self.num < 1:
            raise ValueError(f"number of crops must be >= 1, got {self.num}")
        if self.size < 1:
            raise ValueError(f"crop size must be >= 1, got {self.size}")

    @property
    def crops_per_image(self) -> int:
        return {"five": 5, "center": 1, "resize": 1}.get(self.mode, self.num)

    def offsets(self, height: int, width: int) -> list[tuple[int, int]]:
        """(top, left) of each crop, in protocol order, for an image of at least ``size`` on both sides."""
        s = self.size
        if height < s or width < s:
            raise ValueError(f"image {height}x{width} is smaller than the crop size {s}; call prepare() first")
        if self.mode == "random":
            gen = torch.Generator().manual_seed(self.seed)
            out = []
            for _ in range(self.num):
                top = int(torch.randint(0, height - s + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - s + 1, (1,), generator=gen))
                out.append((top, left))
            return out
        if self.mode == "grid":
            rows, cols = _grid_shape(self.num, height, width)
            tops = _spread(height - s, rows)
            lefts = _spread(width - s, cols)
            return [(t, l) for t in tops for l in lefts]
        if self.mode == "five":
            ct, cl = (height - s) // 2, (width - s) // 2
            return [(ct, cl), (0, 0), (0, width - s), (height - s, 0), (height - s, width - s)]
        # center / resize (resize is handled before offsets are asked for: the image is then exactly s x s)
        return [((height - s) // 2, (width - s) // 2)]


def _grid_shape(num: int, height: int, width: int) -> tuple[int, int]:
    """rows x cols == num, the factor pair whose shape is closest to the image's (more columns for wide images)."""
    pairs = [(r, num // r) for r in range(1, num + 1) if num % r == 0]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - math.log(height / width)))


def _spread(span: int, count: int) -> list[int]:
    if count == 1:
        return [span // 2]
    return [round(i * span / (count - 1)) for i in range(count)]


def prepare(images: torch.Tensor, protocol: CropProtocol) -> torch.Tensor:
    """Bring a batch (B, 3, H, W) to a size the protocol can crop.

    ``resize`` resizes to size x size; otherwise an image smaller than the crop on either side is upscaled
    (bicubic, aspect ratio kept) so that its short side equals the crop size. Larger images are left untouched.
    """
    h, w = images.shape[-2:]
    s = protocol.size
    if protocol.mode == "resize":
        if (h, w) == (s, s):
            return images
        return _resize(images, (s, s))
    if h >= s and w >= s:
        return images
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        # Upscaling a 1x20000 strip (20 kpx, well under any decompression-bomb limit) would allocate 224x4.5M pixels.
        raise ValueError(f"image {h}x{w} is too elongated to upscale to a short side of {s} (aspect ratio over "
                         f"{MAX_ASPECT_RATIO}:1); score it with the 'resize' crop mode")
    scale = s / min(h, w)
    return _resize(images, (max(s, round(h * scale)), max(s, round(w * scale))))


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    antialias = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    out = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=antialias)
    return out.clamp_(0.0, 1.0)


def unique_crops(images: torch.Tensor, protocol: CropProtocol) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct crops of a prepared batch and the weight of each in the average.

    Returns:
        crops (U * B, 3, s, s), crop-major (all images' first window, then all images' second ...), and weights (U,)
        that sum to 1: the share of the protocol's crops that fall on each distinct window.
    """
    h, w = images.shape[-2:]
    s = protocol.size
    counts = Counter(protocol.offsets(h, w))
    windows = list(counts)
    crops = torch.cat([images[:, :, t : t + s, l : l + s] for t, l in windows], dim=0)
    total = sum(counts.values())
    weights = torch.tensor([counts[win] / total for win in windows], dtype=torch.float64)
    return crops, weights


def crop_features(images: torch.Tensor, protocol: CropProtocol,
                  encode: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode`` run once on the distinct crops of full-resolution images (B, 3, H, W).

    Returns:
        features (U, B, E) of the U distinct windows, crop-major, and each window's weight (U,) in the average.
    """
    images = prepare(images, protocol)
    crops, weights = unique_crops(images, protocol)  # (U * B, 3, s, s), (U,)
    return encode(crops).view(len(weights), images.shape[0], -1), weights


def crop_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted average over the leading crop axis: values (U, B, ...) and weights (U,) -> (B, ...)."""
    w = weights.to(values).view(-1, *([1] * (values.dim() - 1)))
    return (w * values).sum(dim=0)
