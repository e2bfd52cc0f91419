"""gamma: generic image quality and aesthetics assessment with a Mixture of Assessment Experts."""

__version__ = "0.1.0"

from .archs import Assessment, AttiqaModel, CropProtocol, GammaModel, MoAE, PromptIQA, keep_only_experts  # noqa: E402
from .config import GammaConfig, PromptIQAConfig, TextCfg, VisionCfg  # noqa: E402
from .factory import create_model, list_models  # noqa: E402
from .prompts import (  # noqa: E402
    ATTRIBUTES,
    DATASET_SCENES,
    NAIVE_PROMPTS,
    SCENES,
    SDP_PROMPTS,
    canonical_scene,
)
from .weights import CheckpointError, read_checkpoint, save_checkpoint  # noqa: E402

__all__ = [
    "ATTRIBUTES",
    "DATASET_SCENES",
    "NAIVE_PROMPTS",
    "SCENES",
    "SDP_PROMPTS",
    "Assessment",
    "AttiqaModel",
    "CheckpointError",
    "CropProtocol",
    "GammaConfig",
    "GammaModel",
    "MoAE",
    "PromptIQA",
    "PromptIQAConfig",
    "TextCfg",
    "VisionCfg",
    "__version__",
    "canonical_scene",
    "create_model",
    "keep_only_experts",
    "list_models",
    "read_checkpoint",
    "save_checkpoint",
]

# pyiqa metrics 'gamma' / 'gamma_sdp': registered now if pyiqa is already imported, else right after pyiqa's import.
# Imports neither pyiqa (seconds) nor anything else; installed gamma also runs it at interpreter start, for pyiqa's own
# command line. See _gamma_pyiqa_hook and gamma.pyiqa_plugin.
import _gamma_pyiqa_hook  # noqa: E402

_gamma_pyiqa_hook.install()
