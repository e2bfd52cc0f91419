"""PromptIQA: no-reference IQA steered by a prompt of image-score pairs (ECCV 2024; docs/promptiqa.md).

A target image is scored *relative to* an ISPP (image-score pair prompt): a few images with their scores in [0, 1].
The ISPP sets the scale and direction (MOS or DMOS, technical or aesthetic ...); the model is never told which.

    image ──ViT-B/8──taps(2,5,8,11)──3 MAL──fusion MAL──block──CNN──► visual feature (dim)
    ISPP:  [visual feature ; score·1] ──prompt encoder──mean──MLP──► prompt feature (n, dim)     (cached by content)
    target: [visual feature ; ISPP fusion(prompt features)] ──8 blocks──LayerNorm──head(token 0)──sigmoid──► score

This is the official code's model (chencn2020/PromptIQA, ``PromptIQA/models/promptiqa.py``) rewritten with our own
modules: the same state_dict keys, the same LayerNorm eps / qkv biases / exact GELU per block, and the two reshape
quirks of its MAL module kept bit for bit (see :class:`AttentionBlock` and :class:`MAL`). Nothing here needs timm.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import PromptIQAConfig
from .inputs import check_images
from .trainable import TrainableModule

logger = logging.getLogger(__name__)

# The official model normalises every channel as (x - 0.5) / 0.5 (the ViT-B/8 AugReg weights' own mean and std).
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5

# How many encoded ISPPs the model keeps (least recently used first out).
PROMPT_CACHE_SIZE = 8

Images = Union[torch.Tensor, Sequence[torch.Tensor]]  # noqa: UP007 - runtime alias (py3.10)
Prompt = Union[tuple[Images, object], torch.Tensor]  # noqa: UP007 - (images, scores) or an encoded (n, dim) tensor


# ------------------------------------------------------------------------------------------ transformer parts
class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d/H)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d/H)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm's names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, timm ``Block`` layout (no dropout, no drop-path, no layer scale).

    The official model uses it with three settings, which is why ``qkv_bias`` and ``eps`` have no defaults: the ViT and
    the 8 image-prompt fusion blocks have qkv bias and eps 1e-6; the other blocks (timm's defaults) neither bias nor
    the smaller eps.
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool, eps: float, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, 3, S, S) -> (B, (S/p)^2, D)."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """The ViT-B/8 backbone without its final norm and head; returns the outputs of the tapped blocks.

    Keys match timm's ``vit_base_patch8_224`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i``).
    """

    def __init__(self, cfg: PromptIQAConfig) -> None:
        super().__init__()
        self.taps = cfg.taps
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.vit_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vit_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, cfg.vit_width))
        self.blocks = nn.ModuleList(
            Block(cfg.vit_width, cfg.vit_heads, qkv_bias=True, eps=1e-6) for _ in range(cfg.vit_depth)
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):  # timm's ViT init; the official model then loads pretrained weights
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)  # (B, P, D), P = grid^2
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+P, D)
        taps = []
        for i, block in enumerate(self.blocks[: self.taps[-1] + 1]):  # blocks after the last tap are never read
            x = block(x)
            if i in self.taps:
                taps.append(x)  # the residual stream after block i, (B, 1+P, D)
        return taps


# ---------------------------------------------------------------------------------------------------- MAL
class SelfAttention2d(nn.Module):
    """Spatial self-attention over one view (b, C, g, g), gated by a scalar that starts at 0 (identity at init).

    The energy q·k is *not* scaled by 1/sqrt(C/8), as in the official code.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qConv = nn.Conv2d(dim, dim // 8, kernel_size=1)
        self.kConv = nn.Conv2d(dim, dim // 8, kernel_size=1)
        self.vConv = nn.Conv2d(dim, dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.qConv(x).view(b, -1, h * w).transpose(1, 2)  # (b, P, C/8)
        k = self.kConv(x).view(b, -1, h * w)  # (b, C/8, P)
        attn = torch.bmm(q, k).softmax(dim=-1)  # (b, P, P), unscaled energy
        v = self.vConv(x).view(b, c, h * w)  # (b, C, P)
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)  # (b, C, g, g)
        return self.gamma * out + x


class AttentionBlock(nn.Module):
    """Single-head attention over the rows of (B, R, N) with Linear(N, N) q/k/v, then dropout and a residual.

    Official quirk kept: the attention output A·v (B, R, N) is transposed to (B, N, R) and then *reshaped* (not
    transposed back) to (B, R, N), which scrambles the elements instead of restoring the layout.
    """

    def __init__(self, dim: int, drop: float) -> None:
        super().__init__()
        self.c_q = nn.Linear(dim, dim)
        self.c_k = nn.Linear(dim, dim)
        self.c_v = nn.Linear(dim, dim)
        self.scale = dim**-0.5
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, r, n = x.shape
        attn = (self.c_q(x) @ self.c_k(x).transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, R, R)
        out = (attn @ self.c_v(x)).transpose(1, 2).reshape(b, r, n)  # the scramble
        return self.drop(out) + x


class MAL(nn.Module):
    """Multi-view Attention Learning: n views (n, b, C, g, g) -> one feature map (b, C, g*g).

    Each view gets its own :class:`SelfAttention2d`; the results are stacked as T (b, n*C, P) with row i*C + c holding
    channel c of view i. Two branches then attend over T:

    - "feature" branch: T *plain-reshaped* to (b, C, n*P), so row w holds rows w*n ... w*n+n-1 of T (not channel w of
      every view, as the paper's figure suggests), attention over those C rows, reshaped back to (b, n*C, P);
    - "channel" branch: T transposed to (b, P, n*C), attention over the P positions, transposed back.

    The two are averaged, viewed as (b, n, C, P) and averaged over the n "views".
    """

    def __init__(self, dim: int, views: int, grid: int, drop: float) -> None:
        super().__init__()
        self.channel_attention = AttentionBlock(dim * views, drop)
        self.feature_attention = AttentionBlock(grid * grid * views, drop)
        self.attention_module = nn.ModuleList(SelfAttention2d(dim) for _ in range(views))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        n, b, c, h, w = views.shape
        y = torch.stack([att(v) for att, v in zip(self.attention_module, views, strict=True)])  # (n, b, C, g, g)
        t = y.permute(1, 0, 2, 3, 4).reshape(b, n * c, h * w)  # (b, n*C, P)
        feature = self.feature_attention(t.reshape(b, c, n * h * w)).reshape(b, n * c, h * w)  # (b, n*C, P)
        channel = self.channel_attention(t.transpose(1, 2)).transpose(1, 2)  # (b, n*C, P)
        return ((feature + channel) / 2).view(b, n, c, h * w).mean(dim=1)  # (b, C, P)


# ------------------------------------------------------------------------------------------- the prompt path
class PromptedIQA(TrainableModule):
    """What PromptIQA does with visual features, whatever produces them: the prompt encoder, the ISPP fusion, the
    image-prompt fusion and the regression head, with the scoring API built on them.

    A subclass builds its visual encoder, then calls :meth:`build_prompt_path`, and implements :meth:`preprocess`
    (images as given -> the encoder's input) and :meth:`image_features` (that input -> visual features (B, dim)).
    :class:`PromptIQA` is the official model; :class:`gamma.archs.gamma_isp.GammaISP` puts the same prompt path on
    frozen Gamma features. The modules keep the official names (``i_p_fusion``, ``mlp``, ``prompt_fusion``,
    ``blocks``, ``norm``, ``score_block``), so the official checkpoint's keys are unchanged.

    Call it as ``model(images, prompt=(prompt_images, prompt_scores))`` with RGB images in [0, 1]: a (B, 3, H, W)
    tensor or a list of (3, H, W) tensors of any sizes. Prompt scores are in [0, 1], one per prompt image; the result
    (B,) is on the prompt's scale, in (0, 1). In eval mode the encoded prompt is cached by content (and by the
    weights), so scoring many images against one ISPP encodes it once; scores do not depend on the order of the ISPs
    or on which other images share the batch.

    For training, :meth:`score_leave_one_out` scores each image of a batch from the other ones (the official scheme).
    """

    lower_better = False
    score_range = (0.0, 1.0)

    def build_prompt_path(self, dim: int, heads: int, prompt_blocks: int, ispp_blocks: int, fusion_blocks: int,
                          drop: float, prompted: bool = True) -> None:
        """Create the prompt path's modules (after the visual encoder's, so that the state_dict keeps its order).

        ``prompted=False`` builds the regression alone (PromptIQA's Table 6 "w/o prompt": no ISPP, prompt encoder or
        fusion module; see :meth:`fuse`).
        """
        self.prompted = prompted
        if prompted:
            # Prompt encoder: each (image, score) pair as two tokens, then mean -> MLP.
            self.i_p_fusion = nn.Sequential(*(Block(dim, heads, qkv_bias=False, eps=1e-5)
                                              for _ in range(prompt_blocks)))
            self.mlp = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim))
            # ISPP fusion, image-prompt fusion.
            self.prompt_fusion = nn.Sequential(*(Block(dim, heads, qkv_bias=False, eps=1e-5)
                                                 for _ in range(ispp_blocks)))
            self.blocks = nn.Sequential(*(Block(dim, heads, qkv_bias=True, eps=1e-6) for _ in range(fusion_blocks)))
        # Regression.
        self.norm = nn.LayerNorm(dim)
        self.score_block = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Dropout(drop),
                                         nn.Linear(dim // 2, 1), nn.Sigmoid())
        self.prompt_dim = dim if prompted else 0  # without a prompt path an encoded ISPP has no features
        self.check_input_range = True
        self._prompt_cache: OrderedDict[tuple, tuple[torch.Tensor, bool, Any]] = OrderedDict()

    # ------------------------------------------------------------------------------------- for subclasses
    def preprocess(self, images: Images) -> object:
        """Images as the caller gives them -> the input of :meth:`image_features` (checked)."""
        raise NotImplementedError

    def image_features(self, pixels: object) -> torch.Tensor:
        """Visual features (B, dim) of what :meth:`preprocess` returned."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ prompt path
    def isp_features(self, features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Prompt encoder: visual features (n, dim) and scores (n,) -> ISP features (n, dim).

        The score becomes a second token, the score repeated ``dim`` times (the paper's expansion E(s)).
        """
        if not self.prompted:
            return features.new_zeros(features.shape[0], 0)  # (n, 0): nothing of the ISPP reaches the score
        pair = torch.stack([features, scores.to(features.dtype)[:, None].expand_as(features)], dim=1)  # (n, 2, dim)
        return self.mlp(self.i_p_fusion(pair).mean(dim=1))  # (n, dim)

    def fuse(self, features: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of visual features (B, dim) against ISP features (B or 1, n, dim).

        Without a prompt path (``prompted`` False) the prompts are not read: score = R(V(I)), the paper's Eq. 1.
        """
        if not self.prompted:
            return self.regress(features)
        prompts = self.prompt_fusion(prompts)  # (B or 1, n, dim): the "assessment requirement" feature
        prompts = prompts.expand(features.shape[0], -1, -1)
        x = self.blocks(torch.cat([features[:, None], prompts], dim=1))  # (B, 1+n, dim), token 0 = the image
        # The official head runs on every token and keeps token 0; the other tokens' outputs are never used.
        return self.regress(x[:, 0])

    def regress(self, feature: torch.Tensor) -> torch.Tensor:
        """The image quality regression R: a feature (B, dim) -> scores (B,) in (0, 1) (LayerNorm, 2 FC, sigmoid)."""
        return self.score_block(self.norm(feature)).squeeze(-1)

    # ------------------------------------------------------------------------------------------------ prompt
    def encode_prompt(self, images: Images, scores: object) -> torch.Tensor:
        """ISP features (n, dim) of an ISPP: n images (RGB in [0, 1]) and their n scores in [0, 1].

        In eval mode, with autograd off (or no parameter requiring a gradient), the result is cached: the key is a
        digest of the images' and scores' values plus the identity and version of every weight, so equal content
        reuses it and a weight change (optimiser step, ``load_state_dict``, ``.to()``) re-encodes.
        """
        scores_t = check_scores(scores, _count(images))
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        cacheable = not self.training and not needs_grad
        key = self._prompt_key(images, scores_t) if cacheable else None
        hit = self._prompt_cache.get(key) if key is not None else None
        if hit is not None and (not hit[1] or not torch.is_grad_enabled()):  # inference tensors only without autograd
            self._prompt_cache.move_to_end(key)
            return hit[0]
        if not self.prompted:  # no prompt encoder: the ISPP is checked, never encoded
            return torch.zeros(scores_t.shape[0], 0, device=self.norm.weight.device, dtype=self.norm.weight.dtype)
        features = self.image_features(self.preprocess(images))
        isp = self.isp_features(features, scores_t.to(features.device))  # (n, dim)
        if key is not None:  # (the images too: a key by identity stays valid while its tensors live)
            kept = images if isinstance(images, torch.Tensor) else tuple(images)
            self._prompt_cache[key] = (isp, torch.is_inference_mode_enabled(), kept)
            while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        return isp

    def clear_prompt_cache(self) -> None:
        """Forget every encoded ISPP."""
        self._prompt_cache.clear()

    def _prompt_key(self, images: Images, scores: torch.Tensor) -> tuple:
        # CPU images: a digest of their values. Images on an accelerator: their identity (storage, layout, in-place
        # version), not their values, which would cost a device-to-host copy of every image on every call; the cache
        # entry keeps them alive, so no other tensor can take their storage while the key exists.
        digest = hashlib.blake2b(digest_size=20)
        for img in ([images] if isinstance(images, torch.Tensor) else images):
            digest.update(repr((tuple(img.shape), str(img.dtype))).encode())
            if img.device.type == "cpu":
                digest.update(_raw_bytes(img))
            else:
                digest.update(repr((str(img.device), img.data_ptr(), img.stride(), img.storage_offset(),
                                    img._version)).encode())
        digest.update(_raw_bytes(scores.to(torch.float64)))
        weights = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in self.state_dict(keep_vars=True).values())
        return digest.hexdigest(), weights, self.check_input_range

    # ----------------------------------------------------------------------------------------------- scoring
    def forward(self, images: Images, prompt: Prompt | None = None) -> torch.Tensor:
        """Scores (B,) in (0, 1) of ``images`` against ``prompt``.

        Args:
            images: RGB in [0, 1], a (B, 3, H, W) tensor or a list of (3, H, W) tensors.
            prompt: ``(prompt_images, prompt_scores)`` (n images as above, n scores in [0, 1]), or ISP features
                (n, dim) from :meth:`encode_prompt`. A model without a prompt path (``no_prompt``) ignores it and
                may be called without one.
        """
        if prompt is None and not self.prompted:
            isp = torch.zeros(1, 0)
        elif isinstance(prompt, torch.Tensor):
            isp = prompt
            if isp.dim() != 2 or isp.shape[1] != self.prompt_dim or isp.shape[0] < 1:
                raise ValueError(f"an encoded prompt must have shape (n, {self.prompt_dim}), got {tuple(isp.shape)}; "
                                 "to prompt with images pass prompt=(prompt_images, prompt_scores)")
        elif isinstance(prompt, (tuple, list)) and len(prompt) == 2:
            isp = self.encode_prompt(prompt[0], prompt[1])
        else:
            raise ValueError("prompt must be (prompt_images, prompt_scores) or an encoded (n, dim) tensor from "
                             f"encode_prompt, got {type(prompt).__name__}")
        features = self.image_features(self.preprocess(images))  # (B, dim)
        return self.fuse(features, isp.to(features)[None])

    def score_leave_one_out(self, images: Images, scores: object) -> torch.Tensor:
        """The official training forward: each of the b images scored from the other b - 1 as its ISPP.

        Every image is both a target and an ISP; its own score never enters its own prompt. In training mode
        BatchNorm uses the statistics of the whole batch, as in the official training.

        Returns:
            predictions (b,); the targets are ``scores`` themselves.
        """
        scores_t = check_scores(scores, _count(images))
        b = scores_t.shape[0]
        if b < 2:
            raise ValueError(f"leave-one-out scoring needs at least 2 images, got {b}")
        features = self.image_features(self.preprocess(images))  # (b, dim)
        isp = self.isp_features(features, scores_t.to(features.device))  # (b, dim)
        return self.fuse(features, isp[leave_one_out_index(b, isp.device)])  # prompts (b, b-1, dim)


# -------------------------------------------------------------------------------------------------- the model
class PromptIQA(PromptedIQA):
    """The PromptIQA model: the official visual encoder (ViT-B/8, MALs, CNN head) under :class:`PromptedIQA`.

    Every image (target or prompt) is resized to ``image_size`` squared, the whole picture, aspect ratio not kept, as
    the official code does.

    State dict keys are the official ones (``vit.*``, ``MALs.i.*``, ``fusion_mal.*``, ``block.*``, ``cnn.*``,
    ``i_p_fusion.*``, ``mlp.*``, ``prompt_fusion.*``, ``blocks.*``, ``norm.*``, ``score_block.*``).
    """

    def __init__(self, config: PromptIQAConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else PromptIQAConfig()
        self.config = cfg
        width, dim, grid = cfg.vit_width, cfg.dim, cfg.grid

        # Visual encoder (the official code calls it MoNet).
        self.vit = ViT(cfg)
        self.MALs = nn.ModuleList(MAL(width, len(cfg.taps), grid, cfg.drop) for _ in range(cfg.num_mals))
        self.fusion_mal = MAL(width, cfg.num_mals, grid, cfg.drop)
        self.block = Block(width, cfg.vit_heads, qkv_bias=False, eps=1e-5)
        channels = (width, *cfg.cnn_channels, dim)
        cnn: list[nn.Module] = []
        for i, (kernel, pool) in enumerate(zip(cfg.cnn_kernels, cfg.cnn_pools, strict=True)):
            cnn += [nn.Conv2d(channels[i], channels[i + 1], kernel), nn.BatchNorm2d(channels[i + 1]),
                    nn.ReLU(inplace=True), nn.AvgPool2d(pool)]
        self.cnn = nn.Sequential(*cnn)  # (b, D, g, g) -> (b, dim, 1, 1)
        self.build_prompt_path(dim, cfg.heads, cfg.prompt_blocks, cfg.ispp_blocks, cfg.fusion_blocks, cfg.drop,
                               prompted=not cfg.no_prompt)

    # ----------------------------------------------------------------------------------------------- inputs
    @property
    def _dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def preprocess(self, images: Images) -> torch.Tensor:
        """RGB in [0, 1] -> the network's input (B, 3, S, S): resized to S = ``image_size`` if needed, (x - .5) / .5.

        Images already S x S are used as they are (the file loader :func:`gamma.io.load_promptiqa_image` resizes
        exactly like the official demo); others are resized with :func:`resize_like_cv2`.
        """
        size = self.config.image_size
        if isinstance(images, torch.Tensor):
            batch = check_images(images, self.check_input_range)
            if batch.shape[-2:] != (size, size):
                batch = resize_like_cv2(batch, size)
        else:
            batch = torch.cat([img if img.shape[-2:] == (size, size) else resize_like_cv2(img, size)
                               for img in image_list(images, self.check_input_range)])
        device = self.norm.weight.device
        batch = batch.to(device=device, dtype=torch.float32)
        return ((batch - PIXEL_MEAN) / PIXEL_STD).to(self._dtype)  # (B, 3, S, S) in [-1, 1]

    # --------------------------------------------------------------------------------------------- features
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Visual features (B, dim) of normalised pixels (B, 3, S, S): the official MoNet path."""
        b, g, d = pixels.shape[0], self.config.grid, self.config.vit_width
        tokens = torch.cat([t[:, 1:] for t in self.vit(pixels)], dim=2)  # (B, P, taps*D), CLS dropped, layer-major
        views = tokens.transpose(1, 2).reshape(b, len(self.config.taps), d, g, g).transpose(0, 1)  # (taps, B, D, g, g)
        dof = torch.stack([mal(views) for mal in self.MALs]).view(-1, b, d, g, g)  # (num_mals, B, D, g, g)
        x = self.fusion_mal(dof).transpose(1, 2)  # (B, P, D)
        x = self.block(x).transpose(1, 2).reshape(b, d, g, g)  # (B, D, g, g)
        return self.cnn(x).flatten(1)  # (B, dim), >= 0 (ReLU then average pooling)


# ------------------------------------------------------------------------------------------------ helpers
def leave_one_out_index(b: int, device: torch.device | None = None) -> torch.Tensor:
    """(b, b-1) indices: row i lists 0 .. b-1 without i, in order (the official ``expand``)."""
    full = torch.arange(b, device=device).expand(b, b)
    return full[~torch.eye(b, dtype=torch.bool, device=device)].view(b, b - 1)


def resize_like_cv2(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, 3, H, W) in [0, 1] to size x size like OpenCV's ``INTER_CUBIC`` on 8-bit images.

    Bicubic with a = -0.75 on half-pixel centres, no antialiasing, edge pixels replicated (what both OpenCV and
    ``F.interpolate`` do), then rounded to the 8-bit grid and clipped to [0, 1] like the official ``cv2.resize`` on
    uint8 data. OpenCV's fixed-point arithmetic can still put a pixel one level (1/255) off.
    """
    out = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    return (out * 255).round().clamp(0, 255) / 255


def image_list(images: Sequence[torch.Tensor], check_range: bool = True) -> list[torch.Tensor]:
    """A non-empty list of (3, H, W) tensors as checked batches of one, (1, 3, H, W) each.

    Raises:
        ValueError: not a list of (3, H, W) tensors, or an image fails :func:`check_images`.
    """
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or not images:
        raise ValueError("images must be a (B, 3, H, W) tensor or a non-empty list of (3, H, W) tensors")
    items = []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"image {i} of the list must be a (3, H, W) tensor, got {shape}")
        items.append(check_images(img.unsqueeze(0), check_range))
    return items


def check_scores(scores: object, count: int) -> torch.Tensor:
    """Prompt scores as a float tensor (n,); they must be n finite numbers in [0, 1].

    Raises:
        ValueError: wrong count or shape, non-numeric, NaN/inf, or outside [0, 1] (normalise MOS first).
    """
    try:
        s = torch.as_tensor(np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores,
                                       dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prompt scores must be numbers, got {type(scores).__name__} ({exc})") from None
    if s.dim() == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.dim() != 1:
        raise ValueError(f"prompt scores must have shape (n,) or (n, 1), got {tuple(s.shape)}")
    if s.shape[0] != count:
        raise ValueError(f"got {s.shape[0]} prompt scores for {count} prompt images")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("prompt scores contain NaN or infinite values")
    if bool((s < 0).any() or (s > 1).any()):
        raise ValueError(f"prompt scores must be in [0, 1] (the model ends in a sigmoid), got values in "
                         f"[{float(s.min()):.4g}, {float(s.max()):.4g}]; normalise them first, e.g. MOS / 100")
    return s.float()


def _count(images: Images) -> int:
    """Number of images in a batch tensor or a list (the batch's shape is checked first)."""
    if isinstance(images, torch.Tensor):
        return check_images(images, check_range=False).shape[0]
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise ValueError(f"images must be a (B, 3, H, W) tensor or a list of (3, H, W) tensors, got "
                         f"{type(images).__name__}")
    return len(images)


def _raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
