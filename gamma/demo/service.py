"""What the demo page does, without the page: score uploaded bytes, rank, adapt, read the routers.

Everything here takes the *contents* of uploaded files (bytes) and decodes them with gamma's own reader
(:func:`gamma.io.load_image` through :class:`gamma.scorer.Scorer`), exactly as ``gamma score`` does; no function takes a
path from a visitor. The page (:mod:`gamma.demo.app`) and its ``POST /score`` route are thin layers over this module.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapt import MIN_PAIRS
from ..families import is_family, scoring_of
from ..io import MAX_PIXELS
from ..prompts import ATTRIBUTES, LEVELS
from ..scorer import Scorer, to_mos

logger = logging.getLogger(__name__)

#: Largest upload the demo accepts, in bytes (the page and ``POST /score``); ``gamma demo --max-upload-mb`` sets it.
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
#: Largest image the demo decodes, in pixels (the decompression-bomb guard; ``--max-pixels``).
DEMO_MAX_PIXELS = 40_000_000


class DemoInputError(ValueError):
    """An upload the demo cannot score; the message says why, in words a visitor understands."""


@dataclass
class DemoService:
    """The scoring behind the page: one model, one :class:`Scorer` per precision (built on first use).

    Args:
        weights: the weight file (``None``: no model; every call then raises :class:`DemoInputError` with ``missing``).
        missing: why there is no model (shown on the page when ``weights`` is ``None``).
        prompt_set: prompts the weights expect (``None``: from the file; :func:`gamma.hub.resolve_prompt_set`).
        prompt_set_override: use ``prompt_set`` even where the file records another (deliberately).
        device: where to run.
        max_pixels: the decoder's pixel limit.
        max_upload_bytes: the largest upload accepted.
    """

    weights: str | os.PathLike | None
    missing: str | None = None
    prompt_set: str | None = None
    prompt_set_override: bool = False
    device: str | None = None
    max_pixels: int = DEMO_MAX_PIXELS
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    _scorers: dict[str, Scorer] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # ---------------------------------------------------------------------------------------------- the model
    def scorer(self, precision: str | None = None) -> Scorer:
        """The scorer for ``precision`` (``None``: as stored), with attributes and distribution on Gamma models."""
        if self.weights is None:
            raise DemoInputError(self.missing or "no weight file: start the demo with --weights FILE")
        key = precision or "stored"
        with self._lock:
            if key not in self._scorers:
                base = self._scorers.get("stored")
                if base is None and key != "stored":
                    base = self.scorer(None)
                gamma_model = base is None or {"attributes", "distribution"} <= scoring_of(base.model).outputs
                self._scorers[key] = Scorer(
                    self.weights, prompt_set=self.prompt_set, prompt_set_override=self.prompt_set_override,
                    device=self.device, precision=precision,
                    max_pixels=self.max_pixels, num_workers=0, attributes=gamma_model, distribution=gamma_model)
            return self._scorers[key]

    @property
    def is_gamma(self) -> bool:
        return is_family(self.scorer().model, "gamma")

    @property
    def scenes(self) -> list[str]:
        """Scenes the model can be told (SDP models; ``auto`` first), else an empty list."""
        model = self.scorer().model
        if not is_family(model, "gamma") or model.config.prompt_set != "sdp":
            return []
        from ..prompts import SCENES

        return ["auto", *SCENES]

    def describe(self) -> str:
        """One line naming the weights and the model, for the page's header and the terminal."""
        if self.weights is None:
            return f"NO MODEL: {self.missing}"
        model = self.scorer().model
        gamma = is_family(model, "gamma")
        kind = "Gamma" if gamma else type(model).__name__
        extra = f", prompts {model.config.prompt_set}" if gamma else ""
        return f"{kind} from {os.path.basename(os.fspath(self.weights))}{extra}"

    # ---------------------------------------------------------------------------------------------- uploads
    def check_upload(self, data: bytes, name: str = "upload") -> bytes:
        """Refuse an empty or oversized upload before decoding it."""
        if not data:
            raise DemoInputError(f"{name}: the file is empty")
        if len(data) > self.max_upload_bytes:
            raise DemoInputError(f"{name}: the file is {len(data) / 2**20:.1f} MB; the demo accepts at most "
                                 f"{self.max_upload_bytes / 2**20:.0f} MB")
        return data

    # ---------------------------------------------------------------------------------------------- score
    def score_bytes(self, data: bytes, name: str = "upload", *, scene: str | None = None,
                    precision: str | None = None, mos_range: tuple[float, float] | None = None) -> dict[str, Any]:
        """Score one uploaded image; a JSON-ready dict: ``name, score`` (+ ``mos``, ``distribution``, ``std``,
        ``attributes``, ``scene``, ``scene_probabilities``). Raises :class:`DemoInputError` for an unreadable file."""
        return self.score_many([(name, data)], scene=scene, precision=precision, mos_range=mos_range)[0]

    def score_many(self, uploads: list[tuple[str, bytes]], *, scene: str | None = None, precision: str | None = None,
                   mos_range: tuple[float, float] | None = None, skip_errors: bool = False) -> list[dict[str, Any]]:
        """Score uploads ``(name, bytes)`` in order; with ``skip_errors`` a bad one gives ``{"name", "error"}``."""
        scorer = self.scorer(precision)
        scene = scene or None
        if scene is not None and scene not in self.scenes:
            raise DemoInputError(f"scene {scene!r} is not one this model knows ({', '.join(self.scenes) or 'none'})")
        if self.scenes and scene is None:
            scene = "auto"
        checked: list[tuple[str, bytes | None, str | None]] = []
        for name, data in uploads:
            try:
                checked.append((name, self.check_upload(data, name), None))
            except DemoInputError as exc:
                if not skip_errors:
                    raise
                checked.append((name, None, str(exc)))
        good = [data for _, data, _ in checked if data is not None]
        results = iter(scorer.iter_scores(good, scene, on_error="skip") if good else [])
        out = []
        for name, data, error in checked:
            if data is None:
                out.append({"name": name, "error": error})
                continue
            r = next(results)
            if not r.ok:
                reason = r.error.split(": ", 1)[-1] if r.error else "unreadable"
                message = f"{name}: cannot score this file: {reason}"
                if not skip_errors:
                    raise DemoInputError(message)
                out.append({"name": name, "error": message})
                continue
            out.append(_result_dict(name, r.score, r.values, mos_range))
        return out

    # ---------------------------------------------------------------------------------------------- adapt
    def adapt(self, pairs: list[tuple[str, bytes, float]], targets: list[tuple[str, bytes]], *,
              scene: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Fit to image-score pairs, then score ``targets`` under that requirement.

        Gamma: :meth:`Scorer.adapt` (a monotone map of the score; in-sample and leave-one-out SRCC/PLCC). PromptIQA:
        the pairs are its prompt. Returns (the fit report as a dict, one row per target with ``adapted``).
        """
        if len(pairs) < MIN_PAIRS:
            raise DemoInputError(f"adapting needs at least {MIN_PAIRS} image-score pairs, got {len(pairs)}")
        for name, data, _ in pairs:
            self.check_upload(data, name)
        base = self.scorer()
        fresh = Scorer(model=base.model, device=base.device, max_pixels=self.max_pixels, num_workers=0)
        prompt = [(data, float(score)) for _, data, score in pairs]
        scene = scene or (self.scenes[1] if self.scenes else None)  # the prompt's images need a named scene
        try:
            if fresh.is_promptiqa:
                fresh.set_prompt(prompt)
                report: dict[str, Any] = {"model": "promptiqa", "pairs": len(pairs)}
            else:
                report = fresh.adapt(prompt, scene=scene).report.to_dict()
        except ValueError as exc:  # PromptFileError, NotEnoughPairsError, a prompt image that does not decode
            raise DemoInputError(_rename_bytes(str(exc), [n for n, _, _ in pairs])) from None
        rows = []
        good = [(name, self.check_upload(data, name)) for name, data in targets]
        for (name, _), r in zip(good, fresh.iter_scores([d for _, d in good], scene, on_error="skip"), strict=True):
            if r.ok:
                rows.append({"name": name, "score": r.score, "adapted": r.values.get("adapted", r.score)})
            else:
                rows.append({"name": name, "error": r.error.split(": ", 1)[-1] if r.error else "unreadable"})
        return report, rows

    # ---------------------------------------------------------------------------------------------- experts
    def routing(self, data: bytes, name: str = "upload", *, scene: str | None = None) -> tuple[np.ndarray, list[str]]:
        """Mean router weight of each expert in each image-tower MoAE block for one image.

        Returns (array (blocks, experts), block labels). Raises :class:`DemoInputError` for a model without MoAE.
        """
        from ..analysis import image_moae_blocks

        base = self.scorer()
        model = base.model
        if not callable(getattr(model, "watch_routing", None)):  # the routers of Gamma's MoAE blocks
            raise DemoInputError("the Experts tab reads Gamma's MoAE routers; this model has none")
        blocks = image_moae_blocks(model)
        if not blocks:
            raise DemoInputError("this model has no MoAE blocks (moae_layers=0): there are no routers to show")
        index = {module: row for row, (_, module) in enumerate(blocks)}
        sums = torch.zeros(len(blocks), blocks[0][1].num_experts, dtype=torch.float64)
        counts = [0] * len(blocks)

        def add(module: Any, gate: torch.Tensor) -> None:
            row = index.get(module)
            if row is not None:
                flat = gate.reshape(-1, gate.shape[-1]).double().cpu()
                sums[row] += flat.sum(dim=0)
                counts[row] += flat.shape[0]

        self.check_upload(data, name)
        scene = scene or (self.scenes[1] if self.scenes else None)
        plain = Scorer(model=model, device=base.device, max_pixels=self.max_pixels, num_workers=0)
        with self._lock, model.watch_routing(add):  # the hooks are the model's: one reading at a time
            r = next(plain.iter_scores([data], scene, on_error="skip"))
        if not r.ok:
            raise DemoInputError(f"{name}: cannot score this file: {r.error.split(': ', 1)[-1]}")
        weights = (sums / torch.tensor([max(c, 1) for c in counts], dtype=torch.float64)[:, None]).numpy()
        return weights, [f"image block {i}" for i, _ in blocks]


def _result_dict(name: str, score: float, values: dict[str, Any], mos_range: tuple[float, float] | None
                 ) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "score": float(score)}
    if mos_range is not None:
        out["mos"] = float(to_mos(score, *mos_range))
    probs = {level: values[f"p_{level}"] for level in LEVELS if f"p_{level}" in values}
    if probs:
        out["distribution"] = {k: float(v) for k, v in probs.items()}
        out["std"] = float(values["std"])
    attrs = {a: float(values[a]) for a in ATTRIBUTES if a in values}
    if attrs:
        out["attributes"] = attrs
    if values.get("scene") is not None:
        out["scene"] = values["scene"]
        scene_p = {k[2:]: float(v) for k, v in values.items()
                   if k.startswith("p_") and k[2:] not in LEVELS and isinstance(v, float) and math.isfinite(v)}
        if scene_p:
            out["scene_probabilities"] = scene_p
    return out


def _rename_bytes(message: str, names: list[str]) -> str:
    """Messages about prompt images name them ``<bytes i>``; put the uploaded file names back."""
    for i, name in enumerate(names):
        message = message.replace(f"<bytes {i}>", name)
    return message


def default_max_pixels() -> int:
    return min(DEMO_MAX_PIXELS, MAX_PIXELS)
