"""The Gamma model ("Gamma: Toward Generic Image Assessment with Mixture of Assessment Experts"): CLIP towers with MoAE
in their last blocks, a residual adapter on the image feature and a score head over five learnable levels.

    v = image_tower(crop)                              (E,)      MoAE in the last blocks (archs/moae.py)
    f = normalise(v + relu(W2 relu(W1 v)))             (E,)      the Adapter, a residual bottleneck
    t_k = normalise(text_tower(level prompt k))        (5, E)    the image's scene's prompts for SDP
    p = softmax(exp(logit_scale) f t^T)                (5,)      GammaModel.head: these three lines
    score = p @ levels                                 ()        levels learnable, initialised to 0.2 ... 1.0

Training scores crops; evaluation scores full-resolution images with the release's test-time protocol (the distinct
crops of :class:`~gamma.archs.crops.CropProtocol`, scores averaged with their weights). The outputs beyond the score
(level distribution, attributes, automatic scene) are functions in :mod:`gamma.assess`; the methods here delegate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import assess as extra
from ..assess import Assessment
from ..config import GammaConfig
from ..prompts import (
    ATTRIBUTE_PROMPTS,
    ATTRIBUTES,
    AUTO_SCENES,
    SCENE_DESCRIPTIONS,
    SCENES,
    asks_auto,
    level_prompts,
    scene_rows,
)
from .clip import (
    TextFeatureCache,
    build_clip,
    encode_image,
    every_token,
    set_tower_precision,
    tokenize,
    tower_precision,
)
from .crops import CropProtocol, crop_features, crop_mean
from .inputs import check_images
from .moae import MoAE, watch_routing
from .precision import check_precision, resolve_precision
from .trainable import TrainableModule

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Adapter(nn.Module):
    """Bias-free two-layer bottleneck whose output is added to the image feature: f + relu(W2 relu(W1 f))."""

    def __init__(self, dim: int, reduction: int = 2) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class GammaModel(TrainableModule):
    """Gamma image assessor.

    Call it with RGB images in [0, 1] of shape (B, 3, H, W); it returns one score per image (B,) on the normalised MOS
    scale (about [0, 1], higher is better). In training mode the input must be crops of the model's input size; in
    eval mode any size is accepted and scored with the test-time crop protocol :attr:`crop_protocol` (by default the
    release's 10 random 224 crops, seeded and batch-independent). Models with scene-based prompts (``prompt_set='sdp'``)
    need ``scene=`` (one name for the batch or one per image, or ``"auto"``).

    State dict keys follow the authors' release: ``clip_model.<OpenAI CLIP key>``, ``adapter.fc.{0,2}.weight``,
    ``score_level``; MoAE blocks hold ``mlp.useful_experts``, ``mlp.experts.expert_k``, ``mlp.gating.layer1`` and
    ``mlp.scale``. For faster scoring, :meth:`to_precision` runs the image tower in bf16, fp16 or int8; the text
    features and the head stay in fp32, and so does training (under autocast too: see :meth:`head`).
    """

    lower_better = False

    def __init__(self, config: GammaConfig) -> None:
        super().__init__()
        self.config = config
        self.clip_model = build_clip(config)
        self.adapter = Adapter(config.embed_dim, config.adapter_reduction)
        self.score_level = nn.Parameter(torch.tensor(config.levels, dtype=torch.float32))
        self.register_buffer("pixel_mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        # Prompt tokens (groups, prompts, C); the level prompts hold one row per scene for SDP, else one row.
        ctx = config.text.context_length
        self.register_buffer("prompt_tokens", tokenize(level_prompts(config.prompt_set), ctx), persistent=False)
        self.register_buffer("attribute_tokens", tokenize([ATTRIBUTE_PROMPTS[a] for a in ATTRIBUTES], ctx),
                             persistent=False)  # (5 attributes, 2 = positive/negative, C)
        self.register_buffer("scene_tokens", tokenize([SCENE_DESCRIPTIONS[s] for s in SCENES], ctx),
                             persistent=False)  # (5 scenes, D descriptions, C)
        self.auto_scenes: tuple[str, ...] = AUTO_SCENES  # the scenes scene="auto" chooses from
        self.crop_protocol = CropProtocol(size=config.vision.image_size)
        self.check_input_range = True
        self._text_cache = TextFeatureCache(self.clip_model)
        self.set_trainable()

    # ------------------------------------------------------------------------------------------- the model
    def backbone_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Image-tower features (B, E) of crops (B, 3, S, S) in [0, 1]: before the adapter, not normalised."""
        pixels = (crops - self.pixel_mean) / self.pixel_std
        # The image tower runs in its own precision (to_precision); its output comes back in the head's dtype (fp32).
        feats = encode_image(self.clip_model, pixels.to(self.clip_model.visual.conv1.weight.dtype))  # (B, E)
        return feats.to(self.score_level.dtype)

    def image_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Adapter-refined, L2-normalised image features (B, E) of crops (B, 3, S, S) in [0, 1]."""
        return F.normalize(self.adapter(self.backbone_features(crops)), dim=-1)

    def text_features(self, prompts: str = "levels") -> torch.Tensor:
        """L2-normalised text features of a prompt group: ``levels`` (S, 5, E) with S = 5 scenes for SDP, else 1;
        ``attributes`` (5, 2, E); ``scenes`` (5, D, E).

        They do not depend on the image, so outside autograd they are computed once and reused until a text-tower
        weight, the routing (:func:`keep_only_experts`), the device or the autocast state changes
        (:class:`~gamma.archs.clip.TextFeatureCache`).
        """
        tokens = {"levels": self.prompt_tokens, "attributes": self.attribute_tokens, "scenes": self.scene_tokens}
        routing = tuple(m.kept_experts for m in self.moae_modules())
        return self._text_cache(self.clip_model, prompts, tokens[prompts], routing)

    def head(self, feats: torch.Tensor, scene_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The score head on image-tower features (N, E): level probabilities (N, 5) and scores (N,).

        ``scene_index`` (N,) picks each row's scene prompts (SDP); None for single-set prompts. Under autocast the
        logits, softmax and expectation run in fp32 (the head's dtype): logits of 20-30 in bf16 have steps of 0.125.
        """
        f = F.normalize(self.adapter(feats), dim=-1)  # (N, E): adapter residual, L2-normalised
        t = self.text_features()  # (S, 5, E): L2-normalised level prompts, one row per scene
        with torch.autocast(f.device.type, enabled=False):
            dtype = self.score_level.dtype
            f, t = f.to(dtype), t.to(dtype)
            scale = self.clip_model.logit_scale.exp().to(dtype)
            if scene_index is None:
                logits = scale * f @ t[0].t()  # (N, 5)
            else:
                logits = scale * torch.einsum("ne,nke->nk", f, t[scene_index])  # (N, 5): each row its scene's
            probs = logits.softmax(dim=-1)  # (N, 5)
            return probs, probs @ self.score_level  # (N, 5), (N,)

    def score_crops(self, crops: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,) of crops (B, 3, S, S) that already have the model's input size (training)."""
        crops = self.check_images(crops)
        size = self.config.vision.image_size
        if crops.shape[-2:] != (size, size):
            raise ValueError(f"crops must be {size}x{size}, got {crops.shape[-2]}x{crops.shape[-1]}")
        scene_index = self.scene_index(scene, crops.shape[0], crops.device)
        feats = self.backbone_features(crops)  # (B, E)
        if asks_auto(scene) and scene_index is not None:  # each crop is its own image here
            weights = torch.ones(1, dtype=torch.float64)
            scene_index, _ = extra.choose_scenes(self, scene_index, feats.detach()[None], weights)
        return self.head(feats, scene_index)[1]

    def crop_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-tower features (U, B, E) of the U distinct test-time crops of checked images (B, 3, H, W),
        crop-major, and each crop's weight (U,) in the average (the release's protocol, :mod:`gamma.archs.crops`)."""
        return crop_features(images, self.crop_protocol, self.backbone_features)

    _crop_features = crop_features  # its former name (gamma_isp.py and scripts read it)

    def score_images(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,) of full-resolution images: the test-time protocol's crops scored, then averaged."""
        images = self.check_images(images)
        scene_index = self.scene_index(scene, images.shape[0], images.device)
        feats, weights = self.crop_features(images)  # (U, B, E), (U,)
        if asks_auto(scene) and scene_index is not None:
            scene_index, _ = extra.choose_scenes(self, scene_index, feats, weights)
        crop_scene = scene_index.repeat(len(weights)) if scene_index is not None else None  # crop-major, as feats
        _, scores = self.head(feats.flatten(0, 1), crop_scene)  # (U*B,)
        return crop_mean(scores.view(len(weights), -1), weights)  # (B,)

    def forward(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,): per crop in training mode, per image (test-time protocol) in eval mode."""
        if self.training:
            return self.score_crops(images, scene)
        return self.score_images(images, scene)

    # ----------------------------------------------------------- more than one number per image (gamma/assess.py)
    def assess(self, images: torch.Tensor, scene: str | Sequence[str] | None = None, *,
               attributes: bool = False) -> Assessment:
        """Score, level distribution, std and (optionally) attribute scores: :func:`gamma.assess.assess`."""
        return extra.assess(self, images, scene, attributes=attributes)

    def distribution(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Level probabilities (B, 5) of full-resolution images: :func:`gamma.assess.distribution`."""
        return extra.distribution(self, images, scene)

    def attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-shot attribute scores, name -> (B,) in (0, 1): :func:`gamma.assess.attributes`."""
        return extra.attributes(self, images)

    def scene_probabilities(self, images: torch.Tensor, candidates: Sequence[str] | None = None) -> torch.Tensor:
        """Probabilities (B, K) of the candidate scenes: :func:`gamma.assess.scene_probabilities`."""
        return extra.scene_probabilities(self, images, candidates)

    def detect_scene(self, images: torch.Tensor, candidates: Sequence[str] | None = None) -> list[str]:
        """The most likely scene of each image: :func:`gamma.assess.detect_scene`."""
        return extra.detect_scene(self, images, candidates)

    def tower_description(self) -> str:
        """Which towers produce the zero-shot outputs: :func:`gamma.assess.tower_description`."""
        return extra.tower_description(self)

    # ------------------------------------------------------------------------------------------- parameters
    def set_trainable(self) -> None:
        """Freeze everything, then unfreeze what the paper trains: experts, routers, alphas, adapter, levels."""
        self.requires_grad_(False)
        for module in self.moae_modules():
            module.experts.requires_grad_(True)
            module.gating.requires_grad_(True)
            if module.scale is not None:
                module.scale.requires_grad_(True)
            if not self.config.freeze_shared:
                module.useful_experts.requires_grad_(True)
        self.adapter.requires_grad_(True)
        self.score_level.requires_grad_(True)

    def moae_modules(self) -> list[MoAE]:
        return [m for m in self.modules() if isinstance(m, MoAE)]

    def train(self, mode: bool = True) -> GammaModel:
        """Training mode; refused unless the model is in fp32 (reduced precision is for inference)."""
        if mode and self.precision != "fp32":
            raise RuntimeError(
                f"this model runs in {self.precision} for inference; training runs in fp32: "
                + ("call to_precision('fp32') first" if self.precision == "int8" else
                   "create or load it again without precision= (use the trainer's amp= for mixed precision)")
            )
        return super().train(mode)

    # -------------------------------------------------------------------------------------------- precision
    @property
    def precision(self) -> str:
        """``fp32``, ``bf16``, ``fp16`` or ``int8``: how the image tower computes (read from its weights)."""
        return tower_precision(self.clip_model.visual)

    def to_precision(self, precision: str = "fp32", *, allow_slow: bool = False) -> GammaModel:
        """Run the image tower in ``precision`` for scoring; returns the model (in eval mode after a conversion).

        - ``bf16`` / ``fp16``: the image tower's attention and MLP/MoAE weights are converted once, in place (the
          fp32 weights are not kept); LayerNorms, the residual stream, the patch embedding and the output projection
          stay fp32 (:func:`gamma.archs.clip.set_tower_precision`).
        - ``int8`` (CPU): the image tower's MLP and expert matmuls run in int8 with per-token activation scales; the
          float weights stay (the state_dict is unchanged) and ``to_precision('fp32')`` restores the model exactly.
        - ``auto``: the fastest precision the device runs well (:func:`gamma.archs.precision.resolve_precision`).

        In every precision the text features, the adapter, the head and the routers' softmax are fp32. A
        reduced-precision model is for inference: no parameter requires grad, and :meth:`train` is refused until it
        is back in fp32.

        Args:
            precision: ``fp32``, ``bf16``, ``fp16``, ``int8`` or ``auto``.
            allow_slow: run a precision that this device runs slower than fp32 (e.g. fp16 on a CPU without
                AVX512-FP16) with a logged warning instead of an error.

        Raises:
            ValueError: an unknown precision, one the device cannot run (int8 on CUDA) or runs slower than fp32
                (without ``allow_slow``), or leaving bf16/fp16, whose fp32 weights are gone.
        """
        device = self.score_level.device
        target = resolve_precision(precision, device)
        if target == self.precision:
            return self
        check_precision(target, device, allow_slow=allow_slow)
        return self._convert_tower(target)

    def _convert_tower(self, target: str) -> GammaModel:
        """:meth:`to_precision` after its device checks (also used to build a model for a file stored in ``target``,
        before the weights and the device are known)."""
        current = self.precision
        if target == current:
            return self
        if current not in ("fp32", "int8"):
            raise ValueError(
                f"the image tower's weights were rounded to {current} and its fp32 weights are gone: create or load "
                f"the model again for {target} (create_model(..., precision={target!r}))"
            )
        self.eval()
        if current == "int8":
            set_tower_precision(self.clip_model.visual, "fp32")
        set_tower_precision(self.clip_model.visual, target)
        if target == "fp32":
            self.set_trainable()
        else:
            self.requires_grad_(False)
        logger.info("image tower: %s -> %s", current, target)
        return self

    # ------------------------------------------------------------------------------ routing, protocol, inputs
    @contextlib.contextmanager
    def watch_routing(self, hook: Callable[[MoAE, torch.Tensor], None]) -> Iterator[None]:
        """Within the block, ``hook(moae, weights)`` receives the router weights (..., N) each time a MoAE block runs.

        The weights come from a forward hook on each router (:func:`gamma.archs.moae.watch_routing`), detached and
        after any expert mask of :func:`gamma.keep_only_experts`. The image tower's last block then computes every
        token (otherwise the class token alone: the same scores up to rounding), so image routing covers every patch
        and the class token. Text features are cached: the text tower runs, and reports its routing, only when they
        are computed.
        """
        with watch_routing(self, hook), every_token(self.clip_model):
            yield

    @property
    def test_sample(self) -> int:
        """Number of test-time crops (pyiqa's attribute name)."""
        return self.crop_protocol.num

    @test_sample.setter
    def test_sample(self, num: int) -> None:
        self.crop_protocol = dataclasses.replace(self.crop_protocol, num=int(num))

    def set_crop_protocol(self, mode: str | None = None, num: int | None = None, seed: int | None = None) -> None:
        """Change the test-time protocol (see :class:`CropProtocol`); omitted fields keep their value."""
        changes = {k: v for k, v in {"mode": mode, "num": num, "seed": seed}.items() if v is not None}
        self.crop_protocol = dataclasses.replace(self.crop_protocol, **changes)

    def set_prompt_set(self, prompt_set: str) -> None:
        """Score with another prompt set (``naive`` | ``quality`` | ``sdp``); every weight stays as it is.

        The text side alone changes: the prompts are tokenised again and the cached text features dropped. The paper's
        prompt analysis (its Table 15) scores one SDP-trained model with each prompt set this way.

        Raises:
            ValueError: an unknown prompt set.
        """
        if prompt_set == self.config.prompt_set:
            return
        config = self.config.replace(prompt_set=prompt_set)  # (checks the name)
        tokens = tokenize(level_prompts(prompt_set), config.text.context_length)  # (S, 5, C)
        self.prompt_tokens = tokens.to(self.prompt_tokens.device)
        self.config = config
        self._text_cache.clear()  # not needed for correctness (prompts are compared by value); frees the old features

    def scene_index(self, scene: str | Sequence[str] | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """Row of :meth:`text_features` for each image (B,), or None for single-set prompts.

        ``"auto"`` (alone or in a per-image list) is accepted and marked -1: the scoring methods replace it with the
        scene :meth:`scene_probabilities` finds most likely. A named scene is used as named.

        Raises:
            ValueError: unknown scene, a missing scene on an SDP model, or one scene per image of the wrong length.
        """
        rows = scene_rows(scene, batch)  # checks the names on every model
        if self.config.prompt_set != "sdp":
            return None
        if rows is None:
            raise ValueError(
                "this model uses scene-based prompts (SDP): pass scene=one of " + ", ".join(SCENES) + " or 'auto'"
            )
        if len(set(rows)) == 1:  # one scene for the batch (every training batch): filled on the device, no copy
            return torch.full((batch,), rows[0], dtype=torch.long, device=device)
        index = torch.tensor(rows, dtype=torch.long)  # built on the CPU, copied without blocking the host
        return (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate a batch of RGB images in [0, 1] (:func:`gamma.archs.inputs.check_images`); returns it in the
        model's float dtype.

        Raises:
            ValueError: not a tensor, not (B, 3, H, W), not floating point, empty, NaN/inf, or values outside [0, 1].
        """
        images = check_images(images, self.check_input_range)
        return images.to(self.score_level.dtype) if images.dtype != self.score_level.dtype else images
