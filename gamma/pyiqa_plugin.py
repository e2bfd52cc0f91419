"""Gamma as a pyiqa metric: ``pyiqa.create_metric('gamma')``, ``pyiqa.create_metric('gamma_sdp', scene=...)``, and
pyiqa's own command line ``pyiqa gamma -t photos/``; PromptIQA as ``pyiqa.create_metric('promptiqa',
prompt_file='isp.csv')`` (:class:`GammaPromptIQA`; pyiqa's command line cannot pass a prompt file).

The only module of gamma that imports pyiqa. The metric names get into pyiqa through ``_gamma_pyiqa_hook``, a
start-up hook installed with gamma (and run by ``import gamma``) that imports neither gamma nor pyiqa: right after
pyiqa's import it adds gamma's rows to pyiqa's metric table and registers :class:`GammaIQA` by its import path, so
pyiqa imports this module when a gamma metric is first created. The ``pyiqa.archs`` entry point declared in
``pyproject.toml`` calls the same registration when pyiqa loads its plugins.

Contract (pyiqa's): no-reference (``NR``), ``lower_better=False``, ``score_range='~0, ~1'`` (the normalised MOS scale);
input RGB in [0, 1] (a tensor (B, 3, H, W), or a file path, bytes or PIL image, read with :func:`gamma.io.load_image`
like everywhere else in gamma); output (B, 1); ``as_loss=True``
gives gradients with respect to the input; ``metric.net.test_sample`` is the number of test crops.

Precision: ``precision='bf16'`` (``fp32``, ``bf16``, ``fp16``, ``int8`` on the CPU, ``auto``) runs the image tower in
that precision (:meth:`gamma.GammaModel.to_precision`). pyiqa builds the network on the CPU and then moves it to the
metric's device, so the precision is applied right after that move, for the device the network is on (``auto``
resolves for it, and int8 on CUDA is an error when the metric is created).

Weights: ``pretrained_model_path=`` (the release's ``{'params': ...}`` file, ours, or safetensors), else the known
weight name of the metric (``gamma`` / ``gamma_sdp``), found by :func:`gamma.hub.resolve_weights` (``$GAMMA_WEIGHTS`` /
``$GAMMA_SDP_WEIGHTS``, then the cache folder). The architecture is read from the file, so a small model saved in the
release layout works as well as the real one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pyiqa.models.inference_model import InferenceModel
from torch import nn

from _gamma_pyiqa_hook import ARCH_NAME, METRICS, PROMPTIQA_ARCH_NAME, is_registered, register

from .archs.gamma import GammaModel
from .archs.precision import PRECISIONS, resolve_precision
from .archs.promptiqa import PromptIQA, check_images, resize_like_cv2
from .data.promptiqa import random_vertical_flip
from .factory import create_model
from .hub import KNOWN_WEIGHTS
from .io import PROMPTIQA_BACKENDS, load_image, load_promptiqa_image
from .prompt_file import PromptFileError, read_prompt_file


class GammaIQA(nn.Module):
    """pyiqa arch wrapping a :class:`gamma.GammaModel`.

    Args:
        pretrained_model_path: a weight file; default: the file of ``weights``.
        weights: known weight name used when no path is given (``gamma`` or ``gamma_sdp``).
        prompt_set: prompts the weights expect (the release's files do not record it).
        scene: default scene for SDP prompts; ``metric(x, scene=...)`` overrides it per call.
        test_sample: number of test-time crops (default: the model's, 10 random 224 crops).
        crop_mode: test-time crop protocol (``random``, ``grid``, ``five``, ``center``, ``resize``).
        model_name: build this variant and load the weights into it, instead of reading the architecture from the
            file; with ``pretrained=False`` the variant keeps random weights (no file needed).
        pretrained: load weights at all.
        allow_unsafe: allow weight files that need a full unpickle.
        precision: how the image tower computes (see the module docstring); ``None``: as the weights are stored.
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
        precision: str | None = None,
    ) -> None:
        super().__init__()
        _decode_with_gamma(InferenceModel)
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        overrides = {"prompt_set": prompt_set} if prompt_set else {}
        if not pretrained:
            name, kwargs = model_name or "gamma_vitb16", overrides
        else:
            source = pretrained_model_path if pretrained_model_path is not None else weights
            name, kwargs = model_name, {"pretrained": source, "allow_unsafe": allow_unsafe, **overrides}

        def build(precision: str | None = None, device: torch.device | None = None) -> GammaModel:
            net = create_model(name, precision=precision, device=device, **kwargs)
            # pyiqa checks the input range itself (and turns the check off for as_loss, whose generic test feeds
            # randn).
            net.check_input_range = False
            net.set_crop_protocol(mode=crop_mode, num=test_sample)
            return net

        self._build = build
        self.net = build()
        self._precision = precision  # applied by `to` (pyiqa moves the net to the metric's device) or the first call
        self.scene = scene
        if scene is not None:
            self.net.scene_index(scene, 1, torch.device("cpu"))  # fail now on an unknown scene

    @property
    def test_sample(self) -> int:
        return self.net.test_sample

    @test_sample.setter
    def test_sample(self, num: int) -> None:
        self.net.test_sample = num

    def to(self, *args: Any, **kwargs: Any) -> GammaIQA:
        """Move the network, then apply ``precision`` for the device it is now on."""
        super().to(*args, **kwargs)
        self._apply_precision()
        return self

    def _apply_precision(self) -> None:
        if self._precision is None:
            return
        wanted, self._precision = self._precision, None
        device = self.net.score_level.device
        target = resolve_precision(wanted, device)
        if self.net.precision in ("bf16", "fp16") and target != self.net.precision:
            # A file stored in bf16 / fp16 (gamma convert --precision) has no fp32 weights left to convert from.
            self.net = self._build(target, device)
        else:
            self.net.to_precision(target)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Also accepts the model's own layout (the release's keys, without ``net.``): ``metric.load_weights(file)``."""
        if state_dict and not any(k.startswith("net.") for k in state_dict):
            return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B, 1) of images (B, 3, H, W) in [0, 1]; pyiqa hands grayscale (B, 1, H, W) through as is."""
        self._apply_precision()  # when the metric was never moved (used outside pyiqa)
        if x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x, scene=scene if scene is not None else self.scene).unsqueeze(1)


class GammaPromptIQA(nn.Module):
    """pyiqa arch wrapping gamma's :class:`~gamma.archs.PromptIQA`, scoring against the prompt of a file.

    Contract: no-reference, ``lower_better=False``, ``score_range='0, 1'`` (the prompt's own [0, 1] scale); input RGB
    in [0, 1], a tensor (B, 3, H, W) of any size (resized to the model's input with the OpenCV-like bicubic of
    :func:`gamma.archs.promptiqa.resize_like_cv2`) or a file path / bytes / PIL image (read like the prompt's images);
    output (B, 1). The prompt is encoded once and reused (the model's content-keyed cache), also under ``as_loss``.

    Args:
        prompt_file: a CSV ``image,score`` (image paths relative to the CSV; scores in [0, 1]; at least 2 pairs).
            Required: the metric has no default prompt.
        pretrained_model_path: a weight file (the authors' ``best_model.pth.tar`` or ours); default: the file of
            ``weights``, found by :func:`gamma.hub.resolve_weights`.
        weights: known weight name used when no path is given.
        model_name: build this variant (``promptiqa``, ``promptiqa_test``) and load the weights into it; with
            ``pretrained=False`` it keeps random weights.
        pretrained: load weights at all.
        backend: how files are decoded and resized, ``cv2`` (the official preprocessing) or ``pil``.
        prompt_flip: flip each prompt image upside down with p = 0.5 on every call, as the official test code does
            (random scores; for exact reproduction only). ``seed`` seeds it.
        allow_unsafe: allow weight files that need a full unpickle.
    """

    def __init__(
        self,
        prompt_file: str | os.PathLike | None = None,
        pretrained_model_path: str | os.PathLike | None = None,
        weights: str = "promptiqa",
        model_name: str | None = None,
        pretrained: bool = True,
        backend: str = "cv2",
        prompt_flip: bool = False,
        seed: int = 0,
        allow_unsafe: bool = False,
    ) -> None:
        super().__init__()
        if prompt_file is None:
            raise ValueError(
                "the promptiqa metric scores images relative to a prompt of image-score pairs: pass "
                "prompt_file='isp.csv', a CSV with the columns image,score (image paths relative to the CSV, scores "
                "in [0, 1], at least 2 pairs): pyiqa.create_metric('promptiqa', prompt_file='isp.csv', "
                "pretrained_model_path='best_model.pth.tar')")
        if backend not in PROMPTIQA_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(PROMPTIQA_BACKENDS)}, got {backend!r}")
        pairs = read_prompt_file(prompt_file)  # before the model: a bad file fails fast
        _decode_with_gamma(InferenceModel)
        if not pretrained:
            net = create_model(model_name or "promptiqa")
        else:
            source = pretrained_model_path if pretrained_model_path is not None else weights
            net = create_model(model_name, pretrained=source, allow_unsafe=allow_unsafe)
        if not isinstance(net, PromptIQA):
            raise ValueError(f"the promptiqa metric needs PromptIQA weights, got a {type(net).__name__}")
        self.net = net.requires_grad_(False)  # frozen: the encoded prompt is cached even when gradients flow
        self.net.check_input_range = False  # pyiqa checks the range itself (and not for as_loss)
        self.backend = backend
        self.prompt_source = pairs.source
        try:
            images = torch.stack([self.decode(path) for path in pairs.images])  # (n, 3, S, S)
            scores = torch.tensor(pairs.scores, dtype=torch.float32)
            self.net.encode_prompt(images, scores)  # checks the scores (in [0, 1]) now, not at the first call
        except ValueError as exc:
            raise PromptFileError(f"{pairs.source}: {exc}") from exc
        self.register_buffer("prompt_images", images, persistent=False)
        self.register_buffer("prompt_scores", scores, persistent=False)
        self.prompt_flip = prompt_flip
        self._flip = torch.Generator().manual_seed(seed) if prompt_flip else None

    def decode(self, source: Any) -> torch.Tensor:
        """A file path, bytes or PIL image as the model reads it: RGB (3, S, S) in [0, 1]."""
        size = self.net.config.image_size
        if isinstance(source, (str, os.PathLike, bytes, bytearray)):
            return load_promptiqa_image(source, size, backend=self.backend)
        image = load_image(source)
        return image if image.shape[-2:] == (size, size) else resize_like_cv2(check_images(image[None]), size)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, 1) of images (B, 3, H, W) in [0, 1] against the prompt; grayscale (B, 1, H, W) is expanded."""
        if x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        images = self.prompt_images
        if self._flip is not None:
            images = random_vertical_flip(images, generator=self._flip)
        return self.net(x, prompt=(images, self.prompt_scores)).unsqueeze(1)


def _decode_with_gamma(inference_model: type) -> None:
    """Make gamma's metrics (and only them) read file paths, bytes and PIL images with :func:`gamma.io.load_image`.

    pyiqa turns a non-tensor input into a tensor in ``InferenceModel._to_batched_tensor`` (``PIL.convert('RGB')``: no
    EXIF rotation, transparency dropped) before the network sees it. The wrapper routes gamma's metric names to
    gamma's reader, so pyiqa, the CLI and the scorer score the same file the same way; every other metric keeps
    pyiqa's behaviour. pyiqa offers no public route for this (its ``InferenceModel`` is not configurable per metric),
    hence the wrapper; skipped if this pyiqa has no such method. Called when a gamma metric is created.
    """
    original = getattr(inference_model, "_to_batched_tensor", None)
    if original is None or getattr(original, "_gamma_wrapped", False):
        return

    def _to_batched_tensor(self: Any, img: Any) -> Any:
        if getattr(self, "metric_name", None) in METRICS and not torch.is_tensor(img):
            decode = getattr(getattr(self, "net", None), "decode", None)  # PromptIQA reads files its own way
            return (decode(img) if decode is not None else load_image(img))[None]  # (1, 3, H, W)
        return original(self, img)

    _to_batched_tensor._gamma_wrapped = True  # type: ignore[attr-defined]
    inference_model._to_batched_tensor = _to_batched_tensor


__all__ = ["ARCH_NAME", "KNOWN_WEIGHTS", "METRICS", "PROMPTIQA_ARCH_NAME", "GammaIQA", "GammaPromptIQA",
           "is_registered", "register"]
