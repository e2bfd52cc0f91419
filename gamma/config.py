"""Model configuration dataclasses and the table of named variants."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

from ._dataclass_dict import from_dict, to_dict
from .prompts import ATTRIBUTES, PROMPT_SETS


@dataclass
class VisionCfg:
    """Image tower of an OpenAI-layout CLIP ViT."""

    width: int = 768  # token width D
    layers: int = 12  # number of transformer blocks
    heads: int = 12  # attention heads (OpenAI rule: width // 64)
    patch_size: int = 16  # conv1 stride and kernel
    image_size: int = 224  # input (crop) resolution; positional embedding covers (image_size // patch_size)**2 + 1


@dataclass
class TextCfg:
    """Text tower of an OpenAI-layout CLIP."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77  # BPE tokens incl. SOT/EOT, zero padded
    vocab_size: int = 49408


# ------------------------------------------------------------------------------------------------ one mechanism
C = TypeVar("C", bound="ModelConfig")

#: Family name -> its config class (every :class:`ModelConfig` subclass, as it is defined): what a checkpoint's
#: recorded ``family`` is read with (:func:`config_from_dict`).
CONFIG_CLASSES: dict[str, type[ModelConfig]] = {}


class ModelConfig:
    """What the config dataclass of every model family shares: its family, its named variants, and the mapping form.

    A subclass sets the class attributes ``family`` (the name recorded in checkpoints), ``title`` (the family in
    messages) and, after its definition, ``variants`` (named configs; :meth:`variant` hands out fresh copies). Their
    mapping form records the family (``{"family": "attiqa", ...}``), so a checkpoint's config picks its class;
    ``from_dict`` checks it. Gamma's own mapping form records none (``records_family = False``): a config without a
    family is a Gamma config. An unknown key is an error that names it (:mod:`gamma._dataclass_dict`).
    """

    family: ClassVar[str]  # the ``family`` entry of the mapping form
    title: ClassVar[str]  # the family in messages ("ATTIQA")
    records_family: ClassVar[bool] = True
    variants: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            CONFIG_CLASSES[cls.family] = cls
            cls.variants = {}

    @classmethod
    def variant(cls: type[C], name: str) -> C:
        """A fresh copy of the named variant's config (an unknown name is an error that lists the known ones)."""
        if name not in cls.variants:
            what = "" if cls.family == "gamma" else f"{cls.title} "
            raise ValueError(f"unknown {what}model {name!r}; available: {', '.join(sorted(cls.variants))}")
        return cls.from_dict(cls.variants[name].to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **to_dict(self)} if self.records_family else to_dict(self)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The config of a mapping (``to_dict``'s form); a wrong family or an unknown key is an error naming it."""
        d = dict(d)
        family = d.pop("family", cls.family)
        if family != cls.family:
            article = "an" if cls.title[0] in "AEIOU" else "a"
            raise ValueError(f"not {article} {cls.title} config (family {family!r})")
        return from_dict(cls, d, typed=False, noun=f"{cls.title} config key")

    def replace(self: C, **overrides: Any) -> C:
        """A copy with ``overrides`` applied (an unknown name is an error that lists the known ones)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return from_dict(type(self), to_dict({**fields, **overrides}), typed=False, noun=f"{self.title} option")


def config_from_dict(d: Any) -> ModelConfig:
    """The model config of a mapping a checkpoint records; its ``family`` entry picks the class (none: Gamma)."""
    family = d.get("family", "gamma") if isinstance(d, dict) else "gamma"
    if family not in CONFIG_CLASSES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[family].from_dict(d)


# ------------------------------------------------------------------------------------------------ Gamma
@dataclass
class GammaConfig(ModelConfig):
    """Everything needed to build a Gamma model (and nothing about how it is trained)."""

    family = "gamma"  # class attributes, not fields
    title = "Gamma"
    records_family = False  # a config without a family is Gamma's (the form every Gamma checkpoint has)

    embed_dim: int = 512  # joint image/text embedding width (visual.proj / text_projection columns)
    vision: VisionCfg = field(default_factory=VisionCfg)
    text: TextCfg = field(default_factory=TextCfg)
    moae_layers: int = 6  # MoAE replaces the MLP of the last `moae_layers` blocks of both towers (0 = none)
    num_experts: int = 3  # adaptive experts per MoAE block (0 = plain backbone MLP)
    freeze_shared: bool = True  # the shared expert (pretrained MLP) stays frozen
    merge_factor: bool = True  # scalar alpha per block, zero-initialised; off = adaptive sum added with weight 1
    adapter_reduction: int = 2  # head adapter hidden width = embed_dim // adapter_reduction
    levels: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)  # initial learnable level vector
    prompt_set: str = "naive"  # "naive" | "quality" | "sdp"

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = from_dict(VisionCfg, self.vision, "vision", typed=False, noun="model config key")
        if isinstance(self.text, dict):
            self.text = from_dict(TextCfg, self.text, "text", typed=False, noun="model config key")
        self.levels = tuple(float(v) for v in self.levels)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.prompt_set not in PROMPT_SETS:
            raise ValueError(f"prompt_set must be one of {PROMPT_SETS}, got {self.prompt_set!r}")
        max_layers = min(self.vision.layers, self.text.layers)
        if not 0 <= self.moae_layers <= max_layers:
            raise ValueError(f"moae_layers must be in [0, {max_layers}], got {self.moae_layers}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                raise ValueError(f"{name}.width ({tower.width}) must be divisible by {name}.heads ({tower.heads})")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("vision.image_size must be a multiple of vision.patch_size")
        if len(self.levels) != 5:
            raise ValueError(f"levels must have 5 entries (one per prompt level), got {len(self.levels)}")

    @property
    def has_moae(self) -> bool:
        return self.moae_layers > 0 and self.num_experts > 0

    def moae_blocks(self, num_layers: int) -> list[int]:
        """Indices of the blocks that carry MoAE in a tower of ``num_layers`` blocks."""
        if not self.has_moae:
            return []
        return list(range(num_layers - self.moae_layers, num_layers))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GammaConfig:
        """The config of a mapping (``to_dict``'s form); an unknown key is an error that names it."""
        d = dict(d)
        family = d.pop("family", "gamma")
        if family != "gamma":
            raise ValueError(f"not a Gamma config (family {family!r})")
        return from_dict(cls, d, typed=False, noun="model config key")

    def replace(self, **overrides: Any) -> GammaConfig:
        """A copy with ``overrides`` applied; nested fields accept dicts (``vision={'width': 64}``)."""
        d = self.to_dict()
        for key, value in overrides.items():
            if key not in d:
                raise ValueError(f"unknown model option {key!r}; known options: {', '.join(sorted(d))}")
            if isinstance(d[key], dict) and isinstance(value, dict):
                d[key] = {**d[key], **value}
            elif dataclasses.is_dataclass(value):
                d[key] = asdict(value)
            else:
                d[key] = value
        return GammaConfig.from_dict(d)


# Named variants. ``gamma_vitb16`` is the paper's model (CLIP ViT-B/16 + MoAE in the last 6 blocks, 3 experts).
VARIANTS: dict[str, GammaConfig] = {
    "gamma_vitb16": GammaConfig(),
    "gamma_vitb16_sdp": GammaConfig(prompt_set="sdp"),
    # The plain backbone with the score head ("w/o MoAE" rows of the paper's ablations).
    "clip_vitb16_head": GammaConfig(moae_layers=0, num_experts=0),
    # Tiny variants for tests and the offline demo: same structure, widths 64, 4 blocks, patch 32.
    "gamma_test": GammaConfig(
        embed_dim=64,
        vision=VisionCfg(width=64, layers=4, heads=1, patch_size=32, image_size=224),
        text=TextCfg(width=64, layers=4, heads=1),
        moae_layers=2,
    ),
    "gamma_test_sdp": GammaConfig(
        embed_dim=64,
        vision=VisionCfg(width=64, layers=4, heads=1, patch_size=32, image_size=224),
        text=TextCfg(width=64, layers=4, heads=1),
        moae_layers=2,
        prompt_set="sdp",
    ),
}


GammaConfig.variants = VARIANTS


# ------------------------------------------------------------------------------------------------ ATTIQA student
@dataclass
class AttiqaConfig(ModelConfig):
    """An ATTIQA student (docs/attiqa.md): a torchvision ResNet with Bottleneck blocks, five attribute heads and a MOS
    regressor over the heads' hidden features. The defaults are ResNet-50."""

    family = "attiqa"  # not annotated: a class attribute, not a field (recorded by to_dict, checked by from_dict)
    title = "ATTIQA"
    prompt_set = None  # class attribute: a student has no prompts (for code that asks any model for its prompt set)

    layers: tuple[int, ...] = (3, 4, 6, 3)  # Bottleneck blocks per stage (ResNet-50); the feature is 2048 wide
    width_per_group: int = 64  # Bottleneck inner width per 64 channels (64 = ResNet-50; smaller only for tests)
    head_hidden: int = 512  # hidden width of each attribute head: Linear(2048, h) -> ReLU -> Linear(h, 1)
    regressor_hidden: int = 512  # hidden width of the MOS regressor over the 5 * head_hidden concatenated features
    crop_size: int = 320  # test crops (the paper follows QPT: five 320 x 320 crops, averaged)
    resize: int = 340  # test images are first resized so their short side is this (0: keep the size)
    # One attribute head per name, the teacher's columns in this order; Table 7's single-prompt ablation: ("quality",)
    attributes: tuple[str, ...] = ATTRIBUTES

    def __post_init__(self) -> None:
        self.layers = tuple(int(n) for n in self.layers)
        self.attributes = tuple(str(a) for a in self.attributes)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be 4 block counts >= 1 (one per ResNet stage), got {self.layers}")
        for name in ("width_per_group", "head_hidden", "regressor_hidden", "crop_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resize and self.resize < self.crop_size:
            raise ValueError(f"resize ({self.resize}) must be 0 or at least crop_size ({self.crop_size})")
        if not self.attributes or len(set(self.attributes)) < len(self.attributes) or not all(self.attributes):
            raise ValueError(f"attributes must be distinct non-empty names (one head each), got {self.attributes}")

#: Named ATTIQA students. ``attiqa_resnet50`` is the paper's; ``attiqa_test`` keeps its structure (Bottleneck blocks,
#: a 2048-wide feature, five heads, the regressor) with one block per stage, narrow blocks and small heads.
ATTIQA_VARIANTS: dict[str, AttiqaConfig] = {
    "attiqa_resnet50": AttiqaConfig(),
    "attiqa_test": AttiqaConfig(layers=(1, 1, 1, 1), width_per_group=8, head_hidden=32, regressor_hidden=32,
                                crop_size=64, resize=72),
}


AttiqaConfig.variants = ATTIQA_VARIANTS
# ------------------------------------------------------------------------------------------------ PromptIQA
@dataclass
class PromptIQAConfig(ModelConfig):
    """Everything needed to build a PromptIQA model (docs/promptiqa.md).

    The defaults are the official model (ViT-B/8 at 224, 128-d features); the fixed parts of its structure (LayerNorm
    eps, qkv biases, exact GELU, the MAL reshapes) are not options.
    """

    family = "promptiqa"  # not annotated: a class attribute, not a field (recorded by to_dict, checked by from_dict)
    title = "PromptIQA"

    image_size: int = 224  # every image (target and prompt) is resized to image_size x image_size
    patch_size: int = 8  # ViT patch; grid = image_size // patch_size tokens per side (28)
    vit_width: int = 768  # ViT token width D; also the width of the MAL modules and of the D-wide block
    vit_depth: int = 12  # ViT blocks
    vit_heads: int = 12  # ViT heads (and heads of the D-wide block after the fusion MAL)
    taps: tuple[int, ...] = (2, 5, 8, 11)  # 0-based ViT blocks whose outputs (CLS dropped) are the MAL views
    num_mals: int = 3  # parallel MAL modules ("different opinion features"), fused by one more MAL
    cnn_channels: tuple[int, ...] = (256, 128)  # widths of the first two convs of the CNN head (the last is `dim`)
    cnn_kernels: tuple[int, ...] = (5, 3, 3)  # kernel of each of the three convs
    cnn_pools: tuple[int, ...] = (2, 2, 3)  # average-pool window after each conv; the head must end at 1 x 1
    dim: int = 128  # image / prompt feature width
    heads: int = 4  # heads of every dim-wide transformer block
    prompt_blocks: int = 3  # prompt encoder (image-score pair fusion) blocks
    ispp_blocks: int = 3  # ISPP fusion blocks (run over the prompt features before they meet the image)
    fusion_blocks: int = 8  # image-prompt fusion blocks
    drop: float = 0.1  # dropout in the MAL attention blocks and in the score head
    # Table 6 "w/o prompt": no ISPP, prompt encoder or fusion module; the visual feature goes straight to the regression
    # (LayerNorm, 2 FC, sigmoid). Prompts are then accepted and ignored.
    no_prompt: bool = False

    def __post_init__(self) -> None:
        self.taps = tuple(int(t) for t in self.taps)
        self.cnn_channels = tuple(int(c) for c in self.cnn_channels)
        self.cnn_kernels = tuple(int(k) for k in self.cnn_kernels)
        self.cnn_pools = tuple(int(p) for p in self.cnn_pools)
        self.validate()

    @property
    def grid(self) -> int:
        """Tokens per side of the ViT (28 for the official model)."""
        return self.image_size // self.patch_size

    def cnn_sizes(self) -> list[int]:
        """Spatial size after each conv and each pool of the CNN head, starting from :attr:`grid`."""
        sizes, size = [], self.grid
        for kernel, pool in zip(self.cnn_kernels, self.cnn_pools, strict=False):
            size = size - kernel + 1
            sizes.append(size)
            size = size // pool if size > 0 else 0
            sizes.append(size)
        return sizes

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        for name, width, heads in (("vit_width", self.vit_width, self.vit_heads), ("dim", self.dim, self.heads)):
            if heads < 1 or width % heads:
                raise ValueError(f"{name} ({width}) must be divisible by its number of heads ({heads})")
        if self.vit_width % 8:
            raise ValueError(f"vit_width must be divisible by 8 (MAL query/key width), got {self.vit_width}")
        increasing = list(self.taps) == sorted(set(self.taps))
        if not self.taps or not increasing or self.taps[0] < 0 or self.taps[-1] >= self.vit_depth:
            raise ValueError(f"taps must be increasing block indices in [0, {self.vit_depth}), got {self.taps}")
        if self.num_mals < 1:
            raise ValueError(f"num_mals must be >= 1, got {self.num_mals}")
        if len(self.cnn_channels) != 2 or len(self.cnn_kernels) != 3 or len(self.cnn_pools) != 3:
            raise ValueError("the CNN head has three convs: cnn_channels needs 2 entries, cnn_kernels and cnn_pools 3")
        sizes = self.cnn_sizes()
        if min(sizes) < 1 or sizes[-1] != 1:
            raise ValueError(f"the CNN head must reduce the {self.grid}x{self.grid} grid to 1x1, but cnn_kernels="
                             f"{self.cnn_kernels} and cnn_pools={self.cnn_pools} give sizes {sizes}")
        for name in ("prompt_blocks", "ispp_blocks", "fusion_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {self.drop}")

#: Named PromptIQA variants. ``promptiqa`` is the official model (318,159,200 parameters); ``promptiqa_test`` has the
#: same structure at toy widths (a 6 x 6 token grid, so its CNN head uses smaller kernels and pools).
PROMPTIQA_VARIANTS: dict[str, PromptIQAConfig] = {
    "promptiqa": PromptIQAConfig(),
    "promptiqa_test": PromptIQAConfig(
        image_size=48, patch_size=8, vit_width=16, vit_depth=4, vit_heads=2, taps=(0, 1, 2, 3),
        cnn_channels=(16, 16), cnn_kernels=(3, 1, 2), cnn_pools=(2, 1, 1), dim=16, heads=2,
    ),
}


PromptIQAConfig.variants = PROMPTIQA_VARIANTS


# ------------------------------------------------------------------------------------------------ Gamma + ISP
GAMMA_ISP_FEATURES: tuple[str, ...] = ("backbone", "adapted")


@dataclass
class GammaISPConfig(ModelConfig):
    """Gamma + ISP (docs/promptiqa.md#gamma--isp): PromptIQA's prompt path on the image features of a frozen Gamma.

    The prompt path has PromptIQA's structure (the same modules); its widths default to the official ones.
    """

    family = "gamma_isp"  # not annotated: a class attribute, not a field (recorded by to_dict, checked by from_dict)
    title = "Gamma + ISP"

    gamma: GammaConfig = field(default_factory=GammaConfig)  # the frozen Gamma's architecture (read from its weights)
    feature: str = "backbone"  # Gamma's image-tower output ('backbone') or the adapter-refined, normalised 'adapted'
    dim: int = 128  # prompt-path width (Gamma's feature is projected to it)
    heads: int = 4  # heads of every prompt-path block
    prompt_blocks: int = 3  # prompt encoder (image-score pair fusion) blocks
    ispp_blocks: int = 3  # ISPP fusion blocks
    fusion_blocks: int = 8  # image-prompt fusion blocks
    drop: float = 0.1  # dropout in the score head

    def __post_init__(self) -> None:
        if isinstance(self.gamma, dict):
            self.gamma = GammaConfig.from_dict(self.gamma)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if not isinstance(self.gamma, GammaConfig):
            raise ValueError(f"gamma must be a Gamma model config, got {type(self.gamma).__name__}")
        if self.feature not in GAMMA_ISP_FEATURES:
            raise ValueError(f"feature must be one of {', '.join(GAMMA_ISP_FEATURES)}, got {self.feature!r}")
        if self.heads < 1 or self.dim % self.heads or self.dim < 2:
            raise ValueError(f"dim ({self.dim}) must be at least 2 and divisible by heads ({self.heads})")
        for name in ("prompt_blocks", "ispp_blocks", "fusion_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {self.drop}")

    def replace(self, **overrides: Any) -> GammaISPConfig:
        """A copy with ``overrides`` applied; ``gamma`` accepts a dict of Gamma config fields (or a whole config)."""
        gamma = overrides.get("gamma")
        if isinstance(gamma, dict):
            overrides = {**overrides, "gamma": self.gamma.replace(**gamma)}
        return super().replace(**overrides)


#: Named Gamma + ISP variants. ``gamma_isp`` puts the official prompt-path widths on the paper's Gamma (ViT-B/16);
#: ``gamma_isp_test`` the same structure at toy widths on ``gamma_test``. With ``gamma_weights=`` (create_model) the
#: Gamma architecture is read from the weights file instead.
GAMMA_ISP_VARIANTS: dict[str, GammaISPConfig] = {
    "gamma_isp": GammaISPConfig(gamma=VARIANTS["gamma_vitb16"]),
    "gamma_isp_test": GammaISPConfig(gamma=VARIANTS["gamma_test"], dim=16, heads=2),
}


GammaISPConfig.variants = GAMMA_ISP_VARIANTS


def get_variant(name: str) -> GammaConfig:
    """A fresh copy of a named Gamma variant's config (:meth:`ModelConfig.variant`)."""
    return GammaConfig.variant(name)


# The per-family getters of earlier versions, kept as names.
get_attiqa_variant = AttiqaConfig.variant
get_promptiqa_variant = PromptIQAConfig.variant
get_gamma_isp_variant = GammaISPConfig.variant
