"""ONNX export of a PromptIQA model with one ISP set baked in, and its onnxruntime runner.

    gamma export best_model.pth.tar --model promptiqa --isp isp.csv --onnx piqa.onnx
    Scorer("piqa.onnx", backend="onnxruntime").score("photos/")     # scored against isp.csv, without PyTorch

PromptIQA scores an image against a set of image-score pairs (ISPs). With the set fixed, its encoding (the ISP
features, :meth:`gamma.archs.promptiqa.PromptedIQA.encode_prompt`: the ISP images through the ViT and the prompt
encoder) is a constant: it is computed once at export, through the scorer's own reading of the ISP files
(:attr:`gamma.Scorer.encoded_isp` of a ``Scorer`` with ``isp=``), and stored in the graph. The graph is the rest:
the image path (ViT + MAL) and the fusion with the stored ISP features.

The graph's contract: input ``images``: float32 (N, 3, S, S), RGB in [0, 1], already resized to the model's input S
(the scorer's reader does it the official way, :func:`gamma.io.load_promptiqa_image`); the (x - 0.5) / 0.5
normalisation is inside. Output ``score``: (N,) in (0, 1), on the ISP scores' normalised scale as
``Scorer(..., isp=...)`` gives it. N is a dynamic axis; opset :data:`gamma.export.OPSET`; ``metadata_props``
``gamma`` holds the family, the input size, the ISP source and its number of pairs. ISP flipping (``isp_flip``) is a
per-batch random input and is not exported. Requires the ``onnx`` extra.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ..archs.promptiqa import PIXEL_MEAN, PIXEL_STD, PromptIQA
from ..families import Scoring, fit_promptiqa, get_family, read_promptiqa
from .runtime import OPSET, onnx_session

logger = logging.getLogger(__name__)


class _PromptIQAHead(nn.Module):
    """images (N, 3, S, S) in [0, 1] -> scores (N,) against ISP features stored as a constant."""

    def __init__(self, model: PromptIQA, isp: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("isp", isp.detach().float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images - PIXEL_MEAN) / PIXEL_STD  # PromptIQA.preprocess, less its checks and resize (done before)
        return self.model.fuse(self.model.image_features(pixels), self.isp[None])


def export_promptiqa_onnx(model: PromptIQA, path: str | os.PathLike, encoded: torch.Tensor, *,
                          isp_source: str | None = None, backend: str = "cv2", source: str = "",
                          opset: int | None = None) -> Path:
    """Write ``model`` with one encoded ISP set baked in as an ONNX graph (the contract is in the module docstring).

    The ISP set is encoded by the scorer's own reading of its files, e.g.
    ``encoded = Scorer(model=model, isp="isp.csv", device="cpu").encoded_isp`` (what ``gamma export --isp`` does).

    Args:
        model: a PromptIQA model (fp32).
        path: the ``.onnx`` file to write.
        encoded: the ISP features (n, dim) every image is scored against (:attr:`gamma.Scorer.encoded_isp`).
        isp_source: where the ISP set came from (its file), for the metadata.
        backend: how the ISP images were decoded and resized (``cv2``, the official path, or ``pil``), for the
            metadata: the runner reads the targets the same way.
        source: where the weights came from, for the metadata.
        opset: the ONNX opset (default :data:`gamma.export.OPSET`).
    """
    import onnx  # the `onnx` extra

    model = model.eval().cpu()
    encoded = encoded.detach().float().cpu()
    head = _PromptIQAHead(model, encoded).eval()
    size = model.config.image_size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel is an op ONNX lacks
        with torch.no_grad():
            torch.onnx.export(head, (torch.rand(2, 3, size, size),), str(path), dynamo=False,
                              opset_version=opset or OPSET, input_names=["images"], output_names=["score"],
                              dynamic_axes={"images": {0: "batch"}, "score": {0: "batch"}}, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    proto = onnx.load(str(path))
    meta = {"family": "promptiqa", "image_size": size, "isp": isp_source,
            "isp_pairs": int(encoded.shape[0]), "backend": backend, "source": str(source),
            "input": "images in [0, 1], RGB, resized to image_size"}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "gamma", json.dumps(meta, default=str)
    onnx.save(proto, str(path))
    logger.info("wrote %s (PromptIQA, %d ISPs baked in)", path, meta["isp_pairs"])
    return path


#: How the scorer runs the graph: PromptIQA's reading and resizing; the ISP set is inside, so none is asked for.
ONNX_PROMPTIQA_SCORING = Scoring(forward=lambda model, batch, context: model(batch),  # noqa: ARG005
                                 read=read_promptiqa, fit=fit_promptiqa)


class OnnxPromptIQAModel:
    """A PromptIQA graph written by :func:`export_promptiqa_onnx`, run by onnxruntime: a runner (its own
    :class:`~gamma.families.Scoring` row and family, as :class:`gamma.export.OnnxGammaModel`)."""

    scoring = ONNX_PROMPTIQA_SCORING

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        self.family = get_family("promptiqa")
        self.path = Path(path)
        self.session, self.meta = onnx_session(self.path, threads, providers)
        if self.meta.get("family") != "promptiqa":
            raise ValueError(f"{self.path} is not a PromptIQA graph written by gamma export")
        self.config = SimpleNamespace(image_size=int(self.meta["image_size"]), prompt_set=None)
        self.check_input_range = True

    def eval(self) -> OnnxPromptIQAModel:
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Scores (N,) of images (N, 3, S, S) in [0, 1] at the model's input size."""
        size = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be (N, 3, {size}, {size}), got {tuple(getattr(images, 'shape', ()))}")
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"images": array})[0])


__all__ = ["ONNX_PROMPTIQA_SCORING", "OnnxPromptIQAModel", "export_promptiqa_onnx"]
