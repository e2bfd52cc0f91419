"""The ``gamma`` command: score images, list what is available, analyse experts, train.

    gamma score photos/ --weights Gamma.pth --out scores.csv        # recursive; streaming; resumable
    gamma score 'shots/**/*.png' --weights Gamma-Prompt.pth --prompt sdp --scene underwater --out s.jsonl
    gamma list
    gamma --version

Exit status of ``gamma score``: 0 when every image was scored, 1 when some could not be read (each is named on
stderr; the others are still scored), 2 for usage or setup errors (bad options, weights not found).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .data.meta import is_number

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


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
        self.format = "stdout" if out is None else OUTPUT_FORMATS.get(Path(out).suffix.lower())
        if self.format is None:
            raise UsageError(f"--out must end in one of {', '.join(OUTPUT_FORMATS)}, got {out}")
        self._fh: TextIO | None = None
        self._replace = overwrite and not resume
        if self.path is None:
            return
        stream_path = self.partial_path if self.format == "json" else self.path
        exists = self.path.exists() or stream_path.exists()
        if exists and not (resume or overwrite):
            raise UsageError(f"{self.path} exists: pass --resume to continue it, or --overwrite to replace it")
        if self.format == "json" and resume and self.path.exists() and not stream_path.exists():
            self._seed_partial_from_json()
        if stream_path.exists() and not self._replace:
            if self.format == "csv":
                self.done = _read_csv_names(stream_path, columns)
            else:
                self.done = _read_jsonl_names(stream_path)

    def open(self) -> None:
        """Start writing (separate from the checks in ``__init__``, so a setup error leaves the output untouched)."""
        if self.path is None:
            self._fh = sys.stdout
            self._csv = csv.writer(self._fh, lineterminator="\n")
            self._csv.writerow(self.columns)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"):  # left by a killed run
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
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, self.partial_path)

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
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out, open(self.partial_path, encoding="utf-8") as src:
                out.write("[")
                first = True
                for line in src:  # streamed: a million rows never sit in memory at once
                    if not line.strip():
                        continue
                    out.write(("\n  " if first else ",\n  ") + line.strip())
                    first = False
                out.write("\n]\n" if not first else "]\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.partial_path.unlink(missing_ok=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


# ------------------------------------------------------------------------------------------------ commands
def _score(args: argparse.Namespace) -> int:
    from .io import iter_image_files
    from .scorer import Scorer

    if args.resume and args.out is None:
        raise UsageError("--resume needs --out (the file to continue)")
    args.scene_explicit = args.scene is not None
    if args.dataset is not None:
        _apply_dataset(args)
    if args.mos_range is not None and args.mos_range[0] == args.mos_range[1]:
        raise UsageError("--mos-range needs two different numbers LO HI")
    if args.lower_better and args.mos_range is None:
        raise UsageError("--lower-better only applies together with --mos-range")
    columns = ["name", "score"] + (["mos"] if args.mos_range else [])
    writer = RowWriter(args.out, columns, resume=args.resume, overwrite=args.overwrite)
    complete = False
    try:
        scorer = _make_scorer(args, Scorer)
        writer.open()
        recursive = not args.no_recursive
        # Counting first walks the folders twice but keeps memory flat and gives the bar an ETA.
        total = None if args.no_progress else sum(1 for _ in iter_image_files(args.paths, recursive=recursive))
        bar = _progress(total, disable=args.no_progress)
        skipped = scored = failed = 0
        seen = writer.done

        def todo() -> Iterator[str]:
            nonlocal skipped
            for path in iter_image_files(args.paths, recursive=recursive):
                if path in seen:  # already in the output (--resume) or named twice
                    skipped += 1
                    bar.update(1)
                    continue
                seen.add(path)
                yield path

        results = scorer.iter_file_scores(todo(), on_error="skip")
        try:
            for result in results:
                if result.ok:
                    writer.write({"name": result.name, "score": result.score, "mos": result.mos})
                    scored += 1
                else:
                    failed += 1
                    bar.write(f"gamma: cannot score {result.error}", file=sys.stderr)
                bar.update(1)
        finally:
            bar.close()
        complete = True
    except KeyboardInterrupt:
        print("gamma: interrupted; run again with --resume to continue", file=sys.stderr)
        writer.close(complete=False)
        return 130
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close(complete=complete)
    parts = [f"scored {scored} image(s)"]
    if skipped:
        parts.append(f"skipped {skipped} already in {args.out}")
    if failed:
        parts.append(f"{failed} could not be read (named above)")
    print("gamma: " + ", ".join(parts), file=sys.stderr)
    return 1 if failed else 0


def _apply_dataset(args: argparse.Namespace) -> None:
    """--dataset NAME: the dataset's MOS range, label direction and (for SDP) scene, unless given explicitly."""
    try:
        from .data.registry import DATASETS
    except ImportError as exc:
        raise UsageError(f"--dataset needs gamma.data ({exc})") from None
    info = DATASETS.get(args.dataset.lower())
    if info is None:
        raise UsageError(f"unknown dataset {args.dataset!r}; known: {', '.join(DATASETS)}")
    if args.mos_range is None:
        args.mos_range = list(info.mos_range)
        args.lower_better = args.lower_better or info.lower_better
    if args.scene is None:
        args.scene = info.scene


def _make_scorer(args: argparse.Namespace, scorer_cls: Any) -> Any:
    from .hub import WeightsNotFoundError
    from .weights import CheckpointError

    if args.model is None and args.weights is None:
        weights = None
    else:
        weights = args.weights
    if args.model is not None and args.weights is None:
        logger.warning("--model %s without --weights: random weights (tests and demos only)", args.model)
        import torch

        torch.manual_seed(0)  # the same random weights on every run, so that --resume continues consistently
    try:
        scorer = scorer_cls(
            weights,
            model=args.model,
            prompt_set=args.prompt,
            device=args.device,
            batch_size=args.batch_size,
            crops=args.crops,
            num_crops=args.num_crops,
            seed=args.seed,
            mos_range=tuple(args.mos_range) if args.mos_range else None,
            lower_better=args.lower_better,
            max_pixels=args.max_pixels if args.max_pixels > 0 else None,
            num_workers=args.workers,
            allow_unsafe=args.allow_unsafe_pickle,
        )
    except (WeightsNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, or CUDA not available
        if args.device is None:
            raise
        raise UsageError(f"cannot use device {args.device!r}: {str(exc).splitlines()[0]}") from None
    if scorer.model.config.prompt_set == "sdp" and args.scene is None:
        from .prompts import SCENES

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
    return scorer


def _progress(total: int | None, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="scoring", file=sys.stderr, disable=disable,
                dynamic_ncols=True)


def _list(args: argparse.Namespace) -> int:
    from .archs.crops import CROP_MODES
    from .factory import list_models
    from .hub import KNOWN_WEIGHTS, WeightsNotFoundError, resolve_weights, weights_dir
    from .prompts import SCENES

    out = sys.stdout
    print("model variants (--model):", file=out)
    for name in list_models():
        print(f"  {name}", file=out)
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


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import main as analysis_main

    return analysis_main(args)


def _train(argv: Sequence[str]) -> int:
    """``gamma train ARGS`` is ``gamma-train ARGS`` (gamma.train.main.cli), imported only when asked for."""
    try:
        from .train.main import cli as train_cli
    except ImportError as exc:
        raise UsageError(f"training is not available in this installation ({exc})") from None
    return int(train_cli(list(argv)) or 0)


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gamma", description="Gamma image quality and aesthetics assessment (MoAE + scene-based prompts).",
    )
    parser.add_argument("--version", action="version", version=f"gamma {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("score", help="score images (files, folders, globs)", description=(
        "Score images with Gamma. Rows stream to the output as they are scored; unreadable files are named on "
        "stderr and counted, and make the exit status 1."))
    s.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    s.add_argument("--weights", "-w", help="weight file, or a known name (gamma, gamma_sdp); default: find the "
                   "release file (see `gamma list`)")
    s.add_argument("--model", help=argparse.SUPPRESS)  # a variant name, random-init without --weights (tests)
    s.add_argument("--prompt", choices=("naive", "sdp", "quality"), help="prompts the weights expect "
                   "(the release files: naive for Gamma, sdp for Gamma-Prompt)")
    s.add_argument("--scene", help="scene for SDP models: natural, aigc, underwater, face, aesthetics")
    s.add_argument("--batch-size", "-b", type=_positive_int, default=8, help="images per forward pass (default 8)")
    s.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    s.add_argument("--crops", choices=("random", "grid", "five", "center", "resize"),
                   help="test-time crop protocol (default: random, the release's 10 seeded random crops)")
    s.add_argument("--num-crops", type=_positive_int, help="crops per image for random/grid (default 10)")
    s.add_argument("--seed", type=int, help="seed of the random crop offsets (default 0)")
    s.add_argument("--out", "-o", help="output file: .csv, .jsonl or .json (default: CSV on stdout)")
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

    sub.add_parser("list", help="model variants, known weights (and whether they are found), scenes, crop modes")

    from .analysis import add_arguments as add_analysis_arguments

    a = sub.add_parser("analyze", help="expert analysis: router weights per block and scene; single-expert scores")
    add_analysis_arguments(a)

    sub.add_parser("train", help="train or fine-tune (arguments are passed to gamma.train)", add_help=False)
    return parser


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
        from .io import MAX_PIXELS

        args.max_pixels = MAX_PIXELS if args.max_pixels is None else args.max_pixels
        return _run(lambda: _score(args))
    if args.command == "list":
        return _run(lambda: _list(args))
    return _run(lambda: _analyze(args))


def _run(command: Any) -> int:
    try:
        return command()
    except UsageError as exc:
        print(f"gamma: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gamma score ... | head`
        sys.stderr.close()
        return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="gamma: %(levelname)s: %(message)s")


if __name__ == "__main__":  # python -m gamma.cli
    sys.exit(main())
