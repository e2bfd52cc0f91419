"""Gamma as a pyiqa metric: ``pyiqa.create_metric('gamma')`` and ``pyiqa.create_metric('gamma_sdp', scene=...)``.

The only module of gamma that imports pyiqa, and only inside :func:`register`.

How the names get into pyiqa:

- ``import gamma`` calls :func:`enable`: if pyiqa is already imported it registers at once; otherwise it adds a
  one-shot import hook that registers right after pyiqa's own import finishes. ``import gamma`` therefore never pays
  for importing pyiqa (seconds), and the order of ``import gamma`` / ``import pyiqa`` does not matter.
- pyiqa versions that load plugins call :func:`register` through the ``pyiqa.archs`` entry point declared in
  ``pyproject.toml`` — but only when a network is first built, after ``create_metric`` has checked the name, so
  ``import gamma`` is what makes ``create_metric('gamma')`` work.

Contract (pyiqa's): no-reference (``NR``), ``lower_better=False``, ``score_range='~0, ~1'`` (the normalised MOS scale);
input RGB in [0, 1] (a tensor (B, 3, H, W), or a file path, bytes or PIL image, read with :func:`gamma.io.load_image`
like everywhere else in gamma); output (B, 1); ``as_loss=True``
gives gradients with respect to the input; ``metric.net.test_sample`` is the number of test crops.

Weights: ``pretrained_model_path=`` (the release's ``{'params': ...}`` file, ours, or safetensors), else
:func:`gamma.hub.resolve_weights` (``$GAMMA_WEIGHTS`` / ``$GAMMA_SDP_WEIGHTS``, then the cache folder). The
architecture is read from the file, so a small model saved in the release layout works as well as the real one.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .factory import create_model
from .hub import KNOWN_WEIGHTS, resolve_weights

logger = logging.getLogger(__name__)

#: Name of the arch class in pyiqa's ARCH_REGISTRY.
ARCH_NAME = "GammaIQA"

#: Metric name -> pyiqa default config.
METRICS: dict[str, dict[str, Any]] = {
    "gamma": {
        "metric_opts": {"type": ARCH_NAME, "weights": "gamma", "prompt_set": "naive"},
        "metric_mode": "NR",
        "lower_better": False,
        "score_range": "~0, ~1",
    },
    "gamma_sdp": {
        "metric_opts": {"type": ARCH_NAME, "weights": "gamma_sdp", "prompt_set": "sdp", "scene": "natural"},
        "metric_mode": "NR",
        "lower_better": False,
        "score_range": "~0, ~1",
    },
}

_lock = threading.Lock()
_registered = False


class GammaIQA(nn.Module):
    """pyiqa arch wrapping a :class:`gamma.GammaModel`.

    Args:
        pretrained_model_path: a weight file; default: :func:`gamma.hub.resolve_weights` of ``weights``.
        weights: known weight name used when no path is given (``gamma`` or ``gamma_sdp``).
        prompt_set: prompts the weights expect (the release's files do not record it).
        scene: default scene for SDP prompts; ``metric(x, scene=...)`` overrides it per call.
        test_sample: number of test-time crops (default: the model's, 10 random 224 crops).
        crop_mode: test-time crop protocol (``random``, ``grid``, ``five``, ``center``, ``resize``).
        model_name: build this variant and load the weights into it, instead of reading the architecture from the
            file; with ``pretrained=False`` the variant keeps random weights (no file needed).
        pretrained: load weights at all.
        allow_unsafe: allow weight files that need a full unpickle.
    """

    def __init__(
        self,
        pretrained_model_path: str | os.PathLike | None = None,
        weights: str = "gamma",
        prompt_set: str | None = None,
        scene: str | None = None,
        test_sample: int | None = None,
        crop_mode: str | None = None,
        model_name: str | None = None,
        pretrained: bool = True,
        allow_unsafe: bool = False,
    ) -> None:
        super().__init__()
        overrides = {"prompt_set": prompt_set} if prompt_set else {}
        if not pretrained:
            self.net = create_model(model_name or "gamma_vitb16", **overrides)
        else:
            path = resolve_weights(weights, pretrained_model_path)
            self.net = create_model(model_name, pretrained=path, allow_unsafe=allow_unsafe, **overrides)
        # pyiqa checks the input range itself (and turns the check off for as_loss, whose generic test feeds randn).
        self.net.check_input_range = False
        self.net.set_crop_protocol(mode=crop_mode, num=test_sample)
        self.scene = scene
        if scene is not None:
            self.net.scene_index(scene, 1, torch.device("cpu"))  # fail now on an unknown scene

    @property
    def test_sample(self) -> int:
        return self.net.test_sample

    @test_sample.setter
    def test_sample(self, num: int) -> None:
        self.net.test_sample = num

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Also accepts the model's own layout (the release's keys, without ``net.``): ``metric.load_weights(file)``."""
        if state_dict and not any(k.startswith("net.") for k in state_dict):
            return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B, 1) of images (B, 3, H, W) in [0, 1]; pyiqa hands grayscale (B, 1, H, W) through as is."""
        if x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x, scene=scene if scene is not None else self.scene).unsqueeze(1)


def register() -> None:
    """Register gamma's metrics and arch in pyiqa (imports pyiqa). Safe to call any number of times."""
    global _registered
    with _lock:
        if _registered:
            return
        from pyiqa.default_model_configs import DEFAULT_CONFIGS
        from pyiqa.utils.registry import ARCH_REGISTRY

        # Look in the registry's table directly: `name in ARCH_REGISTRY` would load the entry points, i.e. call us.
        known = getattr(ARCH_REGISTRY, "_obj_map", {})
        if known.get(ARCH_NAME) is not GammaIQA:
            try:
                ARCH_REGISTRY.register(GammaIQA, override=True)
            except TypeError:  # pyiqa < 0.1.14: no `override`
                ARCH_REGISTRY.register(GammaIQA)
        try:
            from pyiqa.models.inference_model import InferenceModel

            _decode_with_gamma(InferenceModel)
        except ImportError:  # a pyiqa laid out differently: paths are then decoded by pyiqa
            logger.debug("pyiqa's InferenceModel not found; file inputs of gamma's metrics use pyiqa's reader")
        for name, config in METRICS.items():
            existing = DEFAULT_CONFIGS.get(name)
            if existing is not None and existing.get("metric_opts", {}).get("type") != ARCH_NAME:
                logger.warning("pyiqa already defines a metric %r; leaving it as it is", name)
                continue
            DEFAULT_CONFIGS[name] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
        _registered = True
        logger.debug("registered %s in pyiqa", ", ".join(METRICS))


def _decode_with_gamma(inference_model: type) -> None:
    """Make gamma's metrics (and only them) read file paths, bytes and PIL images with :func:`gamma.io.load_image`.

    pyiqa turns a non-tensor input into a tensor in ``InferenceModel._to_batched_tensor`` (``PIL.convert('RGB')``: no
    EXIF rotation, transparency dropped) before the network sees it. The wrapper routes gamma's metric names to
    gamma's reader, so pyiqa, the CLI and the scorer score the same file the same way; every other metric keeps
    pyiqa's behaviour. Skipped if this pyiqa has no such method.
    """
    original = getattr(inference_model, "_to_batched_tensor", None)
    if original is None or getattr(original, "_gamma_wrapped", False):
        return

    def _to_batched_tensor(self: Any, img: Any) -> Any:
        if getattr(self, "metric_name", None) in METRICS and not torch.is_tensor(img):
            from .io import load_image

            return load_image(img)[None]  # (1, 3, H, W)
        return original(self, img)

    _to_batched_tensor._gamma_wrapped = True  # type: ignore[attr-defined]
    inference_model._to_batched_tensor = _to_batched_tensor


def is_registered() -> bool:
    return _registered


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``pyiqa`` is about to be imported, wraps its loader to call :func:`register`."""

    def __init__(self) -> None:
        self._busy = False
        self.fired = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "pyiqa" or self._busy or self.fired:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec("pyiqa")  # the real spec, from the other finders
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        self.fired = True
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            try:
                register()
            except Exception as exc:  # noqa: BLE001 - never break pyiqa's import because of gamma
                logger.warning("could not register gamma's metrics in pyiqa: %s", exc)

        loader.exec_module = exec_module  # this loader instance serves only this import of pyiqa
        return spec


_hook: _RegisterAfterImport | None = None


def enable() -> None:
    """Make gamma's metrics available in pyiqa whenever pyiqa is (or gets) imported, without importing it."""
    global _hook
    module = sys.modules.get("pyiqa")
    if module is not None:
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            return  # pyiqa is importing right now (and imported us): its entry point will call register()
        try:
            register()
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not register gamma's metrics in pyiqa: %s", exc)
        return
    if _hook is None:
        _hook = _RegisterAfterImport()
        sys.meta_path.insert(0, _hook)


__all__ = ["ARCH_NAME", "KNOWN_WEIGHTS", "METRICS", "GammaIQA", "enable", "is_registered", "register"]
