"""ONNX export of a Gamma model, and an onnxruntime runner that scores like the PyTorch model.

    gamma export Gamma.pth --onnx gamma.onnx                                   # score, distribution, attributes
    gamma export Gamma-Prompt.pth --prompt sdp --scene natural --onnx g.onnx   # one scene's prompts baked in
    Scorer("gamma.onnx", backend="onnxruntime").score("photos/")               # the same scores, run by onnxruntime

What the ONNX graph holds: the image tower (with its MoAE blocks), Gamma's adapter and the level head, with the text
features (the level prompts of every scene, or of the one ``--scene``; the attribute prompt pairs) computed once at
export and baked in as constants. The text tower is not exported.

The graph's contract:

- input ``crops``: float32 (N, 3, 224, 224), RGB in [0, 1], **not** CLIP-normalised: the CLIP mean/std normalisation
  is inside the graph (as in :meth:`gamma.GammaModel.backbone_features`). N is a dynamic axis (``batch``).
- outputs, per crop, as asked with ``outputs``: ``level_probs`` (N, S, 5): the softmax over the five level prompts of
  each of the S baked scenes (S = 1 for single-set prompts or one ``scene``); ``score`` (N, S): their expectation over
  the learned levels; ``attributes`` (N, 5): P(positive prompt) of each attribute pair.
- opset :data:`OPSET` (the TorchScript-based exporter of ``torch.onnx``; no onnxscript needed).
- ``metadata_props``: ``gamma`` holds a JSON object with the levels, the scenes of the S rows, the prompt set, the
  crop protocol of the model at export, and the source.

The crop protocol is not in the graph: :class:`OnnxGammaModel` cuts the crops with the functions of
:mod:`gamma.archs.crops` (the same offsets, the same de-duplicated windows and weights as the PyTorch model) and
averages the per-crop outputs with those weights, so ``Scorer(..., backend="onnxruntime")`` decodes, crops and
averages exactly as the PyTorch path does. Requires the ``onnx`` extra (``onnx``, ``onnxruntime``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..archs.crops import CropProtocol, prepare, unique_crops
from ..archs.gamma import Assessment, GammaModel
from ..families import GAMMA_SCORING, family_of_model, get_family, is_family
from ..prompts import ATTRIBUTES, AUTO_SCENE, SCENES, canonical_scene
from .runtime import OPSET, onnx_session

logger = logging.getLogger(__name__)

#: The outputs ``export_onnx`` can write, by name.
ONNX_OUTPUTS = ("score", "distribution", "attributes")
_GRAPH_OUTPUTS = {"score": "score", "distribution": "level_probs", "attributes": "attributes"}


class _ExportHead(nn.Module):
    """crops (N, 3, S, S) in [0, 1] -> per-crop outputs, with every text feature a constant."""

    def __init__(self, model: GammaModel, rows: list[int], outputs: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)
        with torch.no_grad():
            text = model.text_features().detach().float()  # (S_all, 5, E)
            self.register_buffer("level_text", text[rows].clone())  # (S, 5, E)
            attr = model.text_features("attributes").detach().float()  # (5, 2, E)
            self.register_buffer("attribute_text", attr.clone())
            self.register_buffer("scale", model.clip_model.logit_scale.exp().detach().float().reshape(()).clone())
            self.register_buffer("levels", model.score_level.detach().float().clone())

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.backbone_features(crops)  # (N, E): CLIP normalisation inside
        image = F.normalize(self.model.adapter(feats), dim=-1)
        logits = self.scale * torch.einsum("ne,ske->nsk", image, self.level_text)  # (N, S, 5)
        probs = logits.softmax(dim=-1)
        result = []
        if "score" in self.outputs:
            result.append(probs @ self.levels)  # (N, S)
        if "distribution" in self.outputs:
            result.append(probs)
        if "attributes" in self.outputs:
            plain = F.normalize(feats, dim=-1)
            pair = self.scale * torch.einsum("ne,ape->nap", plain, self.attribute_text)  # (N, 5, 2)
            result.append(pair.softmax(dim=-1)[..., 0])
        return tuple(result)


def export_onnx(model: GammaModel, path: str | os.PathLike, *, scene: str | None = None,
                outputs: Sequence[str] = ONNX_OUTPUTS, source: str = "", opset: int = OPSET) -> Path:
    """Write ``model`` (fp32) as an ONNX graph (the contract is in this module's docstring).

    Args:
        model: a Gamma model in fp32.
        path: the ``.onnx`` file to write.
        scene: SDP models: bake this scene's prompts only; ``None`` bakes every scene's (the runner picks per call).
        outputs: a subset of ``score``, ``distribution``, ``attributes`` (``score`` always included).
        source: where the weights came from, for the metadata.
        opset: the ONNX opset.

    Raises:
        ValueError: an unknown output, a scene on a single-set model, ``auto``, or a model not in fp32.
    """
    import onnx  # the `onnx` extra

    if not is_family(model, "gamma"):
        title = getattr(family_of_model(model), "title", type(model).__name__)
        raise ValueError(f"ONNX export covers Gamma models; this is a {title} model (docs/scale.md says why)")
    unknown = [o for o in outputs if o not in ONNX_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown ONNX output(s) {unknown}; choose among {', '.join(ONNX_OUTPUTS)}")
    outputs = [o for o in ONNX_OUTPUTS if o in set(outputs) | {"score"}]
    if model.precision != "fp32":
        raise ValueError(f"export an fp32 model (this one runs in {model.precision}); quantise the ONNX file instead")
    sdp = model.config.prompt_set == "sdp"
    if scene is not None and scene.strip().lower() == AUTO_SCENE:
        raise ValueError("scene 'auto' is not exported: bake one scene, or none (every scene) and name it when scoring")
    if scene is not None and not sdp:
        raise ValueError(f"--scene applies to scene-based prompts (sdp); this model uses {model.config.prompt_set!r}")
    rows = [SCENES.index(canonical_scene(scene))] if scene is not None else list(range(5 if sdp else 1))
    scenes = [SCENES[r] for r in rows] if sdp else []
    model = model.eval().cpu()
    head = _ExportHead(model, rows, outputs).eval()
    size = model.config.vision.image_size
    dummy = torch.rand(2, 3, size, size)
    names = [_GRAPH_OUTPUTS[o] for o in outputs]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The fused MoAE kernels compute in place on views, which the TorchScript tracer does not record faithfully: the
    # graph is traced from the formula as written (the same sum; gamma/archs/moae.py), the kernels restored after.
    # Likewise nn.MultiheadAttention's fused inference fast path (an op ONNX lacks) is switched off while tracing.
    kernels = [(m, m.kernel) for m in model.moae_modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for m, _ in kernels:
            m.kernel = None
        axes = {name: {0: "batch"} for name in ["crops", *names]}
        with torch.no_grad():
            torch.onnx.export(head, (dummy,), str(path), dynamo=False, opset_version=opset, input_names=["crops"],
                              output_names=names, dynamic_axes=axes, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, kernel in kernels:
            m.kernel = kernel
    proto = onnx.load(str(path))
    protocol = dataclasses.asdict(model.crop_protocol)
    meta = {"levels": head.levels.tolist(), "scenes": scenes, "prompt_set": model.config.prompt_set,
            "crop_protocol": protocol, "image_size": size, "outputs": list(outputs), "source": str(source),
            "attributes": list(ATTRIBUTES), "input": "crops in [0, 1], RGB, not normalised"}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "gamma", json.dumps(meta)
    onnx.save(proto, str(path))
    logger.info("wrote %s (opset %d, outputs %s, scenes %s)", path, opset, names, scenes or "single set")
    return path


def quantize_onnx(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """An int8 copy of an exported graph: onnxruntime's dynamic quantisation of the MatMul weights, per tensor (its
    per-channel scales fail at run time on this graph's MatMuls: "b zero point is not valid").

    The metadata is kept. Scores move by quantisation error: check the rank agreement on your images
    (``scripts/bench_web.py`` reports SRCC against fp32).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(dest), weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize=[
        "MatMul"])
    proto = onnx.load(str(dest))
    if not any(p.key == "gamma" for p in proto.metadata_props):
        src = onnx.load(str(source), load_external_data=False)
        for prop in src.metadata_props:
            entry = proto.metadata_props.add()
            entry.key, entry.value = prop.key, prop.value
        onnx.save(proto, str(dest))
    return Path(dest)


#: How the scorer runs an exported graph: Gamma's row (the same calls: ``model(batch, scene=...)``, ``assess``, the
#: crop protocol), without the per-image scene choice (``scene='auto'`` needs the text tower, which is not exported).
ONNX_SCORING = dataclasses.replace(GAMMA_SCORING, outputs=frozenset({"distribution", "attributes"}))


class OnnxGammaModel:
    """An exported Gamma graph run by onnxruntime, with the interface :class:`gamma.Scorer` uses of a GammaModel.

    A runner, not an ``nn.Module``: it carries its :class:`~gamma.families.Scoring` row (``scoring``) and the family
    it was exported from (``family``), which :func:`gamma.families.scoring_of` and
    :func:`~gamma.families.family_of_model` read, so ``Scorer(model=OnnxGammaModel(path))`` (or
    ``Scorer(path, backend="onnxruntime")``) scores with it like with any model.

    ``assess`` and ``__call__`` take full-resolution images (B, 3, H, W) in [0, 1] and apply the crop protocol with
    :func:`gamma.archs.crops.prepare` and :func:`~gamma.archs.crops.unique_crops`, then average the graph's per-crop
    outputs with the crop weights, as :meth:`gamma.GammaModel.assess` does.

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx` (or :func:`quantize_onnx`).
        threads: onnxruntime's intra-op threads (default: its own choice).
        providers: onnxruntime execution providers (default: CPU).
    """

    scoring = ONNX_SCORING

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        self.family = get_family("gamma")
        self.path = Path(path)
        self.session, self.meta = onnx_session(self.path, threads, providers)
        if "levels" not in self.meta:
            raise ValueError(f"{self.path} is not a Gamma graph (open it with gamma.export.open_onnx)")
        self.levels = torch.tensor(self.meta["levels"], dtype=torch.float32)
        self.scenes: list[str] = list(self.meta["scenes"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.config = SimpleNamespace(prompt_set=self.meta["prompt_set"], image_size=self.meta["image_size"])
        self.crop_protocol = CropProtocol(**self.meta["crop_protocol"])
        self.auto_scenes: tuple[str, ...] = ()
        self.check_input_range = True

    # -- the parts of GammaModel's interface the scorer uses
    def eval(self) -> OnnxGammaModel:
        return self

    def to(self, *_: Any, **__: Any) -> OnnxGammaModel:
        return self

    @property
    def precision(self) -> str:
        return "onnx"

    def set_crop_protocol(self, mode: str | None = None, num: int | None = None, seed: int | None = None) -> None:
        changes = {k: v for k, v in {"mode": mode, "num": num, "seed": seed}.items() if v is not None}
        self.crop_protocol = dataclasses.replace(self.crop_protocol, **changes)

    def tower_description(self) -> str:
        return f"the exported Gamma towers in {self.path.name} (onnxruntime)"

    def scene_index(self, scene: str | Sequence[str] | None, batch: int, device: Any = None) -> int | None:
        """The row of the baked scenes for ``scene`` (one scene for the batch), or None for single-set prompts."""
        if not self.scenes:
            return None
        if scene is None:
            raise ValueError("this model uses scene-based prompts (SDP): pass scene=one of " + ", ".join(self.scenes))
        if not isinstance(scene, str):
            names = {canonical_scene(s) for s in scene}
            if len(names) != 1:
                raise ValueError("the ONNX runner scores a batch with one scene")
            scene = names.pop()
        if scene.strip().lower() == AUTO_SCENE:
            raise ValueError("scene 'auto' is not available with the ONNX backend; name the scene")
        name = canonical_scene(scene)
        if name not in self.scenes:
            raise ValueError(f"scene {name!r} was not exported into {self.path.name} (it holds {self.scenes})")
        return self.scenes.index(name)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or infinite values")
        return images.float()

    # -- scoring
    def crop_outputs(self, crops: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for crops (N, 3, S, S) in [0, 1], by output name."""
        array = crops.detach().cpu().numpy() if isinstance(crops, torch.Tensor) else crops
        values = self.session.run(None, {"crops": np.ascontiguousarray(array, dtype=np.float32)})
        return dict(zip(self.outputs, values, strict=True))

    def assess(self, images: torch.Tensor, scene: str | Sequence[str] | None = None, *,
               attributes: bool = False) -> Assessment:
        """Score, level distribution (and attribute scores) of images (B, 3, H, W), as :meth:`GammaModel.assess`."""
        images = self.check_images(images)
        batch = images.shape[0]
        row = self.scene_index(scene, batch) or 0
        need = {"score", "level_probs"} | ({"attributes"} if attributes else set())
        missing = need - set(self.outputs)
        if missing:
            raise ValueError(f"{self.path.name} was exported without the output(s) {sorted(missing)}: export it with "
                             "--outputs score,distribution,attributes")
        prepared = prepare(images, self.crop_protocol)
        crops, weights = unique_crops(prepared, self.crop_protocol)  # crop-major (U*B, 3, S, S), (U,)
        out = self.crop_outputs(crops)
        u = len(weights)
        w = weights.to(torch.float32)
        probs = torch.from_numpy(out["level_probs"][:, row]).view(u, batch, -1)
        per_crop = torch.from_numpy(out["score"][:, row]).view(u, batch)
        score = (w[:, None] * per_crop).sum(0)
        distribution = (w[:, None, None] * probs).sum(0)
        mean = distribution @ self.levels
        std = (distribution * (self.levels - mean[:, None]).square()).sum(-1).clamp_min(0).sqrt()
        attrs = None
        if attributes:
            a = torch.from_numpy(out["attributes"]).view(u, batch, -1)
            attrs = dict(zip(ATTRIBUTES, (w[:, None, None] * a).sum(0).unbind(-1), strict=True))
        scenes = [self.scenes[row]] * batch if self.scenes else None
        return Assessment(score=score, distribution=distribution, std=std, levels=self.levels, scenes=scenes,
                          attributes=attrs)

    def score_images(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        """Scores (B,) with the crop protocol (only the score output is read)."""
        images = self.check_images(images)
        batch = images.shape[0]
        row = self.scene_index(scene, batch) or 0
        prepared = prepare(images, self.crop_protocol)
        crops, weights = unique_crops(prepared, self.crop_protocol)
        per_crop = torch.from_numpy(self.crop_outputs(crops)["score"][:, row]).view(len(weights), batch)
        return (weights.to(torch.float32)[:, None] * per_crop).sum(0)

    __call__ = score_images


__all__ = ["ONNX_OUTPUTS", "ONNX_SCORING", "OnnxGammaModel", "export_onnx", "quantize_onnx"]
