"""gamma: generic image quality and aesthetics assessment with a Mixture of Assessment Experts.

The names below are imported on first use (PEP 562): ``import gamma`` loads neither torch's model stack nor
open_clip / torchvision (seconds), so the ``gamma`` command starts quickly and a notebook pays for what it uses.
``from gamma import create_model`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["Assessment", "AttiqaModel", "CropProtocol", "GammaISP", "GammaModel", "MoAE", "PromptIQA",
         "keep_only_experts"], ".archs"
    ),
    **dict.fromkeys(["place"], ".archs.precision"),
    **dict.fromkeys(["AttiqaConfig", "GammaConfig", "GammaISPConfig", "ModelConfig", "PromptIQAConfig", "TextCfg",
                     "VisionCfg"], ".config"),
    **dict.fromkeys(["Family", "Scoring", "register_family"], ".families"),
    **dict.fromkeys(["create_model", "list_models"], ".factory"),
    **dict.fromkeys(["ATTRIBUTES", "DATASET_SCENES", "NAIVE_PROMPTS", "SCENES", "SDP_PROMPTS", "canonical_scene"],
                    ".prompts"),
    **dict.fromkeys(["CheckpointError", "read_checkpoint", "save_checkpoint"], ".weights"),
    **dict.fromkeys(["Scorer", "score_images"], ".scorer"),
}

# Submodules reachable as attributes after a plain ``import gamma`` (gamma.io.load_image, gamma.weights...).
_SUBMODULES = frozenset({"adapt", "analysis", "archs", "assess", "cli", "config", "data", "factory", "families",
                         "hub", "io", "isp", "metrics", "prompt_file", "prompts", "pyiqa_plugin", "scorer", "train",
                         "weights"})

__all__ = [
    "ATTRIBUTES",
    "Assessment",
    "AttiqaConfig",
    "AttiqaModel",
    "CheckpointError",
    "CropProtocol",
    "DATASET_SCENES",
    "Family",
    "GammaConfig",
    "GammaISP",
    "GammaISPConfig",
    "GammaModel",
    "MoAE",
    "ModelConfig",
    "NAIVE_PROMPTS",
    "PromptIQA",
    "PromptIQAConfig",
    "SCENES",
    "SDP_PROMPTS",
    "Scorer",
    "Scoring",
    "TextCfg",
    "VisionCfg",
    "__version__",
    "canonical_scene",
    "create_model",
    "keep_only_experts",
    "list_models",
    "place",
    "read_checkpoint",
    "register_family",
    "save_checkpoint",
    "score_images",
]

if TYPE_CHECKING:  # what static tools see; at run time these come from __getattr__
    from .archs import Assessment, AttiqaModel, CropProtocol, GammaISP, GammaModel, MoAE, PromptIQA, keep_only_experts
    from .archs.precision import place
    from .config import AttiqaConfig, GammaConfig, GammaISPConfig, ModelConfig, PromptIQAConfig, TextCfg, VisionCfg
    from .factory import create_model, list_models
    from .families import Family, Scoring, register_family
    from .prompts import ATTRIBUTES, DATASET_SCENES, NAIVE_PROMPTS, SCENES, SDP_PROMPTS, canonical_scene
    from .scorer import Scorer, score_images
    from .weights import CheckpointError, read_checkpoint, save_checkpoint


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import sets the attribute
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gamma' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


# pyiqa metrics 'gamma' / 'gamma_sdp': registered now if pyiqa is already imported, else right after pyiqa's import.
# Imports neither pyiqa (seconds) nor anything else; installed gamma also runs it at interpreter start, for pyiqa's own
# command line. See _gamma_pyiqa_hook and gamma.pyiqa_plugin.
import _gamma_pyiqa_hook  # noqa: E402

_gamma_pyiqa_hook.install()
