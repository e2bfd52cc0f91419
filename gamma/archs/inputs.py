"""What gamma's models accept (Gamma's image tower, PromptIQA, Gamma + ISP): batches of RGB images in [0, 1], checked
with errors that say what to do."""

from __future__ import annotations

import math

import torch

# Pixel values may overshoot [0, 1] by this much (resampling, colour conversion) before they count as out of range.
RANGE_TOLERANCE = 1e-3


def check_images(images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
    """Validate a batch of RGB images (B, 3, H, W) in [0, 1]; returns it unchanged.

    Raises:
        ValueError: not a tensor, not (B, 3, H, W), not floating point, empty, NaN/inf, or (with ``check_range``)
            values outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        hint = "; for a single image use x.unsqueeze(0)" if images.dim() == 3 else ""
        raise ValueError(f"images must have shape (B, 3, H, W), got shape {tuple(images.shape)}{hint}")
    if images.shape[1] != 3:
        raise ValueError(
            f"images must have 3 (RGB) channels, got {images.shape[1]} in shape {tuple(images.shape)}"
            + ("; expand grayscale with x.expand(-1, 3, -1, -1)" if images.shape[1] == 1 else "")
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}"
            + ("; convert with x.float() / 255" if images.dtype == torch.uint8 else "")
        )
    if images.numel() == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    lo, hi = value_range(images)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or infinite values")
    if check_range:
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"pixel values must be RGB in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                + ("; do not normalise them (no ImageNet or CLIP-normalise step): the model does it"
                   if lo < -RANGE_TOLERANCE else "; divide 0-255 images by 255")
            )
    return images


def value_range(images: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor, read back in one device-to-host transfer (one sync per checked batch).

    Both are NaN when any value is NaN (``torch.aminmax`` propagates it) and infinite when one is, so this one reading
    serves the finiteness check and the range check.
    """
    lo, hi = torch.stack(torch.aminmax(images.detach())).tolist()
    return lo, hi
