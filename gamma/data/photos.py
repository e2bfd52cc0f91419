"""Real photographs, distorted at known strengths, from the pictures that ship with scikit-image (nothing downloaded).

:func:`distorted_photos` builds the set on which reduced-precision scores are compared with fp32 ones (tests and
``scripts/bench.py --precision``): crops of a dozen photographs, each blurred, noised, JPEG-compressed or lowered in
contrast at one of several strengths (the distortions of the synthetic datasets, :func:`gamma.data.synthetic.distort`),
so that the scores spread the way quality does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .synthetic import distort

# Colour photographs, then grayscale ones (expanded to RGB), all bundled with scikit-image.
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "stereo_motorcycle")
GRAY_PHOTOS = ("camera", "moon", "clock", "coins", "grass", "gravel", "brick")
DISTORTIONS = ("blur", "noise", "jpeg", "contrast")  # of gamma.data.synthetic.distort
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # 0 = the undistorted crop


@dataclass(frozen=True)
class PhotoInfo:
    """Where one picture of :func:`distorted_photos` comes from."""

    photo: str
    distortion: str
    strength: float


def photographs() -> dict[str, np.ndarray]:
    """The photographs as RGB arrays (H, W, 3) uint8, by scikit-image name.

    Raises:
        ImportError: scikit-image is not installed (``pip install gamma-iqa[demo]``).
    """
    try:
        import skimage.data as sk
    except ImportError as exc:
        raise ImportError("the photo set needs scikit-image: pip install scikit-image") from exc
    out = {}
    for name in COLOUR_PHOTOS + GRAY_PHOTOS:
        img = getattr(sk, name)()
        if name == "stereo_motorcycle":
            img = img[0]  # (left, right, disparity): the left view
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        out[name] = np.ascontiguousarray(img[..., :3])
    return out


def distorted_photos(count: int = 64, size: int | tuple[int, int] = 224,
                     seed: int = 0) -> tuple[torch.Tensor, list[PhotoInfo]]:
    """``count`` distorted crops of real photographs as RGB in [0, 1], and where each comes from.

    Picture i is a random crop (at least half of the photo's shorter side, resized to ``size``) of photograph
    ``i mod 15``, with distortion and strength drawn so that every distortion appears at every strength. The same
    ``count``, ``size`` and ``seed`` give the same pictures.

    Args:
        count: number of pictures.
        size: output size, ``S`` or ``(H, W)``; the default 224 is one crop window of the Gamma models.
        seed: seed of the crops, distortions and noise.

    Returns:
        images (count, 3, H, W) float32 and one :class:`PhotoInfo` per image.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    photos = photographs()
    names = list(photos)
    grid = [(k, s) for k in DISTORTIONS for s in STRENGTHS]  # every distortion at every strength
    order = rng.permutation(len(grid))
    images, infos = [], []
    for i in range(count):
        name = names[i % len(names)]
        photo = photos[name]
        kind, strength = grid[order[i % len(grid)]]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.5, 1.0) * min(h, w))
        crop_h, crop_w = side, min(w, round(side * width / height))
        top, left = int(rng.integers(0, h - crop_h + 1)), int(rng.integers(0, w - crop_w + 1))
        img = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize((width, height), Image.BICUBIC)
        img = distort(img, kind, strength, rng)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))
        infos.append(PhotoInfo(name, kind, strength))
    return torch.stack(images), infos
