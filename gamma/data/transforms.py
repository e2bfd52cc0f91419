"""Image transforms on decoded tensors (3, H, W) in [0, 1].

Train: optional short-side resize, upscaling of images smaller than the crop, horizontal flip (p=0.5), then a crop
whose top *and* left offsets are random (pyiqa's paired crop, which the release uses for full-reference sets, always
takes its top offset from the last loop index: 0 for the distorted image; not repeated here). Test: the full image,
short-side resized when the dataset says so; the model's crop protocol does the rest.

Randomness comes from ``generator`` when given, else from the global torch RNG (which DataLoader seeds per worker).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_image(img: torch.Tensor) -> None:
    if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"expected an image tensor (3, H, W), got {shape}")


def _resize(img: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    if (h, w) == tuple(img.shape[-2:]):
        return img
    out = F.interpolate(img[None].float(), size=(h, w), mode=mode, align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)  # bicubic overshoots


def resize_short_side(img: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize (3, H, W) so that its short side is ``size``, aspect kept (long side truncated as torchvision does)."""
    _check_image(img)
    h, w = img.shape[-2:]
    if h <= w:
        nh, nw = size, max(1, int(size * w / h))
    else:
        nh, nw = max(1, int(size * h / w)), size
    return _resize(img, nh, nw, mode)


def ensure_min_side(img: torch.Tensor, size: int) -> torch.Tensor:
    """Upscale (bicubic, aspect kept) so that both sides are at least ``size``; larger images are returned as is."""
    _check_image(img)
    h, w = img.shape[-2:]
    if min(h, w) >= size:
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return _resize(img, nh, nw, "bicubic")


def random_crop_offsets(
    height: int, width: int, size: int, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """(top, left) of a uniformly random ``size`` x ``size`` window in a height x width image (both >= size)."""
    if height < size or width < size:
        raise ValueError(f"image {height}x{width} is smaller than the crop {size}")
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return top, left


class TrainTransform:
    """Short-side resize (optional) -> upscale if smaller than the crop -> hflip p=0.5 -> random crop.

    Args:
        crop_size: side of the square crop (224).
        resize: short side to resize to first, or None / 0 for no resize (UWIQA and AVA: 224).
        hflip: random horizontal flip with probability 0.5.
    """

    def __init__(self, crop_size: int = 224, resize: int | None = None, hflip: bool = True) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        self.crop_size = int(crop_size)
        self.resize = int(resize) if resize else None
        self.hflip = bool(hflip)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_image(img)
        if self.resize:
            img = resize_short_side(img, self.resize)
        img = ensure_min_side(img, self.crop_size)
        if self.hflip and float(torch.rand((), generator=generator)) < 0.5:
            img = img.flip(-1)
        s = self.crop_size
        top, left = random_crop_offsets(img.shape[-2], img.shape[-1], s, generator)
        return img[:, top : top + s, left : left + s].contiguous()  # (3, s, s)

    def __repr__(self) -> str:
        return f"TrainTransform(crop_size={self.crop_size}, resize={self.resize}, hflip={self.hflip})"


class TestTransform:
    """The full image, short side resized to ``resize`` when set (deterministic)."""

    __test__ = False  # not a pytest test class

    def __init__(self, resize: int | None = None) -> None:
        self.resize = int(resize) if resize else None

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_image(img)
        return resize_short_side(img, self.resize) if self.resize else img

    def __repr__(self) -> str:
        return f"TestTransform(resize={self.resize})"
