"""Gamma + ISP: PromptIQA's prompt path on frozen Gamma image features (docs/promptiqa.md#gamma--isp).

Gamma scores an image on one fixed scale. To follow a new assessment requirement from ~10 image-score pairs, this
model keeps Gamma frozen and puts PromptIQA's prompt encoder, ISPP fusion, image-prompt fusion and regression head
(:class:`gamma.archs.promptiqa.PromptedIQA`, the same modules) on top of Gamma's image features:

    image ──frozen Gamma image tower (MoAE), test-time crops averaged──► feature (E) ──LayerNorm, Linear──► (dim)
    then exactly PromptIQA: ISPs [feature ; score·1] ──prompt encoder──► ...  ──head(token 0)──sigmoid──► score

Which Gamma feature (``GammaISPConfig.feature``): ``backbone`` (the default) is the image tower's output before
Gamma's adapter. The MoAE experts that Gamma trained sit inside the image tower, so this feature carries their
assessment knowledge, and it is the feature Gamma's zero-shot outputs (attributes, scenes) read. The adapter after it
is a small residual MLP trained for one readout (the cosine with Gamma's five level prompts); a new requirement needs
its own readout, which the trainable prompt path provides. ``adapted`` (the adapter-refined, L2-normalised feature
the score is computed from) is there to compare.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GammaISPConfig
from .gamma import GammaModel
from .promptiqa import Images, PromptedIQA, check_images, image_list

logger = logging.getLogger(__name__)


class GammaISP(PromptedIQA):
    """PromptIQA's prompt path (:class:`PromptedIQA`) over the features of a frozen :class:`GammaModel`.

    Call it as PromptIQA: ``model(images, prompt=(prompt_images, prompt_scores))`` with RGB images in [0, 1] of any
    size (Gamma's test-time crop protocol applies: by default 10 random crops of its input size, features averaged);
    :meth:`score_leave_one_out` is the training forward. Only ``feature_proj`` and the prompt path train; Gamma stays
    frozen and in eval mode (:meth:`train` leaves it there).

    State dict keys: ``gamma.*`` (the whole Gamma model, as in its own checkpoints), ``feature_proj.*``, then
    PromptIQA's ``i_p_fusion.*``, ``mlp.*``, ``prompt_fusion.*``, ``blocks.*``, ``norm.*``, ``score_block.*``.
    """

    def __init__(self, config: GammaISPConfig | None = None, gamma: GammaModel | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else GammaISPConfig()
        if gamma is not None and gamma.config.to_dict() != cfg.gamma.to_dict():
            raise ValueError("the Gamma model given does not have the architecture of config.gamma")
        self.config = cfg
        self.gamma = gamma if gamma is not None else GammaModel(cfg.gamma)
        self.gamma.requires_grad_(False)
        self.gamma.eval()
        width = cfg.gamma.embed_dim
        self.feature_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, cfg.dim))  # (B, E) -> (B, dim)
        self.build_prompt_path(cfg.dim, cfg.heads, cfg.prompt_blocks, cfg.ispp_blocks, cfg.fusion_blocks, cfg.drop)

    def train(self, mode: bool = True) -> GammaISP:
        """Training mode for the prompt path; the frozen Gamma stays in eval mode."""
        super().train(mode)
        self.gamma.eval()
        return self

    # ----------------------------------------------------------------------------------------------- inputs
    def preprocess(self, images: Images) -> list[torch.Tensor]:
        """RGB in [0, 1] -> batches of equal-sized images, (b, 3, H, W) each, on the model's device (checked)."""
        device = self.norm.weight.device
        if isinstance(images, torch.Tensor):
            return [check_images(images, self.check_input_range).to(device=device, dtype=torch.float32)]
        groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for img in image_list(images, self.check_input_range):
            groups.setdefault(tuple(img.shape), []).append(img)
        if len(groups) == 1:
            return [torch.cat(next(iter(groups.values()))).to(device=device, dtype=torch.float32)]
        # Different sizes go through Gamma one by one, so the features come back in the order given.
        return [img.to(device=device, dtype=torch.float32) for img in image_list(images, self.check_input_range)]

    # --------------------------------------------------------------------------------------------- features
    @torch.no_grad()
    def gamma_features(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """Gamma's image features (B, E) of the batches :meth:`preprocess` made: the chosen feature of each test-time
        crop, averaged over the crops with the weights Gamma's score uses."""
        out = []
        for images in batches:
            feats, weights = self.gamma._crop_features(images)  # (U, b, E), (U,)
            if self.config.feature == "adapted":
                feats = F.normalize(self.gamma.adapter(feats), dim=-1)
            w = weights.to(feats).view(-1, 1, 1)
            out.append((w * feats).sum(dim=0))  # (b, E)
        return torch.cat(out)

    def image_features(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Visual features (B, dim) for the prompt path: Gamma's feature, normalised and projected."""
        return self.feature_proj(self.gamma_features(pixels).to(self.norm.weight.dtype))

    def extra_repr(self) -> str:
        frozen = self.gamma.num_parameters()
        return f"feature={self.config.feature!r}, frozen Gamma parameters={frozen:,}"
