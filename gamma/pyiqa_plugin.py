"""Gamma as a pyiqa metric: ``pyiqa.create_metric('gamma')``, ``pyiqa.create_metric('gamma_sdp', scene=...)``, and
pyiqa's own command line ``pyiqa gamma -t photos/``; PromptIQA as ``pyiqa.create_metric('promptiqa',
isp='isp.csv')`` (:class:`PromptIQAMetric`; without ``isp`` it scores against the documented default ISP set of
:func:`gamma.isp.default_isp_set`, made from pictures that ship with scikit-image, and says so in the log).

The only module of gamma that imports pyiqa. The metric names get into pyiqa through ``_gamma_pyiqa_hook``, a
start-up hook installed with gamma (and run by ``import gamma``) that imports neither gamma nor pyiqa: right after
pyiqa's import it adds gamma's rows to pyiqa's metric table and registers :class:`GammaMetric` and
:class:`PromptIQAMetric` (and their old names ``GammaIQA``, ``GammaPromptIQA``) by their import paths, so pyiqa
imports this module when a gamma metric is first created. The ``pyiqa.archs`` entry point declared in
``pyproject.toml`` calls the same registration when pyiqa loads its plugins.

Contract (pyiqa's): no-reference (``NR``), ``lower_better=False``, ``score_range='~0, ~1'`` (the normalised MOS scale);
input RGB in [0, 1] (a tensor (B, 3, H, W), or a file path, bytes or PIL image, read with :func:`gamma.io.load_image`
like everywhere else in gamma); output (B, 1); ``as_loss=True``
gives gradients with respect to the input; ``metric.net.test_sample`` is the number of test crops.

Precision: ``precision='bf16'`` (``fp32``, ``bf16``, ``fp16``, ``int8`` on the CPU, ``auto``) runs the image tower in
that precision (:func:`gamma.archs.precision.place`). pyiqa builds the network on the CPU and then moves it to the
metric's device, so the precision is applied at the first call, for the device the network is then on (``auto``
resolves for it; int8 on CUDA is an error at that call). A file stored in bf16 / fp16 asked for another precision is
read again for it (its fp32 weights are gone).

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

from _gamma_pyiqa_hook import ARCH_NAME, METRICS, PROMPTIQA_ARCH_NAME, is_registered, register  # noqa: F401

from ._deprecation import renamed_options
from .archs.precision import PRECISIONS, place, resolve_precision
from .factory import create_model
from .families import ReadOptions, scoring_of
from .hub import KNOWN_WEIGHTS, PromptSetError
from .io import PROMPTIQA_BACKENDS, load_image
from .isp import IspPrompt, default_isp_set
from .prompt_file import PromptFileError, as_prompt_pairs


class GammaMetric(nn.Module):
    """pyiqa arch wrapping a :class:`gamma.GammaModel` (old name: ``GammaIQA``).

    Args:
        pretrained_model_path: a weight file; default: the file of ``weights``.
        weights: known weight name used when no path is given (``gamma`` or ``gamma_sdp``).
        prompt_set: prompts the weights expect (the metric's: ``naive`` for ``gamma``, ``sdp`` for ``gamma_sdp``);
            a file that records another is refused unless ``prompt_set_override``; ``None``: the file's
            (:func:`gamma.hub.resolve_prompt_set`).
        prompt_set_override: use ``prompt_set`` even where the file records another (deliberately).
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
        prompt_set_override: bool = False,
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
            name, kwargs = model_name, {"pretrained": source, "allow_unsafe": allow_unsafe,
                                        "prompt_set_override": prompt_set_override, **overrides}

        def build(precision: str | None = None, device: torch.device | None = None) -> nn.Module:
            net = create_model(name, precision=precision, device=device, **kwargs)
            # pyiqa checks the input range itself (and turns the check off for as_loss, whose generic test feeds
            # randn).
            net.check_input_range = False
            net.set_crop_protocol(mode=crop_mode, num=test_sample)
            return net

        self._build = build
        try:
            self.net = build()
        except PromptSetError as exc:  # the metric's name chose the prompt set, not the user: say how to choose
            raise PromptSetError(exc.path, exc.recorded, exc.requested, hint="; the metric 'gamma' asks for 'naive' "
                                 "prompts, 'gamma_sdp' for 'sdp': pass prompt_set=None to take the file's") from None
        self._precision = precision  # applied at the first call, on the device pyiqa moved the network to
        self.scene = scene
        if scene is not None:
            self.net.scene_index(scene, 1, torch.device("cpu"))  # fail now on an unknown scene

    @property
    def test_sample(self) -> int:
        return self.net.test_sample

    @test_sample.setter
    def test_sample(self, num: int) -> None:
        self.net.test_sample = num

    def _apply_precision(self) -> None:
        """The precision asked for, on the device the network is on now (once)."""
        if self._precision is None:
            return
        wanted, self._precision = self._precision, None
        device = self.net.score_level.device
        target = resolve_precision(wanted, device)
        with torch.inference_mode(False):  # the first call may run under inference mode: the weights must not
            if self.net.precision in ("bf16", "fp16") and target != self.net.precision:
                # A file stored in bf16 / fp16 (gamma convert --precision) has no fp32 weights left to convert from.
                self.net = self._build(target, device)
            else:
                self.net = place(self.net, None, target)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Also accepts the model's own layout (the release's keys, without ``net.``): ``metric.load_weights(file)``."""
        if state_dict and not any(k.startswith("net.") for k in state_dict):
            return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B, 1) of images (B, 3, H, W) in [0, 1]; pyiqa hands grayscale (B, 1, H, W) through as is."""
        self._apply_precision()
        if x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x, scene=scene if scene is not None else self.scene).unsqueeze(1)


class PromptIQAMetric(nn.Module):
    """pyiqa arch wrapping gamma's :class:`~gamma.archs.PromptIQA`, scoring against an ISP set (old name:
    ``GammaPromptIQA``).

    Contract: no-reference, ``lower_better=False``, ``score_range='0, 1'`` (the ISP set's own [0, 1] scale); input RGB
    in [0, 1], a tensor (B, 3, H, W) of any size (resized to the model's input with the OpenCV-like bicubic of
    :func:`gamma.archs.promptiqa.resize_like_cv2`) or a file path / bytes / PIL image (read like the ISP images);
    output (B, 1). The ISP set is encoded once and reused, also under ``as_loss``.

    Args:
        isp: the image-score pairs: a CSV ``image,score`` (image paths relative to the CSV; scores in [0, 1]; at least
            2 pairs), a dict ``{image: score}`` or a list of pairs. Default: :func:`gamma.isp.default_isp_set` (10
            pictures that ship with scikit-image, distorted by a stated rule and scored by it; logged when used).
            Old name: ``prompt_file``.
        pretrained_model_path: a weight file (the authors' ``best_model.pth.tar`` or ours); default: the file of
            ``weights``, found by :func:`gamma.hub.resolve_weights`.
        weights: known weight name used when no path is given.
        model_name: build this variant (``promptiqa``, ``promptiqa_test``) and load the weights into it; with
            ``pretrained=False`` it keeps random weights.
        pretrained: load weights at all.
        backend: how files are decoded and resized, ``cv2`` (the official preprocessing) or ``pil``.
        isp_flip: flip each ISP image upside down with p = 0.5 on every call, as the official test code does
            (random scores; for exact reproduction only). ``seed`` seeds it. Old name: ``prompt_flip``.
        allow_unsafe: allow weight files that need a full unpickle.
    """

    def __init__(
        self,
        isp: Any = None,
        pretrained_model_path: str | os.PathLike | None = None,
        weights: str = "promptiqa",
        model_name: str | None = None,
        pretrained: bool = True,
        backend: str = "cv2",
        isp_flip: bool | None = None,
        seed: int = 0,
        allow_unsafe: bool = False,
        **old_names: Any,
    ) -> None:
        super().__init__()
        renames = {"prompt_file": "isp", "prompt_flip": "isp_flip"}
        unknown = sorted(set(old_names) - set(renames))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(unknown)}")
        named = renamed_options({"isp": isp, "isp_flip": isp_flip, **old_names}, renames, "the promptiqa metric")
        isp, isp_flip = named["isp"], bool(named["isp_flip"])
        if backend not in PROMPTIQA_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(PROMPTIQA_BACKENDS)}, got {backend!r}")
        pairs = as_prompt_pairs(isp) if isp is not None else default_isp_set()  # before the model: fails fast
        _decode_with_gamma(InferenceModel)
        if not pretrained:
            net = create_model(model_name or "promptiqa")
        else:
            source = pretrained_model_path if pretrained_model_path is not None else weights
            net = create_model(model_name, pretrained=source, allow_unsafe=allow_unsafe)
        self.scoring = scoring_of(net)
        if not self.scoring.takes_isp:
            raise ValueError(f"the promptiqa metric needs PromptIQA weights, got a {type(net).__name__}")
        self.net = net.requires_grad_(False)  # frozen: the encoded ISP set is reused even when gradients flow
        self.net.check_input_range = False  # pyiqa checks the range itself (and not for as_loss)
        self.backend = backend
        self.prompt_source = pairs.source
        try:
            images = torch.stack([self.decode(image) for image in pairs.images])  # (n, 3, S, S)
            self.isp = IspPrompt(self.net, images, torch.tensor(pairs.scores), flip=isp_flip, seed=seed)
        except ValueError as exc:
            raise PromptFileError(f"{pairs.source}: {exc}") from exc
        self.isp_flip = isp_flip

    def decode(self, source: Any) -> torch.Tensor:
        """A file path, bytes, PIL image or (3, H, W) tensor as the model reads it: RGB (3, S, S) in [0, 1]."""
        return self.scoring.decode(self.net, source, ReadOptions(backend=self.backend))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, 1) of images (B, 3, H, W) in [0, 1] against the ISP set; grayscale (B, 1, H, W) is expanded."""
        if x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        self.isp.to(x.device)
        x = self.scoring.fit(self.net, x) if self.scoring.fit is not None else x  # a loss's gradient passes through
        return self.scoring.forward(self.net, x, self.isp.for_batch()).unsqueeze(1)


#: Old names of the wrapper classes.
GammaIQA = GammaMetric
GammaPromptIQA = PromptIQAMetric


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


__all__ = ["ARCH_NAME", "KNOWN_WEIGHTS", "METRICS", "PROMPTIQA_ARCH_NAME", "GammaIQA", "GammaMetric",
           "GammaPromptIQA", "PromptIQAMetric", "is_registered", "register"]
