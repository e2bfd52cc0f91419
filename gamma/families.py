"""The model families, one row each: what ``create_model``, ``list_models``, checkpoint reading, the ``Scorer``, the
CLI and the pyiqa wrappers need to know about a family, and nothing they must ask a model's class about.

A row (:class:`Family`) names the family's config class (whose ``variants`` are its named models, the tiny test
variant included), its model class, how a model is built from a variant and / or a checkpoint (``build``), how a
checkpoint of the family is recognised (our files record ``family`` in their config; an official file of another
layout has a ``telltale`` key), and how it scores (:class:`Scoring`: reading an image, the forward call, the outputs
beyond the score). Adding a family is one module (config, model) plus one :func:`register_family` call; the built-in
rows are at the end of this module.

Reading top-down: ``Scorer(weights)`` -> :func:`gamma.factory.create_model` -> :func:`gamma.hub.resolve_weights`
and :func:`gamma.weights.read_checkpoint` -> :func:`family_of_checkpoint` -> ``family.build`` ->
:func:`gamma.build.build_loaded` -> :func:`gamma.weights.load_into`; never back up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .archs.attiqa import AttiqaModel
from .archs.gamma import GammaModel
from .archs.gamma_isp import GammaISP
from .archs.precision import place
from .archs.promptiqa import PromptIQA, check_images, resize_like_cv2
from .build import build_loaded, check_same_architecture, stored_and_target
from .config import (
    CONFIG_CLASSES,
    AttiqaConfig,
    GammaConfig,
    GammaISPConfig,
    ModelConfig,
    PromptIQAConfig,
)
from .hub import resolve_prompt_set, resolve_weights
from .io import load_image, load_promptiqa_image
from .weights import (
    PROMPTIQA_TELLTALE,
    TELLTALES,
    Checkpoint,
    CheckpointError,
    infer_config,
    load_into,
    read_checkpoint,
    read_state_dict,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadOptions:
    """How an input is decoded: what :func:`gamma.io.load_image` takes, and PromptIQA's ``backend``."""

    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int | None = None
    backend: str = "cv2"


def _read_rgb(model: nn.Module, source: Any, options: ReadOptions) -> torch.Tensor:  # noqa: ARG001
    return load_image(source, background=options.background, max_pixels=options.max_pixels)


@dataclass(frozen=True)
class Scoring:
    """How a family scores images (what the ``Scorer``, ``gamma score`` and the pyiqa wrappers call).

    Attributes:
        read: ``(model, source, options) -> (3, H, W)`` in [0, 1]: a file path, bytes or PIL image as the model reads
            it (default: :func:`gamma.io.load_image`).
        fit: ``(model, image) -> image``: a decoded image or a caller's tensor made what ``forward`` takes (PromptIQA:
            resized to its input); None: as it is.
        forward: ``(model, batch, context) -> (B,)`` scores; ``context`` is the scene (scene-taking families) or
            the ISP prompt (ISP-taking ones), else None.
        takes_isp: the family scores relative to a set of image-score pairs (ISP), which it needs before scoring.
        outputs: what it gives beyond the score: ``distribution``, ``attributes``, ``scene`` (``scene='auto'``).
        assess: ``(model, batch, scene, attributes) -> list of row dicts`` for the outputs above (None: score only).
        check_scene: ``(model, scene)`` raises on a scene the model does not take (None: it takes none).
        set_crops: ``(model, mode, num, seed)`` sets its test-time crops (None: it has none).
        describe: ``(model) -> str`` for the table's metadata (which towers the attributes come from).
        auto_scenes: ``(model) -> scenes`` it chooses among with ``scene='auto'`` (empty: it cannot choose).
    """

    forward: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]
    read: Callable[[nn.Module, Any, ReadOptions], torch.Tensor] = _read_rgb
    fit: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    takes_isp: bool = False
    outputs: frozenset[str] = frozenset()
    assess: Callable[..., list[dict[str, Any]]] | None = None
    check_scene: Callable[[nn.Module, Any], None] | None = None
    set_crops: Callable[..., None] | None = None
    describe: Callable[[nn.Module], str] | None = None
    auto_scenes: Callable[[nn.Module], tuple[str, ...]] | None = None

    def decode(self, model: nn.Module, source: Any, options: ReadOptions | None = None) -> torch.Tensor:
        """``source`` (a file path, bytes, PIL image or (3, H, W) tensor) as ``forward`` takes it."""
        if isinstance(source, torch.Tensor):
            image = source
        else:
            image = self.read(model, source, options or ReadOptions())
        return self.fit(model, image) if self.fit is not None else image


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the family (``gamma``; recorded as ``family`` in the config of our checkpoints).
        title: the family in messages (``Gamma + ISP``).
        config_class: its config dataclass (a :class:`gamma.config.ModelConfig`; ``config_class.variants`` are its
            named models).
        model_class: the model's class.
        build: ``(name, ckpt, *, strict, allow_unsafe, precision, device, **options) -> model`` in eval mode, placed
            (:func:`gamma.archs.precision.place`): a variant (``name``) and / or a checkpoint (``ckpt``, already
            read; its kind ``native`` or this family's official ``kind``).
        telltale: a key only this family's official (foreign-layout) checkpoints have, and the ``kind`` they are read
            as; None: the family has only our format.
        scoring: how it scores (None: it does not score images by itself).
        reads_release: the authors' Gamma release and plain CLIP files are this family's (Gamma only).
    """

    name: str
    title: str
    config_class: type[ModelConfig]
    model_class: type[nn.Module]
    build: Callable[..., nn.Module]
    scoring: Scoring | None = None
    telltale: str | None = None
    kind: str | None = None
    reads_release: bool = False
    docs: str = field(default="", compare=False)

    @property
    def variants(self) -> dict[str, ModelConfig]:
        return self.config_class.variants


FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add a family to the table (at run time too): its variants become ``create_model`` names, its config class
    reads our checkpoints of it, its telltale key recognises its official files, and the ``Scorer``, ``gamma score``
    and the pyiqa wrappers score with it.

    Raises:
        ValueError: the name, or one of its variant names, is taken (unless ``replace``).
    """
    if not replace and family.name in FAMILIES:
        raise ValueError(f"a model family {family.name!r} is registered already")
    taken = {v: f.name for f in FAMILIES.values() if f.name != family.name for v in f.variants}
    clash = sorted(set(family.variants) & set(taken))
    if clash:
        raise ValueError(f"variant name(s) {', '.join(clash)} of family {family.name!r} belong to another family")
    if family.telltale is not None:
        TELLTALES[family.telltale] = family.kind or family.name
    CONFIG_CLASSES[family.config_class.family] = family.config_class
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family registered at run time (tests)."""
    family = FAMILIES.pop(name)
    if family.telltale is not None:
        TELLTALES.pop(family.telltale, None)
    if CONFIG_CLASSES.get(family.config_class.family) is family.config_class:
        del CONFIG_CLASSES[family.config_class.family]


def get_family(name: str) -> Family:
    """The family called ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_variant(name: str) -> Family:
    """The family a variant name belongs to; an unknown name is an error listing every variant."""
    for family in FAMILIES.values():
        if name in family.variants:
            return family
    known = sorted(v for f in FAMILIES.values() for v in f.variants)
    raise ValueError(f"unknown model {name!r}; available: {', '.join(known)}")


def family_of_checkpoint(ckpt: Checkpoint) -> Family:
    """The family of a checkpoint: the one its config records, the one whose telltale kind it has, else Gamma (the
    release's files and plain CLIP backbones)."""
    if ckpt.config is not None:
        return get_family(ckpt.config.family)
    for family in FAMILIES.values():
        if family.kind is not None and ckpt.kind == family.kind:
            return family
    return next(f for f in FAMILIES.values() if f.reads_release)


def family_of_model(model: nn.Module) -> Family:
    """The family of a model instance (its exact class first, then the nearest base class); a runner (a model that
    is not an ``nn.Module``, e.g. an exported graph run by onnxruntime: :class:`gamma.export.OnnxGammaModel`) names
    the family it was exported from in its ``family`` attribute."""
    own = getattr(model, "family", None)
    if isinstance(own, Family) and not isinstance(model, nn.Module):
        return own
    for family in FAMILIES.values():
        if type(model) is family.model_class:
            return family
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    raise TypeError(f"{type(model).__name__} is not a model of a registered family ({', '.join(FAMILIES)})")


def is_family(model: nn.Module, name: str) -> bool:
    """Whether ``model`` belongs to the family called ``name``."""
    try:
        return family_of_model(model).name == name
    except TypeError:
        return False


def scoring_of(model: nn.Module) -> Scoring:
    """How ``model`` scores images: a runner's own row (its ``scoring`` attribute: how an exported graph is run), else
    its family's; a family without one is an error naming it."""
    own = getattr(model, "scoring", None)
    if isinstance(own, Scoring) and not isinstance(model, nn.Module):
        return own
    family = family_of_model(model)
    if family.scoring is None:
        raise ValueError(f"{family.title} models do not score images by themselves")
    return family.scoring


def _config(family_name: str, name: str | None, ckpt: Checkpoint | None, overrides: dict[str, Any]) -> ModelConfig:
    """The config of a variant and / or our checkpoint, with ``overrides``, checked against the checkpoint's."""
    family = get_family(family_name)
    config = family.config_class.variant(name) if name is not None else ckpt.config
    config = config.replace(**overrides) if overrides else config
    if ckpt is not None and ckpt.config is not None and name is not None:
        check_same_architecture(ckpt.config, config, str(ckpt.path))
    return config


# ------------------------------------------------------------------------------------------------ Gamma
def build_gamma(name: str | None, ckpt: Checkpoint | None, *, strict: bool = True, allow_unsafe: bool = False,
                precision: str | None = None, device: str | torch.device | None = None,
                **overrides: Any) -> GammaModel:
    """Gamma: a variant, our checkpoint, the authors' release file or a CLIP backbone (docs/model.md)."""
    if ckpt is not None and ckpt.kind not in ("native", "release", "clip"):
        title = next((f.title for f in FAMILIES.values() if f.kind == ckpt.kind), ckpt.kind)
        raise CheckpointError(f"{ckpt.path} is an official {title} checkpoint, not a {name or 'Gamma'} model")
    if name is not None or ckpt.kind == "native":
        config = _config("gamma", name, ckpt, overrides)
    else:
        if ckpt.kind == "release" and "prompt_set" not in overrides:  # create_model gives it; other callers: the rule
            overrides = {**overrides, "prompt_set": resolve_prompt_set(ckpt)[0]}
        config = infer_config(ckpt.state_dict, **overrides)
    if ckpt is None:
        return place(GammaModel(config), device).eval().to_precision(precision or "fp32")
    stored, target = stored_and_target(ckpt, precision, torch.device(device if device is not None else "cpu"))
    if stored != "fp32" and target == stored:  # the file's dtypes as they are: memory-mapped, nothing converted
        return place(build_loaded(lambda: GammaModel(config)._convert_tower(stored), ckpt, strict), device).eval()
    return place(build_loaded(lambda: GammaModel(config), ckpt, strict), device, target).eval()


def _gamma_forward(model: GammaModel, batch: torch.Tensor, scene: Any) -> torch.Tensor:
    return model(batch, scene=scene)


def gamma_assess_rows(model: GammaModel, batch: torch.Tensor, scene: Any, attributes: bool) -> list[dict[str, Any]]:
    """One dict per image of :meth:`GammaModel.assess`: score, std, p_<level>, scene, p_<scene>, attribute scores."""
    out = model.assess(batch, scene, attributes=attributes)
    columns: dict[str, list[Any]] = {"score": out.score.float().cpu().tolist(),
                                     "std": out.std.float().cpu().tolist()}
    columns.update({k: v.float().cpu().tolist() for k, v in out.level_columns().items()})
    if out.scenes is not None:
        columns["scene"] = list(out.scenes)
    if out.scene_probabilities is not None:
        probs = out.scene_probabilities.float().cpu()
        columns.update({f"p_{s}": probs[:, k].tolist() for k, s in enumerate(model.auto_scenes)})
    if out.attributes is not None:
        columns.update({k: v.float().cpu().tolist() for k, v in out.attributes.items()})
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


GAMMA_SCORING = Scoring(
    forward=_gamma_forward,
    outputs=frozenset({"distribution", "attributes", "scene"}),
    assess=gamma_assess_rows,
    check_scene=lambda model, scene: model.scene_index(scene, 1, torch.device("cpu")),
    set_crops=lambda model, mode, num, seed: model.set_crop_protocol(mode=mode, num=num, seed=seed),
    describe=lambda model: model.tower_description(),
    auto_scenes=lambda model: tuple(model.auto_scenes) if model.config.prompt_set == "sdp" else (),
)


# ------------------------------------------------------------------------------------------------ ATTIQA
def build_attiqa(name: str | None, ckpt: Checkpoint | None, *, strict: bool = True, allow_unsafe: bool = False,
                 precision: str | None = None, device: str | torch.device | None = None,
                 backbone: str | os.PathLike | None = None, **overrides: Any) -> AttiqaModel:
    """An ATTIQA student (docs/attiqa.md): a variant and/or our checkpoint of one; ``backbone`` names a torchvision
    ImageNet ResNet weight file loaded strictly into a fresh backbone (classifier dropped)."""
    if ckpt is not None and ckpt.kind != "native":
        raise CheckpointError(f"{ckpt.path} is a {ckpt.kind} checkpoint, not an ATTIQA student")
    config = _config("attiqa", name, ckpt, overrides)
    if ckpt is not None:
        if backbone is not None:
            raise ValueError("pass either pretrained= (a whole student) or backbone= (ImageNet weights), not both")
        return place(build_loaded(lambda: AttiqaModel(config), ckpt, strict).eval(), device, precision)
    model = AttiqaModel(config)
    if backbone is not None:
        try:
            model.load_backbone(read_state_dict(backbone, allow_unsafe=allow_unsafe))
        except ValueError as exc:
            raise CheckpointError(f"{backbone}: {exc}") from exc
    return place(model.eval(), device, precision)


ATTIQA_SCORING = Scoring(
    forward=lambda model, batch, context: model(batch),  # noqa: ARG005
    outputs=frozenset(),
    set_crops=lambda model, mode, num, seed: model.set_crop_protocol(mode=mode, num=num, seed=seed),
)


# ------------------------------------------------------------------------------------------------ PromptIQA
def build_promptiqa(name: str | None, ckpt: Checkpoint | None, *, strict: bool = True, allow_unsafe: bool = False,
                    precision: str | None = None, device: str | torch.device | None = None,
                    vit_weights: str | os.PathLike | None = None, **overrides: Any) -> PromptIQA:
    """PromptIQA (docs/promptiqa.md): a variant, the official checkpoint (full size only) or ours; ``vit_weights``
    a timm ``vit_base_patch8_224`` state_dict file for its backbone (where official training starts)."""
    if ckpt is not None and ckpt.kind not in ("native", "promptiqa"):
        raise CheckpointError(f"{ckpt.path} is a {ckpt.kind} checkpoint, not a PromptIQA model")
    if ckpt is not None and ckpt.kind == "native":
        config = _config("promptiqa", name, ckpt, overrides)
    else:  # a variant, or the official layout (which exists only at full size)
        config = PromptIQAConfig.variant(name or "promptiqa")
        config = config.replace(**overrides) if overrides else config
    if ckpt is None:
        model = PromptIQA(config)
        if vit_weights is not None:
            load_vit_weights(model, read_state_dict(vit_weights, allow_unsafe=allow_unsafe), str(vit_weights))
        return place(model.eval(), device, precision)
    if vit_weights is not None:
        raise ValueError("pass either pretrained= (a whole PromptIQA model) or vit_weights= (ImageNet ViT weights to "
                         "train from), not both")
    if strict:  # every tensor is overwritten by the strict load (or it raises): skip the costly random init
        with torch.device("meta"):
            model = PromptIQA(config)
        model.to_empty(device="cpu")
    else:
        model = PromptIQA(config)
    load_into(model, ckpt, strict=strict)
    return place(model.eval(), device, precision)


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


def read_promptiqa(model: PromptIQA, source: Any, options: ReadOptions) -> torch.Tensor:
    """A file path or bytes decoded and resized the official way (:func:`gamma.io.load_promptiqa_image` with
    ``options.backend``); a PIL image read by :func:`gamma.io.load_image` (then :func:`fit_promptiqa`)."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        return load_promptiqa_image(source, model.config.image_size, backend=options.backend,
                                    max_pixels=options.max_pixels)
    return load_image(source, background=options.background, max_pixels=options.max_pixels)


def fit_promptiqa(model: PromptIQA, images: torch.Tensor) -> torch.Tensor:
    """Images (3, H, W) or (B, 3, H, W) resized to the model's input with its own resize (:func:`resize_like_cv2`,
    rounded to the 8-bit grid like the official preprocessing). Where a gradient is wanted (a loss), it passes
    straight through the rounding: the values are those of the rounded images, the gradient that of the bicubic."""
    batch = images if images.dim() == 4 else images[None]
    size = model.config.image_size
    if batch.shape[-2:] != (size, size):
        check_images(batch, check_range=getattr(model, "check_input_range", True))  # before the resize clips
        rounded = resize_like_cv2(batch, size)
        if batch.requires_grad and torch.is_grad_enabled():
            smooth = torch.nn.functional.interpolate(batch.float(), size=(size, size), mode="bicubic",
                                                     align_corners=False)
            rounded = smooth + (rounded - smooth).detach()
        batch = rounded
    return batch if images.dim() == 4 else batch[0]


PROMPTED_SCORING = Scoring(
    forward=lambda model, batch, prompt: model(batch, prompt=prompt),
    read=read_promptiqa,
    fit=fit_promptiqa,
    takes_isp=True,
)


# ------------------------------------------------------------------------------------------------ Gamma + ISP
GAMMA_ISP_SCORING = Scoring(  # reads any image size (its Gamma takes its crops), scored against an ISP set
    forward=lambda model, batch, prompt: model(batch, prompt=prompt),
    takes_isp=True,
)


def build_gamma_isp(name: str | None, ckpt: Checkpoint | None, *, strict: bool = True, allow_unsafe: bool = False,
                    precision: str | None = None, device: str | torch.device | None = None,
                    gamma_weights: str | os.PathLike | None = None, **overrides: Any) -> GammaISP:
    """Gamma + ISP (docs/promptiqa.md#gamma--isp): a variant and/or our checkpoint of one; ``gamma_weights`` names the
    Gamma checkpoint whose frozen features the prompt path reads (its architecture replaces the variant's)."""
    if ckpt is not None and ckpt.kind != "native":
        raise CheckpointError(f"{ckpt.path} is a {ckpt.kind} checkpoint, not a Gamma + ISP model")
    config = _config("gamma_isp", name, ckpt, overrides)
    if ckpt is not None:
        if gamma_weights is not None:
            raise ValueError("pass either pretrained= (a whole Gamma + ISP model) or gamma_weights= (a Gamma to "
                             "start from), not both")
        return place(build_loaded(lambda: GammaISP(config), ckpt, strict).eval(), device, precision)
    if gamma_weights is None:
        logger.warning("Gamma + ISP without gamma_weights: its Gamma features come from random weights")
        return place(GammaISP(config).eval(), device, precision)
    gamma_ckpt = read_checkpoint(resolve_weights(path=gamma_weights), allow_unsafe=allow_unsafe)
    if family_of_checkpoint(gamma_ckpt).name != "gamma":
        raise CheckpointError(f"gamma_weights={gamma_weights}: not a Gamma model")
    known = os.fspath(gamma_weights) if not os.path.isfile(gamma_weights) else None  # a known name: its prompt set
    prompt_set, _ = resolve_prompt_set(gamma_ckpt, name=known)
    gamma = build_gamma(None, gamma_ckpt, allow_unsafe=allow_unsafe,
                        **({"prompt_set": prompt_set} if gamma_ckpt.kind == "release" else {}))
    return place(GammaISP(config.replace(gamma=gamma.config), gamma=gamma).eval(), device, precision)


# ------------------------------------------------------------------------------------------------ the table
GAMMA = register_family(Family("gamma", "Gamma", GammaConfig, GammaModel, build_gamma, GAMMA_SCORING,
                               reads_release=True, docs="docs/model.md"))
ATTIQA = register_family(Family("attiqa", "ATTIQA", AttiqaConfig, AttiqaModel, build_attiqa, ATTIQA_SCORING,
                                docs="docs/attiqa.md"))
PROMPTIQA = register_family(Family("promptiqa", "PromptIQA", PromptIQAConfig, PromptIQA, build_promptiqa,
                                   PROMPTED_SCORING, telltale=PROMPTIQA_TELLTALE,
                                   kind="promptiqa", docs="docs/promptiqa.md"))
GAMMA_ISP = register_family(Family("gamma_isp", "Gamma + ISP", GammaISPConfig, GammaISP, build_gamma_isp,
                                   GAMMA_ISP_SCORING, docs="docs/promptiqa.md#gamma--isp"))

__all__ = ["FAMILIES", "Family", "ReadOptions", "Scoring", "family_of_checkpoint", "family_of_model",
           "family_of_variant", "get_family", "is_family", "load_vit_weights", "register_family", "scoring_of",
           "unregister_family"]
