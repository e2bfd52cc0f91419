"""nn.Modules only: the MoAE layer, CLIP towers with MoAE, and the Gamma model with its head."""

from .crops import CROP_MODES, CropProtocol
from .gamma import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Adapter, GammaModel
from .moae import MoAE, Router, keep_only_experts

__all__ = [
    "CROP_MODES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "Adapter",
    "CropProtocol",
    "GammaModel",
    "MoAE",
    "Router",
    "keep_only_experts",
]
