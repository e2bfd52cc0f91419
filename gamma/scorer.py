"""A scorer for notebooks and scripts: paths, folders, PIL images or tensors in; a table of scores out.

    >>> scorer = Scorer("Gamma.pth")                       # or Scorer() to find the file (see gamma.hub)
    >>> scorer.score("photos/")                            # pandas DataFrame: name, score
    >>> Scorer("Gamma-Prompt.pth", prompt_set="sdp", scene="underwater").score(["a.jpg", pil_image, tensor])
    >>> Scorer("Gamma.pth", attributes=True, distribution=True).score("photos/")   # + std, p_bad ..., sharpness ...
    >>> Scorer("Gamma-Prompt.pth", prompt_set="sdp", scene="auto").score("photos/")  # + scene (chosen per image)
    >>> Scorer("best_model.pth.tar", isp="isp.csv").score("photos/")              # PromptIQA, on the ISP set's scale
    >>> Scorer("Gamma.pth", isp="isp.csv").score("photos/")                       # + adapted (Gamma mapped onto it)

Images are decoded in background threads (:mod:`gamma.inputs`), scored in batches of equal-sized images under
``torch.inference_mode()``, and streamed: :meth:`Scorer.iter_scores` holds at most one batch of decoded images, so a
million files cost no more memory than ten. What differs between model families (how a file is read, the forward
call, the outputs beyond the score, scenes, crops, an ISP set) comes from the model's row in
:mod:`gamma.families`: PromptIQA reads files with :func:`gamma.io.load_promptiqa_image` (the official
preprocessing: the whole image resized to 224), and the ISP set's images go through that same reader.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._deprecation import renamed_options, warn_once
from .adapt import ADAPT_OUTPUTS, DISTRIBUTION_COLUMNS, MIN_PAIRS, Adaptation, NotEnoughPairsError, adapt_features, fit
from .archs.precision import default_device, exact_fp32, place
from .data.meta import from_mos, to_mos
from .factory import create_model
from .families import ReadOptions, Scoring, family_of_model, scoring_of
from .inputs import InputReader, Item, decoded
from .io import MAX_PIXELS, PROMPTIQA_BACKENDS, ImageDecodeError
from .isp import IspPrompt
from .prompt_file import PromptFileError, PromptPairs, as_prompt_pairs, normalized_prompt_scores
from .prompts import ATTRIBUTES, AUTO_SCENE

logger = logging.getLogger(__name__)

#: Old keyword names of :class:`Scorer` (each warns once, still works).
OLD_NAMES = {"prompt": "isp", "prompt_flip": "isp_flip"}

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


@dataclass(frozen=True)
class _Plan:
    """What one scoring run computes: the scene, the model outputs needed, the extra columns written."""

    scene: Any
    needs: frozenset[str]  # of "distribution", "attributes", "scene" (Gamma's assess), "adapted"
    columns: tuple[str, ...]  # extra columns of each result, in output order


class Scorer:
    """Score images with a model of any family (:mod:`gamma.families`): Gamma, PromptIQA or Gamma + ISP against an ISP
    set, ATTIQA.

    Args:
        weights: a weight file (the release's, ours, PromptIQA's, or a CLIP backbone) or a known name (``gamma``,
            ``gamma_sdp``, ``promptiqa``). ``None`` with ``model=None`` finds the release file through
            :func:`gamma.hub.resolve_weights`.
        model: a model of a registered family to use as is, or a variant name from :func:`gamma.list_models`
            (random-init unless ``weights`` is given: for tests and demos).
        prompt_set: prompts the weights expect (``naive`` | ``sdp`` | ``quality``). ``None``: the one the file
            records (ours), else the one a known file was trained with (``Gamma-Prompt.pth``, ``gamma_sdp``: ``sdp``;
            ``Gamma.pth``: ``naive``), else ``naive`` with a warning (:func:`gamma.hub.resolve_prompt_set`). One
            that contradicts what the file records is an error unless ``prompt_set_override``.
        prompt_set_override: use ``prompt_set`` even where the file records another (deliberately: other prompts
            on the same weights).
        scene: default scene for SDP models (``natural``, ``aigc``, ``underwater``, ``face``, ``aesthetics``), or
            ``auto`` to let the model choose per image (adds a ``scene`` column; docs/explain.md).
        device: where to run (default: CUDA, else MPS, else CPU).
        precision: how the image tower computes: ``fp32`` (exact), ``bf16``, ``fp16``, ``int8`` (CPU) or ``auto``
            (the fastest ``device`` runs well; the choice is logged); a precision the device lacks is an error.
            ``None``: as the weights are stored (fp32, or what ``gamma convert --precision`` stored). See
            :meth:`gamma.GammaModel.to_precision` and docs/performance.md.
        batch_size: images scored per forward pass (images of one size are batched together).
        crops: test-time crop mode (``random`` (release), ``grid``, ``five``, ``center``, ``resize``); ``None`` keeps
            the model's protocol. ``num_crops`` and ``seed`` refine it (PromptIQA: ``seed`` seeds ``isp_flip``).
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
        isp: image-score pairs (an ISP set): a CSV ``image,score`` (paths relative to the CSV), a dict ``{image:
            score}`` or a list of ``(image, score)``. PromptIQA scores relative to it (:meth:`set_isp`; required
            before scoring). A Gamma model is adapted to it (:meth:`adapt`): an ``adapted`` column on its scale.
            Old name: ``prompt``.
        adapt_outputs: which Gamma outputs :meth:`adapt` maps from (``score``, ``distribution``, ``all``).
        isp_flip: PromptIQA: flip each ISP image upside down with p = 0.5 for every batch, as the official test
            code does (scores then depend on the batch; for exact reproduction only). Old name: ``prompt_flip``.
        backend: PromptIQA: how files are decoded and resized, ``cv2`` (the official path; default) or ``pil``
            (:func:`gamma.io.load_promptiqa_image`). ``onnxruntime``: ``weights`` is a graph written by
            ``gamma export`` (:class:`gamma.export.OnnxGammaModel`, which carries its own :class:`Scoring` row), run
            on the CPU with the same decoding and crops.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        *,
        model: nn.Module | str | None = None,
        prompt_set: str | None = None,
        prompt_set_override: bool = False,
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
        isp: Any = None,
        adapt_outputs: str | Sequence[str] = "score",
        isp_flip: bool | None = None,
        backend: str | None = None,
        **old_names: Any,
    ) -> None:
        unknown = sorted(set(old_names) - set(OLD_NAMES))
        if unknown:
            raise TypeError(f"Scorer got unexpected keyword argument(s) {', '.join(unknown)}")
        named = renamed_options({"isp": isp, "isp_flip": isp_flip, **old_names}, OLD_NAMES, "Scorer")
        isp, isp_flip = named["isp"], bool(named["isp_flip"])
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
            from .export import open_onnx

            model, weights, backend, device = open_onnx(weights), None, None, "cpu"
        self.device = torch.device(device) if device is not None else default_device()
        self.model = self._build(weights, model, prompt_set, prompt_set_override, allow_unsafe, precision,
                                 self.device).eval()
        self.family = family_of_model(self.model)
        self.scoring = scoring_of(self.model)
        self.batch_size = batch_size
        self.mos_range = mos_range
        self.lower_better = lower_better
        self.max_pixels = max_pixels
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else max(0, int(num_workers))
        self.attributes = bool(attributes)
        self.distribution = bool(distribution)
        self.scene = scene
        self.adaptation: Adaptation | None = None
        self.adapt_scene: Any = None  # the scene the adaptation's features were computed with
        #: What a table of these scores needs to be read right: the model family, the towers behind the attribute
        #: scores, the ISP set and the fit report of an adaptation. ``score`` copies it into ``DataFrame.attrs``.
        self.metadata: dict[str, Any] = {"model": self.family.name}
        self._isp: IspPrompt | None = None
        title = self.family.title
        if not self.scoring.takes_isp and (isp_flip or backend is not None):
            raise ValueError(f"isp_flip and backend apply to models scored against an ISP set (PromptIQA); this is a "
                             f"{title} model")
        self.backend = backend or "cv2"
        if self.backend not in PROMPTIQA_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(PROMPTIQA_BACKENDS)}, got {backend!r}")
        self.isp_flip, self._flip_seed = isp_flip, 0 if seed is None else int(seed)
        options = ReadOptions(background=background, max_pixels=max_pixels, backend=self.backend)
        self.inputs = InputReader(lambda source: self.scoring.read(self.model, source, options),
                                  None if self.scoring.fit is None else lambda x: self.scoring.fit(self.model, x))
        if crops is not None or num_crops is not None or (seed is not None and not self.scoring.takes_isp):
            if self.scoring.set_crops is None:
                raise ValueError(f"{title} scores the whole image: crops and num_crops apply to Gamma models")
            self.scoring.set_crops(self.model, crops, num_crops, seed)
        if scene is not None:
            self._check_scene(scene)  # validate the name now, not after decoding
        if (self.attributes and "attributes" not in self.scoring.outputs) or (
                self.distribution and "distribution" not in self.scoring.outputs):
            raise ValueError(f"attributes and distribution are Gamma outputs; {title} gives one score per image")
        if self.attributes and self.scoring.describe is not None:
            self.metadata["attributes_from"] = self.scoring.describe(self.model)
            logger.info("attribute scores from %s", self.metadata["attributes_from"])
        if isp is not None:
            if self.scoring.takes_isp:
                self.set_isp(isp)
            else:
                self.adapt(isp, outputs=adapt_outputs)

    @staticmethod
    def _build(weights: Any, model: Any, prompt_set: str | None, prompt_set_override: bool, allow_unsafe: bool,
               precision: str | None, device: torch.device) -> nn.Module:
        if isinstance(getattr(model, "scoring", None), Scoring):  # a runner (an exported graph): used as it is
            if weights is not None or prompt_set is not None or precision not in (None, "fp32"):
                raise ValueError("pass either a model instance or weights/prompt_set/precision, not both")
            return model
        if isinstance(model, nn.Module):
            if weights is not None or prompt_set is not None or prompt_set_override:
                raise ValueError("pass either a model instance or weights/prompt_set, not both")
            family_of_model(model)  # a model of a registered family, or an error naming the class
            return place(model, device, precision)
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a model of a registered family or a variant name, got "
                            f"{type(model).__name__}")
        if model is None and weights is None:  # the release file for these prompts, found by gamma.hub
            weights = "gamma_sdp" if prompt_set == "sdp" else "gamma"
        overrides = {"prompt_set": prompt_set} if prompt_set else {}
        return create_model(model, pretrained=weights, allow_unsafe=allow_unsafe, precision=precision, device=device,
                            prompt_set_override=prompt_set_override, **overrides)

    @property
    def encoded_isp(self) -> torch.Tensor | None:
        """The encoded ISP set (n, dim) every batch is scored against; None without one, or with ``isp_flip`` (then
        every batch encodes newly flipped ISP images). ``gamma export`` bakes it into a PromptIQA graph."""
        return None if self._isp is None or self._isp.flip else self._isp.for_batch()

    @property
    def takes_isp(self) -> bool:
        """Whether the model scores against an ISP set (PromptIQA, Gamma + ISP)."""
        return self.scoring.takes_isp

    @property
    def is_promptiqa(self) -> bool:
        """Old name of :attr:`takes_isp`."""
        return self.scoring.takes_isp

    def _check_scene(self, scene: Any) -> None:
        if self.scoring.check_scene is not None:
            self.scoring.check_scene(self.model, scene)
        elif scene is not None:
            task = "takes its task from the ISP set" if self.scoring.takes_isp else "takes none"
            raise ValueError(f"scenes apply to Gamma models with scene-based prompts; {self.family.title} {task}")

    # ------------------------------------------------------------------------------------------------ ISP set
    def set_isp(self, isp: Any) -> None:
        """Score relative to the ISP set ``isp`` from now on (``Scorer(..., isp=...)`` calls this; PromptIQA).

        The ISP images are read like the targets (the family's reader: :func:`gamma.io.load_promptiqa_image` with the
        scorer's ``backend`` for PromptIQA), their scores normalised by ``mos_range`` when one is given, and the set is
        encoded once: every batch reuses its features (unless ``isp_flip``).

        Args:
            isp: a CSV ``image,score`` (paths relative to the CSV), a dict ``{image: score}`` or a list of
                ``(image, score)`` pairs; at least 2 pairs; scores in [0, 1] (or within ``mos_range``).

        Raises:
            gamma.prompt_file.PromptFileError: a missing or unreadable image, a non-numeric score, fewer than 2 pairs,
                scores outside what the model was trained on.
        """
        if not self.scoring.takes_isp:
            raise ValueError(f"set_isp() is for models scored against an ISP set; a {self.family.title} model is "
                             "adapted to one with adapt()")
        pairs = as_prompt_pairs(isp)
        scores = torch.tensor(normalized_prompt_scores(pairs, self.mos_range, self.lower_better))
        images = torch.stack(self._decode_isp(pairs)).to(self.device)  # (n, 3, S, S), read like every target
        self._isp = IspPrompt(self.model, images, scores, flip=self.isp_flip, seed=self._flip_seed)
        self.metadata.update(prompt=pairs.source, prompt_pairs=len(pairs), backend=self.backend,
                             prompt_flip=self.isp_flip)

    def set_prompt(self, prompt: Any) -> None:
        """Old name of :meth:`set_isp`."""
        warn_once("Scorer.set_prompt()", "Scorer.set_isp()")
        self.set_isp(prompt)

    def _decode_isp(self, pairs: PromptPairs) -> list[torch.Tensor]:
        """The ISP images, decoded like the targets; a failure names the file and the image."""
        items = [self.inputs.one_item(image, i) for i, image in enumerate(pairs.images)]
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
        if self.scoring.takes_isp:
            raise ValueError(f"adapt() maps a model's outputs; {self.family.title} takes its ISP set directly "
                             "(Scorer(..., isp='isp.csv'))")
        names = adapt_features(outputs)
        pairs = as_prompt_pairs(prompt)
        if len(pairs) < MIN_PAIRS:
            raise NotEnoughPairsError(
                f"{pairs.source}: adapting needs at least {MIN_PAIRS} image-score pairs, got {len(pairs)}: with so "
                "few, any map passes through them and says nothing about other images; add pairs")
        scene = self.scene if scene is None else scene
        self._check_scene(scene)
        needs = {"distribution"} if set(names) & set(DISTRIBUTION_COLUMNS) else set()
        needs |= {"attributes"} if set(names) & set(ATTRIBUTES) else set()
        plan = _Plan(scene, frozenset(needs), tuple(n for n in names if n != "score"))
        items = [self.inputs.one_item(image, i) for i, image in enumerate(pairs.images)]
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
        return self._score_items(self.inputs.items(inputs), scene, on_error)

    def iter_file_scores(
        self, paths: Iterable[str | os.PathLike], scene: str | None = None, *, on_error: str = "skip"
    ) -> Iterator[ScoreResult]:
        """Like :meth:`iter_scores` for an iterable of file paths taken literally (no folder or glob expansion)."""
        items = ((os.fspath(p), self.inputs._file_loader(os.fspath(p))) for p in paths)
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
        load = self.inputs._file_loader(source)

        def named() -> torch.Tensor:
            try:
                return load()
            except ImageDecodeError as exc:
                raise ImageDecodeError(name, exc.reason) from None

        return named

    def _score_items(self, items: Iterable[Item], scene: str | None, on_error: str) -> Iterator[ScoreResult]:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        scene = scene if scene is not None else self.scene
        self._check_scene(scene)  # unknown or missing scene: fail before any work
        if self.scoring.takes_isp and self._isp is None:
            raise ValueError(
                f"{self.family.title} scores images relative to an ISP set (image-score pairs): pass isp='isp.csv' (a "
                "CSV with the columns image,score; image paths relative to the CSV; scores in [0, 1], or on the scale "
                "given by mos_range) or a dict {image: score} to Scorer, or call set_isp(); on the command line "
                "--prompt-file isp.csv")
        return self._score_stream(items, self._plan(scene), on_error)

    def _plan(self, scene: Any) -> _Plan:
        """The outputs and extra columns of a run with ``scene``."""
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
                columns += [f"p_{s}" for s in self.scoring.auto_scenes(self.model)]
        if self.attributes:
            needs.add("attributes")
            columns += ATTRIBUTES
        return _Plan(scene, frozenset(needs), tuple(columns))

    def _is_auto(self, scene: Any) -> bool:
        """Whether ``scene`` lets this model choose each image's scene (``auto`` on an SDP model)."""
        return (isinstance(scene, str) and scene.strip().lower() == AUTO_SCENE
                and self.scoring.auto_scenes is not None and bool(self.scoring.auto_scenes(self.model)))

    def _score_stream(self, items: Iterable[Item], plan: _Plan, on_error: str) -> Iterator[ScoreResult]:
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
        with torch.inference_mode(), exact_fp32():  # fp32 is IEEE fp32 on a GPU too (no TF32)
            batch = batch.to(self.device, non_blocking=True)
            model_outputs = plan.needs - {"adapted"}
            if model_outputs:
                rows = self.scoring.assess(self.model, batch, plan.scene, "attributes" in model_outputs)
            else:
                context = self._isp.for_batch() if self._isp is not None else plan.scene
                rows = [{"score": s} for s in self.scoring.forward(self.model, batch, context).float().cpu().tolist()]
        if "adapted" in plan.needs:
            adapted = self.adaptation.predict({k: [row[k] for row in rows] for k in self.adaptation.features})
            for row, value in zip(rows, adapted.tolist(), strict=True):
                row["adapted"] = value
        return rows

    def _decoded(self, items: Iterable[Item]) -> Iterator[tuple[str, torch.Tensor | Exception]]:
        return decoded(items, self.num_workers, self.batch_size)


def score_images(inputs: Any, weights: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """One-call form: ``Scorer(weights, **kwargs).score(inputs)``."""
    scorer_keys = set(Scorer.__init__.__code__.co_varnames) | set(OLD_NAMES)
    score_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in scorer_keys}
    return Scorer(weights, **kwargs).score(inputs, **score_kwargs)


__all__ = ["ADAPT_OUTPUTS", "DISTRIBUTION_COLUMNS", "ScoreResult", "Scorer", "default_device", "from_mos",
           "score_images", "to_mos"]
