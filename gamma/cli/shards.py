"""``gamma score`` over WebDataset tar shards: whole shards per process, per-shard result files, resume by shard.

    gamma score 'shards/{00000..00099}.tar' --out scores.parquet            # one file, in shard order
    gamma score 'shards/*.tar' --out-dir scores/                             # scores/00000.parquet ... (img2dataset)
    torchrun --nproc_per_node=8 -m gamma score --list shards.txt --out scores.parquet

How a run is recorded (the design of resume):

- Every shard's rows are written to a per-shard file that appears, by atomic rename, only when the shard is done:
  ``DIR/<shard>.parquet`` with ``--out-dir DIR``, else ``<stem>.jsonl`` in a staging folder ``.<out>.shards/`` beside
  ``--out``. A shard is *finished* when its file exists (or, once merged into ``--out``, its marker
  ``<stem>.done``). A run killed mid-shard leaves only a temporary, which the next run deletes: that shard is redone.
- Process ``r`` of ``N`` (torchrun) scores shards ``i % N == r``; when every process is done, rank 0 merges the
  finished shards' rows, in shard order, into ``--out``, skipping names it already holds (so a shard redone after a
  crash during the merge adds no duplicate), and replaces each merged staging file by its ``.done`` marker.
- ``--resume`` skips finished shards; ``--overwrite`` deletes the output, the staging folder and the per-shard files.

Reading the shards is :mod:`gamma.shards`; the scorer, the writers and the report are the ``gamma score`` command's
(:mod:`gamma.cli.score_setup`, :mod:`gamma.cli.writers`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .._files import atomic_write
from ..shards import (
    ShardReader,
    ShardTally,
    clear_partials,
    expand_shard_specs,
    is_shard_spec,
    read_jsonl_rows,
    read_shard_list,
    sample_source,
    shard_name,
    shards_for_rank,
    write_jsonl_rows,
)
from .common import PeerError, UsageError
from .provenance import Provenance, check_resume, write_sidecar
from .score_setup import Tally, announce, make_scorer, report
from .sharded import world_size
from .writers import open_writer

logger = logging.getLogger(__name__)

STAGING_RECORD = "shards"  # <staging>/shards.meta.json: how the staged shards were scored


def wants_shards(args: argparse.Namespace) -> bool:
    """Whether ``gamma score``'s inputs are tar shards (PATHs ending in .tar, or a --list of them)."""
    if any(is_shard_spec(p) for p in args.paths or []):
        return True
    for listed in args.list or []:
        try:
            with open(listed, encoding="utf-8") as fh:
                first = next((line.strip() for line in fh if line.strip() and not line.startswith("#")), "")
        except OSError:
            return False
        if is_shard_spec(first):
            return True
    return False


def shard_inputs(args: argparse.Namespace) -> list[str]:
    """The shards of PATHs and --list files, in order; a usage error for a missing shard or images mixed in."""
    mixed = [p for p in args.paths or [] if not is_shard_spec(p)]
    if mixed:
        raise UsageError(f"tar shards and other inputs cannot be mixed in one run: {mixed[0]} is not a .tar shard")
    try:
        shards = expand_shard_specs(args.paths or [])
        for listed in args.list or []:
            shards += [s for s in read_shard_list(listed) if s not in shards]
    except (FileNotFoundError, UnicodeDecodeError) as exc:
        raise UsageError(str(exc)) from None
    names = [shard_name(s) for s in shards]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"two shards share the name {dup!r}: rows are named <shard>/<key>, so shard file names must "
                         "be distinct")
    return shards


def _staging(args: argparse.Namespace) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    out = Path(args.out)
    return out.with_name(f".{out.name}.shards")


def _finished(folder: Path, shard: str, suffix: str) -> bool:
    stem = shard_name(shard)
    return (folder / f"{stem}{suffix}").exists() or (folder / f"{stem}.done").exists()


def score_shards(args: argparse.Namespace) -> int:
    """``gamma score SHARDS ...``: see the module docstring. Returns the exit status."""
    if args.out is None and args.out_dir is None:
        raise UsageError("scoring tar shards needs --out FILE and/or --out-dir DIR (one Parquet file per shard)")
    shards = shard_inputs(args)
    if world_size() > 1:
        from ..train import distributed

        try:
            info = distributed.setup(device=args.device or "auto", timeout_s=7 * 24 * 3600)
        except ValueError as exc:
            raise UsageError.from_library(exc) from None
        try:
            return _run(args, shards, info)
        finally:
            distributed.cleanup(info)
    return _run(args, shards, None)


def _run(args: argparse.Namespace, shards: list[str], info: Any) -> int:
    from ..train.distributed import all_gather_objects

    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    is_main = rank == 0
    suffix = ".parquet" if args.out_dir else ".jsonl"
    staging = _staging(args)
    error, scorer = None, None
    try:
        if is_main:
            _check_outputs(args, staging, suffix)
        scorer = make_scorer(args, device=info.device if info is not None else None)
        provenance = Provenance.from_scorer(scorer, args).with_columns(scorer.columns())
        if is_main:
            _check_provenance(provenance, args, staging)
    except UsageError as exc:
        error = str(exc)
    if info is not None:
        errors = [e for e in all_gather_objects(error, info) if e is not None]
        if errors:
            raise UsageError(errors[0]) if is_main else PeerError(errors[0])
    elif error is not None:
        raise UsageError(error)
    columns = scorer.columns()
    if is_main:
        announce(scorer)
        staging.mkdir(parents=True, exist_ok=True)
        clear_partials(staging)
    if info is not None:
        all_gather_objects(None, info)  # the staging folder exists and is clean before anyone writes
    mine = [s for s in shards_for_rank(shards, rank, world) if not _finished(staging, s, suffix)]
    skipped = len(shards_for_rank(shards, rank, world)) - len(mine)
    tallies, start = [], time.perf_counter()
    try:
        for shard in mine:
            tallies.append(_score_one(scorer, shard, staging, suffix, columns, provenance))
    except KeyboardInterrupt:
        if is_main:
            print("gamma: interrupted; run again with --resume to continue (finished shards are kept)", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    mine_summary = (sum(t.rows for t in tallies), sum(t.failed for t in tallies), skipped, seconds,
                    sum(1 for t in tallies if t.error))
    everyone = all_gather_objects(mine_summary, info) if info is not None else [mine_summary]
    if not is_main:
        return 0
    tally = Tally()
    tally.failed = sum(e[1] for e in everyone)
    tally.new = sum(e[0] + e[1] for e in everyone)
    tally.seconds = max(e[3] for e in everyone)
    shards_skipped, truncated = sum(e[2] for e in everyone), sum(e[4] for e in everyone)
    if args.out is not None:
        writer = open_writer(args.out, columns, resume=True, overwrite=False, provenance=provenance)
        tally.scored, dup = _merge(shards, staging, suffix, writer, keep=bool(args.out_dir))
        tally.skipped += dup
    else:
        tally.scored = sum(e[0] for e in everyone)
    if shards_skipped:
        print(f"gamma: {shards_skipped} shard(s) already finished, skipped", file=sys.stderr)
    if truncated:
        print(f"gamma: {truncated} shard(s) could not be read to their end (named above)", file=sys.stderr)
    report(tally, args.out or args.out_dir, world, verbose=args.verbose)
    return 1 if tally.failed or truncated else 0


def _check_outputs(args: argparse.Namespace, staging: Path, suffix: str) -> None:
    """Existing results need --resume (continue) or --overwrite (start again)."""
    out = Path(args.out) if args.out else None
    existing = (out is not None and out.exists()) or (staging.is_dir() and any(staging.iterdir()))
    if not existing:
        return
    if args.overwrite and not args.resume:
        if out is not None:
            out.unlink(missing_ok=True)
        if args.out_dir:
            for path in list(staging.glob(f"*{suffix}")) + list(staging.glob("*.done")):
                path.unlink()
        else:
            shutil.rmtree(staging, ignore_errors=True)
        if out is not None:
            shutil.rmtree(out.with_name(f".{out.name}.parts"), ignore_errors=True)
    elif not args.resume:
        where = args.out if out is not None and out.exists() else staging
        raise UsageError(f"{where} holds results of an earlier run: pass --resume to continue it (finished shards "
                         "are skipped), or --overwrite to start again")


def _check_provenance(provenance: Provenance, args: argparse.Namespace, staging: Path) -> None:
    """``--resume`` over shards finished by a run scored differently (other weights, prompts, crops, precision ...) is
    refused, naming each difference, before anything is scored: no shard of another model is merged with this run's.
    The record of the staged shards is ``<staging>/shards.meta.json``."""
    finished = staging.is_dir() and any(p.suffix in (".parquet", ".jsonl", ".done") for p in staging.iterdir())
    if args.resume and finished:
        check_resume(staging / STAGING_RECORD, provenance, what=f"the shards finished in {staging}")
    staging.mkdir(parents=True, exist_ok=True)
    write_sidecar(staging / STAGING_RECORD, provenance)


def _score_one(scorer: Any, shard: str, staging: Path, suffix: str, columns: list[str],
               provenance: Provenance) -> ShardTally:
    """Score one shard into its per-shard file (written when the shard is done)."""
    from ..parquet_out import write_table

    reader = ShardReader(shard)
    tally = ShardTally(shard_name(shard))
    rows = []
    for result in scorer.iter_named_scores(((s.name, sample_source(s)) for s in reader), on_error="skip"):
        if result.ok:
            rows.append({"name": result.name, "score": result.score, "mos": result.mos, **result.values})
            tally.rows += 1
        else:
            tally.failed += 1
            print(f"gamma: cannot score {result.error}", file=sys.stderr)
    tally.members = reader.members
    if reader.error is not None:
        tally.error = str(reader.error)
        print(f"gamma: {reader.error}; the {tally.rows + tally.failed} sample(s) before it are kept", file=sys.stderr)
    dest = staging / f"{tally.shard}{suffix}"
    if suffix == ".parquet":
        write_table(dest, rows, columns, metadata={**scorer.metadata, "shard": os.fspath(shard),
                                                   "provenance": provenance.to_dict()})
    else:
        atomic_write(dest, lambda tmp: write_jsonl_rows(tmp, rows))
    logger.info("%s: %d row(s), %d failed, %d member(s)", shard, tally.rows, tally.failed, tally.members)
    return tally


def _merge(shards: list[str], staging: Path, suffix: str, writer: Any, keep: bool) -> tuple[int, int]:
    """Append the finished shards' rows to ``writer`` in shard order, each name once; mark merged shards done.
    Returns (rows written, rows skipped as already in the output)."""
    seen = writer.done
    written = dup = 0
    merged = []
    writer.open()
    try:
        for shard in shards:
            path = staging / f"{shard_name(shard)}{suffix}"
            if not path.exists():
                continue
            for row in _read_rows(path, suffix):
                if row["name"] in seen:
                    dup += 1
                    continue
                seen.add(row["name"])
                writer.write(row)
                written += 1
            merged.append(path)
    except BaseException:
        writer.close(complete=False)
        raise
    writer.close(complete=True)
    if not keep:  # the staging file gives way to its marker: the shard stays finished for --resume
        for path in merged:
            path.with_suffix(".done").touch()
            path.unlink()
    return written, dup


def _read_rows(path: Path, suffix: str) -> list[dict]:
    if suffix == ".jsonl":
        return list(read_jsonl_rows(path))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
