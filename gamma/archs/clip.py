"""OpenAI-layout CLIP towers (open_clip modules, QuickGELU) with MoAE in the last blocks of both towers."""

from __future__ import annotations

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from ..config import GammaConfig
from .moae import MoAE


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
    return model


def encode_text(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Text features (N, E) at the EOT position of ``tokens`` (N, context_length).

    The causal mask means position j only sees positions <= j, so everything after the last EOT of the batch is cut
    before the transformer runs: the same features as the full 77-token pass for a fraction of the work.
    """
    eot = tokens.argmax(dim=-1)  # (N,) EOT has the largest id
    length = int(eot.max()) + 1
    x = clip.token_embedding(tokens[:, :length])  # (N, L, W)
    x = x + clip.positional_embedding[:length].to(x.dtype)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # (N, W)
    return x @ clip.text_projection  # (N, E)


def encode_image(clip: CLIP, pixels: torch.Tensor) -> torch.Tensor:
    """Image features (B, E) of CLIP-normalised pixels (B, 3, S, S): ln_post on CLS, then ``@ visual.proj``."""
    return clip.visual(pixels)


def text_parameters(clip: CLIP) -> list[nn.Parameter]:
    """Parameters the text features depend on (everything outside the image tower, ``logit_scale`` excluded)."""
    return [p for name, p in clip.named_parameters() if not name.startswith("visual.") and name != "logit_scale"]
