"""Score a Ray Dataset: a callable class for ``ds.map_batches``, and ``gamma score --engine ray``.

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

import argparse
import logging
import math
import sys
import time
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


def score_command(args: argparse.Namespace) -> int:
    """``gamma score ... --engine ray``: the inputs as a Ray Dataset of paths, scored by ``--ray-actors`` actors,
    the rows written in input order by the usual writer (``--resume`` skips what ``--out`` holds)."""
    from ..cli import UsageError, _iter_inputs, _open_writer, _report, _Tally
    from ..shard_score import wants_shards

    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'gamma-iqa[ray]'") from None
    if wants_shards(args):
        raise UsageError("--engine ray scores files; for tar shards read them with ray.data.read_webdataset and "
                         "map GammaScorer over it (docs/scale.md), or score them without --engine ray")
    if args.prompt_file is not None:
        raise UsageError("--engine ray does not take --prompt-file yet")
    kwargs = _scorer_kwargs(args)
    try:
        probe = GammaScorer(**{**kwargs, "device": "cpu"})  # the columns and metadata, and the options checked
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    writer = _open_writer(args.out, probe.columns, args.resume, args.overwrite, probe.scorer.metadata)
    del probe
    todo = [p for p in _iter_inputs(args) if p not in writer.done]
    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 **({} if args.ray_address else {"num_cpus": max(args.ray_actors, 1)}))
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    tally, start = _Tally(), time.perf_counter()
    writer.open()
    try:
        if todo:
            blocks = min(len(todo), 4 * args.ray_actors)
            ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=blocks)
            scored = ds.map_batches(GammaScorer, fn_constructor_kwargs=kwargs, concurrency=args.ray_actors,
                                    batch_size=args.batch_size, batch_format="pandas", num_cpus=1)
            for row in scored.iter_rows():
                if row["error"] is not None and not (isinstance(row["error"], float) and math.isnan(row["error"])):
                    tally.failed += 1
                    print(f"gamma: cannot score {row['error']}", file=sys.stderr)
                    continue
                writer.write({c: row[c] for c in writer.columns})
                tally.scored += 1
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close(complete=True)
    tally.new, tally.seconds = tally.scored + tally.failed, time.perf_counter() - start
    _report(tally, args.out, args.ray_actors, verbose=args.verbose)
    return 1 if tally.failed else 0


def _scorer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Scorer arguments of ``gamma score``'s options, for each actor."""
    return {
        "weights": args.weights, "model": args.model, "prompt_set": args.prompt, "device": args.device,
        "precision": args.precision, "batch_size": args.batch_size, "crops": args.crops,
        "num_crops": args.num_crops, "seed": args.seed, "scene": args.scene,
        "mos_range": tuple(args.mos_range) if args.mos_range else None, "lower_better": args.lower_better,
        "max_pixels": args.max_pixels if args.max_pixels > 0 else None, "allow_unsafe": args.allow_unsafe_pickle,
        "attributes": args.attributes, "distribution": args.distribution,
        **({"backend": "onnxruntime"} if args.backend == "onnxruntime" else {}),
    }


__all__ = ["IMAGE_COLUMNS", "GammaScorer", "score_command"]
