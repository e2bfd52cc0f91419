"""PromptIQA's data-side rules as pure functions: label augmentation (the paper's Eq. 4 as the official code does it),
the official random vertical flip, and the choice of a test ISPP from a training split (:func:`sample_ispp`). See
docs/promptiqa.md.

Label augmentation acts on one training batch of labels S in [0, 1] at once. In the official scheme every image of the
batch is both a target and a prompt for the others (:meth:`gamma.archs.promptiqa.PromptIQA.score_leave_one_out`), so
the same transformed labels are the prompt scores and the regression targets:

1. random scaling, with probability ``scale_p`` (0.5): S <- S / c, c ~ U(max S, 1);
2. then, independently, random flipping with probability ``flip_p`` (0.1): S <- 1 - S.

The result stays in [0, 1]. Typical use in a training step::

    aug = draw_label_augment(labels, generator=gen)
    labels = aug.apply(labels)
    preds = model.score_leave_one_out(images, labels)
    loss = F.l1_loss(preds, labels)
    report(aug.invert(preds), aug.invert(labels))   # back on the dataset's scale
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: The official training's probabilities (``--random_scale_rate 0.5 --random_flipping_rate 0.1``).
SCALE_P = 0.5
FLIP_P = 0.1
#: The official probability of flipping an image upside down (training images, and the ISPP images at test time).
VFLIP_P = 0.5
#: How a test ISPP is drawn from a training split: the official 'fix' (interval) and 'random' strategies.
ISPP_SAMPLING: tuple[str, ...] = ("interval", "random")


@dataclass(frozen=True)
class LabelAugment:
    """One draw of the label augmentation: divide by ``scale``, then map s -> 1 - s if ``flip``."""

    scale: float = 1.0  # labels are divided by this (1.0: no scaling); always in (0, 1]
    flip: bool = False

    def apply(self, labels: torch.Tensor) -> torch.Tensor:
        """Augmented labels (same shape)."""
        out = labels / self.scale if self.scale != 1.0 else labels
        return 1 - out if self.flip else out

    def invert(self, values: torch.Tensor) -> torch.Tensor:
        """Map augmented labels or predictions back to the original scale (undo the flip, then the scaling).

        The official training reports its training metrics after undoing the scaling *before* the flip, which gives
        ``1 - c + s`` instead of ``s`` when both were drawn; that only shifts the values, and leaves SRCC/PLCC as they
        are. This method is the exact inverse of :meth:`apply`.
        """
        out = 1 - values if self.flip else values
        return out * self.scale if self.scale != 1.0 else out


def draw_label_augment(
    labels: torch.Tensor,
    scale_p: float = SCALE_P,
    flip_p: float = FLIP_P,
    generator: torch.Generator | None = None,
) -> LabelAugment:
    """Draw one :class:`LabelAugment` for a batch of labels in [0, 1] (the draws follow the official order).

    Args:
        labels: the batch's labels, shape (b,) or (b, 1), in [0, 1].
        scale_p: probability of random scaling.
        flip_p: probability of random flipping (drawn independently, after the scaling).
        generator: the source of randomness (seed it for reproducible draws).

    Raises:
        ValueError: labels empty, not finite or outside [0, 1]; a probability outside [0, 1].
    """
    check_labels(labels)
    for name, p in (("scale_p", scale_p), ("flip_p", flip_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    scale = 1.0
    if _uniform(generator) < scale_p:
        top = float(labels.max())
        scale = top + (1.0 - top) * _uniform(generator)  # c ~ U(max S, 1)
        if scale <= 0.0:  # every label is 0: any divisor leaves them at 0
            scale = 1.0
    flip = _uniform(generator) < flip_p
    return LabelAugment(scale=scale, flip=flip)


def augment_labels(
    labels: torch.Tensor,
    scale_p: float = SCALE_P,
    flip_p: float = FLIP_P,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, LabelAugment]:
    """Augmented labels and the draw behind them: :func:`draw_label_augment`, then :meth:`LabelAugment.apply`."""
    aug = draw_label_augment(labels, scale_p, flip_p, generator)
    return aug.apply(labels), aug


def check_labels(labels: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``labels`` is a non-empty (b,) or (b, 1) float tensor of finite values in [0, 1]."""
    if not isinstance(labels, torch.Tensor) or not labels.is_floating_point():
        raise ValueError(f"labels must be a floating-point tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.numel() == 0 or labels.dim() not in (1, 2) or (labels.dim() == 2 and labels.shape[1] != 1):
        raise ValueError(f"labels must have shape (b,) or (b, 1) with b >= 1, got {tuple(labels.shape)}")
    if not bool(torch.isfinite(labels).all()):
        raise ValueError("labels contain NaN or infinite values")
    lo, hi = float(labels.min()), float(labels.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"labels must be in [0, 1] (normalise MOS first), got values in [{lo:.4g}, {hi:.4g}]")


def random_vertical_flip(
    images: torch.Tensor, p: float = VFLIP_P, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flip each image of (B, 3, H, W) upside down with probability ``p``, independently.

    The official code calls this a horizontal flip, but applies ``np.fliplr`` to a C x H x W array, which reverses
    the height axis. It flips training images, and at test time also the ISPP images, which makes the official test
    scores random; gamma's scoring does not flip (pass the prompt images through this function to reproduce it).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    flip = torch.rand(images.shape[0], generator=generator) < p  # (B,)
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-2), images)


def interval_positions(length: int, n: int) -> list[int]:
    """Positions, in a list of ``length`` items, of the official picker's ``n`` choices.

    The official picker (``get_prompt``) takes position 0, then every ``step = (length - 2) // (n - 2)``-th position
    until it holds n - 1 items, then the last one: on a list sorted by label, the minimum, n - 2 evenly spaced items
    and the maximum. Those are the positions for every n >= 3.

    For n = 2 the official code returns one item (position 0) instead of two; here n = 2 gives the minimum and the
    maximum, which is what the rule means, and n = 1 the minimum.

    Raises:
        ValueError: ``n < 1`` or ``length < n`` (the official code fails on both).
    """
    if n < 1:
        raise ValueError(f"an ISPP needs at least one pair, got n = {n}")
    if length < n:
        raise ValueError(f"cannot choose {n} ISPs from {length} image(s)")
    if n <= 2:
        return [0, length - 1][:n]
    step = (length - 2) // (n - 2)
    return [0, *range(step, step * (n - 1), step), length - 1]  # (n - 2) * step <= length - 2 < length - 1


def sample_ispp(labels: np.ndarray | torch.Tensor, n: int = 10, strategy: str = "interval",
                generator: np.random.Generator | None = None) -> np.ndarray:
    """Indices (n,) into ``labels`` of a test ISPP drawn from a training split, as the official test does.

    ``interval`` (the official 'fix', the paper's interval sampling): the items sorted by label (a stable sort, so
    ties keep their order), then :func:`interval_positions`: the minimum, n - 2 evenly spaced items, the maximum.
    ``random``: the same picker on a random permutation instead of the sorted order (the official code seeds it from
    the operating system; pass a seeded ``generator`` for reproducible draws).

    Returns:
        indices in the order picked (ascending label for ``interval``).

    Raises:
        ValueError: unknown strategy, ``labels`` not 1-D or not finite, fewer than n items, n < 1.
    """
    values = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError(f"labels must be a 1-D array of finite values, got shape {values.shape}")
    if strategy == "interval":
        order = np.argsort(values, kind="stable")
    elif strategy == "random":
        order = (generator if generator is not None else np.random.default_rng()).permutation(len(values))
    else:
        raise ValueError(f"strategy must be one of {', '.join(ISPP_SAMPLING)}, got {strategy!r}")
    return order[interval_positions(len(values), n)]


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))
