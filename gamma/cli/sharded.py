"""Scoring under torchrun: each process scores its share into a part file; rank 0 merges the parts into --out.

`torchrun --nproc_per_node=N -m gamma score ... --out scores.csv`: input i (in the order
:func:`~gamma.cli.score_setup.iter_inputs` gives, the same in every process) goes to process i % N, which scores its
share on its own device and appends one record per input (index, name, score or error) to its own part file beside
--out, `.scores.csv.rank<r>-of-<N>.jsonl`. After all processes are done, rank 0 merges the parts by index into --out
(the same rows, in the same order, as one process writes) and deletes them. A crash of any process leaves the parts:
`--resume` (with any number of processes, one included) skips what they hold and merges them with the new records.
Multi-node: --out must be on a filesystem that every node sees. Rank 0 records what the parts were scored with
(:mod:`gamma.cli.provenance`) in `.scores.csv.parts.meta.json`; `--resume` continues parts only when this run's
record is the same, and the merged --out gets its own record, `scores.csv.meta.json`.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import PeerError, UsageError
from .provenance import Provenance, check_resume, sidecar_path, write_sidecar
from .score_setup import SkippedFiles, Tally, announce, iter_inputs, make_scorer, progress, report
from .writers import ErrorWriter, RowWriter, check_output, error_reason, open_writer, truncate_partial_line

if TYPE_CHECKING:
    from ..scorer import Scorer
    from ..train.distributed import DistInfo

logger = logging.getLogger(__name__)

_PART_NAME = re.compile(r"\.rank(\d+)-of-(\d+)\.jsonl$")
_SHARD_TIMEOUT_S = 7 * 24 * 3600  # a process that finished its share waits for the slowest one at the merge


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.name}.rank{rank}-of-{world}.jsonl")


def _parts_record(out: Path) -> Path:
    """The name whose sidecar records what the parts of ``out`` were scored with (``.scores.csv.parts.meta.json``)."""
    return out.with_name(f".{out.name}.parts")


def part_files(out: Path) -> list[Path]:
    """The part files of earlier (interrupted) sharded runs into ``out``, whatever their number of processes."""
    if not out.parent.is_dir():
        return []
    found = out.parent.glob(f".{glob.escape(out.name)}.rank*-of-*.jsonl")
    return sorted(p for p in found if _PART_NAME.search(p.name[len(out.name) + 1:]))


def score_sharded(args: argparse.Namespace) -> int:
    from ..train import distributed  # the process group (gloo on CPU, NCCL on CUDA), as in training

    if args.out is None:
        raise UsageError("scoring with several processes needs --out (each writes a part beside it; rank 0 merges)")
    try:
        info = distributed.setup(device=args.device or "auto", timeout_s=_SHARD_TIMEOUT_S)
    except ValueError as exc:
        raise UsageError.from_library(exc) from None
    try:
        return _score_share(args, info)
    finally:
        distributed.cleanup(info)


def _collective_check(error: str | None, info: DistInfo) -> None:
    """Raise on every process if any process hit a usage error (none waits forever for one that gave up)."""
    from ..train.distributed import all_gather_objects

    first = next((e for e in all_gather_objects(error, info) if e is not None), None)
    if first is not None:
        raise UsageError(first) if info.is_main else PeerError(first)


def _score_share(args: argparse.Namespace, info: DistInfo) -> int:
    from ..train.distributed import all_gather_objects

    out = Path(args.out)
    # 1. Rank 0 checks the output (cheaply), then everyone builds the scorer on its own device: the columns depend
    #    on the model.
    error, scorer = None, None
    try:
        if info.is_main:
            check_output(args.out, args.resume, args.overwrite)
        scorer = make_scorer(args, device=info.device)
    except UsageError as exc:
        error = str(exc)
    _collective_check(error, info)
    columns = scorer.columns()
    part_columns = _part_columns(columns)
    # 2. Rank 0 checks the output and the parts, and repairs rows half-written by a killed run, before anyone reads.
    writer, error = None, None
    if info.is_main:
        announce(scorer)
        try:
            provenance = Provenance.from_scorer(scorer, args)  # rank 0 only: the weights are hashed once
            writer = open_writer(args.out, columns, args.resume, args.overwrite, provenance)
            _prepare_parts(out, args, provenance.with_columns(part_columns))
        except UsageError as exc:
            error = str(exc)
    _collective_check(error, info)
    # 3. Everyone: what is done already (in --out, in any part).
    error = None
    try:
        done_out = writer.done if writer is not None else (
            open_writer(args.out, columns, resume=True, overwrite=False).done if args.resume else set())
        done_parts = _names_in_parts(out)
    except UsageError as exc:
        error = str(exc)
    _collective_check(error, info)
    # 4. Score this process's share into its part.
    part = RowWriter(str(_part_path(out, info.rank, info.world_size)), part_columns, resume=True, overwrite=False)
    part.open()
    skipped = SkippedFiles()
    try:
        mine = _score_part(args, scorer, part, info, done=(done_out, done_parts), skipped=skipped)
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
    tally = _merge_parts(out, writer, ErrorWriter(args.errors))
    tally.skipped += sum(t.skipped for t in everyone)
    tally.new, tally.seconds = sum(t.new for t in everyone), max(t.seconds for t in everyone)
    # Every process walks all inputs (keeping its share): rank 0 has seen every file skipped for its suffix.
    report(tally, args.out, info.world_size, verbose=args.verbose, skipped=skipped, errors=args.errors)
    return 1 if tally.failed else 0


def _part_columns(columns: list[str]) -> list[str]:
    """The fields of a part record: index, the output's columns (``mos`` always), error."""
    extra = [c for c in columns if c not in ("name", "score", "mos")]
    return ["index", "name", "score", "mos", *extra, "error"]


def _prepare_parts(out: Path, args: argparse.Namespace, provenance: Provenance) -> None:
    """Parts of an earlier run: continued with --resume (their record and fields must be this run's; a half-written
    last record is dropped), deleted with --overwrite, else an error. Then this run's record of the parts is written."""
    parts = part_files(out)
    record = _parts_record(out)
    part_columns = provenance.columns
    if not parts:
        pass
    elif args.resume:
        check_resume(record, provenance, what=f"the part files of {out.name} ({parts[0].name} ...)")
        for path in parts:
            truncate_partial_line(path)
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
    write_sidecar(record, provenance)


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
    return {record["name"] for path in part_files(out) for record in _read_part(path)}


def _score_part(args: argparse.Namespace, scorer: Scorer, part: RowWriter, info: DistInfo,
                done: tuple[set[str], set[str]], skipped: SkippedFiles) -> Tally:
    """Score inputs ``i % world == rank`` that no earlier run scored: how many, how long, how many were skipped as
    already in --out."""
    rank, world = info.rank, info.world_size
    tally = Tally()
    indices: deque[int] = deque()  # the index of each path handed to the scorer, whose results come in that order

    def todo() -> Iterator[str]:
        for i, path in enumerate(iter_inputs(args, skipped)):
            if i % world != rank:
                continue
            if path in done[0] or path in done[1]:  # in --out (counted as skipped), or in a part (merged below)
                tally.skipped += path in done[0]
                bar.update(1)
                continue
            indices.append(i)
            yield path

    show = info.is_main and not args.no_progress
    total = sum(1 for i, _ in enumerate(iter_inputs(args)) if i % world == rank) if show else None
    bar = progress(total, disable=not show, desc=f"scoring (rank 0 of {world})" if world > 1 else "scoring")
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


def _merge_parts(out: Path, writer: RowWriter, errors: ErrorWriter) -> Tally:
    """Append the parts' rows to ``writer`` in input order (by index), once per name; name the failures (on stderr
    and in ``errors``); delete the parts and their record. Memory: one record per part, and the names written (as
    ``--resume`` holds them)."""
    parts = part_files(out)
    tally = Tally()
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
    errors.open()
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
                errors.write(name, error_reason(name, record["error"]))
                continue
            score = record["score"]
            extra = {c: record[c] for c in writer.columns if c not in ("name", "score", "mos")}
            writer.write({"name": name, "score": math.nan if score is None else float(score), "mos": record["mos"],
                          **extra})
            tally.scored += 1
    except BaseException:
        writer.close(complete=False)  # the parts stay: --resume merges them again, skipping the rows written
        raise
    finally:
        errors.close()
    writer.close(complete=True)
    if unordered:
        logger.warning("the inputs changed between the interrupted run and --resume: some rows of %s are not in input "
                       "order", out)
    for path in parts:
        path.unlink(missing_ok=True)
    sidecar_path(_parts_record(out)).unlink(missing_ok=True)
    return tally
