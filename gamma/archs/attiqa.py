"""The ATTIQA student: a ResNet encoder, attribute heads (five) and a MOS regressor over the heads' hidden features.

ATTIQA (Kwon et al., "ATTIQA: Generalizable Image Quality Feature Extractor using Attribute-aware Pretraining", ACCV
2024) pretrains this network on the *order* of five zero-shot CLIP attribute scores (the teacher, computed by
:meth:`gamma.GammaModel.attributes`; cached by :mod:`gamma.train.teacher`) with a margin-ranking loss
(:func:`attribute_ranking_loss`), then fine-tunes it to MOS with a regressor fed by the heads' hidden features. The
choices the paper leaves open are listed, with reasons, in docs/attiqa.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from ..config import AttiqaConfig
from .crops import CropProtocol, prepare, unique_crops
from .inputs import value_range
from .trainable import TrainableModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

STAGES = ("pretrain", "finetune", "probe")


class AttributeHead(nn.Module):
    """Two-layer MLP from the pooled feature to one attribute score: Linear(D, h) -> ReLU -> Linear(h, 1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden feature (B, h), after the ReLU (the input of the final layer), and the score (B,)."""
        h = self.hidden(x)
        return h, self.out(h).squeeze(-1)


class AttiqaModel(TrainableModule):
    """ATTIQA student.

    Call it with RGB images in [0, 1] (B, 3, H, W). In training mode it returns what the stage trains, per input crop:
    the MOS prediction (B,) when fine-tuning, the attribute predictions (B, A) when pretraining. In eval mode it
    returns MOS predictions of whole images of any size: the short side is resized to ``config.resize`` and the
    predictions of the five ``config.crop_size`` crops (corners and centre) are averaged (the paper's test protocol;
    :meth:`set_crop_protocol` can change it).
    :meth:`attribute_scores` gives the attribute predictions (B, A) that pretraining ranks; they are unbounded
    scalars whose order, not value, is learned. The A heads are ``config.attributes``: the paper's five
    (:data:`gamma.prompts.ATTRIBUTES`), or for its Table 7 single-prompt ablation one, ``("quality",)``.

    Submodules: ``backbone`` (torchvision ``ResNet``, ``fc`` replaced by identity: its state_dict keys are those of
    torchvision's ``resnet50`` minus ``fc.*``), ``heads.<attribute>.{hidden.0, out}``, ``regressor.{0, 2}``.
    """

    lower_better = False

    def __init__(self, config: AttiqaConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNet(Bottleneck, list(config.layers), width_per_group=config.width_per_group)
        self.backbone.fc = nn.Identity()  # the pooled feature (B, 2048) feeds the heads
        dim = 512 * Bottleneck.expansion
        self.feature_dim = dim
        self.attribute_names = config.attributes
        self.heads = nn.ModuleDict({a: AttributeHead(dim, config.head_hidden) for a in self.attribute_names})
        self.regressor = nn.Sequential(
            nn.Linear(len(self.attribute_names) * config.head_hidden, config.regressor_hidden),
            nn.ReLU(),
            nn.Linear(config.regressor_hidden, 1),
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.crop_protocol = CropProtocol(mode="five", size=config.crop_size)
        self.stage = "finetune"
        self.set_stage("finetune")

    # ----------------------------------------------------------------------------------------------- parameters
    def set_stage(self, stage: str) -> None:
        """Make trainable what a stage uses, and only that (so DDP sees no unused parameters).

        ``pretrain``: backbone and attribute heads (the regressor is not used). ``finetune``: backbone, the heads'
        hidden layers and the regressor (the heads' final layers are not used). The backbone is trained end to end
        in both. ``probe`` (the paper's linear probing): only the regressor, one MLP over the frozen pretrained
        features (backbone and heads' hidden layers frozen, and kept in eval mode so that BatchNorm's statistics stay
        the pretrained ones).
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; known stages: {', '.join(STAGES)}")
        self.stage = stage
        self.requires_grad_(True)
        if stage == "pretrain":
            self.regressor.requires_grad_(False)
        elif stage == "probe":
            self.backbone.requires_grad_(False)
            self.heads.requires_grad_(False)
            self.train(self.training)
        else:
            for head in self.heads.values():
                head.out.requires_grad_(False)

    def train(self, mode: bool = True) -> AttiqaModel:
        """As ``nn.Module.train``; in stage ``probe`` the frozen feature extractor stays in eval mode."""
        super().train(mode)
        if self.stage == "probe":
            self.backbone.eval()
            self.heads.eval()
        return self

    def load_backbone(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load ImageNet weights of a torchvision ResNet of the same depth into the backbone, strictly.

        The classifier (``fc.*``) is dropped and a ``module.`` prefix is removed; any other missing, unexpected or
        mis-shaped key is an error that names it.

        Raises:
            ValueError: the weights do not fit the backbone.
        """
        sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        own = self.backbone.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in sd if k in own and sd[k].shape != own[k].shape]
        problems = [(what, keys) for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                    ("mis-shaped", mismatched)) if keys]
        if problems:
            msg = "; ".join(f"{len(keys)} {what} key(s): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                            for what, keys in problems)
            raise ValueError(f"the backbone weights do not fit a ResNet with layers={self.config.layers}, "
                             f"width_per_group={self.config.width_per_group} ({msg})")
        self.backbone.load_state_dict(sd, strict=True)

    # ------------------------------------------------------------------------------------------------ forward
    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, 2048) of crops (B, 3, S, S) in [0, 1]."""
        x = (crops - self.pixel_mean.to(crops.dtype)) / self.pixel_std.to(crops.dtype)
        return self.backbone(x)

    def heads_forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads' hidden features (B, A, h) and attribute scores (B, A), in ``config.attributes`` order."""
        feats = self.features(crops)
        hidden, scores = zip(*(self.heads[a](feats) for a in self.attribute_names), strict=True)
        return torch.stack(hidden, dim=1), torch.stack(scores, dim=1)

    def attribute_scores(self, crops: torch.Tensor) -> torch.Tensor:
        """The attribute predictions (B, A) of crops (what pretraining ranks against the teacher)."""
        return self.heads_forward(_check(crops))[1]

    def score_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """MOS predictions (B,) of crops: the regressor over the heads' hidden features, concatenated (B, A * h)."""
        hidden, _ = self.heads_forward(_check(crops))
        return self.regressor(hidden.flatten(1)).squeeze(-1)

    def score_images(self, images: torch.Tensor) -> torch.Tensor:
        """MOS predictions (B,) of full images with the test protocol (resize, five crops, average)."""
        return self._over_crops(images, self.score_crops)

    def attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute name -> prediction (B,) of full images with the test protocol (unbounded; order matters)."""
        scores = self._over_crops(images, self.attribute_scores)  # (B, A)
        return dict(zip(self.attribute_names, scores.unbind(dim=-1), strict=True))

    def crop_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, 2048) of full images with the test protocol, averaged over the crops."""
        return self._over_crops(images, self.features)

    def set_crop_protocol(self, mode: str | None = None, num: int | None = None, seed: int | None = None) -> None:
        """Change the test-time protocol (:class:`CropProtocol`; the crop side stays ``config.crop_size``), as
        :meth:`gamma.GammaModel.set_crop_protocol` does; omitted fields keep their value."""
        changes = {k: v for k, v in {"mode": mode, "num": num, "seed": seed}.items() if v is not None}
        self.crop_protocol = dataclasses.replace(self.crop_protocol, **changes)

    def set_prompt_set(self, prompt_set: str | None) -> None:
        """A student has no prompts (``config.prompt_set`` is None); only None is accepted, so code that switches any
        model's prompt set (the trainer's evaluation) leaves it unchanged."""
        if prompt_set is not None:
            raise ValueError(f"an ATTIQA student has no prompts to switch to {prompt_set!r}")

    def forward(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:  # noqa: ARG002
        """Training mode: per crop, MOS predictions (B,) when fine-tuning, attribute predictions (B, A) when
        pretraining. Eval mode: MOS predictions (B,) per image (test protocol). ``scene`` is accepted and ignored (the
        student has no scene-specific part), so the trainer calls it as it calls Gamma."""
        if self.training:
            return self.attribute_scores(images) if self.stage == "pretrain" else self.score_crops(images)
        return self.score_images(images)

    def _over_crops(self, images: torch.Tensor, per_crop: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``per_crop`` (crops (N, 3, S, S) -> (N, ...)) on the test-time crops of images, averaged: (B, ...)."""
        images = _check(images)
        if self.config.resize:
            images = _resize_short_side(images, self.config.resize)
        images = prepare(images, self.crop_protocol)
        crops, weights = unique_crops(images, self.crop_protocol)  # (U*B, 3, S, S), (U,)
        out = per_crop(crops)
        out = out.view(len(weights), images.shape[0], *out.shape[1:])  # crop-major
        return (weights.to(out).view(-1, *([1] * (out.dim() - 1))) * out).sum(dim=0)


# ---------------------------------------------------------------------------------------------------- loss
def check_attribute_targets(pred: torch.Tensor, target: torch.Tensor) -> None:
    """What an attribute loss takes: predictions and teacher scores of one shape (B, A), the scores finite.

    Raises:
        ValueError: shapes differ or are not (B, A), or the targets are not finite.
    """
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (batch, attributes), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if not bool(torch.isfinite(target).all()):
        raise ValueError("teacher targets contain NaN or infinite values")


def attribute_ranking_loss(pred: torch.Tensor, target: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """ATTIQA's pretraining loss: margin ranking on in-batch pairs ordered by the teacher, summed over attributes.

    For every attribute a and every pair i < j of the batch whose teacher scores differ (ties carry no order and are
    left out), with y = sign(target[i, a] - target[j, a]):

        loss_a = mean over those pairs of max(0, margin - y * (pred[i, a] - pred[j, a]))

    which is ``F.margin_ranking_loss(pred_i, pred_j, y, margin)`` with its default mean reduction. The result is the
    sum of the five ``loss_a`` (the paper sums over attributes); an attribute without an ordered pair adds 0. Taking
    the mean over pairs keeps the loss scale independent of the batch size.

    Args:
        pred: the student's attribute predictions (B, A).
        target: the teacher's attribute scores (B, A); only their order is used.
        margin: the hinge margin (the paper's 0.1).

    Raises:
        ValueError: shapes differ or are not (B, A), or the targets are not finite.
    """
    check_attribute_targets(pred, target)
    i, j = torch.triu_indices(pred.shape[0], pred.shape[0], offset=1, device=pred.device)  # (P,) each
    order = torch.sign(target[i] - target[j]).to(pred.dtype)  # (P, A): +1, -1, or 0 for a tie
    hinge = (margin - order * (pred[i] - pred[j])).clamp_min(0) * order.abs()  # ties contribute 0
    pairs = order.abs().sum(dim=0)  # (A,) ordered pairs per attribute
    return (hinge.sum(dim=0) / pairs.clamp_min(1)).sum()


# ---------------------------------------------------------------------------------------------------- helpers
def _check(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, 3, H, W) of RGB values in [0, 1], got {shape}")
    if not images.is_floating_point() or images.numel() == 0:
        raise ValueError(f"images must be a non-empty floating-point tensor in [0, 1], got dtype {images.dtype}")
    if not all(math.isfinite(v) for v in value_range(images)):  # one device-to-host transfer
        raise ValueError("images contain NaN or infinite values")
    return images


def _resize_short_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, 3, H, W) so the short side is ``size`` (aspect kept; bilinear, antialiased when shrinking)."""
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images
    nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=min(h, w) > size)
    return out.clamp_(0.0, 1.0)
