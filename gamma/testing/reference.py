"""A literal re-statement of the authors' released forward pass, for validating :class:`gamma.GammaModel`.

Everything here is computed the way the release computes it (docs/model.md), with plain torch ops and nothing shared
with :mod:`gamma.archs`: sequence-first (L, N, D) activations, OpenAI's fp32 LayerNorm, QuickGELU,
``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention(batch_first=False)`` runs), the text tower over the
full 77-token context on *every* call, each adaptive expert called on its own in a Python loop and combined with
``torch.stack`` + a weighted sum, ``scale * routed + shared``, the ``f + relu(W2 relu(W1 f))`` adapter,
normalisation, ``exp(logit_scale)``, softmax and the level expectation. At test time the crops are scored one after
another (one forward per crop offset, the whole batch of images per forward) and averaged.

Two deliberate departures: the release concatenates the 10 crops into one forward (here: one forward per crop, as a
plain loop would; the scores are the same), and with SDP each image is paired with its own five prompts as in the
release's training path (its batched test path mis-pairs the crops of mixed-scene batches, see
docs/model.md#differences-from-the-release).

It is deliberately slow: it is the yardstick that ``scripts/bench.py`` measures the model against and the oracle that
``tests/test_reference.py`` compares the model's scores with (same weights, same crop offsets, max abs diff <= 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F

from ..prompts import NAIVE_PROMPTS, QUALITY_PROMPTS, SDP_PROMPTS, canonical_scene

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def release_offsets(height: int, width: int, num: int = 10, size: int = 224,
                    generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """(top, left) of the release's ``num`` random test crops: top then left per crop, from ``generator``.

    The release draws from the global RNG (``generator=None``); :class:`gamma.archs.CropProtocol` draws the same way
    from a seeded generator, so both give the same offsets for the same generator state.
    """
    out = []
    for _ in range(num):
        top = torch.randint(0, height - size + 1, size=(1,), generator=generator).item()
        left = torch.randint(0, width - size + 1, size=(1,), generator=generator).item()
        out.append((int(top), int(left)))
    return out


class ReleaseReference:
    """The release's Gamma forward over a release-layout state_dict (``clip_model.*``, ``adapter.*``, ``score_level``).

    Args:
        state_dict: release keys; plain OpenAI keys (no ``clip_model.`` prefix) are accepted for the CLIP part.
        prompt_set: ``naive`` (the "Gamma" weights), ``quality`` or ``sdp`` (the "Gamma-Prompt" weights).
        vision_heads, text_heads: attention heads; default OpenAI's rule ``width // 64`` (at least 1).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], prompt_set: str = "naive",
                 vision_heads: int | None = None, text_heads: int | None = None) -> None:
        sd = {}
        for key, value in state_dict.items():
            sd[key[len("clip_model."):] if key.startswith("clip_model.") else key] = value.detach()
        self.sd = sd
        self.prompt_set = prompt_set
        self.vision_width = sd["visual.conv1.weight"].shape[0]
        self.patch_size = sd["visual.conv1.weight"].shape[-1]
        self.vision_layers = _count_blocks(sd, "visual.transformer.resblocks.")
        self.text_width = sd["ln_final.weight"].shape[0]
        self.text_layers = _count_blocks(sd, "transformer.resblocks.")
        self.context_length = sd["positional_embedding"].shape[0]
        self.vision_heads = vision_heads or max(1, self.vision_width // 64)
        self.text_heads = text_heads or max(1, self.text_width // 64)
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        self.image_size = grid * self.patch_size
        # Additive causal mask of the text tower: -inf above the diagonal (the release's build_attention_mask).
        self.attn_mask = torch.full((self.context_length, self.context_length), float("-inf")).triu_(1)
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def to(self, device: torch.device | str) -> ReleaseReference:
        self.sd = {k: v.to(device) for k, v in self.sd.items()}
        self.attn_mask = self.attn_mask.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    # -------------------------------------------------------------------------------------------- building blocks
    @staticmethod
    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """OpenAI's LayerNorm: computed in fp32, cast back to the input dtype."""
        orig = x.dtype
        return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), 1e-5).to(orig)

    @staticmethod
    def quick_gelu(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)

    def mlp(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """c_fc -> QuickGELU -> c_proj, the CLIP block MLP (and each expert)."""
        sd = self.sd
        h = F.linear(x, sd[prefix + "c_fc.weight"], sd[prefix + "c_fc.bias"])
        h = self.quick_gelu(h)
        return F.linear(h, sd[prefix + "c_proj.weight"], sd[prefix + "c_proj.bias"])

    def moe(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """The release's MoE_clip.forward on (L, N, D): router softmax, shared expert, experts in a loop, stack, sum."""
        sd = self.sd
        weights = torch.softmax(F.linear(x, sd[prefix + "gating.layer1.weight"], sd[prefix + "gating.layer1.bias"]),
                                dim=-1)  # (L, N, E)
        useful = self.mlp(x, prefix + "useful_experts.")
        names = sorted({k[len(prefix + "experts."):].split(".")[0] for k in sd if k.startswith(prefix + "experts.")},
                       key=lambda name: int(name.split("_")[-1]))
        outputs = torch.stack([self.mlp(x, f"{prefix}experts.{name}.") for name in names], dim=2)  # (L, N, E, D)
        weights = weights.unsqueeze(3).expand_as(outputs)
        routed = torch.sum(outputs * weights, dim=2)  # (L, N, D)
        scale = sd.get(prefix + "scale")
        return (scale * routed if scale is not None else routed) + useful

    def block(self, x: torch.Tensor, prefix: str, heads: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """One pre-LN residual block on (L, N, D)."""
        sd = self.sd
        h = self.layer_norm(x, sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"])
        mask = attn_mask.to(dtype=x.dtype, device=x.device) if attn_mask is not None else None
        h, _ = F.multi_head_attention_forward(
            query=h, key=h, value=h, embed_dim_to_check=x.shape[-1], num_heads=heads,
            in_proj_weight=sd[prefix + "attn.in_proj_weight"], in_proj_bias=sd[prefix + "attn.in_proj_bias"],
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=sd[prefix + "attn.out_proj.weight"], out_proj_bias=sd[prefix + "attn.out_proj.bias"],
            training=False, need_weights=False, attn_mask=mask,
        )
        x = x + h
        h = self.layer_norm(x, sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"])
        if prefix + "mlp.useful_experts.c_fc.weight" in sd:
            return x + self.moe(h, prefix + "mlp.")
        return x + self.mlp(h, prefix + "mlp.")

    # ------------------------------------------------------------------------------------------------- towers
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels (N, 3, S, S) -> features (N, E): the release's ViT with ``pos_embedding=True``."""
        sd = self.sd
        x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=self.patch_size)  # (N, W, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, g*g, W)
        cls = sd["visual.class_embedding"].to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                                      device=x.device)
        x = torch.cat([cls, x], dim=1)  # (N, L, W)
        # The release's pos_embedding=True path: a bicubic resize of the table to its own size (an identity here).
        pos = F.interpolate(sd["visual.positional_embedding"][None, None], size=(x.size(1), x.size(2)),
                            mode="bicubic").squeeze(0).squeeze(0)
        x = x + pos.to(x.dtype)
        x = self.layer_norm(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
        x = x.permute(1, 0, 2)  # NLD -> LND
        for i in range(self.vision_layers):
            x = self.block(x, f"visual.transformer.resblocks.{i}.", self.vision_heads, None)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.layer_norm(x[:, 0, :], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
        return x @ sd["visual.proj"]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, 77) -> features (N, E) at the EOT position, over the full context (no truncation)."""
        sd = self.sd
        dtype = sd["visual.conv1.weight"].dtype
        x = F.embedding(tokens, sd["token_embedding.weight"]).to(dtype)  # (N, C, W)
        x = x + sd["positional_embedding"].to(dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        for i in range(self.text_layers):
            x = self.block(x, f"transformer.resblocks.{i}.", self.text_heads, self.attn_mask)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.layer_norm(x, sd["ln_final.weight"], sd["ln_final.bias"]).to(dtype)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ sd["text_projection"]

    def prompts(self, scenes: Sequence[str] | None, batch: int) -> list[str]:
        """Prompt strings of one forward: the 5 level prompts, or 5 per image (SDP, in image order)."""
        if self.prompt_set == "sdp":
            if scenes is None:
                raise ValueError("the SDP prompt set needs a scene per image")
            out: list[str] = []
            for s in scenes:
                out.extend(SDP_PROMPTS[canonical_scene(s)])
            return out
        return list(QUALITY_PROMPTS if self.prompt_set == "quality" else NAIVE_PROMPTS)

    # ------------------------------------------------------------------------------------------------- scoring
    def score_crops(self, crops: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (N,) of crops (N, 3, S, S) in [0, 1]: the release's ``forward_image`` (text tower included)."""
        batch = crops.shape[0]
        scenes = [scene] * batch if isinstance(scene, str) else scene
        device = crops.device
        mean, std = self.mean.to(device), self.std.to(device)
        x = (crops - mean.to(crops)) / std.to(crops)
        dtype = self.sd["visual.conv1.weight"].dtype
        tokens = open_clip.tokenize(self.prompts(scenes, batch), context_length=self.context_length).to(device)
        image = self.encode_image(x.to(dtype))  # (N, E)
        text = self.encode_text(tokens)  # (5, E) or (5N, E): recomputed on every call, as in the release
        sd = self.sd
        h = F.relu(F.linear(image, sd["adapter.fc.0.weight"]))
        h = F.relu(F.linear(h, sd["adapter.fc.2.weight"]))
        image = image + h
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logit_scale = sd["logit_scale"].exp()
        if self.prompt_set == "sdp":
            # Each image against its own five prompts (the release's per-image loop of its training path).
            sims = [logit_scale * image[i].unsqueeze(0) @ text[5 * i: 5 * i + 5].t() for i in range(batch)]
            logits = torch.cat(sims, dim=0)
        else:
            logits = logit_scale * image @ text.t()  # (N, 5)
        probs = logits.softmax(dim=-1) * sd["score_level"]
        return torch.sum(probs, dim=-1)  # (N,)

    def score_images(self, images: torch.Tensor, scene: str | Sequence[str] | None = None,
                     crop_offsets: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Scores (B,) of full-resolution images (B, 3, H, W): crops one after another, scores averaged.

        Args:
            crop_offsets: (top, left) of each crop, shared by all images of the batch; default the release's 10
                offsets from the global RNG (:func:`release_offsets`).
        """
        height, width = images.shape[-2:]
        size = self.image_size
        if crop_offsets is None:
            crop_offsets = release_offsets(height, width, 10, size)
        results = []
        for top, left in crop_offsets:
            results.append(self.score_crops(images[:, :, top: top + size, left: left + size], scene))
        return torch.stack(results, dim=0).mean(dim=0)  # (num_crops, B) -> (B,)

    __call__ = score_images


def release_forward(state_dict: dict[str, torch.Tensor], images: torch.Tensor, prompt_set: str = "naive",
                    scene: str | Sequence[str] | None = None,
                    crop_offsets: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Scores (B,) of ``images`` with the release's forward and test-time protocol (see :class:`ReleaseReference`).

    Images of exactly the model's input size with ``crop_offsets=None`` are scored as one crop (the release's 10
    identical crops average to the same score).
    """
    ref = ReleaseReference(state_dict, prompt_set=prompt_set).to(images.device)
    with torch.no_grad():
        if crop_offsets is None and tuple(images.shape[-2:]) == (ref.image_size, ref.image_size):
            return ref.score_crops(images, scene)
        return ref.score_images(images, scene, crop_offsets)


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
