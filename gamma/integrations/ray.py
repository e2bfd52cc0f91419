"""Score a Ray Dataset: a callable class for ``ds.map_batches`` (the command line: :mod:`gamma.cli.ray_engine`).

    import ray
    from gamma.integrations.ray import GammaScorer

    ds = ray.data.read_images(...)  # or read_webdataset / read_parquet / from_items([{"path": ...}])
    scored = ds.map_batches(GammaScorer, fn_constructor_kwargs={"weights": "Gamma.pth", "device": "cuda",
                            "precision": "bf16"}, concurrency=4, num_gpus=1, batch_size=64, batch_format="pandas")

Each actor builds its :class:`gamma.Scorer` once (``__init__``), on its own device and in its own precision, and
scores every batch it is given. A batch holds the encoded images in a bytes column (``image_column``, default
``image``; a WebDataset's ``jpg`` / ``png`` ...) or file paths (``path_column``, default ``path``), and optionally the
row names (``name_column``, default: the paths, else ``<bytes i>``). It comes back with the columns ``gamma score``
writes (:meth:`gamma.Scorer.columns`: name, score, mos, std, p_*, scene, attributes, adapted as asked) and ``error``
(None, or why the row could not be scored: its score is then NaN). The scorer decodes in the actor's thread
(``num_workers=0``): Ray runs several actors instead. Requires the ``ray`` extra (``ray[data]``).

A batch is a pure function of its rows, so when Ray restarts a dead actor and retries its batch (``max_restarts``,
``max_task_retries``; Ray Data's actor pools retry by default), every row comes out once.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: Bytes columns a WebDataset (ray.data.read_webdataset) gives images under, tried after ``image_column``.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "bytes")


class GammaScorer:
    """A callable class for ``Dataset.map_batches``: a :class:`gamma.Scorer` per actor, batches in, rows out.

    Args:
        weights: as for :class:`gamma.Scorer` (a file, a known name, or an ``.onnx`` graph with
            ``backend='onnxruntime'``).
        model: a variant name (random weights unless ``weights``: seeded with 0, the same in every actor).
        device: this actor's device (default: CUDA if the actor has a GPU, else CPU).
        precision: this actor's precision (``fp32``, ``bf16``, ``auto`` ...).
        image_column, path_column, name_column: the input columns (see the module docstring).
        **scorer_kwargs: the other :class:`gamma.Scorer` arguments (scene, attributes, distribution, crops ...).
    """

    def __init__(self, weights: str | None = None, *, model: str | None = None, device: str | None = None,
                 precision: str | None = None, image_column: str = "image", path_column: str = "path",
                 name_column: str = "name", **scorer_kwargs: Any) -> None:
        import torch

        from ..scorer import Scorer

        if model is not None and weights is None:
            torch.manual_seed(0)  # the same random weights in every actor (tests and demos)
        scorer_kwargs.setdefault("num_workers", 0)
        self.scorer = Scorer(weights, model=model, device=device, precision=precision, **scorer_kwargs)
        self.columns = self.scorer.columns()
        self.image_column, self.path_column, self.name_column = image_column, path_column, name_column

    def __call__(self, batch: Any) -> Any:
        """Score a batch (a pandas DataFrame, a pyarrow Table or a dict of arrays); the same kind comes back."""
        kind, data = _as_columns(batch)
        sources, names = self._inputs(data)
        rows = []
        for result in self.scorer.iter_named_scores(zip(names, sources, strict=True), on_error="skip"):
            row = {"name": result.name, "score": result.score, "mos": result.mos, **result.values}
            rows.append({**{c: row.get(c) for c in self.columns}, "error": result.error})
        columns = {c: [row[c] for row in rows] for c in [*self.columns, "error"]}
        return _from_columns(kind, columns)

    def _inputs(self, data: dict[str, list]) -> tuple[list[Any], list[str]]:
        image_col = next((c for c in (self.image_column, *IMAGE_COLUMNS) if c in data), None)
        if image_col is not None:
            sources = [bytes(v) if v is not None else ValueError("no image bytes") for v in data[image_col]]
        elif self.path_column in data:
            sources = [str(v) for v in data[self.path_column]]
        else:
            raise ValueError(f"a batch needs an image bytes column ({self.image_column}) or a path column "
                             f"({self.path_column}); it has {sorted(data)}")
        if self.name_column in data:
            names = [str(v) for v in data[self.name_column]]
        elif self.path_column in data:
            names = [str(v) for v in data[self.path_column]]
        else:
            names = [f"<bytes {i}>" for i in range(len(sources))]
        return sources, names


def _as_columns(batch: Any) -> tuple[str, dict[str, list]]:
    if hasattr(batch, "to_pydict"):  # pyarrow.Table
        return "pyarrow", batch.to_pydict()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
        return "pandas", {c: batch[c].tolist() for c in batch.columns}
    return "numpy", {k: list(v) for k, v in batch.items()}


def _from_columns(kind: str, columns: dict[str, list]) -> Any:
    if kind == "pandas":
        import pandas as pd

        return pd.DataFrame(columns)
    if kind == "pyarrow":
        from ..parquet_out import parquet_schema, rows_to_table

        names = list(columns)
        rows = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        return rows_to_table(rows, parquet_schema(names))
    import numpy as np

    return {k: np.asarray(v, dtype=object if k in ("name", "scene", "error") else float) for k, v in columns.items()}


__all__ = ["IMAGE_COLUMNS", "GammaScorer"]
