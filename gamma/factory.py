"""create_model / list_models / convert_checkpoint: the model families' common entrance (:mod:`gamma.families`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .families import FAMILIES, Family, family_of_checkpoint, family_of_model, family_of_variant, load_vit_weights
from .hub import KNOWN_WEIGHTS, resolve_prompt_set, resolve_weights, sha256sum
from .weights import STORED_DTYPES, Checkpoint, CheckpointError, read_checkpoint, save_safetensors, source_identity

logger = logging.getLogger(__name__)


def list_models(family: str = "gamma") -> list[str]:
    """Names of the registered variants of a model family (:data:`gamma.families.FAMILIES`): ``gamma`` (what the
    scorer, CLI and trainer take), ``attiqa`` (ATTIQA students, docs/attiqa.md), ``promptiqa`` (docs/promptiqa.md),
    ``gamma_isp`` (Gamma + ISP, docs/promptiqa.md#gamma--isp), any family registered at run time, or ``all``."""
    if family == "all":
        return sorted(name for row in FAMILIES.values() for name in row.variants)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}, all")
    return sorted(FAMILIES[family].variants)


def create_model(
    name: str | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    strict: bool = True,
    allow_unsafe: bool = False,
    precision: str | None = None,
    device: str | torch.device | None = None,
    prompt_set_override: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a Gamma model (or an ATTIQA student, PromptIQA, or Gamma + ISP), optionally loading weights.

    Args:
        name: a variant from :func:`list_models`. Without it, ``pretrained`` is required and the architecture is
            inferred from the checkpoint (our checkpoints carry their config; others are read from tensor shapes).
        pretrained: a checkpoint file: ours, the authors' release (``{'params': ...}``), a plain OpenAI/UniQA CLIP
            state_dict (becomes the backbone; experts start as copies of its MLPs), the official PromptIQA file
            (``{'state_dict': {'module.' + key: ...}, 'prompt_num': n}``), or safetensors of these. Or a known
            weight name (``gamma``, ``gamma_sdp``, ``uniqa``, ``promptiqa``: :data:`gamma.hub.KNOWN_WEIGHTS`), whose
            file :func:`gamma.hub.resolve_weights` finds. The prompt set of a Gamma file follows one rule
            (:func:`gamma.hub.resolve_prompt_set`): the one it records, else the one a known file (``Gamma.pth``,
            ``Gamma-Prompt.pth``, a known name) was trained with, else ``prompt_set``, else ``naive`` with a warning.
        strict: refuse a checkpoint whose keys or shapes do not match exactly (the error names them).
        allow_unsafe: allow a full unpickle for files that cannot be read with ``weights_only=True``.
        precision: ``fp32`` (exact), ``bf16``, ``fp16``, ``int8`` or ``auto`` (the fastest the device runs well;
            the choice is logged): how the image tower computes when scoring (:meth:`GammaModel.to_precision`; an
            unsupported combination is an error). ``None``: as the weights are stored, i.e. fp32, or for a file
            written by ``gamma convert --precision bf16|fp16`` that precision, loaded without conversion; where
            ``device`` runs it slower than fp32, the stored weights are computed in fp32 instead (logged).
        device: the device the model is moved to before the precision is applied and ``auto`` resolved for it
            (default: where it is built, the CPU unless a ``torch.device`` context says otherwise).
        prompt_set_override: a ``prompt_set`` that contradicts the one ``pretrained`` records is meant (scoring a
            model with other prompts); without it that is an error (:class:`gamma.hub.PromptSetError`).
        **overrides: config fields (``prompt_set='sdp'``, ``moae_layers=4``, ``num_experts=5``, ``vision={...}`` ...).
            For a release file, ``prompt_set`` says which prompts its weights were trained with (a file name that
            says otherwise is warned about); for a file that records its prompt set, it must agree (see
            ``prompt_set_override``). With ``name`` and a Gamma file, the file's prompt set replaces the variant's.
            ATTIQA students (``attiqa_*`` variants, or our checkpoint of one) take their own fields
            (``head_hidden=...``) and ``backbone=`` a torchvision ImageNet ResNet weight file, loaded strictly.
            Gamma + ISP (``gamma_isp*`` variants) takes its own fields (``dim=...``, ``feature=...``) and
            ``gamma_weights=`` a Gamma checkpoint (a file or a known name) to put its prompt path on, whose
            architecture replaces the variant's. PromptIQA takes ``vit_weights=`` a timm ``vit_base_patch8_224``
            state_dict file for its backbone (where official training starts; :func:`load_vit_weights`).

    Returns:
        the model in eval mode.

    Raises:
        gamma.hub.WeightsNotFoundError: the file (or the known name's file) does not exist.
    """
    if name is None and pretrained is None:
        known = ", ".join(list_models("all"))
        raise ValueError(f"create_model needs a variant name or a checkpoint; variants: {known}")
    # --- device context (issue 23): a `with torch.device(...)` context would place the tensors built here but not
    # those read from the checkpoint (a mixed-device model). Build and load on the CPU, then move it all there.
    ambient = torch.get_default_device()
    if pretrained is not None and ambient.type != "cpu":
        with torch.device("cpu"):
            return create_model(name, pretrained, strict=strict, allow_unsafe=allow_unsafe, precision=precision,
                                device=device if device is not None else ambient,
                                prompt_set_override=prompt_set_override, **overrides)
    # --- end device context
    ckpt = None
    if pretrained is not None:
        ckpt = read_checkpoint(resolve_weights(path=pretrained), allow_unsafe=allow_unsafe)
    family = family_of_variant(name) if name is not None else family_of_checkpoint(ckpt)
    if ckpt is not None and _has_prompt_sets(family):
        overrides = _with_prompt_set(family, name, ckpt, _known_name(pretrained), prompt_set_override, overrides)
    return family.build(name, ckpt, strict=strict, allow_unsafe=allow_unsafe, precision=precision, device=device,
                        **overrides)


def _has_prompt_sets(family: Family) -> bool:
    """Whether the family's models take a prompt set (a ``prompt_set`` config field: Gamma)."""
    return any(f.name == "prompt_set" for f in dataclasses.fields(family.config_class))


def _known_name(pretrained: str | os.PathLike) -> str | None:
    """The known weight name ``pretrained`` is (``gamma_sdp``), unless a file of that name exists."""
    text = os.fspath(pretrained)
    return text if text in KNOWN_WEIGHTS and not os.path.isfile(text) else None


def _with_prompt_set(family: Family, name: str | None, ckpt: Checkpoint, known: str | None, deliberate: bool,
                     overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with the prompt set of :func:`gamma.hub.resolve_prompt_set` (none for a CLIP backbone: the
    variant's or the one asked for)."""
    prompt_set, how = resolve_prompt_set(ckpt, overrides.get("prompt_set"), deliberate=deliberate, name=known)
    if prompt_set is None or how == "backbone":
        return overrides
    if name is not None and "prompt_set" not in overrides:
        own = family.config_class.variant(name).prompt_set
        if own != prompt_set:
            logger.warning("%s: prompt set %r (%s), not the %r of variant %s", ckpt.path, prompt_set, how, own, name)
    return {**overrides, "prompt_set": prompt_set}


# ------------------------------------------------------------------------------------------------ converting
def convert_checkpoint(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    precision: str = "fp32",
    prompt_set: str | None = None,
    prompt_set_override: bool = False,
    allow_unsafe: bool = False,
) -> Path:
    """Write a model checkpoint (the release's pickle, ours, a known weight name) as our safetensors file.

    The file records the model config, its prompt set included (:func:`gamma.hub.resolve_prompt_set` decides it: a
    converted release file needs no ``prompt_set`` when loaded), the precision
    its weights are stored in, and the source file's name, size, modification time and sha256: the weight lookup
    (:func:`gamma.hub.resolve_weights`) then uses ``X.safetensors`` in place of ``X.pth`` beside it while ``X.pth`` is
    unchanged. Loading it is memory-mapped: seconds instead of a 1 GB unpickle.

    Args:
        source: the checkpoint file or a known name (``gamma``, ``gamma_sdp``).
        dest: the ``.safetensors`` file to write (atomically).
        precision: ``fp32`` (exact), or ``bf16`` / ``fp16``: the model as :meth:`GammaModel.to_precision` makes it
            (the image tower's matmul weights in that dtype, everything else fp32: a smaller file), recorded
            so that loading the file gives the model in that precision, with the scores of an fp32 file converted
            after loading. The file is written whatever this machine runs fast.
        prompt_set: the prompts a release file's weights expect; default: implied by a known weight name or file name
            (``Gamma-Prompt.pth``: ``sdp``), else ``naive`` (with a warning). Must agree with a set the source
            records, unless ``prompt_set_override``.
        prompt_set_override: write a ``prompt_set`` that contradicts the one the source records (deliberately).
        allow_unsafe: allow a full unpickle of a source that needs it.

    Raises:
        CheckpointError: the source cannot be read, or is a CLIP backbone rather than a model.
    """
    dest = Path(dest)
    if dest.suffix != ".safetensors":
        raise ValueError(f"the converted file must end in .safetensors, got {dest}")
    if precision not in STORED_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(STORED_DTYPES)}, got {precision!r}")
    path = resolve_weights(path=source)
    ckpt = read_checkpoint(path, allow_unsafe=allow_unsafe)
    if ckpt.kind == "clip":
        raise CheckpointError(f"{path} is a CLIP backbone, not a Gamma model: nothing to convert")
    # The source as given: a known name says which weights these are (gamma.hub.resolve_prompt_set).
    model = create_model(pretrained=source, allow_unsafe=allow_unsafe, precision="fp32",
                         prompt_set_override=prompt_set_override, **({"prompt_set": prompt_set} if prompt_set else {}))
    convert_tower = getattr(model, "_convert_tower", None)  # the families that store reduced precision (Gamma)
    if convert_tower is None and precision != "fp32":
        raise ValueError(f"--precision {precision} applies to Gamma models; {path} holds a "
                         f"{family_of_model(model).title} model")
    if convert_tower is not None:
        convert_tower(precision)  # storage only: no device check (the loading device is checked on load)
    return save_safetensors(model, dest, source=source_identity(path, sha256sum(path)))


__all__ = ["convert_checkpoint", "create_model", "list_models", "load_vit_weights"]
