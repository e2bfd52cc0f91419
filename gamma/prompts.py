"""Prompt tables (data only): the naive level prompts and the Scene-based Differential Prompts (SDP).

The five levels are ordered from worst to best; their order matches the learnable level vector of the score head
(initialised to 0.2, 0.4, 0.6, 0.8, 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence

LEVELS: tuple[str, ...] = ("bad", "poor", "fair", "good", "perfect")

#: Prompts of the released "Gamma" weights.
NAIVE_PROMPTS: tuple[str, ...] = tuple(f"{level} image" for level in LEVELS)

#: Scene names, in a fixed order (the SDP text features are stacked in this order).
SCENES: tuple[str, ...] = ("natural", "aigc", "underwater", "face", "aesthetics")

# (scene prefix, assessed property) of each SDP scene; paper App. A.4 and the release's prompt table.
_SDP_PARTS: dict[str, tuple[str, str]] = {
    "natural": ("natural", "quality"),
    "aigc": ("AI-generated", "quality"),
    "underwater": ("underwater", "quality"),
    "face": ("face", "quality"),
    "aesthetics": ("natural", "aesthetics"),
}

#: Prompts of the released "Gamma-Prompt" weights: scene -> five level prompts.
SDP_PROMPTS: dict[str, tuple[str, ...]] = {
    scene: tuple(f"{prefix} {level}-{prop} image" for level in LEVELS) for scene, (prefix, prop) in _SDP_PARTS.items()
}

#: Prompt sets of the paper's prompt ablation (Table 15): "general" and "quality" use one set for every scene.
GENERAL_PROMPTS: tuple[str, ...] = NAIVE_PROMPTS
QUALITY_PROMPTS: tuple[str, ...] = tuple(f"{level}-quality image" for level in LEVELS)

PROMPT_SETS: tuple[str, ...] = ("naive", "quality", "sdp")

#: Dataset name (lower case, as registered in :mod:`gamma.data`) -> scene.
DATASET_SCENES: dict[str, str] = {
    "live": "natural",
    "csiq": "natural",
    "tid2013": "natural",
    "kadid10k": "natural",
    "livec": "natural",
    "koniq10k": "natural",
    "spaq": "natural",
    "agiqa3k": "aigc",
    "uwiqa": "underwater",
    "gfiqa20k": "face",
    "ava": "aesthetics",
    "aadb": "aesthetics",
    "exbedde": "natural",
    "eciqad": "natural",
    # Beyond the paper's Table 1: LIQE's training set (Table 12), cross-dataset tests (Table 13), ATTIQA's tables.
    "bid": "natural",
    "flive": "natural",
    "aigciqa2023": "aigc",
}

# Accepted spellings of scene names; the canonical names are SCENES.
_SCENE_ALIASES: dict[str, str] = {
    "ai-generated": "aigc",
    "ai_generated": "aigc",
    "aigi": "aigc",
    "aesthetic": "aesthetics",
    "iaa": "aesthetics",
    "uw": "underwater",
}


def canonical_scene(scene: str) -> str:
    """Return the canonical scene name for ``scene`` (case-insensitive, a few aliases accepted).

    Raises:
        ValueError: the scene is unknown; the message lists the known scenes.
    """
    if not isinstance(scene, str):
        raise ValueError(f"scene must be a string, one of {list(SCENES)}; got {type(scene).__name__}")
    key = scene.strip().lower()
    key = _SCENE_ALIASES.get(key, key)
    if key not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; known scenes: {', '.join(SCENES)}")
    return key


def prompt_table(prompt_set: str) -> dict[str, tuple[str, ...]]:
    """Scene -> five level prompts for a prompt set; single-set prompt sets map every scene to the same prompts."""
    if prompt_set == "sdp":
        return dict(SDP_PROMPTS)
    if prompt_set == "naive":
        return {scene: NAIVE_PROMPTS for scene in SCENES}
    if prompt_set == "quality":
        return {scene: QUALITY_PROMPTS for scene in SCENES}
    raise ValueError(f"unknown prompt set {prompt_set!r}; known prompt sets: {', '.join(PROMPT_SETS)}")


def level_prompts(prompt_set: str) -> list[tuple[str, ...]]:
    """The rows of five level prompts a model scores with: one per scene (in :data:`SCENES` order) for SDP, else one.

    Raises:
        ValueError: an unknown prompt set.
    """
    table = prompt_table(prompt_set)
    return [table[s] for s in SCENES] if prompt_set == "sdp" else [table[SCENES[0]]]


# ------------------------------------------------------------------------------------------------ attributes
#: Five image attributes scored zero-shot with CLIP's antonym method: attribute -> (positive prompt, negative prompt).
#: The pairs are the ones ATTIQA selected by its prompt search (Kwon et al., "ATTIQA: Generalizable Image Quality
#: Feature Extractor using Attribute-aware Pretraining", ACCV 2024, Table 1), positive first, no trailing period. The
#: positive prompt is the good pole of every pair, so a high score is good for each attribute: a high "noisiness"
#: score means little noise ("Peerless image" vs "Grainy image").
ATTRIBUTE_PROMPTS: dict[str, tuple[str, str]] = {
    "sharpness": ("Splendid image", "Blurry image"),
    "contrast": ("Distinct image", "Vague image"),
    "brightness": ("Sunny image", "Darkened image"),
    "colorfulness": ("Vibrant image", "Colorless image"),
    "noisiness": ("Peerless image", "Grainy image"),
}

#: Attribute names in a fixed order (columns of attribute tensors).
ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTE_PROMPTS)

# ------------------------------------------------------------------------------------------------ automatic scene
#: The scene name that asks a scene-based (SDP) model to choose each image's scene itself (docs/explain.md).
AUTO_SCENE = "auto"

#: Plain descriptions of what each scene's images look like, for zero-shot scene detection (docs/explain.md). Each
#: scene has the same number of descriptions; their text features are averaged (CLIP's prompt ensembling). They were
#: written for general CLIP vocabulary, not tuned on any dataset.
SCENE_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "natural": ("a photo", "a photo of an everyday scene", "a real photograph taken with a camera"),
    "aigc": ("an AI-generated picture", "a computer-generated image", "a digital rendering"),
    "underwater": ("an underwater photo", "a photo taken under water", "a photo of fish and the sea floor"),
    "face": ("a photo of a face", "a close-up portrait of a person", "a headshot of a person"),
    "aesthetics": ("an artistic photograph", "a professional photo with a beautiful composition", "a fine-art photo"),
}

#: Scenes that ``scene="auto"`` chooses from by default. "aesthetics" is left out: it differs from "natural" by the
#: question asked (aesthetics or technical quality), not by what the picture shows, so content cannot decide it.
AUTO_SCENES: tuple[str, ...] = ("natural", "aigc", "underwater", "face")


def asks_auto(scene: str | Sequence[str] | None) -> bool:
    """Whether a scene argument asks for the automatic scene anywhere (decided from the names, no tensor sync)."""
    names = [scene] if isinstance(scene, str) else scene if isinstance(scene, Sequence) else []
    return any(_is_auto(n) for n in names)


def _is_auto(name: object) -> bool:
    return isinstance(name, str) and name.strip().lower() == AUTO_SCENE


def scene_rows(scene: str | Sequence[str] | None, batch: int) -> list[int] | None:
    """Each image's row of :data:`SCENES` (-1 for ``"auto"``), from one scene for the batch or one per image.

    Raises:
        ValueError: an unknown scene, a scene that is not a string, or one scene per image of the wrong length.
    """
    if scene is None:
        return None
    if isinstance(scene, str):
        names = [scene] * batch
    elif isinstance(scene, Sequence):
        if len(scene) != batch:
            raise ValueError(f"got {len(scene)} scenes for a batch of {batch} images")
        names = list(scene)
    else:
        raise ValueError(f"scene must be a string or a sequence of strings, got {type(scene).__name__}")
    return [-1 if _is_auto(n) else SCENES.index(canonical_scene(n)) for n in names]
