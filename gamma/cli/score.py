"""``gamma score``: its options, and scoring in one process (under torchrun: :mod:`gamma.cli.sharded`).

Exit status: 0 when every image was scored, 1 when some could not be read (each is named on stderr and, with
``--errors FILE``, listed there; the others are still scored) or when there was nothing to score (an empty folder),
2 for usage or setup errors (bad options, weights not found, an output that ``--resume`` must not continue).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..archs.crops import CROP_MODES
from ..archs.precision import PRECISIONS
from ..hub import KNOWN_WEIGHTS
from ..io import MAX_PIXELS
from ..prompts import ATTRIBUTES, PROMPT_SETS, SCENES
from .common import UsageError, add_prompt_set_override, add_renamed, positive_int
from .provenance import Provenance
from .score_setup import (
    SkippedFiles,
    Tally,
    announce,
    check_not_empty,
    iter_inputs,
    make_scorer,
    progress,
    report,
    resolve_options,
)
from .sharded import part_files, score_sharded, world_size
from .writers import ErrorWriter, RowWriter, check_output, error_reason, open_writer

if TYPE_CHECKING:
    from ..scorer import Scorer

NAME = "score"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    release_names = ", ".join(name for name, entry in KNOWN_WEIGHTS.items() if entry.prompt_set)
    s = subparsers.add_parser(NAME, help="score images (files, folders, globs, file lists)", description=(
        "Score images with Gamma. Rows stream to the output as they are scored; unreadable files are named on "
        "stderr and counted, and make the exit status 1. Under torchrun (`torchrun --nproc_per_node=N -m gamma "
        "score ...`) the inputs are split over the processes, each on its own device, and merged into --out."))
    s.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders (searched recursively) or globs")
    s.add_argument("--list", action="append", metavar="FILE", help="a file listing images: one path a line, or a "
                   "CSV whose header names the path column (image, path, name, file); read lazily; repeatable")
    s.add_argument("--weights", "-w", help=f"weight file, or a known name ({release_names}); default: find the "
                   "release file (see `gamma list`)")
    s.add_argument("--model", help="a model variant (`gamma list`), e.g. promptiqa: the weights are loaded into it "
                   "(default: read from the file; alone: random weights, for tests)")
    prompt_set = s.add_argument("--prompt-set", choices=PROMPT_SETS, help="the CLIP text prompts the weights expect "
                                "(default: the one the file records, else by the release's file names: naive for "
                                "Gamma.pth, sdp for Gamma-Prompt.pth, else naive)")
    add_renamed(s, "--prompt", prompt_set)
    add_prompt_set_override(s)
    s.add_argument("--scene", help=f"scene for SDP models: {', '.join(SCENES)}, or auto (chosen per image; adds a "
                   "scene column)")
    s.add_argument("--attributes", action="store_true", help="add the zero-shot attribute scores (columns "
                   f"{', '.join(ATTRIBUTES)}; higher is better)")
    s.add_argument("--distribution", action="store_true", help="add std and the level probabilities p_bad ... "
                   "p_perfect (with --scene auto also the scene probabilities)")
    isp = s.add_argument("--isp", metavar="CSV", help="image-score pairs (ISPs; CSV image,score; paths relative to "
                         "it): the prompt of a PromptIQA model; a Gamma model is adapted to them (column adapted, on "
                         "their scale)")
    add_renamed(s, "--prompt-file", isp)
    s.add_argument("--adapt-outputs", choices=["score", "distribution", "all"], help="Gamma with --isp: the outputs "
                   "mapped onto the ISPs' scores (default score: a monotone map; the others: ridge)")
    isp_flip = s.add_argument("--isp-flip", action="store_true", help="PromptIQA: flip the ISP images at random for "
                              "every batch, as the official test code does (random scores; for exact reproduction "
                              "only)")
    add_renamed(s, "--prompt-flip", isp_flip)
    s.add_argument("--promptiqa-backend", choices=["cv2", "pil"], help="PromptIQA: how images are decoded and "
                   "resized (default cv2, the official preprocessing; pil needs no OpenCV)")
    s.add_argument("--batch-size", "-b", type=positive_int, default=8, help="images per forward pass (default 8)")
    s.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    s.add_argument("--precision", choices=PRECISIONS, help="how the image tower computes: fp32 (exact), bf16, fp16, "
                   "int8 (CPU), auto (the fastest this device runs well); default: as the weights are stored (fp32 "
                   "for the release's files). Under torchrun each process applies it for its own device")
    s.add_argument("--allow-slow", action="store_true", help="with --precision: run it even where this device runs "
                   "it slower than fp32 (a warning instead of an error; e.g. to measure its agreement)")
    s.add_argument("--crops", choices=CROP_MODES,
                   help="test-time crop protocol (default: random, the release's 10 seeded random crops)")
    s.add_argument("--num-crops", type=positive_int, help="crops per image for random/grid (default 10)")
    s.add_argument("--seed", type=int, help="seed of the random crop offsets (default 0)")
    s.add_argument("--out", "-o", help="output file: .csv, .jsonl, .json or .parquet (default: CSV on stdout)")
    _add_scale_options(s)
    s.add_argument("--resume", action="store_true", help="skip images already in --out and append the rest (refused "
                   "when --out was scored with other weights, prompts, scene, crops, precision or columns: its "
                   "record is <out>.meta.json); files that could not be scored are tried again")
    s.add_argument("--errors", metavar="FILE", help="write the files that could not be scored to FILE (CSV "
                   "name,error; replaced at every run)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--mos-range", nargs=2, type=float, metavar=("LO", "HI"),
                   help="also write scores mapped to a dataset's label scale (column mos)")
    s.add_argument("--lower-better", action="store_true", help="with --mos-range: the labels are DMOS (lower is "
                   "better)")
    s.add_argument("--dataset", help="a dataset name (koniq10k, live, ava ...): its MOS range, label direction and "
                   "scene (mos column; scene for SDP models)")
    s.add_argument("--workers", type=int, default=None, help="image decoding threads (default: min(4, CPUs))")
    s.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels (decompression-bomb "
                   "guard; default 178956970; 0 leaves only PIL's own limit)")
    s.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--allow-unsafe-pickle", action="store_true", help="allow weight files that need a full "
                   "unpickle (only for files you trust)")
    return s


def _add_scale_options(s: argparse.ArgumentParser) -> None:
    """Web-scale scoring (docs/scale.md): tar shards' per-shard Parquet files, Ray Data, the ONNX backend."""
    s.add_argument("--out-dir", metavar="DIR", help="tar shard inputs: one Parquet file per shard, DIR/00000.parquet "
                   "... (img2dataset's naming), each written when its shard is done")
    s.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default; torchrun for several "
                   "processes) or ray: Ray Data actors (docs/scale.md)")
    s.add_argument("--ray-address", metavar="ADDR", help="--engine ray: the cluster (ray://host:10001 or auto); "
                   "default: a local Ray")
    s.add_argument("--ray-actors", type=positive_int, default=2, help="--engine ray: scoring actors (default 2)")
    s.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch", help="torch (default), or "
                   "onnxruntime: --weights is a graph written by `gamma export` (same crops and decoding)")


def run(args: argparse.Namespace) -> int:
    args.max_pixels = MAX_PIXELS if args.max_pixels is None else args.max_pixels
    resolve_options(args)
    if args.engine == "ray":  # Ray Data actors, local or a ray:// cluster
        from .ray_engine import score_with_ray

        return score_with_ray(args)
    from .shards import score_shards, wants_shards  # tar shards: whole shards per process, per-shard files

    if wants_shards(args):
        return score_shards(args)
    if args.out_dir is not None:
        raise UsageError("--out-dir writes one Parquet file per input shard: it applies to .tar shard inputs")
    if not check_not_empty(args):  # before the model loads; the same answer in every process of a sharded run
        return 1
    if world_size() > 1 or (args.out is not None and part_files(Path(args.out))):
        return score_sharded(args)  # torchrun; or the parts a crashed torchrun run left
    check_output(args.out, args.resume, args.overwrite)  # before the model loads
    try:
        scorer = make_scorer(args)
    except KeyboardInterrupt:
        print("gamma: interrupted", file=sys.stderr)
        return 130
    announce(scorer)
    # The columns depend on the model (PromptIQA, SDP prompts for the scene column): known once it is built; so is
    # the record of what the scores depend on, which --resume checks before anything is appended.
    provenance = Provenance.from_scorer(scorer, args) if args.out is not None else None
    writer = open_writer(args.out, scorer.columns(), args.resume, args.overwrite, provenance)
    errors, skipped = ErrorWriter(args.errors), SkippedFiles()
    try:
        writer.open()
        errors.open()
        tally = _score_files(args, scorer, writer, errors, skipped)
    except KeyboardInterrupt:
        print("gamma: interrupted; run again with --resume to continue", file=sys.stderr)
        writer.close(complete=False)
        return 130
    except BaseException:
        writer.close(complete=False)
        raise
    finally:
        errors.close()
    writer.close(complete=True)
    report(tally, args.out, verbose=args.verbose, skipped=skipped, errors=args.errors)
    if tally.failed and not tally.scored and not tally.skipped:
        print("gamma: warning: no image could be scored", file=sys.stderr)
    return 1 if tally.failed else 0


def _score_files(args: argparse.Namespace, scorer: Scorer, writer: RowWriter, errors: ErrorWriter,
                 skipped: SkippedFiles) -> Tally:
    """Score the images of ``args`` that are not in the output yet, streaming one row per image."""
    # Counting first walks the inputs twice but keeps memory flat and gives the bar an ETA.
    total = None if args.no_progress else sum(1 for _ in iter_inputs(args))
    bar = progress(total, disable=args.no_progress)
    tally = Tally()
    seen = writer.done
    start = time.perf_counter()

    def todo() -> Iterator[str]:
        for path in iter_inputs(args, skipped):
            if path in seen:
                tally.skipped += 1
                bar.update(1)
                continue
            seen.add(path)
            yield path

    try:
        for result in scorer.iter_file_scores(todo(), on_error="skip"):
            if result.ok:
                writer.write({"name": result.name, "score": result.score, "mos": result.mos, **result.values})
                tally.scored += 1
            else:
                tally.failed += 1
                bar.write(f"gamma: cannot score {result.error}", file=sys.stderr)
                errors.write(result.name, error_reason(result.name, result.error))
            bar.update(1)
    finally:
        bar.close()
    tally.new, tally.seconds = tally.scored + tally.failed, time.perf_counter() - start
    return tally
