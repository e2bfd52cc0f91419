"""The Gamma model: CLIP towers with MoAE, a residual adapter and a learnable-level score head."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..config import GammaConfig
from ..prompts import SCENES, canonical_scene, prompt_table
from .clip import build_clip, encode_image, encode_text, text_parameters
from .crops import CropProtocol, prepare, unique_crops
from .moae import MoAE

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


class GammaModel(nn.Module):
    """Gamma image assessor.

    Call it with RGB images in [0, 1] of shape (B, 3, H, W); it returns one score per image (B,) on the normalised MOS
    scale (about [0, 1], higher is better). In training mode the input must be crops of the model's input size; in
    eval mode any size is accepted and scored with the test-time crop protocol :attr:`crop_protocol` (by default the
    release's 10 random 224 crops, seeded and batch-independent). Models with scene-based prompts (``prompt_set='sdp'``)
    need ``scene=`` (one name for the batch or one per image).

    State dict keys follow the authors' release: ``clip_model.<OpenAI CLIP key>``, ``adapter.fc.{0,2}.weight``,
    ``score_level``; MoAE blocks hold ``mlp.useful_experts``, ``mlp.experts.expert_k``, ``mlp.gating.layer1`` and
    ``mlp.scale``.
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

        self.crop_protocol = CropProtocol(size=config.vision.image_size)
        self.check_input_range = True
        self._text_params = text_parameters(self.clip_model)
        self._text_cache: tuple[tuple, torch.Tensor, bool] | None = None
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

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

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
        tokens = self.prompt_tokens
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self._text_params)
        key = (
            tuple((p.data_ptr(), p._version, p.dtype) for p in self._text_params),
            tuple(m.kept_experts for m in self.moae_modules()),  # keep_only_experts changes the text tower too
            tokens.device,
        )
        cache = self._text_cache
        if not needs_grad and cache is not None and cache[0] == key:
            # An inference-mode tensor may only be reused where autograd is off.
            if not cache[2] or not torch.is_grad_enabled():
                return cache[1]
        rows, levels, ctx = tokens.shape
        feats = encode_text(self.clip_model, tokens.view(rows * levels, ctx))
        feats = F.normalize(feats, dim=-1).view(rows, levels, -1)
        self._text_cache = None if needs_grad else (key, feats, torch.is_inference_mode_enabled())
        return feats

    def image_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Adapter-refined, L2-normalised image features (B, E) of crops (B, 3, S, S) in [0, 1]."""
        dtype = self.clip_model.visual.conv1.weight.dtype
        pixels = (crops.to(dtype) - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)
        feats = encode_image(self.clip_model, pixels)
        return F.normalize(self.adapter(feats), dim=-1)

    def logits(self, crops: torch.Tensor, scene_index: torch.Tensor | None) -> torch.Tensor:
        """Scaled cosine similarities (B, 5) between crops and their five level prompts."""
        image = self.image_features(crops)  # (B, E)
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
        return self._score(crops, self.scene_index(scene, crops.shape[0], crops.device))

    def _score(self, crops: torch.Tensor, scene_index: torch.Tensor | None) -> torch.Tensor:
        probs = self.logits(crops, scene_index).softmax(dim=-1)  # (B, 5)
        return probs @ self.score_level.to(probs.dtype)  # (B,)

    def score_images(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,) of full-resolution images with the test-time crop protocol, averaged over crops."""
        images = self.check_images(images)
        scene_index = self.scene_index(scene, images.shape[0], images.device)
        images = prepare(images, self.crop_protocol)
        crops, weights = unique_crops(images, self.crop_protocol)  # (U*B, 3, S, S), (U,)
        batch = images.shape[0]
        crop_scene = scene_index.repeat(len(weights)) if scene_index is not None else None
        scores = self._score(crops, crop_scene).view(len(weights), batch)  # crop-major
        return (weights.to(scores) [:, None] * scores).sum(dim=0)

    def forward(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,): per crop in training mode, per image (test-time protocol) in eval mode."""
        if self.training:
            return self.score_crops(images, scene)
        return self.score_images(images, scene)

    # ---------------------------------------------------------------------------------------------- checks
    def scene_index(self, scene: str | Sequence[str] | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """Row of :meth:`text_features` for each image (B,), or None for single-set prompts.

        Raises:
            ValueError: unknown scene, a missing scene on an SDP model, or one scene per image of the wrong length.
        """
        names: list[str] | None
        if scene is None:
            names = None
        elif isinstance(scene, str):
            names = [canonical_scene(scene)] * batch
        elif isinstance(scene, Sequence):
            if len(scene) != batch:
                raise ValueError(f"got {len(scene)} scenes for a batch of {batch} images")
            names = [canonical_scene(s) for s in scene]
        else:
            raise ValueError(f"scene must be a string or a sequence of strings, got {type(scene).__name__}")
        if self.config.prompt_set != "sdp":
            return None
        if names is None:
            raise ValueError(
                "this model uses scene-based prompts (SDP): pass scene=one of " + ", ".join(SCENES)
            )
        return torch.tensor([SCENES.index(n) for n in names], device=device, dtype=torch.long)

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
