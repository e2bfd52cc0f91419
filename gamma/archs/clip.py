"""OpenAI-layout CLIP towers (open_clip modules, QuickGELU) with MoAE in the last blocks of both towers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from ..config import GammaConfig
from .moae import MoAE
from .moae_kernels import FusedExperts
from .precision import FLOAT_DTYPES, CastLayerNorm, Int8Linear, precision_of


def build_clip(cfg: GammaConfig) -> CLIP:
    """An open_clip ``CLIP`` with the architecture of ``cfg``; MoAE replaces the MLPs of the last blocks.

    Parameter names are OpenAI's (``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight`` ...), so
    OpenAI, UniQA and the Gamma release's checkpoints map onto it key for key.
    """
    v, t = cfg.vision, cfg.text
    model = CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=CLIPVisionCfg(
            width=v.width, layers=v.layers, head_width=v.width // v.heads, patch_size=v.patch_size,
            image_size=v.image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads, layers=t.layers,
        ),
        quick_gelu=True,  # OpenAI / UniQA weights were trained with QuickGELU, not nn.GELU
    )
    for tower in (model.visual.transformer, model.transformer):
        for i in cfg.moae_blocks(len(tower.resblocks)):
            block = tower.resblocks[i]
            block.mlp = MoAE(block.mlp, cfg.num_experts, merge_factor=cfg.merge_factor,
                             freeze_shared=cfg.freeze_shared)
    visual = model.visual
    if (visual.attn_pool is None and visual.pool_type == "tok" and not visual.output_tokens
            and visual.transformer.batch_first):
        # The image feature is ln_post(class token) @ proj: the last block's other outputs are never read.
        blocks = visual.transformer.resblocks
        blocks[-1] = ClassTokenBlock(blocks[-1])
    return model


class ClassTokenBlock(ResidualAttentionBlock):
    """A vision tower's last block computed for the class token alone: (B, L, D) -> (B, 1, D).

    Keys and values still come from every token, but the query, the attention output and the MLP (with MoAE: the shared
    expert and every adaptive expert) run for one token instead of L: for ViT-B/16 with MoAE, 12% fewer FLOPs per image.
    The pooled output of the tower is the same (its other token outputs are dropped), and so are the gradients. It
    adopts the block's submodules: parameter names and state_dict keys are unchanged. Within :func:`every_token` it
    computes every token, as the block it replaced does (for routing statistics over all tokens).
    """

    def __init__(self, block: ResidualAttentionBlock) -> None:
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.class_token_only = True  # switched off by `every_token` only

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if k_x is not None or v_x is not None or not self.class_token_only:
            return super().forward(q_x, k_x, v_x, attn_mask)  # cross-attention, or every token wanted
        h = self.ln_1(q_x)  # (B, L, D)
        if h.dtype != torch.float32:
            # The same values in sequence-first memory: attention transposes its inputs to (L, B, D), and for a
            # transposed input torch's CPU matmul in bf16/fp16 copies the projection weight once per position (L x
            # 768 x 1536 values for ViT-B), which made this block cost as much as the other eleven.
            h = h.transpose(0, 1).contiguous().transpose(0, 1)
        mask = attn_mask[..., :1, :] if attn_mask is not None else None
        x = q_x[:, :1] + self.ls_1(self.attention(q_x=h[:, :1], k_x=h, v_x=h, attn_mask=mask))  # (B, 1, D)
        return x + self.ls_2(self.mlp(self.ln_2(x)))


@contextlib.contextmanager
def every_token(module: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`ClassTokenBlock` in ``module`` computes all tokens (B, L, D).

    The pooled features are the same up to rounding (the class token's row is computed in a larger matmul).
    """
    blocks = [m for m in module.modules() if isinstance(m, ClassTokenBlock)]
    saved = [b.class_token_only for b in blocks]
    for b in blocks:
        b.class_token_only = False
    try:
        yield
    finally:
        for b, value in zip(blocks, saved, strict=True):
            b.class_token_only = value


def tower_precision(visual: nn.Module) -> str:
    """``fp32``, ``bf16``, ``fp16`` or ``int8``: how a vision tower's blocks compute (read from their weights)."""
    if any(isinstance(m, Int8Linear) for m in visual.modules()):
        return "int8"
    return precision_of(visual.transformer.resblocks[0].attn.in_proj_weight.dtype)


def set_tower_precision(visual: nn.Module, precision: str) -> None:
    """Convert an fp32 vision tower's blocks to ``precision`` for inference, or an int8 one back to fp32.

    bf16 / fp16: each block's attention and MLP (or MoAE) weights are converted in place; its LayerNorms keep fp32
    weights and compute in fp32, then hand the matmuls their input in the reduced dtype (:class:`CastLayerNorm`). The
    residual stream stays fp32 (fp32 + bf16 promotes to fp32), and so do the patch embedding, ``ln_pre``, ``ln_post``
    and the output projection, which cost about 1% of the FLOPs: rounding enters only through the matmuls' inputs and
    weights, not through 12 residual additions.

    int8: the MLP linears (the shared expert's in MoAE blocks) become :class:`Int8Linear` and MoAE blocks get int8
    fused kernels; attention projections and routers stay fp32. ``fp32`` undoes it exactly.
    """
    current = tower_precision(visual)
    if precision == current:
        return
    if current != "fp32" and (current, precision) != ("int8", "fp32"):
        raise ValueError(f"a vision tower converts from fp32 (or from int8 back to fp32), not from {current}")
    blocks = visual.transformer.resblocks
    if precision in ("bf16", "fp16"):
        dtype = FLOAT_DTYPES[precision]
        for block in blocks:
            block.attn.to(dtype)
            block.mlp.to(dtype)
            block.ln_1, block.ln_2 = CastLayerNorm(block.ln_1, dtype), CastLayerNorm(block.ln_2, dtype)
        return
    int8 = precision == "int8"
    for block in blocks:
        mlp = block.mlp
        if isinstance(mlp, MoAE):
            if mlp.kernel is not None:
                mlp.kernel = FusedExperts(int8=int8)
            mlp = mlp.useful_experts
        for name in ("c_fc", "c_proj"):
            layer = getattr(mlp, name)
            setattr(mlp, name, Int8Linear(layer) if int8 else layer.to_linear())


def encode_text(clip: CLIP, tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Text features (N, E) at the EOT position of ``tokens`` (N, context_length).

    The causal mask means position j only sees positions <= j, so everything after the last EOT of the batch is cut
    before the transformer runs: the same features as the full 77-token pass for a fraction of the work. ``length``
    is that cut, :func:`token_length` of ``tokens``; pass it for fixed prompts to spare reading it back from the device
    on every call.
    """
    eot = tokens.argmax(dim=-1)  # (N,) EOT has the largest id
    length = token_length(tokens) if length is None else length
    x = clip.token_embedding(tokens[:, :length])  # (N, L, W)
    x = x + clip.positional_embedding[:length].to(x.dtype)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # (N, W)
    return x @ clip.text_projection  # (N, E)


def token_length(tokens: torch.Tensor) -> int:
    """Positions up to the last EOT of any prompt in ``tokens`` (..., context_length) (a device-to-host read)."""
    return int(tokens.argmax(dim=-1).max()) + 1


def encode_image(clip: CLIP, pixels: torch.Tensor) -> torch.Tensor:
    """Image features (B, E) of CLIP-normalised pixels (B, 3, S, S): ln_post on CLS, then ``@ visual.proj``."""
    return clip.visual(pixels)


def text_parameters(clip: CLIP) -> list[nn.Parameter]:
    """Parameters the text features depend on (everything outside the image tower, ``logit_scale`` excluded)."""
    return [p for name, p in clip.named_parameters() if not name.startswith("visual.") and name != "logit_scale"]


def tokenize(groups: Sequence[Sequence[str]], context_length: int) -> torch.Tensor:
    """CLIP tokens (G, K, context_length) of G groups of K prompts each (the level prompts of each scene, each
    attribute's prompt pair, each scene's descriptions)."""
    sizes = {len(group) for group in groups}
    if len(sizes) != 1:
        raise ValueError(f"prompt groups must be non-empty and of equal size, got sizes {sorted(sizes)}")
    tokens = open_clip.tokenize([p for group in groups for p in group], context_length=context_length)
    return tokens.view(len(groups), sizes.pop(), -1)


def autocast_state(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``'s type, or None where autocast is off."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class TextFeatureCache:
    """L2-normalised text features of fixed prompts, computed once and reused while nothing they depend on changes.

    An entry's key holds each text-tower parameter's storage, version and dtype (an optimiser step,
    ``load_state_dict`` and ``.to()`` change one of them), the MoAE routing masks (``keep_only_experts`` changes the
    text tower too), the tokens' device and the autocast state: features computed under bf16 autocast are never served
    to an fp32 pass, nor the reverse. Where autograd needs them (a trainable text tower) nothing is cached. Not a
    module: it holds no parameters and nothing of the state_dict.
    """

    def __init__(self, clip: CLIP) -> None:
        self.params = text_parameters(clip)
        # name -> (key, tokens, features, inference tensor?)
        self.entries: dict[str, tuple[tuple, torch.Tensor, torch.Tensor, bool]] = {}
        # name -> (the tokens tensor seen, its in-place version, its token_length): the prompts are fixed buffers, so
        # their length and their equality with a cached entry's are read from the device once per buffer, not per call
        self.seen: dict[str, tuple[torch.Tensor, int, int]] = {}

    def __call__(self, clip: CLIP, name: str, tokens: torch.Tensor, routing: tuple) -> torch.Tensor:
        """Features (..., E) of ``tokens`` (..., C), cached under ``name``; ``routing`` keys the experts' masks."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.params)
        key = (tuple((p.data_ptr(), p._version, p.dtype) for p in self.params), routing, tokens.device,
               autocast_state(tokens.device))
        entry = self.entries.get(name)
        seen = self.seen.get(name)
        unchanged = seen is not None and seen[0] is tokens and seen[1] == tokens._version  # the buffer of last call
        if not unchanged:
            seen = (tokens, tokens._version, token_length(tokens))
        # The same prompts (tokens compared by value: a caller may swap a model's prompt buffer) under the same key; an
        # inference-mode tensor may only be reused where autograd is off.
        if (not needs_grad and entry is not None and entry[0] == key and (unchanged or torch.equal(entry[1], tokens))
                and not (entry[3] and torch.is_grad_enabled())):
            self.seen[name] = seen
            return entry[2]
        *lead, ctx = tokens.shape
        feats = F.normalize(encode_text(clip, tokens.reshape(-1, ctx), seen[2]), dim=-1).view(*lead, -1)
        self.seen[name] = seen
        if needs_grad:
            self.entries.pop(name, None)
        else:
            self.entries[name] = (key, tokens.clone(), feats, torch.is_inference_mode_enabled())
        return feats

    def clear(self) -> None:
        self.entries.clear()
        self.seen.clear()
