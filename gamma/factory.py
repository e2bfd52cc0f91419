"""create_model / list_models / convert_checkpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .archs.attiqa import AttiqaModel
from .archs.gamma import GammaModel
from .archs.gamma_isp import GammaISP
from .archs.precision import check_precision, resolve_precision
from .archs.promptiqa import PromptIQA
from .config import (
    ATTIQA_VARIANTS,
    GAMMA_ISP_VARIANTS,
    PROMPTIQA_VARIANTS,
    VARIANTS,
    AttiqaConfig,
    GammaConfig,
    GammaISPConfig,
    PromptIQAConfig,
    get_attiqa_variant,
    get_gamma_isp_variant,
    get_promptiqa_variant,
    get_variant,
)
from .hub import KNOWN_WEIGHTS, known_file, resolve_weights, sha256sum
from .weights import (
    STORED_DTYPES,
    Checkpoint,
    CheckpointError,
    infer_config,
    load_into,
    read_checkpoint,
    read_state_dict,
    save_safetensors,
    source_identity,
)

logger = logging.getLogger(__name__)


def list_models(family: str = "gamma") -> list[str]:
    """Names of the registered variants of a model family: ``gamma`` (what the scorer, CLI and trainer take),
    ``attiqa`` (ATTIQA students, docs/attiqa.md), ``promptiqa`` (docs/promptiqa.md), ``gamma_isp`` (Gamma + ISP,
    docs/promptiqa.md#gamma--isp) or ``all``."""
    tables = {"gamma": VARIANTS, "attiqa": ATTIQA_VARIANTS, "promptiqa": PROMPTIQA_VARIANTS,
              "gamma_isp": GAMMA_ISP_VARIANTS}
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
    precision: str | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> GammaModel | AttiqaModel | PromptIQA | GammaISP:
    """Build a Gamma model (or an ATTIQA student, PromptIQA, or Gamma + ISP), optionally loading weights.

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
        precision: ``fp32`` (exact), ``bf16``, ``fp16``, ``int8`` or ``auto`` (the fastest the device runs well;
            the choice is logged): how the image tower computes when scoring (:meth:`GammaModel.to_precision`; an
            unsupported combination is an error). ``None``: as the weights are stored, i.e. fp32, or for a file
            written by ``gamma convert --precision bf16|fp16`` that precision, loaded without conversion; where
            ``device`` runs it slower than fp32, the stored weights are computed in fp32 instead (logged).
        device: the device the model is moved to before the precision is applied and ``auto`` resolved for it
            (default: where it is built, the CPU unless a ``torch.device`` context says otherwise).
        **overrides: config fields (``prompt_set='sdp'``, ``moae_layers=4``, ``num_experts=5``, ``vision={...}`` ...).
            For a release file, ``prompt_set`` says which prompts its weights were trained with (default ``naive``).
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
                                device=device if device is not None else ambient, **overrides)
    # --- end device context
    ckpt = None
    if pretrained is not None:
        implied = _implied_prompt_set(pretrained)
        if implied is not None and "prompt_set" not in overrides:
            overrides = {**overrides, "prompt_set": implied}
        pretrained = resolve_weights(path=pretrained)
        ckpt = read_checkpoint(pretrained, allow_unsafe=allow_unsafe)
    if name in ATTIQA_VARIANTS or (name is None and isinstance(ckpt.config, AttiqaConfig)):
        _fp32_only(precision, "ATTIQA students")
        return _placed(_create_attiqa(name, ckpt, strict=strict, allow_unsafe=allow_unsafe, **overrides), device)
    if name in PROMPTIQA_VARIANTS or (name is None and _is_promptiqa(ckpt)):
        _fp32_only(precision, "PromptIQA models")
        vit_weights = overrides.pop("vit_weights", None) if overrides else None
        model = _create_promptiqa(name, ckpt, strict, overrides)
        if vit_weights is not None:
            if ckpt is not None:
                raise ValueError("pass either pretrained= (a whole PromptIQA model) or vit_weights= (ImageNet ViT "
                                 "weights to train from), not both")
            load_vit_weights(model, read_state_dict(vit_weights, allow_unsafe=allow_unsafe), str(vit_weights))
        return _placed(model, device)
    if name in GAMMA_ISP_VARIANTS or (name is None and isinstance(ckpt.config, GammaISPConfig)):
        _fp32_only(precision, "Gamma + ISP models")
        return _placed(_create_gamma_isp(name, ckpt, strict=strict, allow_unsafe=allow_unsafe, **overrides), device)
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
    if ckpt is None:
        return _placed(GammaModel(config), device).eval().to_precision(precision or "fp32")
    stored, target = _stored_and_target(ckpt, precision, torch.device(device if device is not None else "cpu"))
    if stored != "fp32" and target == stored:  # the file's dtypes as they are: memory-mapped, nothing converted
        model = _build_loaded(lambda: GammaModel(config)._convert_tower(stored), ckpt, strict)
        return _placed(model, device).eval()
    return _placed(_build_loaded(lambda: GammaModel(config), ckpt, strict), device).eval().to_precision(target)


def _placed(model: _M, device: str | torch.device | None) -> _M:
    """``model`` moved to ``device``, or left where it was built (``None``)."""
    return model.to(device) if device is not None else model


def _fp32_only(precision: str | None, family: str) -> None:
    if precision not in (None, "fp32"):
        raise ValueError(f"precision={precision!r} applies to Gamma models; {family} run in fp32")


def _stored_and_target(ckpt: Checkpoint, precision: str | None, device: torch.device) -> tuple[str, str]:
    """The precision a checkpoint stores its image tower in, and the one the model will compute in on ``device``.

    ``precision=None`` keeps the stored one, or falls back to fp32 (logged) where the device runs it slower than
    fp32; an explicit precision is checked by :meth:`GammaModel.to_precision` as usual. Computing in another
    precision than a bf16 / fp16 file stores starts from its rounded weights, which is said in the log.
    """
    stored = ckpt.extra.get("precision", "fp32") if ckpt.kind == "gamma" else "fp32"
    if stored not in STORED_DTYPES:
        raise CheckpointError(f"{ckpt.path}: unknown stored precision {stored!r} (expected one of "
                              f"{', '.join(STORED_DTYPES)})")
    target = resolve_precision(precision if precision is not None else stored, device)
    if stored == "fp32":
        return stored, target
    if target == stored:
        try:
            check_precision(stored, device)
        except ValueError as exc:
            if precision is not None:
                raise
            why = str(exc).split(": ", 1)[-1].split(";")[0]  # e.g. "this CPU has none of amx_bf16, avx512_bf16"
            logger.warning("%s stores its image tower's weights in %s, which would run slower than fp32 here (%s): "
                           "computing in fp32 with those rounded weights instead", ckpt.path, stored, why)
            return stored, "fp32"
    else:
        logger.warning("%s stores its image tower's weights rounded to %s: the %s scores are those of the rounded "
                       "weights (convert the original file again for exact %s scores)", ckpt.path, stored, target,
                       target)
    return stored, target


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
    if ckpt is not None:
        if backbone is not None:
            raise ValueError("pass either pretrained= (a whole student) or backbone= (ImageNet weights), not both")
        return _build_loaded(lambda: AttiqaModel(config), ckpt, strict).eval()
    model = AttiqaModel(config)
    if backbone is not None:
        try:
            model.load_backbone(read_state_dict(backbone, allow_unsafe=allow_unsafe))
        except ValueError as exc:
            raise CheckpointError(f"{backbone}: {exc}") from exc
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


def load_vit_weights(model: PromptIQA, state_dict: dict[str, torch.Tensor], where: str = "ViT weights") -> None:
    """Load a timm ViT state_dict (``vit_base_patch8_224``'s keys: ``cls_token``, ``pos_embed``, ``patch_embed.*``,
    ``blocks.i.*``) into PromptIQA's backbone, strictly; its final norm and classifier are dropped (PromptIQA has
    neither), as the official model replaces them with identities. This is where official training starts."""
    unused = ("norm.", "fc_norm.", "head.", "head_drop.", "pre_logits.")
    sd = {k: v for k, v in state_dict.items() if not k.startswith(unused)}
    own = model.vit.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own
                  and sd[k].shape != own[k].shape]
    problems = [f"{len(v)} {what} key(s): {', '.join(v[:5])}" for what, v in
                (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if v]
    if problems:
        raise CheckpointError(f"{where} does not fit PromptIQA's ViT ({'; '.join(problems)}); it needs timm's "
                              "vit_base_patch8_224 layout")
    model.vit.load_state_dict(sd, strict=True)


def _create_gamma_isp(name: str | None, ckpt: Checkpoint | None, *, strict: bool, allow_unsafe: bool,
                      gamma_weights: str | os.PathLike | None = None, **overrides: Any) -> GammaISP:
    """Gamma + ISP (docs/promptiqa.md#gamma--isp): a variant and/or our checkpoint of one; ``gamma_weights`` names the
    Gamma checkpoint whose frozen features the prompt path reads (its architecture replaces the variant's)."""
    if ckpt is not None and not isinstance(ckpt.config, GammaISPConfig):
        raise CheckpointError(f"{ckpt.path} is a {getattr(ckpt.config, 'family', ckpt.kind)} checkpoint, not a "
                              "Gamma + ISP model")
    config = get_gamma_isp_variant(name) if name is not None else ckpt.config
    config = config.replace(**overrides) if overrides else config
    if ckpt is not None:
        if gamma_weights is not None:
            raise ValueError("pass either pretrained= (a whole Gamma + ISP model) or gamma_weights= (a Gamma to "
                             "start from), not both")
        _check_same_architecture(ckpt.config, config, str(ckpt.path))
        return _build_loaded(lambda: GammaISP(config), ckpt, strict).eval()
    if gamma_weights is None:
        logger.warning("Gamma + ISP without gamma_weights: its Gamma features come from random weights")
        return GammaISP(config).eval()
    gamma = create_model(pretrained=gamma_weights, allow_unsafe=allow_unsafe)
    if not isinstance(gamma, GammaModel):
        raise CheckpointError(f"gamma_weights={gamma_weights}: not a Gamma model ({type(gamma).__name__})")
    return GammaISP(config.replace(gamma=gamma.config), gamma=gamma).eval()


def _check_same_architecture(saved: GammaConfig | AttiqaConfig | PromptIQAConfig | GammaISPConfig,
                             wanted: GammaConfig | AttiqaConfig | PromptIQAConfig | GammaISPConfig,
                             where: str) -> None:
    if type(saved) is not type(wanted):
        raise CheckpointError(f"{where} holds a {getattr(saved, 'family', 'gamma')} model, not a "
                              f"{getattr(wanted, 'family', 'gamma')} model")
    a, b = saved.to_dict(), wanted.to_dict()
    diff = [k for k in a if k not in ("prompt_set", "levels") and a[k] != b[k]]
    if diff:
        raise CheckpointError(f"{where} was saved from a different architecture ({', '.join(diff)} differ)")


# ------------------------------------------------------------------------------------------------ fast loading
_M = TypeVar("_M", bound=nn.Module)

# Constructors whose large results are made on the meta device while a model is built for loading.
_CONSTRUCTORS = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                           torch.empty_strided})
_LARGE = 1 << 16  # elements: every weight matrix of a ViT-B/16 CLIP; not the token buffers or the attention mask


class _LargeTensorsOnMeta(TorchFunctionMode):
    """While active (in this thread only), constructors make floating tensors of >= 65536 elements on the meta device.

    Building a model under it allocates and initialises none of its weight matrices (random init, the experts' deep
    copies: 3 of the 4.4 s it takes to build ViT-B/16 Gamma on 2 cores); small parameters and the buffers computed
    from the config (prompt tokens, pixel statistics, masks) are made as usual. :func:`gamma.weights.load_into` then
    swaps the checkpoint's (memory-mapped) tensors into the meta parameters.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONSTRUCTORS and kwargs.get("device") is None:
            shaped = func(*args, **{**kwargs, "device": "meta"})  # no storage: tells the size for free
            if shaped.numel() >= _LARGE and shaped.is_floating_point():  # weights; never token ids
                return shaped
        return func(*args, **kwargs)


def _build_loaded(build: Callable[[], _M], ckpt: Checkpoint, strict: bool) -> _M:
    """``build()`` with ``ckpt`` loaded: without initialising the weights the checkpoint replaces, when it provides
    every one of them (our checkpoints and the release's); otherwise built and initialised as usual."""
    model = None
    if strict and ckpt.kind != "clip":
        with _LargeTensorsOnMeta():
            candidate = build()
        on_meta = {k for k, v in candidate.state_dict(keep_vars=True).items() if v.is_meta}
        stray = [n for n, b in _non_persistent_buffers(candidate) if b.is_meta] + _meta_attributes(candidate)
        if on_meta <= set(ckpt.state_dict) and not stray:
            model = candidate  # else the checkpoint cannot fill every weight: built the usual way below
    if model is None:
        model = build()
    load_into(model, ckpt, strict=strict)
    left = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    if left:  # a safety net (a strict load fills every key): never hand out weights without storage
        raise CheckpointError(f"{ckpt.path or 'checkpoint'} does not provide {', '.join(left[:6])}"
                              f"{' ...' if len(left) > 6 else ''}")
    return model


def _non_persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    persistent = set(model.state_dict(keep_vars=True))
    return [(n, b) for n, b in model.named_buffers() if n not in persistent]


def _meta_attributes(model: nn.Module) -> list[str]:
    """Plain tensor attributes (neither parameters nor buffers) left on the meta device: values the constructor
    computed from large tensors, which no checkpoint fills."""
    return [f"{prefix}.{name}" for prefix, module in model.named_modules() for name, value in vars(module).items()
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.is_meta]


# ------------------------------------------------------------------------------------------------ converting
def convert_checkpoint(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    precision: str = "fp32",
    prompt_set: str | None = None,
    allow_unsafe: bool = False,
) -> Path:
    """Write a model checkpoint (the release's pickle, ours, a known weight name) as our safetensors file.

    The file records the model config (a converted release file needs no ``prompt_set`` when loaded), the precision
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
            (``Gamma-Prompt.pth``: ``sdp``), else ``naive``.
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
    if prompt_set is None:
        entry = KNOWN_WEIGHTS.get(os.fspath(source)) if not os.path.isfile(source) else known_file(path)
        if entry is not None and entry.prompt_set is not None:
            prompt_set = entry.prompt_set
            logger.info("%s: the %r weights, prompt set %r", path, entry.name, prompt_set)
    ckpt = read_checkpoint(path, allow_unsafe=allow_unsafe)
    if ckpt.kind == "clip":
        raise CheckpointError(f"{path} is a CLIP backbone, not a Gamma model: nothing to convert")
    model = create_model(pretrained=path, allow_unsafe=allow_unsafe, precision="fp32",
                         **({"prompt_set": prompt_set} if prompt_set else {}))
    if not isinstance(model, GammaModel) and precision != "fp32":
        raise ValueError(f"--precision {precision} applies to Gamma models; {path} holds a {type(model).__name__}")
    if isinstance(model, GammaModel):
        model._convert_tower(precision)  # storage only: no device check (the loading device is checked on load)
    return save_safetensors(model, dest, source=source_identity(path, sha256sum(path)))
