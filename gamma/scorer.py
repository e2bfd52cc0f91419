"""A scorer for notebooks and scripts: paths, folders, PIL images or tensors in; a table of scores out.

    >>> scorer = Scorer("Gamma.pth")                       # or Scorer() to find the file (see gamma.hub)
    >>> scorer.score("photos/")                            # pandas DataFrame: name, score
    >>> Scorer("Gamma-Prompt.pth", prompt_set="sdp", scene="underwater").score(["a.jpg", pil_image, tensor])

Images are decoded by :func:`gamma.io.load_image` in background threads, scored in batches of equal-sized images under
``torch.inference_mode()``, and streamed: :meth:`Scorer.iter_scores` holds at most one batch of decoded images, so a
million files cost no more memory than ten.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .archs.gamma import GammaModel
from .data.meta import denormalize_mos, normalize_mos
from .factory import create_model
from .io import MAX_PIXELS, ImageDecodeError, iter_image_files, load_image

logger = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """The score of one input; ``score`` is NaN and ``error`` says why when it could not be scored."""

    name: str
    score: float
    mos: float | None = None
    error: str | None = None

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


class Scorer:
    """Score images with a Gamma model.

    Args:
        weights: a weight file (the release's, ours, or a CLIP backbone) or a known name (``gamma``, ``gamma_sdp``).
            ``None`` with ``model=None`` finds the release file through :func:`gamma.hub.resolve_weights`.
        model: a :class:`~gamma.archs.GammaModel` to use as is, or a variant name from :func:`gamma.list_models`
            (random-init unless ``weights`` is given: for tests and demos).
        prompt_set: prompts the weights expect (``naive`` | ``sdp`` | ``quality``). The release's files do not record
            it; ``None`` takes it from the named weights or our checkpoint, else ``naive``.
        scene: default scene for SDP models (``natural``, ``aigc``, ``underwater``, ``face``, ``aesthetics``).
        device: where to run (default: CUDA, else MPS, else CPU).
        precision: how the image tower computes: ``fp32`` (exact), ``bf16``, ``fp16``, ``int8`` (CPU) or ``auto``
            (the fastest ``device`` runs well; the choice is logged); a precision the device lacks is an error.
            ``None``: as the weights are stored (fp32, or what ``gamma convert --precision`` stored). See
            :meth:`gamma.GammaModel.to_precision` and docs/performance.md.
        batch_size: images scored per forward pass (images of one size are batched together).
        crops: test-time crop mode (``random`` (release), ``grid``, ``five``, ``center``, ``resize``); ``None`` keeps
            the model's protocol. ``num_crops`` and ``seed`` refine it.
        mos_range: ``(lo, hi)`` of a dataset's label scale: adds a ``mos`` column (see :func:`to_mos`).
        lower_better: the dataset's labels are DMOS-like (lower is better).
        background: RGB colour that transparent images are composited on.
        max_pixels: decompression-bomb limit of the decoder.
        num_workers: decoding threads (0 decodes in the calling thread).
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        *,
        model: GammaModel | str | None = None,
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
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mos_range is not None:
            lo, hi = (float(v) for v in mos_range)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
                raise ValueError(f"mos_range must be two different finite numbers, got {mos_range}")
            mos_range = (lo, hi)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = self._build(weights, model, prompt_set, allow_unsafe, precision, self.device).eval()
        if crops is not None or num_crops is not None or seed is not None:
            self.model.set_crop_protocol(mode=crops, num=num_crops, seed=seed)
        self.scene = scene
        if scene is not None:
            self.model.scene_index(scene, 1, torch.device("cpu"))  # validate the name now, not after decoding
        self.batch_size = batch_size
        self.mos_range = mos_range
        self.lower_better = lower_better
        self.background = background
        self.max_pixels = max_pixels
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else max(0, int(num_workers))

    @staticmethod
    def _build(weights: Any, model: Any, prompt_set: str | None, allow_unsafe: bool, precision: str | None,
               device: torch.device) -> GammaModel:
        if isinstance(model, GammaModel):
            if weights is not None or prompt_set is not None:
                raise ValueError("pass either a model instance or weights/prompt_set, not both")
            model = model.to(device)  # first the device, then the precision for it
            return model.to_precision(precision) if precision is not None else model
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a GammaModel or a variant name, got {type(model).__name__}")
        if model is None and weights is None:  # the release file for these prompts, found by gamma.hub
            weights = "gamma_sdp" if prompt_set == "sdp" else "gamma"
        overrides = {"prompt_set": prompt_set} if prompt_set else {}
        return create_model(model, pretrained=weights, allow_unsafe=allow_unsafe, precision=precision, device=device,
                            **overrides)

    # ------------------------------------------------------------------------------------------------ scoring
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
            scene: scene of these images (SDP models); default: the scorer's scene.
            on_error: ``raise`` stops at the first unreadable input; ``skip`` gives it a NaN score and an ``error``.
            progress: show a tqdm progress bar on stderr.

        Returns:
            a pandas DataFrame with columns ``name``, ``score`` (+ ``mos`` with a MOS range, + ``error`` when some
            input failed), in input order; a list of dicts with those keys when pandas is not installed.
        """
        results = self.iter_scores(inputs, scene, on_error=on_error)
        if progress:
            results = tqdm(results, desc="scoring", unit="img")
        rows = [asdict(r) for r in results]
        if self.mos_range is None:
            for row in rows:
                row.pop("mos")
        if all(row["error"] is None for row in rows):
            for row in rows:
                row.pop("error")
        try:
            import pandas as pd  # optional (the `analysis` and `dev` extras)
        except ImportError:
            return rows
        columns = ["name", "score"] + (["mos"] if self.mos_range else [])
        columns += ["error"] if rows and "error" in rows[0] else []
        return pd.DataFrame(rows, columns=columns)

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

    def _score_items(self, items: Iterable[_Item], scene: str | None, on_error: str) -> Iterator[ScoreResult]:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        scene = scene if scene is not None else self.scene
        self.model.scene_index(scene, 1, torch.device("cpu"))  # unknown or missing scene: fail before any work
        return self._score_stream(items, scene, on_error)

    def _score_stream(self, items: Iterable[_Item], scene: str | None, on_error: str) -> Iterator[ScoreResult]:
        pending: list[tuple[str, torch.Tensor | Exception]] = []
        for name, loaded in self._decoded(items):
            if isinstance(loaded, Exception) and on_error == "raise":
                # Inputs before this one come first: their results, or an earlier input's error.
                yield from self._flush(pending, scene, on_error)
                if isinstance(loaded, ImageDecodeError):
                    raise loaded
                raise ValueError(f"{name}: {loaded}") from loaded
            pending.append((name, loaded))
            if len(pending) >= self.batch_size:
                yield from self._flush(pending, scene, on_error)
                pending = []
        if pending:
            yield from self._flush(pending, scene, on_error)

    def _flush(self, pending: list[tuple[str, Any]], scene: str | None, on_error: str) -> Iterator[ScoreResult]:
        """Score a window of decoded images, batching those of equal size; yield results in window order.

        With ``on_error='raise'`` the results before the window's first failing input are yielded, then its error
        is raised: errors surface in input order whatever the batching.
        """
        scores: list[float] = [math.nan] * len(pending)
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
                values = self._forward(batch, scene)
            except (ValueError, RuntimeError) as exc:
                values = [exc]
                if len(indices) > 1:  # isolate the bad input(s): an error names the input that caused it
                    values = [self._forward_or_error(pending[i][1][None], scene) for i in indices]
            for i, v in zip(indices, values, strict=True):
                if isinstance(v, BaseException):
                    errors[i], causes[i] = f"{pending[i][0]}: {v}", v
                else:
                    scores[i] = float(v)
        for i, (name, _) in enumerate(pending):
            if errors[i] is not None and on_error == "raise":
                if isinstance(causes[i], ImageDecodeError):
                    raise causes[i]
                raise ValueError(errors[i]) from causes[i]
            mos = None
            if self.mos_range is not None and errors[i] is None:
                mos = float(to_mos(scores[i], *self.mos_range, lower_better=self.lower_better))
            yield ScoreResult(name, scores[i], mos, errors[i])

    def _forward_or_error(self, image: torch.Tensor, scene: str | None) -> float | Exception:
        try:
            return self._forward(image, scene)[0]
        except (ValueError, RuntimeError) as exc:
            return exc

    def _forward(self, batch: torch.Tensor, scene: str | None) -> list[float]:
        with torch.inference_mode():
            out = self.model(batch.to(self.device, non_blocking=True), scene=scene)
        return out.float().cpu().tolist()

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
                yield f"<tensor {next(counter)}>", _tensor_loader(obj)
            elif obj.dim() == 4:
                for image in obj:
                    yield f"<tensor {next(counter)}>", _tensor_loader(image)
            else:
                raise ValueError(f"image tensors must be (3, H, W) or (B, 3, H, W), got shape {tuple(obj.shape)}")
        elif isinstance(obj, np.ndarray):
            yield f"<array {next(counter)}>", _array_loader(obj)
        elif isinstance(obj, (bytes, bytearray)):
            yield f"<bytes {next(counter)}>", self._file_loader(obj)
        elif isinstance(obj, Iterable):
            for item in obj:
                yield from self._expand(item, counter)
        else:
            raise TypeError(
                f"cannot score a {type(obj).__name__}; pass paths, folders, PIL images, tensors, arrays or lists"
            )

    def _file_loader(self, source: Any) -> Callable[[], torch.Tensor]:
        return lambda: load_image(source, background=self.background, max_pixels=self.max_pixels)

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
