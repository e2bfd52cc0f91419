"""ONNX export of gamma's models and the onnxruntime runners that score like PyTorch (the ``onnx`` extra).

- :mod:`gamma.export.onnx_gamma`: a Gamma model (image tower + adapter + level head, text features baked in) and
  :class:`OnnxGammaModel`, which applies gamma's own crop protocol;
- :mod:`gamma.export.onnx_promptiqa`: a PromptIQA model with one ISP set baked in, and :class:`OnnxPromptIQAModel`;
- :func:`open_onnx`: the runner of a graph ``gamma export`` wrote (``Scorer(path, backend="onnxruntime")`` uses it).

Nothing here imports onnx or onnxruntime before an export or a session is asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .onnx_gamma import ONNX_OUTPUTS, OnnxGammaModel, export_onnx, quantize_onnx
from .onnx_promptiqa import OnnxPromptIQAModel, export_promptiqa_onnx
from .runtime import OPSET, onnx_session


def open_onnx(path: str | os.PathLike, **kwargs: Any) -> Any:
    """The runner of a graph written by ``gamma export``: :class:`OnnxGammaModel`, or for a PromptIQA graph
    :class:`OnnxPromptIQAModel` (``kwargs``: ``threads``, ``providers``)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if json.loads(props.get("gamma", "{}")).get("family") == "promptiqa":
        return OnnxPromptIQAModel(path, **kwargs)
    return OnnxGammaModel(path, **kwargs)


__all__ = ["ONNX_OUTPUTS", "OPSET", "OnnxGammaModel", "OnnxPromptIQAModel", "export_onnx", "export_promptiqa_onnx",
           "onnx_session", "open_onnx", "quantize_onnx"]
