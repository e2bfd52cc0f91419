"""What every exported graph shares: the opset and the onnxruntime session that reads gamma's metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The ONNX opset of exported graphs.
OPSET = 17


def onnx_session(path: Path, threads: int | None = None, providers: Sequence[str] | None = None) -> tuple[Any, dict]:
    """An onnxruntime session of a graph written by ``gamma export``, and its ``gamma`` metadata."""
    import onnxruntime as ort  # the `onnx` extra

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    raw = session.get_modelmeta().custom_metadata_map.get("gamma")
    if raw is None:
        raise ValueError(f"{path} was not written by gamma export (no 'gamma' metadata)")
    return session, json.loads(raw)
