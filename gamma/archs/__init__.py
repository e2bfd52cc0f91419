"""nn.Modules only: the MoAE layer, CLIP towers with MoAE, the Gamma model with its head, the ATTIQA student,
PromptIQA, and Gamma + ISP (PromptIQA's prompt path on frozen Gamma features).

Names are imported on first use (PEP 562), so that ``gamma.archs.crops`` (the crop protocol, torch only) can be
imported without open_clip and torchvision, which the model modules need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["AttiqaModel", "attribute_ranking_loss"], ".attiqa"),
    **dict.fromkeys(["CROP_MODES", "CropProtocol"], ".crops"),
    **dict.fromkeys(["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "Adapter", "Assessment", "GammaModel"], ".gamma"),
    **dict.fromkeys(["GammaISP"], ".gamma_isp"),
    **dict.fromkeys(["MoAE", "Router", "keep_only_experts"], ".moae"),
    **dict.fromkeys(["PRECISIONS"], ".precision"),
    **dict.fromkeys(["PromptIQA", "PromptedIQA"], ".promptiqa"),
}

__all__ = [
    "Adapter",
    "Assessment",
    "AttiqaModel",
    "CROP_MODES",
    "CropProtocol",
    "GammaISP",
    "GammaModel",
    "MoAE",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PRECISIONS",
    "PromptIQA",
    "PromptedIQA",
    "Router",
    "attribute_ranking_loss",
    "keep_only_experts",
]

if TYPE_CHECKING:
    from .attiqa import AttiqaModel, attribute_ranking_loss
    from .crops import CROP_MODES, CropProtocol
    from .gamma import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Adapter, Assessment, GammaModel
    from .gamma_isp import GammaISP
    from .moae import MoAE, Router, keep_only_experts
    from .precision import PRECISIONS
    from .promptiqa import PromptedIQA, PromptIQA


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gamma.archs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
