"""The Gamma model: CLIP towers with MoAE, a residual adapter and a learnable-level score head."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..config import GammaConfig
from ..prompts import (
    ATTRIBUTE_PROMPTS,
    ATTRIBUTES,
    AUTO_SCENE,
    AUTO_SCENES,
    LEVELS,
    SCENE_DESCRIPTIONS,
    SCENES,
    canonical_scene,
    prompt_table,
)
from .clip import (
    build_clip,
    encode_image,
    encode_text,
    every_token,
    set_tower_precision,
    text_parameters,
    tower_precision,
)
from .crops import CropProtocol, prepare, unique_crops
from .moae import MoAE
from .precision import check_precision, resolve_precision
from .trainable import TrainableModule

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pixel values may overshoot [0, 1] by this much (resampling, colour conversion) before they count as out of range.
RANGE_TOLERANCE = 1e-3


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


@dataclass
class Assessment:
    """Everything :meth:`GammaModel.assess` reads from one pass of the image tower over the test-time crops.

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


class GammaModel(TrainableModule):
    """Gamma image assessor.

    Call it with RGB images in [0, 1] of shape (B, 3, H, W); it returns one score per image (B,) on the normalised MOS
    scale (about [0, 1], higher is better). In training mode the input must be crops of the model's input size; in
    eval mode any size is accepted and scored with the test-time crop protocol :attr:`crop_protocol` (by default the
    release's 10 random 224 crops, seeded and batch-independent). Models with scene-based prompts (``prompt_set='sdp'``)
    need ``scene=`` (one name for the batch or one per image).

    State dict keys follow the authors' release: ``clip_model.<OpenAI CLIP key>``, ``adapter.fc.{0,2}.weight``,
    ``score_level``; MoAE blocks hold ``mlp.useful_experts``, ``mlp.experts.expert_k``, ``mlp.gating.layer1`` and
    ``mlp.scale``.

    For faster scoring, :meth:`to_precision` runs the image tower in bf16, fp16 or int8 (:attr:`precision` says which);
    the text features and the head stay in fp32, and training stays in fp32.
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

        table = prompt_table(config.prompt_set)
        # SDP keeps one row of 5 prompts per scene (in SCENES order); single-set prompt sets keep one row.
        rows = [table[s] for s in SCENES] if config.prompt_set == "sdp" else [table[SCENES[0]]]
        tokens = open_clip.tokenize([p for row in rows for p in row], context_length=config.text.context_length)
        self.register_buffer("prompt_tokens", tokens.view(len(rows), 5, -1), persistent=False)  # (S, 5, C)
        ctx = config.text.context_length
        pairs = [p for attribute in ATTRIBUTES for p in ATTRIBUTE_PROMPTS[attribute]]
        self.register_buffer("attribute_tokens", open_clip.tokenize(pairs, context_length=ctx).view(
            len(ATTRIBUTES), 2, -1), persistent=False)  # (5 attributes, 2 = positive/negative, C)
        per_scene = len(SCENE_DESCRIPTIONS[SCENES[0]])
        descriptions = [d for s in SCENES for d in SCENE_DESCRIPTIONS[s]]
        self.register_buffer("scene_tokens", open_clip.tokenize(descriptions, context_length=ctx).view(
            len(SCENES), per_scene, -1), persistent=False)  # (5 scenes, D descriptions, C)
        self.auto_scenes: tuple[str, ...] = AUTO_SCENES  # the scenes scene="auto" chooses from

        self.crop_protocol = CropProtocol(size=config.vision.image_size)
        self.check_input_range = True
        self._text_params = text_parameters(self.clip_model)
        self._text_cache: dict[str, tuple[tuple, torch.Tensor, bool]] = {}
        self.set_trainable()

    # ----------------------------------------------------------------------------------------------- parameters
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

    # ---------------------------------------------------------------------------------------------- precision
    @property
    def precision(self) -> str:
        """``fp32``, ``bf16``, ``fp16`` or ``int8``: how the image tower computes (read from its weights)."""
        return tower_precision(self.clip_model.visual)

    def to_precision(self, precision: str = "fp32", *, allow_slow: bool = False) -> GammaModel:
        """Run the image tower in ``precision`` for scoring; returns the model (in eval mode after a conversion).

        - ``bf16`` / ``fp16``: the weights of the image tower's attention and MLP/MoAE layers (frozen and trained ones
          alike) are converted once, in place; LayerNorms, the residual stream, the patch embedding and the output
          projection stay fp32 (:func:`gamma.archs.clip.set_tower_precision`). The fp32 weights are not kept: going
          back means creating or loading the model again.
        - ``int8`` (CPU): the MLP and expert matmuls of the image tower run in int8 with per-token activation scales;
          attention, routers and everything else stay fp32. The float weights stay (the state_dict is unchanged) and
          ``to_precision('fp32')`` restores the model exactly.
        - ``auto``: the fastest precision the model's device runs well
          (:func:`gamma.archs.precision.resolve_precision`); the choice is logged.

        In every precision the text features (computed once, in fp32, and cached), the adapter, the softmax over the
        levels and the level expectation are fp32, and the crop protocol and scenes are unchanged. A reduced-precision
        model is for inference: no parameter requires grad, and :meth:`train` is refused until it is back in fp32.

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

    # ---------------------------------------------------------------------------------------------- routing
    @contextlib.contextmanager
    def watch_routing(self, hook: Callable[[MoAE, torch.Tensor], None]) -> Iterator[None]:
        """Within the block, ``hook(moae, weights)`` receives the router weights (..., N) each time a MoAE block runs.

        The weights come from a forward hook on each router (:attr:`MoAE.gating`), detached and after any expert mask
        of :func:`gamma.keep_only_experts`. The image tower's last block then computes every token (otherwise the class
        token alone: the same scores up to rounding), so image routing covers every patch and the class token. Text
        features are cached: the text tower runs, and reports its routing, only when they are computed.
        """
        handles = [m.gating.register_forward_hook(_routing_hook(hook, m)) for m in self.moae_modules()]
        try:
            with every_token(self.clip_model):
                yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------------------------------ test protocol
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
        table = prompt_table(prompt_set)
        rows = [table[s] for s in SCENES] if prompt_set == "sdp" else [table[SCENES[0]]]  # as in __init__
        tokens = open_clip.tokenize([p for row in rows for p in row], context_length=config.text.context_length)
        self.prompt_tokens = tokens.view(len(rows), 5, -1).to(self.prompt_tokens.device)  # (S, 5, C)
        self.config = config
        # Drop the cached text features (one entry, or a dict of them by kind of prompt): their key covers the text
        # weights, not the prompts.
        self._text_cache = {} if isinstance(self._text_cache, dict) else None

    # ---------------------------------------------------------------------------------------------- features
    def text_features(self) -> torch.Tensor:
        """L2-normalised prompt features (S, 5, E): S = 5 scenes for SDP, else 1.

        They do not depend on the image, so outside autograd they are computed once and reused until a text-tower
        weight changes (an optimiser step, ``load_state_dict``, ``.to()``: each changes a parameter's version or
        storage, which is the cache key) or :func:`keep_only_experts` changes the routing.
        """
        return self._encoded_prompts("levels", self.prompt_tokens)

    def _encoded_prompts(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features (..., E) of ``tokens`` (..., C), cached under ``name`` as described above."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self._text_params)
        key = (
            tuple((p.data_ptr(), p._version, p.dtype) for p in self._text_params),
            tuple(m.kept_experts for m in self.moae_modules()),  # keep_only_experts changes the text tower too
            tokens.device,
        )
        cache = self._text_cache.get(name)
        if not needs_grad and cache is not None and cache[0] == key:
            # An inference-mode tensor may only be reused where autograd is off.
            if not cache[2] or not torch.is_grad_enabled():
                return cache[1]
        *lead, ctx = tokens.shape
        feats = encode_text(self.clip_model, tokens.reshape(-1, ctx))
        feats = F.normalize(feats, dim=-1).view(*lead, -1)
        if needs_grad:
            self._text_cache.pop(name, None)
        else:
            self._text_cache[name] = (key, feats, torch.is_inference_mode_enabled())
        return feats

    def backbone_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Image features (B, E) of crops (B, 3, S, S) in [0, 1] as the image tower gives them: before the adapter,
        not normalised. Zero-shot outputs (attributes, automatic scene) read these."""
        pixels = (crops - self.pixel_mean) / self.pixel_std
        # The image tower runs in its own precision (to_precision); its output comes back in the head's dtype (fp32).
        feats = encode_image(self.clip_model, pixels.to(self.clip_model.visual.conv1.weight.dtype))  # (B, E)
        return feats.to(self.score_level.dtype)

    def image_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Adapter-refined, L2-normalised image features (B, E) of crops (B, 3, S, S) in [0, 1]."""
        return F.normalize(self.adapter(self.backbone_features(crops)), dim=-1)

    def logits(self, crops: torch.Tensor, scene_index: torch.Tensor | None) -> torch.Tensor:
        """Scaled cosine similarities (B, 5) between crops and their five level prompts."""
        return self._level_logits(self.image_features(crops), scene_index)

    def _level_logits(self, image: torch.Tensor, scene_index: torch.Tensor | None) -> torch.Tensor:
        """Scaled cosine similarities (N, 5) of adapter-refined features (N, E) with their scene's level prompts."""
        text = self.text_features().to(image.dtype)  # (S, 5, E)
        scale = self.clip_model.logit_scale.exp().to(image.dtype)
        if scene_index is None:
            return scale * image @ text[0].t()
        return scale * torch.einsum("be,bke->bk", image, text[scene_index])

    def score_crops(self, crops: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,) of crops (B, 3, S, S) that already have the model's input size."""
        crops = self.check_images(crops)
        size = self.config.vision.image_size
        if crops.shape[-2:] != (size, size):
            raise ValueError(f"crops must be {size}x{size}, got {crops.shape[-2]}x{crops.shape[-1]}")
        scene_index = self.scene_index(scene, crops.shape[0], crops.device)
        if _asks_auto(scene) and scene_index is not None:  # each crop is its own image here
            with torch.no_grad():  # a discrete choice: no gradient flows through it
                feats = self.backbone_features(crops)[None]  # (1, B, E)
                scene_index, _ = self._resolve_auto(scene_index, feats, torch.ones(1, dtype=torch.float64))
        return self._score(crops, scene_index)

    def _score(self, crops: torch.Tensor, scene_index: torch.Tensor | None) -> torch.Tensor:
        probs = self.logits(crops, scene_index).softmax(dim=-1)  # (B, 5)
        return probs @ self.score_level.to(probs.dtype)  # (B,)

    def score_images(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,) of full-resolution images with the test-time crop protocol, averaged over crops."""
        return self.assess(images, scene).score

    def forward(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,): per crop in training mode, per image (test-time protocol) in eval mode."""
        if self.training:
            return self.score_crops(images, scene)
        return self.score_images(images, scene)

    # ------------------------------------------------------------------------- more than one number per image
    # The level distribution, zero-shot attribute scores and the automatic scene (docs/explain.md) all read the image
    # tower's features of the same test-time crops: `_crop_features` runs the crop protocol once, the rest is math on
    # (crops, images, E) tensors, and `_crop_mean` averages per-crop results with the weights the score uses.
    def assess(self, images: torch.Tensor, scene: str | Sequence[str] | None = None, *,
               attributes: bool = False) -> Assessment:
        """Score, level distribution and (optionally) attribute scores of full-resolution images (B, 3, H, W).

        One pass of the image tower per distinct test-time crop serves all of them. ``scene`` is as for
        :meth:`score_images`; ``"auto"`` lets the model choose each image's scene (SDP models).
        """
        images = self.check_images(images)
        batch = images.shape[0]
        scene_index = self.scene_index(scene, batch, images.device)
        feats, weights = self._crop_features(images)  # (U, B, E), (U,)
        scene_probs = None
        if _asks_auto(scene) and scene_index is not None:
            scene_index, scene_probs = self._resolve_auto(scene_index, feats, weights)
        num_crops = len(weights)
        flat = feats.reshape(num_crops * batch, -1)  # crop-major, as the crops were cut
        crop_scene = scene_index.repeat(num_crops) if scene_index is not None else None
        probs = self._level_logits(F.normalize(self.adapter(flat), dim=-1), crop_scene).softmax(dim=-1)  # (U*B, 5)
        levels = self.score_level.to(probs.dtype)
        score = _crop_mean((probs @ levels).view(num_crops, batch), weights)  # (B,)
        distribution = _crop_mean(probs.view(num_crops, batch, -1), weights)  # (B, 5)
        mean = distribution @ levels  # equals `score` up to rounding (the average of expectations)
        std = (distribution * (levels - mean[:, None]).square()).sum(dim=-1).clamp_min(0).sqrt()
        scenes = [SCENES[i] for i in scene_index.tolist()] if scene_index is not None else None
        attrs = self._attribute_scores(feats, weights) if attributes else None
        return Assessment(score=score, distribution=distribution, std=std, levels=levels, scenes=scenes,
                          attributes=attrs, scene_probabilities=scene_probs)

    def distribution(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Level probabilities (B, 5) of full-resolution images, averaged over the test-time crops.

        Rows sum to 1 and their mean over the learned levels (``probs @ model.score_level``) is the score; see
        :meth:`assess` for the standard deviation.
        """
        return self.assess(images, scene).distribution

    def attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-shot attribute scores of full-resolution images: attribute name -> (B,) in (0, 1), higher is better.

        For each attribute of :data:`gamma.prompts.ATTRIBUTE_PROMPTS`, the softmax over its (positive, negative)
        prompt pair of ``logit_scale.exp() * cosine(image, prompt)``, probability of the positive prompt (CLIP-IQA's
        antonym method, as ATTIQA uses it). The image feature is the image tower's, before Gamma's adapter, and the
        probabilities are averaged over the test-time crops like the score. :meth:`tower_description` says which
        towers produced them.
        """
        return self._attribute_scores(*self._crop_features(self.check_images(images)))

    def scene_probabilities(self, images: torch.Tensor, candidates: Sequence[str] | None = None) -> torch.Tensor:
        """Probabilities (B, K) of the K candidate scenes (default :attr:`auto_scenes`) for full-resolution images.

        Zero-shot through the model's own towers: the softmax over candidates of ``logit_scale.exp() * cosine`` between
        the image feature (before the adapter) and each scene's averaged description features
        (:data:`gamma.prompts.SCENE_DESCRIPTIONS`), averaged over the test-time crops.
        """
        images = self.check_images(images)
        feats, weights = self._crop_features(images)
        return self._scene_probs(feats, weights, self._candidate_rows(candidates))

    def detect_scene(self, images: torch.Tensor, candidates: Sequence[str] | None = None) -> list[str]:
        """The most likely scene of each image among ``candidates`` (default :attr:`auto_scenes`)."""
        rows = self._candidate_rows(candidates)
        probs = self.scene_probabilities(images, [SCENES[r] for r in rows])
        return [SCENES[rows[k]] for k in probs.argmax(dim=-1).tolist()]

    def tower_description(self) -> str:
        """Which towers produce the zero-shot outputs (attribute scores, automatic scene), for the record."""
        modules = self.moae_modules()
        if not modules:
            return "the CLIP backbone's towers (no MoAE)"
        active = [m for m in modules if m.scale is None or bool(m.scale.detach().ne(0).item())]
        where = f"MoAE in the last {self.config.moae_layers} blocks of each tower, {self.config.num_experts} experts"
        if not active:
            return f"the CLIP backbone's towers ({where}, all merge factors 0: the backbone exactly)"
        return f"Gamma's MoAE towers ({where}; {len(active)} of {len(modules)} MoAE blocks active), not a plain CLIP"

    def _crop_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features (U, B, E) of the U distinct test-time crops of checked images (B, 3, H, W), crop-major,
        and each crop's weight (U,) in the average."""
        images = prepare(images, self.crop_protocol)
        crops, weights = unique_crops(images, self.crop_protocol)  # (U*B, 3, S, S), (U,)
        feats = self.backbone_features(crops)  # (U*B, E)
        return feats.view(len(weights), images.shape[0], -1), weights

    def _attribute_scores(self, feats: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute name -> crop-averaged P(positive prompt) (B,) from backbone features (U, B, E)."""
        image = F.normalize(feats, dim=-1)
        text = self._encoded_prompts("attributes", self.attribute_tokens).to(image.dtype)  # (5, 2, E)
        scale = self.clip_model.logit_scale.exp().to(image.dtype)
        logits = scale * torch.einsum("ube,ape->ubap", image, text)  # (U, B, 5 attributes, 2)
        probs = _crop_mean(logits.softmax(dim=-1)[..., 0], weights)  # (B, 5)
        return dict(zip(ATTRIBUTES, probs.unbind(dim=-1), strict=True))

    def _candidate_rows(self, candidates: Sequence[str] | None) -> list[int]:
        names = self.auto_scenes if candidates is None else candidates
        if isinstance(names, str):
            names = [names]
        rows = [SCENES.index(canonical_scene(n)) for n in names]
        if not rows or len(set(rows)) != len(rows):
            raise ValueError(f"scene candidates must be distinct scenes (at least one), got {list(names)}")
        return rows

    def _scene_probs(self, feats: torch.Tensor, weights: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Crop-averaged scene probabilities (B, K) over the scenes ``rows`` from backbone features (U, B, E)."""
        image = F.normalize(feats, dim=-1)
        described = self._encoded_prompts("scenes", self.scene_tokens)  # (5, D, E)
        text = F.normalize(described.mean(dim=1), dim=-1)[rows].to(image.dtype)  # (K, E): prompt ensembling
        scale = self.clip_model.logit_scale.exp().to(image.dtype)
        return _crop_mean((scale * image @ text.t()).softmax(dim=-1), weights)  # (U, B, K) -> (B, K)

    def _resolve_auto(self, scene_index: torch.Tensor, feats: torch.Tensor,
                      weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``scene_index`` (B,) with every -1 ("auto") replaced by the most likely of :attr:`auto_scenes`, and the
        probabilities (B, K) of those scenes."""
        rows = self._candidate_rows(None)
        probs = self._scene_probs(feats, weights, rows)  # (B, K)
        chosen = torch.tensor(rows, device=scene_index.device)[probs.argmax(dim=-1)]
        return torch.where(scene_index < 0, chosen, scene_index), probs

    # ---------------------------------------------------------------------------------------------- checks
    def scene_index(self, scene: str | Sequence[str] | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """Row of :meth:`text_features` for each image (B,), or None for single-set prompts.

        ``"auto"`` (alone or in a per-image list) is accepted and marked -1: :meth:`assess` and :meth:`score_crops`
        replace it with the scene :meth:`scene_probabilities` finds most likely. A named scene is used as named.

        Raises:
            ValueError: unknown scene, a missing scene on an SDP model, or one scene per image of the wrong length.
        """
        names: list[str] | None
        if scene is None:
            names = None
        elif isinstance(scene, str):
            names = [_scene_or_auto(scene)] * batch
        elif isinstance(scene, Sequence):
            if len(scene) != batch:
                raise ValueError(f"got {len(scene)} scenes for a batch of {batch} images")
            names = [_scene_or_auto(s) for s in scene]
        else:
            raise ValueError(f"scene must be a string or a sequence of strings, got {type(scene).__name__}")
        if self.config.prompt_set != "sdp":
            return None
        if names is None:
            raise ValueError(
                "this model uses scene-based prompts (SDP): pass scene=one of " + ", ".join(SCENES) + " or 'auto'"
            )
        return torch.tensor([-1 if n == AUTO_SCENE else SCENES.index(n) for n in names], device=device,
                            dtype=torch.long)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate a batch of RGB images in [0, 1]; returns it in the model's float dtype.

        Raises:
            ValueError: not a tensor, not (B, 3, H, W), not floating point, empty, NaN/inf, or values outside [0, 1].
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
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or infinite values")
        if self.check_input_range:
            lo, hi = (float(v) for v in torch.aminmax(images.detach()))
            if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
                raise ValueError(
                    f"pixel values must be RGB in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                    + ("; do not CLIP-normalise: the model does it" if lo < -RANGE_TOLERANCE
                       else "; divide 0-255 images by 255")
                )
        return images.to(self.score_level.dtype) if images.dtype != self.score_level.dtype else images


def _scene_or_auto(scene: str) -> str:
    """The canonical name of ``scene``, or ``"auto"``."""
    if isinstance(scene, str) and scene.strip().lower() == AUTO_SCENE:
        return AUTO_SCENE
    return canonical_scene(scene)


def _asks_auto(scene: str | Sequence[str] | None) -> bool:
    """Whether a scene argument asks for the automatic scene anywhere (decided from the names, no tensor sync)."""
    names = [scene] if isinstance(scene, str) else scene if isinstance(scene, Sequence) else []
    return any(isinstance(n, str) and n.strip().lower() == AUTO_SCENE for n in names)


def _crop_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted average over the leading crop axis: values (U, B, ...) and weights (U,) -> (B, ...)."""
    w = weights.to(values).view(-1, *([1] * (values.dim() - 1)))
    return (w * values).sum(dim=0)


def _routing_hook(hook: Callable[[MoAE, torch.Tensor], None], moae: MoAE) -> Callable:
    """A forward hook for ``moae.gating`` that passes its output, the router weights, to ``hook``."""

    def forward_hook(_router: nn.Module, _inputs: tuple, weights: torch.Tensor) -> None:
        hook(moae, weights.detach())

    return forward_hook
