"""What a ``gamma score`` process does around its loop, alone or as one of N: check the options, list the inputs,
build the :class:`~gamma.scorer.Scorer`, count and report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data.registry import DATASETS
from ..hub import WeightsNotFoundError
from ..io import iter_image_files, iter_listed_files
from ..prompts import SCENES
from ..weights import CheckpointError
from .common import UsageError

if TYPE_CHECKING:
    from ..scorer import Scorer

logger = logging.getLogger(__name__)


@dataclass
class Tally:
    scored: int = 0
    skipped: int = 0  # already in the output (--resume), or named twice
    failed: int = 0  # could not be read or scored
    new: int = 0  # images decoded and scored by this run (sharded: not those merged from an interrupted run's parts)
    seconds: float = 0.0  # how long that took (sharded: the slowest process)


class SkippedFiles:
    """Files of the listed folders left out because their names have no image extension: counted, the first few
    named (a folder of a million sidecar files costs a counter, not a list); each one is logged at debug level."""

    SHOWN = 5

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def __call__(self, path: str) -> None:
        self.count += 1
        if len(self.first) < self.SHOWN:
            self.first.append(path)
        logger.debug("skipping %s: no image extension", path)

    def summary(self) -> str | None:
        """One line for stderr, or None when nothing was skipped."""
        if not self.count:
            return None
        more = f" and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        return (f"skipped {self.count} file(s) without an image extension in the folders given "
                f"({', '.join(self.first)}{more}; -v names each; name a file explicitly to score it anyway)")


def resolve_options(args: argparse.Namespace) -> None:
    """Check option combinations and fill in what ``--dataset`` implies (before any file is touched); read the
    ``--isp`` file (every image in it checked to exist) before the model loads."""
    if not args.paths and not args.list:
        raise UsageError("give the images to score: PATH ... (files, folders, globs) and/or --list FILE")
    if args.resume and args.out is None and getattr(args, "out_dir", None) is None:
        raise UsageError("--resume needs --out (the file to continue) or --out-dir")
    for listed in args.list or []:
        if not os.path.isfile(listed):
            raise UsageError(f"--list {listed}: no such file")
    args.scene_explicit = args.scene is not None
    if args.dataset is not None:
        _apply_dataset(args)
    if args.mos_range is not None and args.mos_range[0] == args.mos_range[1]:
        raise UsageError("--mos-range needs two different numbers LO HI")
    if args.lower_better and args.mos_range is None:
        raise UsageError("--lower-better only applies together with --mos-range")
    args.isp_pairs = None
    if args.isp is not None:
        from ..prompt_file import PromptFileError, read_prompt_file

        try:
            args.isp_pairs = read_prompt_file(args.isp)
        except PromptFileError as exc:
            raise UsageError.from_library(exc) from None
    elif args.adapt_outputs is not None or args.isp_flip:
        raise UsageError(f"{'--adapt-outputs' if args.adapt_outputs else '--isp-flip'} applies together with --isp")


def _apply_dataset(args: argparse.Namespace) -> None:
    """--dataset NAME: the dataset's MOS range, label direction and (for SDP) scene, unless given explicitly."""
    info = DATASETS.get(args.dataset.lower())
    if info is None:
        raise UsageError(f"unknown dataset {args.dataset!r}; known: {', '.join(DATASETS)}")
    if args.mos_range is None:
        args.mos_range = list(info.mos_range)
        args.lower_better = args.lower_better or info.lower_better
    if args.scene is None:
        args.scene = info.scene


def iter_inputs(args: argparse.Namespace, skipped: SkippedFiles | None = None) -> Iterator[str]:
    """The images to score, in a deterministic order: PATHs expanded (folders, globs), then each --list's paths;
    files in the folders without an image extension go to ``skipped``."""
    if args.paths:
        yield from iter_image_files(args.paths, recursive=not args.no_recursive, on_skip=skipped)
    for listed in args.list or []:
        try:
            yield from iter_listed_files(listed)
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # rows scored so far stay; --resume continues
            raise UsageError(f"cannot read the file list {listed}: {exc}") from None


def check_not_empty(args: argparse.Namespace) -> bool:
    """Warn on stderr and return False when the inputs hold no image at all (an empty folder, a glob or list that
    names nothing, a folder of files without image extensions)."""
    skipped = SkippedFiles()
    if next(iter(iter_inputs(args, skipped)), None) is not None:
        return True
    where = " ".join([*args.paths, *(f"--list {f}" for f in args.list or [])])
    why = f"; {skipped.summary()}" if skipped.count else ""
    if os.environ.get("RANK", "0") in ("0", ""):  # under torchrun every process finds the same: one says it
        print(f"gamma: warning: nothing to score: no images in {where}{why}", file=sys.stderr)
    return False


def make_scorer(args: argparse.Namespace, device: Any = None) -> Scorer:
    """The Scorer the options ask for, on ``device`` (default ``--device``), with its scene or its ISPs set."""
    import torch

    from ..adapt import NotEnoughPairsError
    from ..prompt_file import PromptFileError
    from ..scorer import Scorer

    device = args.device if device is None else device
    if args.model is not None and args.weights is None:
        logger.warning("--model %s without --weights: random weights (tests and demos only)", args.model)
        torch.manual_seed(0)  # the same random weights on every run, so that --resume continues consistently
    # --allow-slow: the model is built as stored, then put into the precision with the device check relaxed.
    slow = args.allow_slow and args.precision not in (None, "fp32")
    try:
        scorer = Scorer(
            args.weights,
            model=args.model,
            prompt_set=args.prompt_set,
            prompt_set_override=args.prompt_set_override,
            device=device,
            precision=None if slow else args.precision,
            batch_size=args.batch_size,
            crops=args.crops,
            num_crops=args.num_crops,
            seed=args.seed,
            mos_range=tuple(args.mos_range) if args.mos_range else None,
            lower_better=args.lower_better,
            max_pixels=args.max_pixels if args.max_pixels > 0 else None,
            num_workers=args.workers,
            allow_unsafe=args.allow_unsafe_pickle,
            attributes=args.attributes,
            distribution=args.distribution,
            isp_flip=args.isp_flip,
            backend="onnxruntime" if getattr(args, "backend", None) == "onnxruntime" else args.promptiqa_backend,
        )
    except (WeightsNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError.from_library(exc) from None
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, or CUDA not available
        if device is None:
            raise
        raise UsageError(f"cannot use device {str(device)!r}: {str(exc).splitlines()[0]}") from None
    if slow:
        _allow_slow(scorer, args.precision)
    if scorer.takes_isp:
        return _setup_promptiqa(scorer, args)
    prompt_set = getattr(scorer.model.config, "prompt_set", None)  # None: a family without text prompts
    if prompt_set == "sdp" and args.scene is None:
        raise UsageError(f"this model uses scene-based prompts (SDP): pass --scene, one of {', '.join(SCENES)}, or "
                         "auto (chosen per image)")
    if args.scene is not None and args.scene_explicit and prompt_set != "sdp":
        logger.warning("--scene only applies to scene-based prompts; this model uses %r prompts (for the Gamma-Prompt "
                       "weights pass --prompt-set sdp)", prompt_set)
    if args.scene is not None and prompt_set is not None:
        try:
            scorer.model.scene_index(args.scene, 1, scorer.device)
        except ValueError as exc:
            raise UsageError.from_library(exc) from None
        scorer.scene = args.scene
    if args.isp_pairs is not None:
        try:
            scorer.adapt(args.isp_pairs, outputs=args.adapt_outputs or "score")
        except (NotEnoughPairsError, PromptFileError) as exc:
            raise UsageError(f"cannot adapt to --isp {args.isp}: {exc}") from None
    return scorer


def _allow_slow(scorer: Scorer, precision: str) -> None:
    """``--precision P --allow-slow``: P even where this device runs it slower than fp32 (a warning, not an error)."""
    if scorer.takes_isp:
        raise UsageError(f"--precision {precision} applies to Gamma models; PromptIQA runs in fp32")
    try:
        scorer.model = scorer.model.to_precision(precision, allow_slow=True).eval()
    except ValueError as exc:
        raise UsageError.from_library(exc) from None


def _setup_promptiqa(scorer: Scorer, args: argparse.Namespace) -> Scorer:
    """A PromptIQA scorer: its prompt from --isp; Gamma-only options refused."""
    from ..prompt_file import PromptFileError

    if args.scene is not None and args.scene_explicit:
        raise UsageError("--scene applies to Gamma models with scene-based prompts; PromptIQA takes its task from "
                         "its image-score pairs (--isp)")
    if args.adapt_outputs is not None:
        raise UsageError("--adapt-outputs applies to Gamma models; PromptIQA scores against its image-score pairs "
                         "directly")
    if args.isp_pairs is None:
        raise UsageError("PromptIQA scores images relative to a prompt of image-score pairs: pass --isp isp.csv, a CSV "
                         "with the columns image,score (image paths relative to the CSV; scores in [0, 1], or on the "
                         "scale of --mos-range / --dataset)")
    try:
        scorer.set_isp(args.isp_pairs)
    except PromptFileError as exc:
        raise UsageError.from_library(exc) from None
    return scorer


def announce(scorer: Scorer) -> None:
    """Say on stderr what the extra columns rest on: the towers behind attribute scores, the adaptation's fit."""
    meta = scorer.metadata
    if "attributes_from" in meta:
        print(f"gamma: attribute scores from {meta['attributes_from']}", file=sys.stderr)
    if scorer.adaptation is not None:
        print(f"gamma: adapted to {meta['adaptation']['prompt']} (column adapted): "
              f"{scorer.adaptation.report.summary()}", file=sys.stderr)


def progress(total: int | None, disable: bool, desc: str = "scoring") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, file=sys.stderr, disable=disable, dynamic_ncols=True)


def report(tally: Tally, out: str | None, processes: int = 1, verbose: bool = False,
           skipped: SkippedFiles | None = None, errors: str | None = None) -> None:
    """The closing lines on stderr (and with ``-v`` the rate, which scripts/bench_scale.py reads)."""
    parts = [f"scored {tally.scored} image(s)" + (f" in {processes} processes" if processes > 1 else "")]
    if tally.skipped:
        parts.append(f"skipped {tally.skipped} already in {out} or named twice")
    if tally.failed:
        listed = f" and listed in {errors}" if errors else ""
        parts.append(f"{tally.failed} could not be read (named above{listed})")
    print("gamma: " + ", ".join(parts), file=sys.stderr)
    if skipped is not None and skipped.count:
        print(f"gamma: warning: {skipped.summary()}", file=sys.stderr)
    if verbose and tally.seconds:
        print(f"gamma: rate: {tally.new / tally.seconds:.3f} images/s ({tally.new} image(s) decoded and scored in "
              f"{tally.seconds:.2f} s, {processes} process(es))", file=sys.stderr)
