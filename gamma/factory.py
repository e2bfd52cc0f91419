"""create_model / list_models."""

from __future__ import annotations

import logging
import os
from typing import Any

from .archs.gamma import GammaModel
from .config import VARIANTS, GammaConfig, get_variant
from .hub import KNOWN_WEIGHTS, resolve_weights
from .weights import CheckpointError, infer_config, load_into, read_checkpoint

logger = logging.getLogger(__name__)


def list_models() -> list[str]:
    """Names of the registered variants."""
    return sorted(VARIANTS)


def create_model(
    name: str | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    strict: bool = True,
    allow_unsafe: bool = False,
    **overrides: Any,
) -> GammaModel:
    """Build a Gamma model, optionally loading weights.

    Args:
        name: a variant from :func:`list_models`. Without it, ``pretrained`` is required and the architecture is
            inferred from the checkpoint (our checkpoints carry their config; others are read from tensor shapes).
        pretrained: a checkpoint file: ours, the authors' release (``{'params': ...}``), a plain OpenAI/UniQA CLIP
            state_dict (becomes the backbone; experts start as copies of its MLPs), or safetensors of these. Or a
            known weight name (``gamma``, ``gamma_sdp``, ``uniqa``: :data:`gamma.hub.KNOWN_WEIGHTS`), whose file
            :func:`gamma.hub.resolve_weights` finds and which implies its prompt set unless ``prompt_set`` is given.
        strict: refuse a checkpoint whose keys or shapes do not match exactly (the error names them).
        allow_unsafe: allow a full unpickle for files that cannot be read with ``weights_only=True``.
        **overrides: config fields (``prompt_set='sdp'``, ``moae_layers=4``, ``num_experts=5``, ``vision={...}`` ...).
            For a release file, ``prompt_set`` says which prompts its weights were trained with (default ``naive``).

    Returns:
        the model in eval mode.

    Raises:
        gamma.hub.WeightsNotFoundError: the file (or the known name's file) does not exist.
    """
    if name is None and pretrained is None:
        raise ValueError(f"create_model needs a variant name or a checkpoint; variants: {', '.join(list_models())}")
    ckpt = None
    if pretrained is not None:
        implied = _implied_prompt_set(pretrained)
        if implied is not None and "prompt_set" not in overrides:
            overrides = {**overrides, "prompt_set": implied}
        pretrained = resolve_weights(path=pretrained)
        ckpt = read_checkpoint(pretrained, allow_unsafe=allow_unsafe)
    if name is not None:
        config = get_variant(name).replace(**overrides) if overrides else get_variant(name)
    elif ckpt.kind == "gamma":
        config = ckpt.config.replace(**overrides) if overrides else ckpt.config
    else:
        config = infer_config(ckpt.state_dict, **overrides)
        if ckpt.kind == "release" and "prompt_set" not in overrides:
            logger.warning("%s does not record its prompt set; assuming 'naive' (pass prompt_set='sdp' for the "
                           "Gamma-Prompt weights)", pretrained)
    if ckpt is not None and ckpt.kind == "gamma" and name is not None:
        _check_same_architecture(ckpt.config, config, str(pretrained))
    model = GammaModel(config)
    if ckpt is not None:
        load_into(model, ckpt, strict=strict)
    return model.eval()


def _implied_prompt_set(pretrained: str | os.PathLike) -> str | None:
    """The prompt set of a known weight name (the release files do not record theirs); None for a file path."""
    text = os.fspath(pretrained)
    entry = KNOWN_WEIGHTS.get(text) if not os.path.isfile(text) else None
    return entry.prompt_set if entry is not None else None


def _check_same_architecture(saved: GammaConfig, wanted: GammaConfig, where: str) -> None:
    a, b = saved.to_dict(), wanted.to_dict()
    diff = [k for k in a if k not in ("prompt_set", "levels") and a[k] != b[k]]
    if diff:
        raise CheckpointError(f"{where} was saved from a different architecture ({', '.join(diff)} differ)")
