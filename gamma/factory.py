"""create_model / list_models."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .archs.attiqa import AttiqaModel
from .archs.gamma import GammaModel
from .archs.promptiqa import PromptIQA
from .config import (
    ATTIQA_VARIANTS,
    PROMPTIQA_VARIANTS,
    VARIANTS,
    AttiqaConfig,
    GammaConfig,
    PromptIQAConfig,
    get_attiqa_variant,
    get_promptiqa_variant,
    get_variant,
)
from .hub import KNOWN_WEIGHTS, resolve_weights
from .weights import Checkpoint, CheckpointError, infer_config, load_into, read_checkpoint, read_state_dict

logger = logging.getLogger(__name__)


def list_models(family: str = "gamma") -> list[str]:
    """Names of the registered variants of a model family: ``gamma`` (what the scorer, CLI and trainer take),
    ``attiqa`` (ATTIQA students, docs/attiqa.md), ``promptiqa`` (docs/promptiqa.md) or ``all``."""
    tables = {"gamma": VARIANTS, "attiqa": ATTIQA_VARIANTS, "promptiqa": PROMPTIQA_VARIANTS}
    if family == "all":
        return sorted(name for table in tables.values() for name in table)
    if family not in tables:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(tables)}, all")
    return sorted(tables[family])


def create_model(
    name: str | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    strict: bool = True,
    allow_unsafe: bool = False,
    precision: str = "fp32",
    **overrides: Any,
) -> GammaModel | AttiqaModel | PromptIQA:
    """Build a Gamma model (or an ATTIQA student, or PromptIQA), optionally loading weights.

    Args:
        name: a variant from :func:`list_models`. Without it, ``pretrained`` is required and the architecture is
            inferred from the checkpoint (our checkpoints carry their config; others are read from tensor shapes).
        pretrained: a checkpoint file: ours, the authors' release (``{'params': ...}``), a plain OpenAI/UniQA CLIP
            state_dict (becomes the backbone; experts start as copies of its MLPs), the official PromptIQA file
            (``{'state_dict': {'module.' + key: ...}, 'prompt_num': n}``), or safetensors of these. Or a known
            weight name (``gamma``, ``gamma_sdp``, ``uniqa``, ``promptiqa``: :data:`gamma.hub.KNOWN_WEIGHTS`), whose
            file :func:`gamma.hub.resolve_weights` finds and which implies its prompt set unless ``prompt_set`` is
            given.
        strict: refuse a checkpoint whose keys or shapes do not match exactly (the error names them).
        allow_unsafe: allow a full unpickle for files that cannot be read with ``weights_only=True``.
        precision: ``fp32`` (exact), ``bf16``, ``fp16``, ``int8`` or ``auto`` for scoring on the CPU; see
            :meth:`GammaModel.to_precision` (for another device, move the model there, then call that method).
        **overrides: config fields (``prompt_set='sdp'``, ``moae_layers=4``, ``num_experts=5``, ``vision={...}`` ...).
            For a release file, ``prompt_set`` says which prompts its weights were trained with (default ``naive``).
            ATTIQA students (``attiqa_*`` variants, or our checkpoint of one) take their own fields
            (``head_hidden=...``) and ``backbone=`` a torchvision ImageNet ResNet weight file, loaded strictly.

    Returns:
        the model in eval mode.

    Raises:
        gamma.hub.WeightsNotFoundError: the file (or the known name's file) does not exist.
    """
    if name is None and pretrained is None:
        known = ", ".join(list_models("all"))
        raise ValueError(f"create_model needs a variant name or a checkpoint; variants: {known}")
    ckpt = None
    if pretrained is not None:
        implied = _implied_prompt_set(pretrained)
        if implied is not None and "prompt_set" not in overrides:
            overrides = {**overrides, "prompt_set": implied}
        pretrained = resolve_weights(path=pretrained)
        ckpt = read_checkpoint(pretrained, allow_unsafe=allow_unsafe)
    if name in ATTIQA_VARIANTS or (name is None and isinstance(ckpt.config, AttiqaConfig)):
        if precision != "fp32":
            raise ValueError(f"precision={precision!r} applies to Gamma models; ATTIQA students run in fp32")
        return _create_attiqa(name, ckpt, strict=strict, allow_unsafe=allow_unsafe, **overrides)
    if name in PROMPTIQA_VARIANTS or (name is None and _is_promptiqa(ckpt)):
        return _create_promptiqa(name, ckpt, strict, overrides)
    if ckpt is not None and ckpt.kind == "promptiqa":
        raise CheckpointError(f"{ckpt.path} is an official PromptIQA checkpoint, not a {name} model")
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
    return model.eval().to_precision(precision)


def _implied_prompt_set(pretrained: str | os.PathLike) -> str | None:
    """The prompt set of a known weight name (the release files do not record theirs); None for a file path."""
    text = os.fspath(pretrained)
    entry = KNOWN_WEIGHTS.get(text) if not os.path.isfile(text) else None
    return entry.prompt_set if entry is not None else None


def _create_attiqa(name: str | None, ckpt: Checkpoint | None, *, strict: bool, allow_unsafe: bool,
                   backbone: str | os.PathLike | None = None, **overrides: Any) -> AttiqaModel:
    """An ATTIQA student (docs/attiqa.md): a variant and/or our checkpoint of one; ``backbone`` names a torchvision
    ImageNet ResNet weight file loaded strictly into a fresh backbone (classifier dropped)."""
    if ckpt is not None and ckpt.kind != "gamma":
        raise CheckpointError(f"{ckpt.path} is a {ckpt.kind} checkpoint, not an ATTIQA student")
    config = get_attiqa_variant(name) if name is not None else ckpt.config
    config = config.replace(**overrides) if overrides else config
    if ckpt is not None:
        _check_same_architecture(ckpt.config, config, str(ckpt.path))
    model = AttiqaModel(config)
    if backbone is not None:
        if ckpt is not None:
            raise ValueError("pass either pretrained= (a whole student) or backbone= (ImageNet weights), not both")
        try:
            model.load_backbone(read_state_dict(backbone, allow_unsafe=allow_unsafe))
        except ValueError as exc:
            raise CheckpointError(f"{backbone}: {exc}") from exc
    if ckpt is not None:
        load_into(model, ckpt, strict=strict)
    return model.eval()


def _is_promptiqa(ckpt: Checkpoint) -> bool:
    return ckpt.kind == "promptiqa" or isinstance(ckpt.config, PromptIQAConfig)


def _create_promptiqa(name: str | None, ckpt: Checkpoint | None, strict: bool, overrides: dict[str, Any]) -> PromptIQA:
    """PromptIQA (docs/promptiqa.md): a variant, the official checkpoint (full size only) or ours."""
    if ckpt is not None and not _is_promptiqa(ckpt):
        raise CheckpointError(f"{ckpt.path} is a {getattr(ckpt.config, 'family', ckpt.kind)} checkpoint, not a "
                              "PromptIQA model")
    if name is not None:
        config = get_promptiqa_variant(name)
    elif ckpt.kind == "gamma":  # ours carries its config
        config = ckpt.config
    else:  # the official layout exists only at full size
        config = get_promptiqa_variant("promptiqa")
    config = config.replace(**overrides) if overrides else config
    if ckpt is None:
        return PromptIQA(config).eval()
    if ckpt.kind == "gamma" and name is not None:
        _check_same_architecture(ckpt.config, config, str(ckpt.path))
    if strict:  # every tensor is overwritten by the strict load (or it raises): skip the costly random init
        with torch.device("meta"):
            model = PromptIQA(config)
        model.to_empty(device="cpu")
    else:
        model = PromptIQA(config)
    load_into(model, ckpt, strict=strict)
    return model.eval()


def _check_same_architecture(saved: GammaConfig | AttiqaConfig | PromptIQAConfig,
                             wanted: GammaConfig | AttiqaConfig | PromptIQAConfig, where: str) -> None:
    if type(saved) is not type(wanted):
        raise CheckpointError(f"{where} holds a {getattr(saved, 'family', 'gamma')} model, not a "
                              f"{getattr(wanted, 'family', 'gamma')} model")
    a, b = saved.to_dict(), wanted.to_dict()
    diff = [k for k in a if k not in ("prompt_set", "levels") and a[k] != b[k]]
    if diff:
        raise CheckpointError(f"{where} was saved from a different architecture ({', '.join(diff)} differ)")
