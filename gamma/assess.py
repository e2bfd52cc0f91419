"""More than one number per image from a Gamma model: the level distribution and its spread, zero-shot attribute
scores and the automatic scene (docs/explain.md).

Each output is a function of ``(model, images)`` for a :class:`gamma.GammaModel`. It runs the model's test-time
protocol once (:meth:`GammaModel.crop_features`: image-tower features (U, B, E) of the U distinct crops and their
weights) and the rest is small matrix arithmetic on those features; :func:`gamma.archs.crops.crop_mean` averages
per-crop results with the weights the score uses. The model keeps thin methods for each of them (``model.assess(x)``,
``model.distribution(x)``, ``model.attributes(x)``, ``model.detect_scene(x)``, ``scene="auto"``).

Like the score head, the softmaxes over prompts run in the head's dtype (fp32) even under autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .archs.crops import crop_mean
from .prompts import ATTRIBUTES, LEVELS, SCENES, asks_auto, canonical_scene

# Functions here take a GammaModel as ``model: nn.Module``: this module must not import gamma.archs.gamma, whose
# methods delegate to it.


@dataclass
class Assessment:
    """Everything :func:`assess` reads from one pass of the image tower over the test-time crops.

    Attributes:
        score: (B,) the model's score, as :meth:`GammaModel.score_images` returns it.
        distribution: (B, 5) the level probabilities (bad, poor, fair, good, perfect), averaged over crops with the
            crop weights of the score; ``distribution @ levels`` is the score.
        std: (B,) standard deviation of the learned levels under ``distribution``: how spread out the model's belief
            over the levels is, on the score's scale. Not a calibrated confidence interval (docs/explain.md).
        levels: (5,) the learned level values the distribution is over.
        scenes: the scene each image was scored with (named or chosen by ``"auto"``); None for single-set prompts.
        attributes: attribute name -> (B,) zero-shot attribute score in (0, 1), when asked for.
        scene_probabilities: (B, K) probabilities of the K scenes of ``auto_scenes`` (in that order), when the scene
            was chosen automatically (``scene="auto"`` on an SDP model); None otherwise.
    """

    score: torch.Tensor
    distribution: torch.Tensor
    std: torch.Tensor
    levels: torch.Tensor
    scenes: list[str] | None = None
    attributes: dict[str, torch.Tensor] | None = None
    scene_probabilities: torch.Tensor | None = None

    def level_columns(self) -> dict[str, torch.Tensor]:
        """``{'p_bad': (B,), ..., 'p_perfect': (B,)}``: the distribution as one column per level."""
        return {f"p_{level}": self.distribution[:, k] for k, level in enumerate(LEVELS)}


def assess(model: nn.Module, images: torch.Tensor, scene: str | Sequence[str] | None = None, *,
           attributes: bool = False) -> Assessment:
    """Score, level distribution and (optionally) attribute scores of full-resolution images (B, 3, H, W).

    One pass of the image tower per distinct test-time crop serves all of them. ``scene`` is as for
    :meth:`GammaModel.score_images`; ``"auto"`` lets the model choose each image's scene (SDP models).
    """
    images = model.check_images(images)
    batch = images.shape[0]
    scene_index = model.scene_index(scene, batch, images.device)
    feats, weights = model.crop_features(images)  # (U, B, E), (U,)
    scene_probs = None
    if asks_auto(scene) and scene_index is not None:
        scene_index, scene_probs = choose_scenes(model, scene_index, feats, weights)
    num_crops = len(weights)
    crop_scene = scene_index.repeat(num_crops) if scene_index is not None else None  # crop-major, as the crops
    probs, scores = model.head(feats.flatten(0, 1), crop_scene)  # (U*B, 5), (U*B,)
    with _fp32(images):
        levels = model.score_level
        score = crop_mean(scores.view(num_crops, batch), weights)  # (B,): what score_images returns
        distribution = crop_mean(probs.view(num_crops, batch, -1), weights)  # (B, 5)
        mean = distribution @ levels  # equals `score` up to rounding (the average of expectations)
        std = (distribution * (levels - mean[:, None]).square()).sum(dim=-1).clamp_min(0).sqrt()
    scenes = [SCENES[i] for i in scene_index.tolist()] if scene_index is not None else None
    attrs = attribute_scores(model, feats, weights) if attributes else None
    return Assessment(score=score, distribution=distribution, std=std, levels=levels, scenes=scenes,
                      attributes=attrs, scene_probabilities=scene_probs)


def distribution(model: nn.Module, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
    """Level probabilities (B, 5) of full-resolution images, averaged over the test-time crops.

    Rows sum to 1 and their mean over the learned levels (``probs @ model.score_level``) is the score; see
    :func:`assess` for the standard deviation.
    """
    return assess(model, images, scene).distribution


# ------------------------------------------------------------------------------------------------ attributes
def attributes(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero-shot attribute scores of full-resolution images: attribute name -> (B,) in (0, 1), higher is better.

    For each attribute of :data:`gamma.prompts.ATTRIBUTE_PROMPTS`, the softmax over its (positive, negative) prompt
    pair of ``logit_scale.exp() * cosine(image, prompt)``, probability of the positive prompt (CLIP-IQA's antonym
    method, as ATTIQA uses it). The image feature is the image tower's, before Gamma's adapter, and the probabilities
    are averaged over the test-time crops like the score. :func:`tower_description` says which towers produced them.
    """
    return attribute_scores(model, *model.crop_features(model.check_images(images)))


def attribute_scores(model: nn.Module, feats: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attribute name -> crop-averaged P(positive prompt) (B,) from image-tower features (U, B, E)."""
    return dict(zip(ATTRIBUTES, pair_probabilities(model, feats, weights).unbind(dim=-1), strict=True))


def pair_probabilities(model: nn.Module, feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Crop-averaged P(positive prompt) (B, A) of each of the A (positive, negative) pairs in
    ``model.attribute_tokens`` (the five attributes', or others an ATTIQA teacher puts there), from image-tower
    features (U, B, E)."""
    text = model.text_features("attributes")  # (A pairs, 2 = positive/negative, E)
    with _fp32(feats):
        image = F.normalize(feats, dim=-1)
        scale = model.clip_model.logit_scale.exp().to(image.dtype)
        logits = scale * torch.einsum("ube,ape->ubap", image, text.to(image.dtype))  # (U, B, A, 2)
        return crop_mean(logits.softmax(dim=-1)[..., 0], weights)  # (B, A)


def tower_description(model: nn.Module) -> str:
    """Which towers produce the zero-shot outputs (attribute scores, automatic scene), for the record."""
    modules = model.moae_modules()
    if not modules:
        return "the CLIP backbone's towers (no MoAE)"
    active = [m for m in modules if m.scale is None or bool(m.scale.detach().ne(0).item())]
    where = f"MoAE in the last {model.config.moae_layers} blocks of each tower, {model.config.num_experts} experts"
    if not active:
        return f"the CLIP backbone's towers ({where}, all merge factors 0: the backbone exactly)"
    return f"Gamma's MoAE towers ({where}; {len(active)} of {len(modules)} MoAE blocks active), not a plain CLIP"


# ------------------------------------------------------------------------------------------------ scenes
def scene_probabilities(model: nn.Module, images: torch.Tensor,
                        candidates: Sequence[str] | None = None) -> torch.Tensor:
    """Probabilities (B, K) of the K candidate scenes (default ``model.auto_scenes``) for full-resolution images.

    Zero-shot through the model's own towers: the softmax over candidates of ``logit_scale.exp() * cosine`` between
    the image feature (before the adapter) and each scene's averaged description features
    (:data:`gamma.prompts.SCENE_DESCRIPTIONS`), averaged over the test-time crops.
    """
    feats, weights = model.crop_features(model.check_images(images))
    return _scene_probs(model, feats, weights, _candidate_rows(model, candidates))


def detect_scene(model: nn.Module, images: torch.Tensor, candidates: Sequence[str] | None = None) -> list[str]:
    """The most likely scene of each image among ``candidates`` (default ``model.auto_scenes``)."""
    rows = _candidate_rows(model, candidates)
    probs = scene_probabilities(model, images, [SCENES[r] for r in rows])
    return [SCENES[rows[k]] for k in probs.argmax(dim=-1).tolist()]


def choose_scenes(model: nn.Module, scene_index: torch.Tensor, feats: torch.Tensor,
                  weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scene="auto"``: ``scene_index`` (B,) with every -1 replaced by the most likely of ``model.auto_scenes`` for
    image-tower features (U, B, E), and the probabilities (B, K) of those scenes. A discrete choice: no gradient."""
    rows = _candidate_rows(model, None)
    with torch.no_grad():
        probs = _scene_probs(model, feats, weights, rows)  # (B, K)
    chosen = torch.tensor(rows, device=scene_index.device)[probs.argmax(dim=-1)]
    return torch.where(scene_index < 0, chosen, scene_index), probs


def _candidate_rows(model: nn.Module, candidates: Sequence[str] | None) -> list[int]:
    names = model.auto_scenes if candidates is None else candidates
    if isinstance(names, str):
        names = [names]
    rows = [SCENES.index(canonical_scene(n)) for n in names]
    if not rows or len(set(rows)) != len(rows):
        raise ValueError(f"scene candidates must be distinct scenes (at least one), got {list(names)}")
    return rows


def _scene_probs(model: nn.Module, feats: torch.Tensor, weights: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Crop-averaged scene probabilities (B, K) over the scenes ``rows`` from image-tower features (U, B, E)."""
    described = model.text_features("scenes")  # (5 scenes, D descriptions, E)
    with _fp32(feats):
        image = F.normalize(feats, dim=-1)
        text = F.normalize(described.to(image.dtype).mean(dim=1), dim=-1)[rows]  # (K, E): prompt ensembling
        scale = model.clip_model.logit_scale.exp().to(image.dtype)
        return crop_mean((scale * image @ text.t()).softmax(dim=-1), weights)  # (U, B, K) -> (B, K)


def _fp32(like: torch.Tensor) -> torch.autocast:
    """Autocast off on ``like``'s device: these softmaxes over prompts run in the head's dtype (fp32)."""
    return torch.autocast(like.device.type, enabled=False)
