"""``gamma score ... --engine ray``: the inputs as a Ray Dataset of paths, scored by ``--ray-actors`` actors of
:class:`gamma.integrations.ray.GammaScorer` (a local Ray by default, ``--ray-address ray://...`` for a cluster), the
rows written in input order by the usual writer (``--resume`` skips what ``--out`` holds). Requires the ``ray`` extra.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from .common import UsageError
from .provenance import Provenance
from .score_setup import Tally, iter_inputs, report
from .writers import open_writer


def score_with_ray(args: argparse.Namespace) -> int:
    """Score ``args``' inputs with Ray Data actors; the exit status."""
    from .shards import wants_shards

    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'gamma-iqa[ray]'") from None
    from ..integrations.ray import GammaScorer

    if wants_shards(args):
        raise UsageError("--engine ray scores files; for tar shards read them with ray.data.read_webdataset and "
                         "map GammaScorer over it (docs/scale.md), or score them without --engine ray")
    if args.isp is not None:
        raise UsageError("--engine ray does not take --isp yet")
    kwargs = scorer_kwargs(args)
    try:
        probe = GammaScorer(**{**kwargs, "device": "cpu"})  # the columns and metadata, and the options checked
    except ValueError as exc:
        raise UsageError.from_library(exc) from None
    provenance = Provenance.from_scorer(probe.scorer, args) if args.out is not None else None
    writer = open_writer(args.out, probe.columns, args.resume, args.overwrite, provenance)
    del probe
    todo = [p for p in iter_inputs(args) if p not in writer.done]
    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 **({} if args.ray_address else {"num_cpus": max(args.ray_actors, 1)}))
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    tally, start = Tally(), time.perf_counter()
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
    report(tally, args.out, args.ray_actors, verbose=args.verbose)
    return 1 if tally.failed else 0


def scorer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`gamma.Scorer` arguments of ``gamma score``'s options, for each actor."""
    return {
        "weights": args.weights, "model": args.model, "prompt_set": args.prompt_set, "device": args.device,
        "precision": args.precision, "batch_size": args.batch_size, "crops": args.crops,
        "num_crops": args.num_crops, "seed": args.seed, "scene": args.scene,
        "mos_range": tuple(args.mos_range) if args.mos_range else None, "lower_better": args.lower_better,
        "max_pixels": args.max_pixels if args.max_pixels > 0 else None, "allow_unsafe": args.allow_unsafe_pickle,
        "attributes": args.attributes, "distribution": args.distribution,
        **({"backend": "onnxruntime"} if args.backend == "onnxruntime" else {}),
    }
