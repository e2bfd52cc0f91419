"""A scorer for notebooks and scripts: paths, folders, PIL images or tensors in; a table of scores out.

    >>> scorer = Scorer("Gamma.pth")                       # or Scorer() to find the file (see gamma.hub)
    >>> scorer.score("photos/")                            # pandas DataFrame: name, score
    >>> Scorer("Gamma-Prompt.pth", prompt_set="sdp", scene="underwater").score(["a.jpg", pil_image, tensor])
    >>> Scorer("Gamma.pth", attributes=True, distribution=True).score("photos/")   # + std, p_bad ..., sharpness ...
    >>> Scorer("Gamma-Prompt.pth", prompt_set="sdp", scene="auto").score("photos/")  # + scene (chosen per image)
    >>> Scorer("best_model.pth.tar", prompt="isp.csv").score("photos/")           # PromptIQA, on the prompt's scale
    >>> Scorer("Gamma.pth", prompt="isp.csv").score("photos/")                    # + adapted (Gamma mapped onto it)

Images are decoded by :func:`gamma.io.load_image` in background threads, scored in batches of equal-sized images under
``torch.inference_mode()``, and streamed: :meth:`Scorer.iter_scores` holds at most one batch of decoded images, so a
million files cost no more memory than ten. PromptIQA models read files with
:func:`gamma.io.load_promptiqa_image` instead (the official preprocessing: the whole image resized to 224), and
the prompt's images go through that same reader.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .adapt import MIN_PAIRS, Adaptation, NotEnoughPairsError, fit
from .archs.gamma import GammaModel
from .archs.promptiqa import PromptIQA, check_images, resize_like_cv2
from .data.meta import denormalize_mos, normalize_mos
from .data.promptiqa import random_vertical_flip
from .factory import create_model
from .io import MAX_PIXELS, PROMPTIQA_BACKENDS, ImageDecodeError, iter_image_files, load_image, load_promptiqa_image
from .prompt_file import PromptFileError, PromptPairs, as_prompt_pairs, normalized_prompt_scores
from .prompts import ATTRIBUTES, AUTO_SCENE, LEVELS

logger = logging.getLogger(__name__)

#: Columns ``distribution=True`` adds: the standard deviation of the levels, then one probability per level.
DISTRIBUTION_COLUMNS: tuple[str, ...] = ("std", *(f"p_{level}" for level in LEVELS))

#: Outputs :meth:`Scorer.adapt` can map from, by name; any list of these column names works too.
ADAPT_OUTPUTS: dict[str, tuple[str, ...]] = {
    "score": ("score",),
    "distribution": ("score", *DISTRIBUTION_COLUMNS[1:]),
    "all": ("score", *DISTRIBUTION_COLUMNS[1:], *ATTRIBUTES),
}


@dataclass
class ScoreResult:
    """The score of one input; ``score`` is NaN and ``error`` says why when it could not be scored.

    ``values`` holds the extra columns asked for (``adapted``, ``std``, ``p_bad`` ..., ``scene``, attribute scores),
    by column name in output order; NaN (``None`` for ``scene``) for an input that failed.
    """

    name: str
    score: float
    mos: float | None = None
    error: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def to_mos(score: float | np.ndarray | torch.Tensor, lo: float, hi: float, lower_better: bool = False) -> Any:
    """Map normalised scores (0 = worst, 1 = best) back to a dataset's label scale.

    :func:`gamma.data.meta.denormalize_mos`, the inverse of the training normalisation ``y = (mos - lo) / (hi - lo)``
    (``y = 1 - y`` for DMOS-like labels, ``lower_better``), with the range given as two numbers; ``hi < lo`` reads
    as a reversed scale. Tensors give tensors.
    """
    return _with_range(denormalize_mos, score, lo, hi, lower_better)


def from_mos(mos: float | np.ndarray | torch.Tensor, lo: float, hi: float, lower_better: bool = False) -> Any:
    """Normalise labels on a dataset's scale to [0, 1], higher is better (:func:`gamma.data.meta.normalize_mos`; the
    inverse of :func:`to_mos`)."""
    return _with_range(normalize_mos, mos, lo, hi, lower_better)


def _with_range(convert: Callable[..., Any], values: Any, lo: float, hi: float, lower_better: bool) -> Any:
    if hi == lo:
        raise ValueError(f"MOS range must not be empty, got lo = hi = {lo}")
    # A reversed range (hi < lo) is the ordered one with the label direction flipped.
    mos_range, lower_better = ((lo, hi), lower_better) if lo < hi else ((hi, lo), not lower_better)
    if isinstance(values, torch.Tensor):
        out = convert(values.detach().cpu().numpy(), mos_range, lower_better)
        return torch.as_tensor(out, dtype=values.dtype, device=values.device)
    return convert(values, mos_range, lower_better)


def default_device() -> torch.device:
    """CUDA when available, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# One input item: its display name and a function that decodes it into (3, H, W) in [0, 1].
_Item = tuple[str, Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class _Plan:
    """What one scoring run computes: the scene, the model outputs needed, the extra columns written."""

    scene: Any
    needs: frozenset[str]  # of "distribution", "attributes", "scene" (Gamma's assess), "adapted"
    columns: tuple[str, ...]  # extra columns of each result, in output order


class Scorer:
    """Score images with a Gamma model, or with PromptIQA against a prompt.

    Args:
        weights: a weight file (the release's, ours, PromptIQA's, or a CLIP backbone) or a known name (``gamma``,
            ``gamma_sdp``, ``promptiqa``). ``None`` with ``model=None`` finds the release file through
            :func:`gamma.hub.resolve_weights`.
        model: a :class:`~gamma.archs.GammaModel` or :class:`~gamma.archs.PromptIQA` to use as is, or a variant name
            from :func:`gamma.list_models` (``gamma`` or ``promptiqa`` family; random-init unless ``weights`` is
            given: for tests and demos).
        prompt_set: prompts the weights expect (``naive`` | ``sdp`` | ``quality``). The release's files do not record
            it; ``None`` takes it from the named weights or our checkpoint, else ``naive``.
        scene: default scene for SDP models (``natural``, ``aigc``, ``underwater``, ``face``, ``aesthetics``), or
            ``auto`` to let the model choose per image (adds a ``scene`` column; docs/explain.md).
        device: where to run (default: CUDA, else MPS, else CPU).
        precision: how the image tower computes: ``fp32`` (exact), ``bf16``, ``fp16``, ``int8`` (CPU) or ``auto``
            (the fastest ``device`` runs well; the choice is logged); a precision the device lacks is an error.
            ``None``: as the weights are stored (fp32, or what ``gamma convert --precision`` stored). See
            :meth:`gamma.GammaModel.to_precision` and docs/performance.md.
        batch_size: images scored per forward pass (images of one size are batched together).
        crops: test-time crop mode (``random`` (release), ``grid``, ``five``, ``center``, ``resize``); ``None`` keeps
            the model's protocol. ``num_crops`` and ``seed`` refine it (PromptIQA: ``seed`` seeds ``prompt_flip``).
        mos_range: ``(lo, hi)`` of a dataset's label scale: adds a ``mos`` column (see :func:`to_mos`). PromptIQA:
            the prompt's scores are on this scale (normalised to [0, 1] for the model).
        lower_better: the dataset's labels are DMOS-like (lower is better).
        background: RGB colour that transparent images are composited on.
        max_pixels: decompression-bomb limit of the decoder.
        num_workers: decoding threads (0 decodes in the calling thread).
        attributes: add the five zero-shot attribute scores (``sharpness, contrast, brightness, colorfulness,
            noisiness``; Gamma models). ``metadata['attributes_from']`` says which towers produced them.
        distribution: add ``std, p_bad, p_poor, p_fair, p_good, p_perfect`` (Gamma models), and with
            ``scene='auto'`` the scene probabilities ``p_natural`` ... (one per ``model.auto_scenes``).
        prompt: image-score pairs: a CSV ``image,score`` (paths relative to the CSV), a dict ``{image: score}`` or a
            list of ``(image, score)``. PromptIQA scores relative to it (:meth:`set_prompt`; required before
            scoring). A Gamma model is adapted to it (:meth:`adapt`): an ``adapted`` column on the prompt's scale.
        adapt_outputs: which Gamma outputs :meth:`adapt` maps from (``score``, ``distribution``, ``all``).
        prompt_flip: PromptIQA: flip each prompt image upside down with p = 0.5 for every batch, as the official test
            code does (scores then depend on the batch; for exact reproduction only).
        backend: PromptIQA: how files are decoded and resized, ``cv2`` (the official path; default) or ``pil``
            (:func:`gamma.io.load_promptiqa_image`). ``onnxruntime``: ``weights`` is a graph written by
            ``gamma export`` (:mod:`gamma.export`), run by onnxruntime on the CPU with the same decoding and crops.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        *,
        model: GammaModel | PromptIQA | str | None = None,
        prompt_set: str | None = None,
        scene: str | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        batch_size: int = 8,
        crops: str | None = None,
        num_crops: int | None = None,
        seed: int | None = None,
        mos_range: tuple[float, float] | None = None,
        lower_better: bool = False,
        background: tuple[int, int, int] = (255, 255, 255),
        max_pixels: int | None = MAX_PIXELS,
        num_workers: int | None = None,
        allow_unsafe: bool = False,
        attributes: bool = False,
        distribution: bool = False,
        prompt: Any = None,
        adapt_outputs: str | Sequence[str] = "score",
        prompt_flip: bool = False,
        backend: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mos_range is not None:
            lo, hi = (float(v) for v in mos_range)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
                raise ValueError(f"mos_range must be two different finite numbers, got {mos_range}")
            mos_range = (lo, hi)
        if backend == "onnxruntime":  # an exported graph (gamma.export): `weights` is the .onnx file
            if model is not None or precision not in (None, "fp32"):
                raise ValueError("backend='onnxruntime' runs the .onnx file given as weights, in fp32; pass no model "
                                 "or precision")
            from .export import OnnxGammaModel

            model, weights, backend, device = OnnxGammaModel(weights), None, None, "cpu"
        self.device = torch.device(device) if device is not None else default_device()
        self.model = self._build(weights, model, prompt_set, allow_unsafe, precision, self.device).eval()
        self.batch_size = batch_size
        self.mos_range = mos_range
        self.lower_better = lower_better
        self.background = background
        self.max_pixels = max_pixels
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else max(0, int(num_workers))
        self.attributes = bool(attributes)
        self.distribution = bool(distribution)
        self.scene = scene
        self.adaptation: Adaptation | None = None
        self.adapt_scene: Any = None  # the scene the adaptation's features were computed with
        #: What a table of these scores needs to be read right: the model family, the towers behind the attribute
        #: scores, the prompt and the fit report of an adaptation. ``score`` copies it into ``DataFrame.attrs``.
        self.metadata: dict[str, Any] = {"model": "promptiqa" if self.is_promptiqa else "gamma"}
        self._isp: torch.Tensor | None = None
        self._flip: torch.Generator | None = None
        if self.is_promptiqa:
            self._setup_promptiqa(crops, num_crops, seed, prompt, prompt_flip, backend)
            return
        if prompt_flip or backend is not None:
            raise ValueError("prompt_flip and backend apply to PromptIQA models; this is a Gamma model")
        if crops is not None or num_crops is not None or seed is not None:
            self.model.set_crop_protocol(mode=crops, num=num_crops, seed=seed)
        if scene is not None:
            self.model.scene_index(scene, 1, torch.device("cpu"))  # validate the name now, not after decoding
        if self.attributes:
            self.metadata["attributes_from"] = self.model.tower_description()
            logger.info("attribute scores from %s", self.metadata["attributes_from"])
        if prompt is not None:
            self.adapt(prompt, outputs=adapt_outputs)

    @staticmethod
    def _build(weights: Any, model: Any, prompt_set: str | None, allow_unsafe: bool, precision: str | None,
               device: torch.device) -> GammaModel | PromptIQA:
        if type(model).__name__ == "OnnxGammaModel":  # gamma.export's runner: the interface of a GammaModel
            return model
        if isinstance(model, (GammaModel, PromptIQA)):
            if weights is not None or prompt_set is not None:
                raise ValueError("pass either a model instance or weights/prompt_set, not both")
            model = model.to(device)  # first the device, then the precision for it
            if isinstance(model, PromptIQA):
                if precision not in (None, "fp32"):
                    raise ValueError(f"precision={precision!r} applies to Gamma models; PromptIQA runs in fp32")
                return model
            return model.to_precision(precision) if precision is not None else model
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a GammaModel, a PromptIQA or a variant name, got {type(model).__name__}")
        if model is None and weights is None:  # the release file for these prompts, found by gamma.hub
            weights = "gamma_sdp" if prompt_set == "sdp" else "gamma"
        overrides = {"prompt_set": prompt_set} if prompt_set else {}
        built = create_model(model, pretrained=weights, allow_unsafe=allow_unsafe, precision=precision, device=device,
                             **overrides)
        if not isinstance(built, (GammaModel, PromptIQA)):
            raise ValueError(f"the scorer takes Gamma and PromptIQA models, not a {type(built).__name__}")
        return built

    @property
    def is_promptiqa(self) -> bool:
        return isinstance(self.model, PromptIQA)

    # ------------------------------------------------------------------------------------------------ PromptIQA
    def _setup_promptiqa(self, crops: str | None, num_crops: int | None, seed: int | None, prompt: Any,
                         prompt_flip: bool, backend: str | None) -> None:
        size = self.model.config.image_size
        if crops is not None or num_crops is not None:
            raise ValueError(f"PromptIQA scores the whole image resized to {size}x{size}: crops and num_crops apply "
                             "to Gamma models")
        if self.scene is not None:
            raise ValueError("scenes apply to Gamma models with scene-based prompts; PromptIQA takes its task from "
                             "the prompt")
        if self.attributes or self.distribution:
            raise ValueError("attributes and distribution are Gamma outputs; PromptIQA gives one score per image")
        self.backend = backend or "cv2"
        if self.backend not in PROMPTIQA_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(PROMPTIQA_BACKENDS)}, got {backend!r}")
        self.prompt_flip, self._flip_seed = bool(prompt_flip), 0 if seed is None else int(seed)
        self._prompt_images: torch.Tensor | None = None
        if prompt is not None:
            self.set_prompt(prompt)

    def set_prompt(self, prompt: Any) -> None:
        """PromptIQA: score relative to ``prompt`` from now on (``Scorer(..., prompt=...)`` calls this).

        The prompt's images are read like the targets (:func:`gamma.io.load_promptiqa_image` with the scorer's
        ``backend``), its scores normalised by ``mos_range`` when one is given, and the prompt is encoded once: every
        batch reuses its ISP features.

        Args:
            prompt: a CSV ``image,score`` (paths relative to the CSV), a dict ``{image: score}`` or a list of
                ``(image, score)`` pairs; at least 2 pairs; scores in [0, 1] (or within ``mos_range``).

        Raises:
            gamma.prompt_file.PromptFileError: a missing or unreadable image, a non-numeric score, fewer than 2 pairs,
                scores outside what the model was trained on.
        """
        if not self.is_promptiqa:
            raise ValueError("set_prompt() is for PromptIQA models; a Gamma model is adapted to a prompt with adapt()")
        pairs = as_prompt_pairs(prompt)
        scores = torch.tensor(normalized_prompt_scores(pairs, self.mos_range, self.lower_better))
        images = torch.stack(self._decode_prompt(pairs)).to(self.device)  # (n, 3, S, S), read like every target
        self._isp, self._flip = None, None
        if self.prompt_flip:  # the official test code: new flips (and a new encoding) for every batch
            self._flip = torch.Generator().manual_seed(self._flip_seed)
        else:
            with torch.inference_mode():  # once per prompt: every batch reuses these ISP features (n, dim)
                self._isp = self.model.encode_prompt(images, scores)
        self._prompt_images, self._prompt_scores = images, scores
        self.metadata.update(prompt=pairs.source, prompt_pairs=len(pairs), backend=self.backend,
                             prompt_flip=self.prompt_flip)

    def _decode_prompt(self, pairs: PromptPairs) -> list[torch.Tensor]:
        """The prompt's images, decoded like the targets; a failure names the prompt and the image."""
        items = [self._one_item(image, i) for i, image in enumerate(pairs.images)]
        images = []
        for name, loaded in self._decoded(items):
            if isinstance(loaded, Exception):
                detail = str(loaded) if isinstance(loaded, ImageDecodeError) else f"{name}: {loaded}"
                raise PromptFileError(f"{pairs.source}: prompt image {detail}") from loaded
            images.append(loaded)
        return images

    # ------------------------------------------------------------------------------------------------ adaptation
    def adapt(self, prompt: Any, outputs: str | Sequence[str] = "score", *, scene: str | None = None,
              method: str = "auto") -> Adaptation:
        """Fit a map from this Gamma model's outputs to a prompt's scores (training-free; :mod:`gamma.adapt`).

        The prompt's images are scored exactly as targets are; their outputs and the prompt's scores are handed to
        :func:`gamma.adapt.fit`. From then on every result has an ``adapted`` value on the prompt's scale.

        Args:
            prompt: a CSV ``image,score`` (paths relative to the CSV), a dict ``{image: score}`` or a list of
                ``(image, score)`` pairs; the scores on any scale (MOS, DMOS ...). At least 4 pairs.
            outputs: the outputs mapped from: ``score`` (a monotone map, its direction detected: a DMOS-like prompt
                flips it), ``distribution`` (score and the five level probabilities) or ``all`` (and the five
                attribute scores), both with ridge regression; or a list of column names.
            scene: the scene of the prompt's images (SDP models); default: the scorer's.
            method: ``auto``, ``monotone`` or ``ridge`` (see :func:`gamma.adapt.fit`).

        Returns:
            the :class:`~gamma.adapt.Adaptation` (also :attr:`adaptation`); ``.report`` holds the fit on the pairs.

        Raises:
            gamma.adapt.NotEnoughPairsError: 3 pairs or fewer (it refuses rather than overfit).
            gamma.prompt_file.PromptFileError: a bad prompt (missing or unreadable image, non-numeric score ...).
        """
        if self.is_promptiqa:
            raise ValueError("adapt() maps a Gamma model's outputs; PromptIQA takes its prompt directly "
                             "(Scorer(..., prompt='isp.csv'))")
        names = _adapt_features(outputs)
        pairs = as_prompt_pairs(prompt)
        if len(pairs) < MIN_PAIRS:
            raise NotEnoughPairsError(
                f"{pairs.source}: adapting needs at least {MIN_PAIRS} image-score pairs, got {len(pairs)}: with so "
                "few, any map passes through them and says nothing about other images; add pairs")
        scene = self.scene if scene is None else scene
        self.model.scene_index(scene, 1, torch.device("cpu"))
        needs = {"distribution"} if set(names) & set(DISTRIBUTION_COLUMNS) else set()
        needs |= {"attributes"} if set(names) & set(ATTRIBUTES) else set()
        plan = _Plan(scene, frozenset(needs), tuple(n for n in names if n != "score"))
        items = [self._one_item(image, i) for i, image in enumerate(pairs.images)]
        try:
            results = list(self._score_stream(items, plan, on_error="raise"))
        except ValueError as exc:
            raise PromptFileError(f"{pairs.source}: prompt image {exc}") from exc
        table = {name: [r.score if name == "score" else r.values[name] for r in results] for name in names}
        adaptation = fit(table, pairs.scores, method=method)
        self.adaptation, self.adapt_scene = adaptation, scene
        self.metadata["adaptation"] = {"prompt": pairs.source, **adaptation.report.to_dict()}
        logger.info("adapted to %s: %s", pairs.source, adaptation.report.summary())
        return adaptation

    # ------------------------------------------------------------------------------------------------ scoring
    def columns(self, scene: str | None = None) -> list[str]:
        """The columns :meth:`score` gives (before ``error``) for ``scene`` (default: the scorer's)."""
        plan = self._plan(self.scene if scene is None else scene)
        return ["name", "score"] + (["mos"] if self.mos_range else []) + list(plan.columns)

    def score(
        self,
        inputs: Any,
        scene: str | None = None,
        *,
        on_error: str = "raise",
        progress: bool = False,
    ) -> Any:
        """Score every image in ``inputs``.

        Args:
            inputs: a path, folder (recursive) or glob; a ``PIL.Image``; a tensor (3, H, W) or (B, 3, H, W) in [0, 1];
                a numpy array (H, W, 3) (uint8, or float in [0, 1]); or a list of these.
            scene: scene of these images (SDP models; a named scene overrides the scorer's, ``auto`` included);
                default: the scorer's scene.
            on_error: ``raise`` stops at the first unreadable input; ``skip`` gives it a NaN score and an ``error``.
            progress: show a tqdm progress bar on stderr.

        Returns:
            a pandas DataFrame with columns ``name``, ``score`` (+ ``mos`` with a MOS range, + ``adapted`` after
            :meth:`adapt`, + the columns of ``distribution``, ``scene='auto'`` and ``attributes``, + ``error`` when
            some input failed; :meth:`columns`), in input order, with :attr:`metadata` in ``DataFrame.attrs``; a list
            of dicts with those keys when pandas is not installed.
        """
        columns = self.columns(scene)
        results = self.iter_scores(inputs, scene, on_error=on_error)
        if progress:
            results = tqdm(results, desc="scoring", unit="img")
        rows = []
        for r in results:
            row = {"name": r.name, "score": r.score, **({"mos": r.mos} if self.mos_range else {}), **r.values}
            rows.append({**row, "error": r.error})
        if all(row["error"] is None for row in rows):
            for row in rows:
                row.pop("error")
        try:
            import pandas as pd  # optional (the `analysis` and `dev` extras)
        except ImportError:
            return rows
        columns += ["error"] if rows and "error" in rows[0] else []
        df = pd.DataFrame(rows, columns=columns)
        df.attrs.update(self.metadata)
        return df

    __call__ = score

    def iter_scores(self, inputs: Any, scene: str | None = None, *, on_error: str = "raise") -> Iterator[ScoreResult]:
        """Score lazily, yielding one :class:`ScoreResult` per input in input order (see :meth:`score`).

        Arguments are checked (and a missing scene of an SDP model reported) when this is called, not when the first
        result is asked for.
        """
        return self._score_items(self._items(inputs), scene, on_error)

    def iter_file_scores(
        self, paths: Iterable[str | os.PathLike], scene: str | None = None, *, on_error: str = "skip"
    ) -> Iterator[ScoreResult]:
        """Like :meth:`iter_scores` for an iterable of file paths taken literally (no folder or glob expansion)."""
        items = ((os.fspath(p), self._file_loader(os.fspath(p))) for p in paths)
        return self._score_items(items, scene, on_error)

    def iter_named_scores(
        self, items: Iterable[tuple[str, Any]], scene: str | None = None, *, on_error: str = "skip"
    ) -> Iterator[ScoreResult]:
        """Like :meth:`iter_file_scores` for ``(name, source)`` pairs, each result named ``name``: ``source`` is the
        encoded bytes or a path (decoded as files are), or an exception, which is that input's error (tar shards:
        :mod:`gamma.shards`). A decoding error names the input by ``name``."""
        return self._score_items(((name, self._named_loader(name, source)) for name, source in items), scene, on_error)

    def _named_loader(self, name: str, source: Any) -> Callable[[], torch.Tensor]:
        if isinstance(source, BaseException):
            def failed() -> torch.Tensor:
                raise source

            return failed
        load = self._file_loader(source)

        def named() -> torch.Tensor:
            try:
                return load()
            except ImageDecodeError as exc:
                raise ImageDecodeError(name, exc.reason) from None

        return named

    def _score_items(self, items: Iterable[_Item], scene: str | None, on_error: str) -> Iterator[ScoreResult]:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        scene = scene if scene is not None else self.scene
        if self.is_promptiqa:
            if scene is not None:
                raise ValueError("scenes apply to Gamma models with scene-based prompts; PromptIQA takes its task from "
                                 "the prompt")
            if self._prompt_images is None:
                raise ValueError(
                    "PromptIQA scores images relative to a prompt of image-score pairs: pass prompt='isp.csv' (a CSV "
                    "with the columns image,score; image paths relative to the CSV; scores in [0, 1], or on the scale "
                    "given by mos_range) or a dict {image: score} to Scorer, or call set_prompt(); on the command line "
                    "--prompt-file isp.csv")
        else:
            self.model.scene_index(scene, 1, torch.device("cpu"))  # unknown or missing scene: fail before any work
        return self._score_stream(items, self._plan(scene), on_error)

    def _plan(self, scene: Any) -> _Plan:
        """The outputs and extra columns of a run with ``scene``."""
        if self.is_promptiqa:
            return _Plan(None, frozenset(), ())
        needs: set[str] = set()
        columns: list[str] = []
        if self.adaptation is not None:
            needs.add("adapted")
            columns.append("adapted")
            features = set(self.adaptation.features)
            needs |= {"distribution"} if features & set(DISTRIBUTION_COLUMNS) else set()
            needs |= {"attributes"} if features & set(ATTRIBUTES) else set()
        if self.distribution:
            needs.add("distribution")
            columns += DISTRIBUTION_COLUMNS
        if self._is_auto(scene):
            needs.add("scene")
            columns.append("scene")
            if self.distribution:
                columns += [f"p_{s}" for s in self.model.auto_scenes]
        if self.attributes:
            needs.add("attributes")
            columns += ATTRIBUTES
        return _Plan(scene, frozenset(needs), tuple(columns))

    def _is_auto(self, scene: Any) -> bool:
        """Whether ``scene`` lets this model choose each image's scene (``auto`` on an SDP model)."""
        return (isinstance(scene, str) and scene.strip().lower() == AUTO_SCENE
                and self.model.config.prompt_set == "sdp")

    def _score_stream(self, items: Iterable[_Item], plan: _Plan, on_error: str) -> Iterator[ScoreResult]:
        pending: list[tuple[str, torch.Tensor | Exception]] = []
        for name, loaded in self._decoded(items):
            if isinstance(loaded, Exception) and on_error == "raise":
                # Inputs before this one come first: their results, or an earlier input's error.
                yield from self._flush(pending, plan, on_error)
                if isinstance(loaded, ImageDecodeError):
                    raise loaded
                raise ValueError(f"{name}: {loaded}") from loaded
            pending.append((name, loaded))
            if len(pending) >= self.batch_size:
                yield from self._flush(pending, plan, on_error)
                pending = []
        if pending:
            yield from self._flush(pending, plan, on_error)

    def _flush(self, pending: list[tuple[str, Any]], plan: _Plan, on_error: str) -> Iterator[ScoreResult]:
        """Score a window of decoded images, batching those of equal size; yield results in window order.

        With ``on_error='raise'`` the results before the window's first failing input are yielded, then its error
        is raised: errors surface in input order whatever the batching.
        """
        outputs: list[dict[str, Any] | None] = [None] * len(pending)
        errors: list[str | None] = [None] * len(pending)
        causes: list[BaseException | None] = [None] * len(pending)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, loaded) in enumerate(pending):
            if isinstance(loaded, Exception):
                errors[i] = str(loaded) if isinstance(loaded, ImageDecodeError) else f"{pending[i][0]}: {loaded}"
                causes[i] = loaded
            else:
                groups[tuple(loaded.shape)].append(i)
        for indices in groups.values():
            batch = torch.stack([pending[i][1] for i in indices])
            try:
                values = self._forward(batch, plan)
            except (ValueError, RuntimeError) as exc:
                values = [exc]
                if len(indices) > 1:  # isolate the bad input(s): an error names the input that caused it
                    values = [self._forward_or_error(pending[i][1][None], plan) for i in indices]
            for i, v in zip(indices, values, strict=True):
                if isinstance(v, BaseException):
                    errors[i], causes[i] = f"{pending[i][0]}: {v}", v
                else:
                    outputs[i] = v
        for i, (name, _) in enumerate(pending):
            if errors[i] is not None and on_error == "raise":
                if isinstance(causes[i], ImageDecodeError):
                    raise causes[i]
                raise ValueError(errors[i]) from causes[i]
            out = outputs[i]
            if out is None:  # failed: NaN values (None for the scene)
                yield ScoreResult(name, math.nan, None, errors[i], {c: None if c == "scene" else math.nan
                                                                   for c in plan.columns})
                continue
            mos = None
            if self.mos_range is not None:
                mos = float(to_mos(out["score"], *self.mos_range, lower_better=self.lower_better))
            yield ScoreResult(name, out["score"], mos, None, {c: out[c] for c in plan.columns})

    def _forward_or_error(self, image: torch.Tensor, plan: _Plan) -> dict[str, Any] | Exception:
        try:
            return self._forward(image, plan)[0]
        except (ValueError, RuntimeError) as exc:
            return exc

    def _forward(self, batch: torch.Tensor, plan: _Plan) -> list[dict[str, Any]]:
        """Outputs of a batch (B, 3, H, W): one dict per image with ``score`` and what ``plan`` needs."""
        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            if self.is_promptiqa:
                prompt = self._isp if self._flip is None else (
                    random_vertical_flip(self._prompt_images, generator=self._flip), self._prompt_scores)
                return [{"score": s} for s in self.model(batch, prompt=prompt).float().cpu().tolist()]
            model_outputs = plan.needs - {"adapted"}
            if not model_outputs:
                rows = [{"score": s} for s in self.model(batch, scene=plan.scene).float().cpu().tolist()]
            else:
                rows = _assessment_rows(
                    self.model.assess(batch, plan.scene, attributes="attributes" in model_outputs), self.model)
        if "adapted" in plan.needs:
            adapted = self.adaptation.predict({k: [row[k] for row in rows] for k in self.adaptation.features})
            for row, value in zip(rows, adapted.tolist(), strict=True):
                row["adapted"] = value
        return rows

    # ------------------------------------------------------------------------------------------------ inputs
    def _items(self, inputs: Any) -> Iterator[_Item]:
        """Flatten ``inputs`` into (name, decode) pairs, lazily (folders are walked as they are consumed).

        Inputs without a file name are called ``<tensor i>``, ``<image i>`` ... after their position i in the
        flattened input.
        """
        counter = iter(range(1 << 62))
        yield from self._expand(inputs, counter)

    def _expand(self, obj: Any, counter: Iterator[int]) -> Iterator[_Item]:
        if isinstance(obj, (str, os.PathLike)):
            for path in iter_image_files(obj):
                next(counter)
                yield path, self._file_loader(path)
        elif isinstance(obj, Image.Image):
            index = next(counter)
            yield getattr(obj, "filename", "") or f"<image {index}>", self._file_loader(obj)
        elif isinstance(obj, torch.Tensor):
            if obj.dim() == 3:
                yield f"<tensor {next(counter)}>", self._fitted(_tensor_loader(obj))
            elif obj.dim() == 4:
                for image in obj:
                    yield f"<tensor {next(counter)}>", self._fitted(_tensor_loader(image))
            else:
                raise ValueError(f"image tensors must be (3, H, W) or (B, 3, H, W), got shape {tuple(obj.shape)}")
        elif isinstance(obj, np.ndarray):
            yield f"<array {next(counter)}>", self._fitted(_array_loader(obj))
        elif isinstance(obj, (bytes, bytearray)):
            yield f"<bytes {next(counter)}>", self._file_loader(obj)
        elif isinstance(obj, Iterable):
            for item in obj:
                yield from self._expand(item, counter)
        else:
            raise TypeError(
                f"cannot score a {type(obj).__name__}; pass paths, folders, PIL images, tensors, arrays or lists"
            )

    def _one_item(self, obj: Any, index: int) -> _Item:
        """One prompt image as an item: a path taken literally (no folder or glob expansion), or any other input."""
        if isinstance(obj, (str, os.PathLike)):
            return os.fspath(obj), self._file_loader(os.fspath(obj))
        found = list(self._expand(obj, iter(range(index, index + 2))))
        if len(found) != 1:
            raise PromptFileError(f"prompt image {index + 1} must be one image, got {len(found)}")
        return found[0]

    def _file_loader(self, source: Any) -> Callable[[], torch.Tensor]:
        if self.is_promptiqa and not isinstance(source, Image.Image):  # the official reader and resize
            size = self.model.config.image_size
            return lambda: load_promptiqa_image(source, size, backend=self.backend, max_pixels=self.max_pixels)
        return self._fitted(lambda: load_image(source, background=self.background, max_pixels=self.max_pixels))

    def _fitted(self, load: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """PromptIQA: images resized to its input size here, in the decoding threads (then every target of a run
        shares one shape and one batch), with the model's own resize; Gamma: as decoded."""
        if not self.is_promptiqa:
            return load
        size = self.model.config.image_size

        def fitted() -> torch.Tensor:
            image = load()
            if image.shape[-2:] == (size, size):
                return image
            check_images(image[None])  # range and shape first: the resize would clip what is out of range
            return resize_like_cv2(image[None], size)[0]

        return fitted

    def _decoded(self, items: Iterable[_Item]) -> Iterator[tuple[str, torch.Tensor | Exception]]:
        """Decode items in order, ``num_workers`` threads ahead; a failure is yielded as its exception."""
        if self.num_workers == 0:
            for name, load in items:
                yield name, _try(load)
            return
        ahead = self.batch_size + 2 * self.num_workers  # bounded look-ahead: memory stays O(batch)
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="gamma-decode") as pool:
            queue: deque[tuple[str, Future]] = deque()
            for name, load in items:
                queue.append((name, pool.submit(_try, load)))
                if len(queue) >= ahead:
                    done_name, future = queue.popleft()
                    yield done_name, future.result()
            while queue:
                done_name, future = queue.popleft()
                yield done_name, future.result()


def _assessment_rows(out: Any, model: GammaModel) -> list[dict[str, Any]]:
    """One dict per image of a :class:`~gamma.archs.Assessment`: score, std, p_<level>, scene, p_<scene>,
    attribute scores (those it holds)."""
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


def _adapt_features(outputs: str | Sequence[str]) -> tuple[str, ...]:
    """The feature names of an ``outputs`` choice (a name of :data:`ADAPT_OUTPUTS`, or a list of column names)."""
    if isinstance(outputs, str):
        if outputs not in ADAPT_OUTPUTS:
            raise ValueError(f"outputs must be one of {', '.join(ADAPT_OUTPUTS)} or a list of column names, got "
                             f"{outputs!r}")
        return ADAPT_OUTPUTS[outputs]
    known = set(ADAPT_OUTPUTS["all"]) | {"std"}
    names = tuple(outputs)
    unknown = [n for n in names if n not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"outputs must be distinct names among {', '.join(sorted(known))}; got {list(names)}")
    return names


def _try(load: Callable[[], torch.Tensor]) -> torch.Tensor | Exception:
    try:
        return load()
    except ValueError as exc:  # ImageDecodeError, or an invalid tensor / array
        return exc


def _tensor_loader(image: torch.Tensor) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W), got shape {tuple(image.shape)}")
        return image.detach()

    return load


def _array_loader(array: np.ndarray) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        a = array
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
        if a.dtype == np.uint8:
            return load_image(Image.fromarray(a))
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"image arrays must be uint8, or float in [0, 1]; got dtype {a.dtype}")
        return torch.from_numpy(np.ascontiguousarray(a[..., :3].transpose(2, 0, 1), dtype=np.float32))

    return load


def score_images(inputs: Any, weights: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """One-call form: ``Scorer(weights, **kwargs).score(inputs)``."""
    scorer_keys = set(Scorer.__init__.__code__.co_varnames)
    score_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in scorer_keys}
    return Scorer(weights, **kwargs).score(inputs, **score_kwargs)


__all__ = ["ScoreResult", "Scorer", "default_device", "from_mos", "score_images", "to_mos"]
