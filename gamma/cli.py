"""The ``gamma`` command: score images, list what is available, analyse experts, train.

    gamma score photos/ --weights Gamma.pth --out scores.csv        # recursive; streaming; resumable
    gamma score 'shots/**/*.png' --weights Gamma-Prompt.pth --prompt sdp --scene underwater --out s.jsonl
    gamma score photos/ --weights Gamma.pth --attributes --distribution --out s.csv    # + std, p_*, sharpness ...
    gamma score photos/ --weights Gamma-Prompt.pth --prompt sdp --scene auto --out s.csv  # + scene, chosen per image
    gamma score photos/ --model promptiqa --weights best_model.pth.tar --prompt-file isp.csv   # PromptIQA
    gamma score photos/ --weights Gamma.pth --prompt-file isp.csv --out s.csv          # + adapted (to isp.csv's scale)
    gamma score --list files.txt --weights Gamma.pth --out scores.csv   # a list of paths, read lazily
    torchrun --nproc_per_node=8 -m gamma score --list files.txt --out scores.csv   # sharded over 8 processes/GPUs
    gamma convert Gamma.pth Gamma.safetensors                          # loads memory-mapped, in seconds
    gamma list
    gamma --version

Exit status of ``gamma score``: 0 when every image was scored, 1 when some could not be read (each is named on
stderr; the others are still scored), 2 for usage or setup errors (bad options, weights not found).
"""

from __future__ import annotations

import argparse
import csv
import glob
import heapq
import json
import logging
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tqdm.auto import tqdm

from . import __version__
from ._files import atomic_write
from .archs.crops import CROP_MODES
from .archs.precision import PRECISIONS
from .data.meta import is_number
from .data.registry import DATASETS
from .hub import KNOWN_WEIGHTS, WeightsNotFoundError, resolve_weights, weights_dir
from .io import MAX_PIXELS, iter_image_files, iter_listed_files
from .prompts import ATTRIBUTES, PROMPT_SETS, SCENES
from .weights import STORED_DTYPES, CheckpointError

# What a command runs — the model stack (open_clip and torchvision take seconds to import), scipy, the trainer, the
# process group — is imported inside that command, not above: the parser is built from light modules only, so
# `gamma --help` and `gamma --version` cost torch's import and little more. The one exception in gamma to imports at
# the top of a module, for its own modules as for heavy third-party packages.
if TYPE_CHECKING:
    from .scorer import Scorer
    from .train.distributed import DistInfo

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


class UsageError(Exception):
    """A problem with the command line or the setup; printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------ output files
def _truncate_partial_line(path: Path) -> None:
    """Cut a last line without a newline (a row half-written by a killed run)."""
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return
        # Read backwards in blocks until the last newline is found.
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            if start + len(chunk) == size and chunk.endswith(b"\n"):
                return
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                fh.truncate(start + nl + 1)
                logger.warning("%s: dropped a half-written last row", path)
                return
            pos = start
        fh.truncate(0)


def _read_csv_names(path: Path, columns: list[str]) -> set[str]:
    _truncate_partial_line(path)
    done: set[str] = set()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return done
        if header != columns:
            raise UsageError(f"cannot resume {path}: its columns {header} differ from this run's {columns}")
        for row in reader:
            if len(row) == len(columns) and is_number(row[1]):
                done.add(row[0])
    return done


def _read_jsonl_names(path: Path) -> set[str]:
    _truncate_partial_line(path)
    done: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                done.add(json.loads(line)["name"])
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s:%d: ignoring an unreadable row", path, line_no)
    return done


class RowWriter:
    """Streams result rows to stdout (CSV), a CSV file, a JSON Lines file, or a JSON file.

    CSV and JSON Lines rows are appended and flushed one by one, so a killed run loses at most the row being written
    (which ``--resume`` drops). A ``.json`` output is built in a JSON Lines side file (``.<name>.partial.jsonl``) and
    written atomically at the end; until then the ``.json`` file is either absent or the previous complete one.
    """

    def __init__(self, out: str | None, columns: list[str], resume: bool, overwrite: bool) -> None:
        self.columns = columns
        self.done: set[str] = set()
        self.path = Path(out) if out else None
        self.format = self.check_target(out, resume, overwrite)
        self._fh: TextIO | None = None
        self._replace = overwrite and not resume
        if self.path is None:
            return
        stream_path = self.partial_path if self.format == "json" else self.path
        if self.format == "json" and resume and self.path.exists() and not stream_path.exists():
            self._seed_partial_from_json()
        if stream_path.exists() and not self._replace:
            if self.format == "csv":
                self.done = _read_csv_names(stream_path, columns)
            else:
                self.done = _read_jsonl_names(stream_path)

    @staticmethod
    def check_target(out: str | None, resume: bool, overwrite: bool) -> str:
        """The output format of ``out`` (``stdout`` for None); a usage error for an unknown suffix, or an existing
        output without --resume / --overwrite. Reads nothing: cheap enough to run before the model is built."""
        fmt = "stdout" if out is None else OUTPUT_FORMATS.get(Path(out).suffix.lower())
        if fmt is None:
            raise UsageError(f"--out must end in one of {', '.join(OUTPUT_FORMATS)}, got {out}")
        if out is not None and not (resume or overwrite):
            path = Path(out)
            if path.exists() or (fmt == "json" and path.with_name(f".{path.name}.partial.jsonl").exists()):
                raise UsageError(f"{path} exists: pass --resume to continue it, or --overwrite to replace it")
        return fmt

    def open(self) -> None:
        """Start writing (separate from the checks in ``__init__``, so a setup error leaves the output untouched)."""
        if self.path is None:
            self._fh = sys.stdout
            self._csv = csv.writer(self._fh, lineterminator="\n")
            self._csv.writerow(self.columns)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for name in (self.path.name, self.partial_path.name):  # temporaries of atomic_write left by a killed run
            for stale in self.path.parent.glob(f".{glob.escape(name)}.*.tmp"):
                stale.unlink(missing_ok=True)
        stream_path = self.partial_path if self.format == "json" else self.path
        if self._replace:
            stream_path.unlink(missing_ok=True)
            if self.format == "json":
                self.path.unlink(missing_ok=True)
        new_file = not stream_path.exists() or stream_path.stat().st_size == 0
        self._fh = open(stream_path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._csv = csv.writer(self._fh, lineterminator="\n")
        if self.format == "csv" and new_file:
            self._csv.writerow(self.columns)
            self._fh.flush()

    @property
    def partial_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(f".{self.path.name}.partial.jsonl")

    def _seed_partial_from_json(self) -> None:
        """Resuming a finished ``.json``: its rows become the start of the side file (written atomically)."""
        assert self.path is not None
        try:
            rows = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot resume {self.path}: not a JSON file written by gamma ({exc})") from None
        if not isinstance(rows, list):
            raise UsageError(f"cannot resume {self.path}: expected a JSON list of rows")

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")

        atomic_write(self.partial_path, write)

    def write(self, row: dict[str, Any]) -> None:
        try:
            if self.format in ("csv", "stdout"):
                self._csv.writerow([_fmt(row[c]) for c in self.columns])
            else:
                self._fh.write(json.dumps({c: row[c] for c in self.columns}) + "\n")
            self._fh.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:  # disk full ...: the rows on disk stay, and --resume drops a half-written last one
            raise UsageError(f"cannot write {self.path or 'stdout'} ({exc.strerror or exc}); the rows written so far "
                             "are kept: make room and run again with --resume") from None

    def close(self, complete: bool) -> None:
        """Close the stream; for ``.json`` output, write the final file when the run is ``complete``."""
        if self._fh is None:
            return
        if self._fh is sys.stdout:
            self._fh.flush()
            return
        try:
            self._fh.close()
        except OSError:  # the buffered row that could not be written (disk full): already reported by write()
            if complete:
                raise
        if self.format == "json" and complete:
            self._finish_json()

    def _finish_json(self) -> None:
        assert self.path is not None
        atomic_write(self.path, self._write_json_from_partial)
        self.partial_path.unlink(missing_ok=True)

    def _write_json_from_partial(self, tmp: str) -> None:
        """The side file's rows as one JSON list, streamed: a million rows never sit in memory at once."""
        with open(tmp, "w", encoding="utf-8") as out, open(self.partial_path, encoding="utf-8") as src:
            out.write("[")
            first = True
            for line in src:
                if not line.strip():
                    continue
                out.write(("\n  " if first else ",\n  ") + line.strip())
                first = False
            out.write("\n]\n" if not first else "]\n")


def _open_writer(out: str | None, columns: list[str], resume: bool, overwrite: bool,
                 metadata: dict[str, Any] | None = None) -> Any:
    """The writer of ``--out``: :class:`gamma.parquet_out.ParquetRowWriter` for ``.parquet`` (the ``parquet`` extra),
    else :class:`RowWriter`; both take the same calls."""
    if out is None or Path(out).suffix.lower() != ".parquet":
        return RowWriter(out, columns, resume=resume, overwrite=overwrite)
    try:
        from .parquet_out import ParquetRowWriter

        return ParquetRowWriter(out, columns, resume=resume, overwrite=overwrite, metadata=metadata)
    except ImportError:
        raise UsageError("--out *.parquet needs pyarrow: pip install 'gamma-iqa[parquet]'") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


# ------------------------------------------------------------------------------------------------ score
@dataclass
class _Tally:
    scored: int = 0
    skipped: int = 0  # already in the output (--resume), or named twice
    failed: int = 0  # could not be read or scored
    new: int = 0  # images decoded and scored by this run (sharded: not those merged from an interrupted run's parts)
    seconds: float = 0.0  # how long that took (sharded: the slowest process)


def _score(args: argparse.Namespace) -> int:
    _resolve_score_options(args)
    if args.engine == "ray":  # Ray Data (gamma.integrations.ray), local or a ray:// cluster
        from .integrations.ray import score_command

        return score_command(args)
    from .shard_score import score_shards, wants_shards  # tar shards (gamma.shards): whole shards per process

    if wants_shards(args):
        return score_shards(args)
    if args.out_dir is not None:
        raise UsageError("--out-dir writes one Parquet file per input shard: it applies to .tar shard inputs")
    if _world_size() > 1 or (args.out is not None and _part_files(Path(args.out))):
        return _score_sharded(args)  # torchrun; or the parts a crashed torchrun run left
    RowWriter.check_target(args.out, args.resume, args.overwrite)  # before the model loads
    try:
        scorer = _make_scorer(args)
    except KeyboardInterrupt:
        print("gamma: interrupted", file=sys.stderr)
        return 130
    _announce(scorer)
    # The columns depend on the model (PromptIQA, SDP prompts for the scene column): known once it is built.
    writer = _open_writer(args.out, scorer.columns(), args.resume, args.overwrite, scorer.metadata)
    try:
        writer.open()
        tally = _score_files(args, scorer, writer)
    except KeyboardInterrupt:
        print("gamma: interrupted; run again with --resume to continue", file=sys.stderr)
        writer.close(complete=False)
        return 130
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close(complete=True)
    _report(tally, args.out, verbose=args.verbose)
    return 1 if tally.failed else 0


def _report(tally: _Tally, out: str | None, processes: int = 1, verbose: bool = False) -> None:
    parts = [f"scored {tally.scored} image(s)" + (f" in {processes} processes" if processes > 1 else "")]
    if tally.skipped:
        parts.append(f"skipped {tally.skipped} already in {out} or named twice")
    if tally.failed:
        parts.append(f"{tally.failed} could not be read (named above)")
    print("gamma: " + ", ".join(parts), file=sys.stderr)
    if verbose and tally.seconds:  # scripts/bench_scale.py reads it
        print(f"gamma: rate: {tally.new / tally.seconds:.3f} images/s ({tally.new} image(s) decoded and scored in "
              f"{tally.seconds:.2f} s, {processes} process(es))", file=sys.stderr)


def _resolve_score_options(args: argparse.Namespace) -> None:
    """Check option combinations and fill in what ``--dataset`` implies (before any file is touched)."""
    if not args.paths and not args.list:
        raise UsageError("give the images to score: PATH ... (files, folders, globs) and/or --list FILE")
    if args.resume and args.out is None and args.out_dir is None:
        raise UsageError("--resume needs --out (the file to continue)")
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
    args.prompt_pairs = None
    if args.prompt_file is not None:  # read (and every image checked to exist) before the model loads
        from .prompt_file import PromptFileError, read_prompt_file

        try:
            args.prompt_pairs = read_prompt_file(args.prompt_file)
        except PromptFileError as exc:
            raise UsageError(str(exc)) from None
    elif args.adapt_outputs is not None or args.prompt_flip:
        raise UsageError(f"{'--adapt-outputs' if args.adapt_outputs else '--prompt-flip'} applies together with "
                         "--prompt-file")


def _iter_inputs(args: argparse.Namespace) -> Iterator[str]:
    """The images to score, in a deterministic order: PATHs expanded (folders, globs), then each --list's paths."""
    if args.paths:
        yield from iter_image_files(args.paths, recursive=not args.no_recursive)
    for listed in args.list or []:
        try:
            yield from iter_listed_files(listed)
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # rows scored so far stay; --resume continues
            raise UsageError(f"cannot read the file list {listed}: {exc}") from None


def _score_files(args: argparse.Namespace, scorer: Scorer, writer: RowWriter) -> _Tally:
    """Score the images of ``args`` that are not in the output yet, streaming one row per image."""
    # Counting first walks the inputs twice but keeps memory flat and gives the bar an ETA.
    total = None if args.no_progress else sum(1 for _ in _iter_inputs(args))
    bar = _progress(total, disable=args.no_progress)
    tally = _Tally()
    seen = writer.done
    start = time.perf_counter()

    def todo() -> Iterator[str]:
        for path in _iter_inputs(args):
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
            bar.update(1)
    finally:
        bar.close()
    tally.new, tally.seconds = tally.scored + tally.failed, time.perf_counter() - start
    return tally


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


def _make_scorer(args: argparse.Namespace, device: Any = None) -> Scorer:
    import torch

    from .adapt import NotEnoughPairsError
    from .prompt_file import PromptFileError
    from .scorer import Scorer

    device = args.device if device is None else device
    if args.model is not None and args.weights is None:
        logger.warning("--model %s without --weights: random weights (tests and demos only)", args.model)
        torch.manual_seed(0)  # the same random weights on every run, so that --resume continues consistently
    try:
        scorer = Scorer(
            args.weights,
            model=args.model,
            prompt_set=args.prompt,
            device=device,
            precision=args.precision,
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
            prompt_flip=args.prompt_flip,
            backend="onnxruntime" if args.backend == "onnxruntime" else args.promptiqa_backend,
        )
    except (WeightsNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, or CUDA not available
        if device is None:
            raise
        raise UsageError(f"cannot use device {str(device)!r}: {str(exc).splitlines()[0]}") from None
    if scorer.is_promptiqa:
        return _setup_promptiqa(scorer, args)
    if scorer.model.config.prompt_set == "sdp" and args.scene is None:
        raise UsageError(f"this model uses scene-based prompts (SDP): pass --scene, one of {', '.join(SCENES)}")
    if args.scene is not None and args.scene_explicit and scorer.model.config.prompt_set != "sdp":
        logger.warning("--scene only applies to scene-based prompts; this model uses %r prompts (for the Gamma-Prompt "
                       "weights pass --prompt sdp)", scorer.model.config.prompt_set)
    if args.scene is not None:
        try:
            scorer.model.scene_index(args.scene, 1, scorer.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        scorer.scene = args.scene
    if args.prompt_pairs is not None:
        try:
            scorer.adapt(args.prompt_pairs, outputs=args.adapt_outputs or "score")
        except (NotEnoughPairsError, PromptFileError) as exc:
            raise UsageError(f"cannot adapt to --prompt-file: {exc}") from None
    return scorer


def _setup_promptiqa(scorer: Scorer, args: argparse.Namespace) -> Scorer:
    """A PromptIQA scorer: its prompt from --prompt-file; Gamma-only options refused."""
    from .prompt_file import PromptFileError

    if args.scene is not None and args.scene_explicit:
        raise UsageError("--scene applies to Gamma models with scene-based prompts; PromptIQA takes its task from "
                         "the prompt (--prompt-file)")
    if args.adapt_outputs is not None:
        raise UsageError("--adapt-outputs applies to Gamma models; PromptIQA scores against the prompt directly")
    if args.prompt_pairs is None:
        raise UsageError("PromptIQA scores images relative to a prompt: pass --prompt-file isp.csv, a CSV with the "
                         "columns image,score (image paths relative to the CSV; scores in [0, 1], or on the scale "
                         "of --mos-range / --dataset)")
    try:
        scorer.set_prompt(args.prompt_pairs)
    except PromptFileError as exc:
        raise UsageError(str(exc)) from None
    return scorer


def _announce(scorer: Scorer) -> None:
    """Say on stderr what the extra columns rest on: the towers behind attribute scores, the adaptation's fit."""
    meta = scorer.metadata
    if "attributes_from" in meta:
        print(f"gamma: attribute scores from {meta['attributes_from']}", file=sys.stderr)
    if scorer.adaptation is not None:
        print(f"gamma: adapted to {meta['adaptation']['prompt']} (column adapted): "
              f"{scorer.adaptation.report.summary()}", file=sys.stderr)


def _progress(total: int | None, disable: bool, desc: str = "scoring") -> Any:
    return tqdm(total=total, unit="img", desc=desc, file=sys.stderr, disable=disable, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ sharded score
# `torchrun --nproc_per_node=N -m gamma score ... --out scores.csv`: input i (in the order _iter_inputs gives, the same
# in every process) goes to process i % N, which scores its share on its own device and appends one record per input
# (index, name, score or error) to its own part file beside --out, `.scores.csv.rank<r>-of-<N>.jsonl`. After all
# processes are done, rank 0 merges the parts by index into --out (the same rows, in the same order, as one process
# writes) and deletes them. A crash of any process leaves the parts: `--resume` (with any number of processes, one
# included) skips what they hold and merges them with the new records. Multi-node: --out must be on a filesystem that
# every node sees.

_PART_NAME = re.compile(r"\.rank(\d+)-of-(\d+)\.jsonl$")
_SHARD_TIMEOUT_S = 7 * 24 * 3600  # a process that finished its share waits for the slowest one at the merge


class _PeerError(Exception):
    """Rank 0 reports the error (once); the other processes exit with the same status, silently."""


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.name}.rank{rank}-of-{world}.jsonl")


def _part_files(out: Path) -> list[Path]:
    """The part files of earlier (interrupted) sharded runs into ``out``, whatever their number of processes."""
    if not out.parent.is_dir():
        return []
    found = out.parent.glob(f".{glob.escape(out.name)}.rank*-of-*.jsonl")
    return sorted(p for p in found if _PART_NAME.search(p.name[len(out.name) + 1:]))


def _score_sharded(args: argparse.Namespace) -> int:
    from .train import distributed  # the process group (gloo on CPU, NCCL on CUDA), as in training

    if args.out is None:
        raise UsageError("scoring with several processes needs --out (each writes a part beside it; rank 0 merges)")
    try:
        info = distributed.setup(device=args.device or "auto", timeout_s=_SHARD_TIMEOUT_S)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        return _score_share(args, info)
    finally:
        distributed.cleanup(info)


def _collective_check(error: str | None, info: DistInfo) -> None:
    """Raise on every process if any process hit a usage error (none waits forever for one that gave up)."""
    from .train.distributed import all_gather_objects

    first = next((e for e in all_gather_objects(error, info) if e is not None), None)
    if first is not None:
        raise UsageError(first) if info.is_main else _PeerError(first)


def _score_share(args: argparse.Namespace, info: DistInfo) -> int:
    from .train.distributed import all_gather_objects

    out = Path(args.out)
    # 1. Rank 0 checks the output (cheaply), then everyone builds the scorer on its own device: the columns depend
    #    on the model.
    error, scorer = None, None
    try:
        if info.is_main:
            RowWriter.check_target(args.out, args.resume, args.overwrite)
        scorer = _make_scorer(args, device=info.device)
    except UsageError as exc:
        error = str(exc)
    _collective_check(error, info)
    columns = scorer.columns()
    part_columns = _part_columns(columns)
    # 2. Rank 0 checks the output and the parts, and repairs rows half-written by a killed run, before anyone reads.
    writer, error = None, None
    if info.is_main:
        _announce(scorer)
        try:
            writer = _open_writer(args.out, columns, args.resume, args.overwrite, scorer.metadata)
            _prepare_parts(out, args, part_columns)
        except UsageError as exc:
            error = str(exc)
    _collective_check(error, info)
    # 3. Everyone: what is done already (in --out, in any part).
    error = None
    try:
        done_out = writer.done if writer is not None else (
            _open_writer(args.out, columns, resume=True, overwrite=False).done if args.resume else set())
        done_parts = _names_in_parts(out)
    except UsageError as exc:
        error = str(exc)
    _collective_check(error, info)
    # 4. Score this process's share into its part.
    part = RowWriter(str(_part_path(out, info.rank, info.world_size)), part_columns, resume=True, overwrite=False)
    part.open()
    try:
        mine = _score_part(args, scorer, part, info, done=(done_out, done_parts))
    except KeyboardInterrupt:
        if info.is_main:
            print("gamma: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130
    finally:
        part.close(complete=True)
    # 5. Wait for every process, then rank 0 merges the parts into --out.
    everyone = all_gather_objects(mine, info)
    if not info.is_main:
        return 0
    tally = _merge_parts(out, writer)
    tally.skipped += sum(t.skipped for t in everyone)
    tally.new, tally.seconds = sum(t.new for t in everyone), max(t.seconds for t in everyone)
    _report(tally, args.out, info.world_size, verbose=args.verbose)
    return 1 if tally.failed else 0


def _part_columns(columns: list[str]) -> list[str]:
    """The fields of a part record: index, the output's columns (``mos`` always), error."""
    extra = [c for c in columns if c not in ("name", "score", "mos")]
    return ["index", "name", "score", "mos", *extra, "error"]


def _prepare_parts(out: Path, args: argparse.Namespace, part_columns: list[str]) -> None:
    """Parts of an earlier run: continued with --resume (a half-written last record dropped; their fields must be
    this run's), deleted with --overwrite, else an error."""
    parts = _part_files(out)
    if not parts:
        return
    if args.resume:
        for path in parts:
            _truncate_partial_line(path)
            first = next(iter(_read_part(path)), None)
            if first is not None and list(first) != part_columns:
                raise UsageError(f"cannot resume from {path.name}: its records hold {list(first)[1:-1]}, this run "
                                 f"writes {part_columns[1:-1]} (run with the options of the interrupted run, or "
                                 "--overwrite)")
    elif args.overwrite:
        for path in parts:
            path.unlink()
    else:
        raise UsageError(f"an interrupted run left {len(parts)} part file(s) of {out} ({parts[0].name} ...): pass "
                         "--resume to continue it, or --overwrite to start again")


def _read_part(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a part file, in file order; unreadable lines are skipped with a warning."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("index"), int) or not isinstance(
                    record.get("name"), str):
                logger.warning("%s:%d: ignoring an unreadable record", path, line_no)
                continue
            yield record


def _names_in_parts(out: Path) -> set[str]:
    return {record["name"] for path in _part_files(out) for record in _read_part(path)}


def _score_part(args: argparse.Namespace, scorer: Scorer, part: RowWriter, info: DistInfo,
                done: tuple[set[str], set[str]]) -> _Tally:
    """Score inputs ``i % world == rank`` that no earlier run scored: how many, how long, how many were skipped as
    already in --out."""
    rank, world = info.rank, info.world_size
    tally = _Tally()
    indices: deque[int] = deque()  # the index of each path handed to the scorer, whose results come in that order

    def todo() -> Iterator[str]:
        for i, path in enumerate(_iter_inputs(args)):
            if i % world != rank:
                continue
            if path in done[0] or path in done[1]:  # in --out (counted as skipped), or in a part (merged below)
                tally.skipped += path in done[0]
                bar.update(1)
                continue
            indices.append(i)
            yield path

    show = info.is_main and not args.no_progress
    total = sum(1 for i, _ in enumerate(_iter_inputs(args)) if i % world == rank) if show else None
    bar = _progress(total, disable=not show, desc=f"scoring (rank 0 of {world})" if world > 1 else "scoring")
    start = time.perf_counter()
    try:
        for result in scorer.iter_file_scores(todo(), on_error="skip"):
            part.write({"index": indices.popleft(), "name": result.name, "score": result.score if result.ok else None,
                        "mos": result.mos, **result.values, "error": result.error})
            tally.new += 1
            bar.update(1)
    finally:
        bar.close()
    tally.seconds = time.perf_counter() - start
    logger.info("rank %d of %d: %d image(s) in %.1f s", rank, world, tally.new, tally.seconds)
    return tally


def _merge_parts(out: Path, writer: RowWriter) -> _Tally:
    """Append the parts' rows to ``writer`` in input order (by index), once per name; name the failures; delete the
    parts. Memory: one record per part, and the names written (as ``--resume`` holds them)."""
    parts = _part_files(out)
    tally = _Tally()
    seen = writer.done  # names already in --out (a resumed run) and those merged here
    last = dict.fromkeys(range(len(parts)), -1)
    unordered = False

    def stream(k: int, path: Path) -> Iterable[tuple[int, int, dict[str, Any]]]:
        nonlocal unordered
        for record in _read_part(path):
            index = int(record["index"])
            unordered |= index < last[k]  # only when the inputs changed between a crash and --resume
            last[k] = index
            yield index, k, record

    writer.open()
    try:
        for _, _, record in heapq.merge(*(stream(k, p) for k, p in enumerate(parts))):
            name = record["name"]
            if name in seen:
                tally.skipped += 1
                continue
            seen.add(name)
            if record.get("error"):
                tally.failed += 1
                print(f"gamma: cannot score {record['error']}", file=sys.stderr)
                continue
            score = record["score"]
            extra = {c: record[c] for c in writer.columns if c not in ("name", "score", "mos")}
            writer.write({"name": name, "score": math.nan if score is None else float(score), "mos": record["mos"],
                          **extra})
            tally.scored += 1
    except BaseException:
        writer.close(complete=False)  # the parts stay: --resume merges them again, skipping the rows written
        raise
    writer.close(complete=True)
    if unordered:
        logger.warning("the inputs changed between the interrupted run and --resume: some rows of %s are not in input "
                       "order", out)
    for path in parts:
        path.unlink(missing_ok=True)
    return tally


# ------------------------------------------------------------------------------------------------ convert
def _convert(args: argparse.Namespace) -> int:
    """``gamma convert SRC DST``: :func:`gamma.factory.convert_checkpoint`; prints what it wrote."""
    from .factory import convert_checkpoint

    dest = Path(args.dest)
    if dest.suffix != ".safetensors":
        raise UsageError(f"the converted file must end in .safetensors, got {dest}")
    if dest.exists() and not args.overwrite:
        raise UsageError(f"{dest} exists: pass --overwrite to replace it")
    try:
        written = convert_checkpoint(args.source, dest, precision=args.precision, prompt_set=args.prompt,
                                     allow_unsafe=args.allow_unsafe_pickle)
    except (WeightsNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    size = written.stat().st_size / 2**20
    print(f"wrote {written} ({size:,.0f} MiB, {args.precision} weights)")
    return 0


# ------------------------------------------------------------------------------------------------ export
def _export(args: argparse.Namespace) -> int:
    """``gamma export SRC --onnx FILE``: :func:`gamma.export.export_onnx`; prints what it wrote."""
    import torch

    from .export import export_onnx, quantize_onnx
    from .factory import create_model

    targets = [Path(args.onnx)] + ([Path(args.int8)] if args.int8 else [])
    for target in targets:
        if target.suffix != ".onnx":
            raise UsageError(f"the exported file must end in .onnx, got {target}")
        if target.exists() and not args.overwrite:
            raise UsageError(f"{target} exists: pass --overwrite to replace it")
    if args.source is None and args.model is None:
        raise UsageError("give the weights to export (a file or a known name)")
    torch.manual_seed(0)
    try:
        import onnx  # noqa: F401 - the `onnx` extra
    except ImportError:
        raise UsageError("gamma export needs onnx and onnxruntime: pip install 'gamma-iqa[onnx]'") from None
    try:
        model = create_model(args.model, pretrained=args.source, allow_unsafe=args.allow_unsafe_pickle,
                             **({"prompt_set": args.prompt} if args.prompt else {}))
        written = export_onnx(model, args.onnx, scene=args.scene, outputs=[o.strip() for o in args.outputs.split(",")
                                                                            if o.strip()], source=args.source or "")
    except (WeightsNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {written} ({written.stat().st_size / 2**20:,.1f} MiB)")
    if args.int8:
        quantized = quantize_onnx(written, args.int8)
        print(f"wrote {quantized} ({quantized.stat().st_size / 2**20:,.1f} MiB, int8)")
    return 0


# ------------------------------------------------------------------------------------------------ list
def _list(args: argparse.Namespace) -> int:
    from .factory import list_models

    out = sys.stdout
    print("model variants (--model):", file=out)
    for name in list_models():
        print(f"  {name}", file=out)
    for name in list_models("promptiqa"):
        print(f"  {name}  (PromptIQA: needs --prompt-file)", file=out)
    print(f"weights (--weights NAME or a path; cache folder {weights_dir()}):", file=out)
    for name, entry in KNOWN_WEIGHTS.items():
        try:
            where = f"found: {resolve_weights(name, download=False)}"
        except WeightsNotFoundError:
            where = f"not found (set {entry.env_var} or place {entry.filename} in the cache folder)"
        print(f"  {name:<10} {entry.description}; {where}", file=out)
    print(f"scenes (--scene): {', '.join(SCENES)}", file=out)
    print(f"crop modes (--crops): {', '.join(CROP_MODES)}", file=out)
    return 0


# ------------------------------------------------------------------------------------------------ analyze
def _analyze(args: argparse.Namespace) -> int:
    """``gamma analyze routing|experts``: the functions of :mod:`gamma.analysis`; prints the files written."""
    from .analysis import (
        EXPERT_COLUMNS,
        read_labels,
        routing_statistics,
        single_expert_evaluation,
        write_routing,
        write_rows,
    )
    from .archs.gamma import GammaModel
    from .scorer import Scorer

    try:
        scorer = Scorer(args.weights, model=args.model, prompt_set=args.prompt, device=args.device,
                        batch_size=args.batch_size, crops=args.crops, num_crops=args.num_crops, num_workers=0)
    except (WeightsNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    model = scorer.model
    if not isinstance(model, GammaModel):
        raise UsageError(f"gamma analyze reads Gamma's MoAE routers and experts; {args.weights or args.model} holds a "
                         f"{type(model).__name__}, which has none")
    try:
        if args.analysis == "routing":
            groups, scenes = _parse_groups(args.groups)
            rows = routing_statistics(model, groups, scenes=scenes, batch_size=args.batch_size,
                                      device=scorer.device, max_images=args.max_images)
            written = write_routing(rows, args.out_dir)
        else:
            paths, labels = read_labels(args.meta, args.root)
            rows = single_expert_evaluation(model, paths, labels, scene=args.scene, batch_size=args.batch_size,
                                            device=scorer.device)
            written = [write_rows(rows, Path(args.out_dir) / "single_expert.csv", EXPERT_COLUMNS)]
            for row in rows:
                print(f"{row['setting']:<16} SRCC {row['srcc']:.4f}  PLCC {row['plcc']:.4f}  ({row['images']} images)")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _parse_groups(specs: Sequence[str]) -> tuple[dict[str, str], dict[str, str | None]]:
    """``NAME=PATH[:SCENE]`` arguments -> (name -> path, name -> scene)."""
    groups: dict[str, str] = {}
    scenes: dict[str, str | None] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"a group is NAME=PATH[:SCENE], got {spec!r}")
        path, scene = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and head and not os.path.exists(rest) and "/" not in tail and "\\" not in tail:
            path, scene = head, tail
        groups[name], scenes[name] = path, scene
    return groups, scenes


def _train(argv: Sequence[str]) -> int:
    """``gamma train ARGS`` is ``gamma-train ARGS`` (gamma.train.main.cli)."""
    from .train.main import cli as train_cli

    return int(train_cli(list(argv)) or 0)


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gamma", description="Gamma image quality and aesthetics assessment (MoAE + scene-based prompts).",
    )
    parser.add_argument("--version", action="version", version=f"gamma {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    release_names = ", ".join(name for name, entry in KNOWN_WEIGHTS.items() if entry.prompt_set)

    s = sub.add_parser("score", help="score images (files, folders, globs, file lists)", description=(
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
    s.add_argument("--prompt", choices=PROMPT_SETS, help="prompts the weights expect "
                   "(the release files: naive for Gamma, sdp for Gamma-Prompt)")
    s.add_argument("--scene", help=f"scene for SDP models: {', '.join(SCENES)}, or auto (chosen per image; adds a "
                   "scene column)")
    s.add_argument("--attributes", action="store_true", help="add the zero-shot attribute scores (columns "
                   f"{', '.join(ATTRIBUTES)}; higher is better)")
    s.add_argument("--distribution", action="store_true", help="add std and the level probabilities p_bad ... "
                   "p_perfect (with --scene auto also the scene probabilities)")
    s.add_argument("--prompt-file", metavar="CSV", help="image-score pairs (CSV image,score; paths relative to it): "
                   "the prompt of a PromptIQA model; a Gamma model is adapted to it (column adapted, on its scale)")
    s.add_argument("--adapt-outputs", choices=["score", "distribution", "all"], help="Gamma with --prompt-file: "
                   "the outputs mapped onto the prompt's scores (default score: a monotone map; the others: ridge)")
    s.add_argument("--prompt-flip", action="store_true", help="PromptIQA: flip prompt images at random for every "
                   "batch, as the official test code does (random scores; for exact reproduction only)")
    s.add_argument("--promptiqa-backend", choices=["cv2", "pil"], help="PromptIQA: how images are decoded and "
                   "resized (default cv2, the official preprocessing; pil needs no OpenCV)")
    s.add_argument("--batch-size", "-b", type=_positive_int, default=8, help="images per forward pass (default 8)")
    s.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    s.add_argument("--precision", choices=PRECISIONS, help="how the image tower computes: fp32 (exact), bf16, fp16, "
                   "int8 (CPU), auto (the fastest this device runs well); default: as the weights are stored (fp32 "
                   "for the release's files). Under torchrun each process applies it for its own device")
    s.add_argument("--crops", choices=CROP_MODES,
                   help="test-time crop protocol (default: random, the release's 10 seeded random crops)")
    s.add_argument("--num-crops", type=_positive_int, help="crops per image for random/grid (default 10)")
    s.add_argument("--seed", type=int, help="seed of the random crop offsets (default 0)")
    s.add_argument("--out", "-o", help="output file: .csv, .jsonl, .json or .parquet (default: CSV on stdout)")
    s.add_argument("--out-dir", metavar="DIR", help="tar shard inputs: one Parquet file per shard, DIR/00000.parquet "
                   "... (img2dataset's naming), each written when its shard is done")
    s.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default; torchrun for several "
                   "processes) or ray: Ray Data actors (docs/scale.md)")
    s.add_argument("--ray-address", metavar="ADDR", help="--engine ray: the cluster (ray://host:10001 or auto); "
                   "default: a local Ray")
    s.add_argument("--ray-actors", type=_positive_int, default=2, help="--engine ray: scoring actors (default 2)")
    s.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch", help="torch (default), or "
                   "onnxruntime: --weights is a graph written by `gamma export` (same crops and decoding)")
    s.add_argument("--resume", action="store_true", help="skip images already in --out and append the rest")
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

    c = sub.add_parser("convert", help="write a weight file in gamma's safetensors format (loads in seconds)",
                       description="Convert the release's .pth (or any weight file gamma reads) into gamma's own "
                       "format: safetensors with the model config, loaded memory-mapped. The weight lookup uses "
                       "X.safetensors instead of X.pth beside it while X.pth is unchanged.")
    c.add_argument("source", help=f"weight file, or a known name ({release_names})")
    c.add_argument("dest", help="the .safetensors file to write")
    c.add_argument("--precision", choices=list(STORED_DTYPES), default="fp32", help="store the model in this "
                   "precision (default fp32: exact); bf16/fp16 store the image tower's matmul weights as "
                   "to_precision does (a smaller file that loads as a bf16/fp16 model; scores as with --precision)")
    c.add_argument("--prompt", choices=PROMPT_SETS, help="prompts the weights expect (default: from a known name or "
                   "file name, else naive)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    c.add_argument("--allow-unsafe-pickle", action="store_true", help="allow a source that needs a full unpickle")

    x = sub.add_parser("export", help="export a Gamma model to ONNX (image tower + adapter + level head)",
                       description="Write an ONNX graph of a Gamma model with its text features baked in; input a "
                       "batch of 224x224 crops in [0, 1] (CLIP normalisation inside), a dynamic batch axis; see "
                       "gamma/export.py for the contract. Score with it: gamma score ... --backend onnxruntime "
                       "--weights gamma.onnx")
    x.add_argument("source", nargs="?", help=f"weight file, or a known name ({release_names}); with --model alone: "
                   "random weights")
    x.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    x.add_argument("--model", help=argparse.SUPPRESS)
    x.add_argument("--prompt", "--prompt-set", dest="prompt", choices=PROMPT_SETS, help="prompts the weights expect")
    x.add_argument("--scene", help="SDP models: bake this scene only (default: every scene)")
    x.add_argument("--outputs", default="score,distribution,attributes", help="comma-separated: score, "
                   "distribution, attributes (default: all three)")
    x.add_argument("--int8", metavar="FILE", help="also write an int8 copy (onnxruntime dynamic quantisation)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing file")
    x.add_argument("--allow-unsafe-pickle", action="store_true", help="allow a source that needs a full unpickle")

    sub.add_parser("list", help="model variants, known weights (and whether they are found), scenes, crop modes")

    a = sub.add_parser("analyze", help="expert analysis: router weights per block and scene; single-expert scores")
    _add_analyze_arguments(a)

    sub.add_parser("train", help="train or fine-tune (arguments are passed to gamma.train)", add_help=False)
    return parser


def _add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gamma analyze``."""
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", "-w", help="weight file or known name (default: find the release file)")
    common.add_argument("--model", help=argparse.SUPPRESS)
    common.add_argument("--prompt", choices=PROMPT_SETS, help="prompts the weights expect")
    common.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    common.add_argument("--batch-size", "-b", type=int, default=8)
    common.add_argument("--crops", choices=CROP_MODES, help="crop protocol")
    common.add_argument("--num-crops", type=int, help="crops per image")
    common.add_argument("--out-dir", "-o", default="gamma_analysis", help="output folder (default gamma_analysis)")

    r = sub.add_parser("routing", parents=[common], help="mean router weight per block and expert for each group")
    r.add_argument("groups", nargs="+", metavar="NAME=PATH[:SCENE]",
                   help="a group of images (folder, file or glob) and its name, e.g. koniq10k=data/koniq/512x384 "
                        "or mine=photos/:natural; a dataset or scene name gives SDP models their scene")
    r.add_argument("--max-images", type=int, help="use at most this many images per group")

    e = sub.add_parser("experts", parents=[common], help="SRCC/PLCC with all experts and with each one alone (Table 6)")
    e.add_argument("meta", help="CSV: image path (relative to --root), MOS; more columns ignored")
    e.add_argument("--root", help="image folder (default: the CSV's folder)")
    e.add_argument("--scene", help=f"scene for SDP models: {', '.join(SCENES)}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gamma`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return _run(lambda: _train(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "score":
        args.max_pixels = MAX_PIXELS if args.max_pixels is None else args.max_pixels
        return _run(lambda: _score(args))
    if args.command == "list":
        return _run(lambda: _list(args))
    if args.command == "convert":
        return _run(lambda: _convert(args))
    if args.command == "export":
        return _run(lambda: _export(args))
    return _run(lambda: _analyze(args))


def _run(command: Any) -> int:
    try:
        return command()
    except UsageError as exc:
        print(f"gamma: error: {exc}", file=sys.stderr)
        return 2
    except _PeerError:  # sharded scoring: rank 0 printed it
        return 2
    except BrokenPipeError:  # `gamma score ... | head`
        sys.stderr.close()
        return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="gamma: %(levelname)s: %(message)s")


if __name__ == "__main__":  # python -m gamma.cli (python -m gamma: gamma/__main__.py)
    sys.exit(main())
