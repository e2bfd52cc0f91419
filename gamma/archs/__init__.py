"""nn.Modules only: the MoAE layer, CLIP towers with MoAE, the Gamma model with its head, the ATTIQA student and
PromptIQA."""

from .attiqa import AttiqaModel, attribute_ranking_loss
from .crops import CROP_MODES, CropProtocol
from .gamma import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Adapter, Assessment, GammaModel
from .moae import MoAE, Router, keep_only_experts
from .precision import PRECISIONS
from .promptiqa import PromptIQA

__all__ = [
    "CROP_MODES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PRECISIONS",
    "Adapter",
    "Assessment",
    "AttiqaModel",
    "CropProtocol",
    "GammaModel",
    "MoAE",
    "PromptIQA",
    "Router",
    "attribute_ranking_loss",
    "keep_only_experts",
]
