"""WebDataset tar shards as input: shard specs, streaming samples out of a tar, per-shard result files.

    expand_shard_specs(["shards/{00000..00099}.tar"])       # brace ranges (zero padding kept), {a,b} lists, globs
    for sample in ShardReader("shards/00000.tar"):           # streamed: no member is unpacked to disk
        sample.name, sample.image                            # "00000/000000012", the encoded image bytes (or None)

The layout is img2dataset's (and WebDataset's): the members of one sample are consecutive and share a key, the member
name up to the first dot of its base name (``000000012.jpg``, ``000000012.json``, ``000000012.txt``). A sample's row
is named ``<shard>/<key>``, ``<shard>`` the tar's file name without ``.tar`` (img2dataset's ``00000``), so a row joins
the shard's own ``00000.parquet`` by key. A sample without an image member, or whose image cannot be decoded, is
a failed row like an unreadable file (named, counted; the shard goes on); a truncated or corrupt tar ends its shard
with a :class:`ShardError` that says how many members were read (the samples before it are scored).

Finished shards: :func:`score_shard` writes a shard's rows to a file that appears (atomic rename) only when the
whole shard is done, so "finished" is "its file exists"; a shard interrupted half-way leaves only a temporary that
the next run deletes and redoes. Under torchrun whole shards go to ranks (:func:`shards_for_rank`).
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._files import atomic_write
from .io import IMAGE_EXTENSIONS, ImageDecodeError

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = frozenset("*?[")


class ShardError(Exception):
    """A shard cannot be read to its end (truncated, not a tar): ``str(err)`` names it and the members read."""


def is_shard_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names tar shards (a ``.tar`` / ``.tar.gz`` / ``.tgz`` path, range or glob)."""
    return os.fspath(spec).lower().endswith(SHARD_SUFFIXES)


def expand_braces(spec: str) -> list[str]:
    """``a{00..02}b`` -> a00b, a01b, a02b (the width of the first bound kept); ``{x,y}`` -> x, y; nested in order."""
    match = _BRACE.search(spec)
    if match is None:
        return [spec]
    body = match.group(1)
    ranged = _RANGE.match(body)
    if ranged:
        lo_text, hi_text = ranged.groups()
        lo, hi = int(lo_text), int(hi_text)
        width = len(lo_text) if lo_text.lstrip("-").startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # a literal brace pair (no range, no list)
        return [spec[: match.end()] + rest for rest in expand_braces(spec[match.end():])]
    head, tail = spec[: match.start()], spec[match.end():]
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def expand_shard_specs(specs: Iterable[str | os.PathLike]) -> list[str]:
    """The shard paths of ``specs`` in order: braces expanded, then globs matched (sorted); each path once.

    Raises:
        FileNotFoundError: a path that does not exist, or a glob that matches nothing.
    """
    out: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        for path in expand_braces(os.fspath(spec)):
            if _GLOB_CHARS & set(path):
                found = sorted(glob.glob(path, recursive=True))
                if not found:
                    raise FileNotFoundError(f"{path}: no shard matches")
            elif not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such shard")
            else:
                found = [path]
            for item in found:
                if item not in seen:
                    seen.add(item)
                    out.append(item)
    return out


def read_shard_list(path: str | os.PathLike) -> list[str]:
    """A ``--list`` of shards: one path (or spec) a line, relative to the list's folder; ``#`` comments skipped."""
    base = Path(path).parent
    specs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            specs.append(line if os.path.isabs(line) else str(base / line))
    return expand_shard_specs(specs)


def shard_name(path: str | os.PathLike) -> str:
    """``shards/00000.tar`` -> ``00000``: the prefix of its rows and the stem of its per-shard result file."""
    name = Path(path).name
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def shards_for_rank(shards: Sequence[str], rank: int, world: int) -> list[str]:
    """The shards process ``rank`` of ``world`` scores: every ``world``-th, whole (shard i -> rank i % world)."""
    return [s for i, s in enumerate(shards) if i % world == rank]


@dataclass
class ShardSample:
    """One sample of a shard: its key, its row name, the encoded image (None when the key has no image member)."""

    name: str
    key: str
    image: bytes | None
    image_member: str | None = None
    others: list[str] = field(default_factory=list)  # the other members' names (.json, .txt ...)


def _split_key(member: str) -> tuple[str, str]:
    """``dir/000012.jpg`` -> (``dir/000012``, ``jpg``); the key ends at the first dot of the base name."""
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


class ShardReader:
    """The samples of one tar shard, streamed (``tarfile`` in stream mode: one pass, nothing unpacked).

    Iterating yields :class:`ShardSample` in tar order; afterwards :attr:`members` counts the members read and
    :attr:`error` holds the :class:`ShardError` that ended a truncated or corrupt tar (None when read to its end).
    With ``strict=True`` that error is raised after the samples read before it.
    """

    def __init__(self, path: str | os.PathLike, *, strict: bool = False) -> None:
        self.path = os.fspath(path)
        self.shard = shard_name(path)
        self.strict = strict
        self.members = 0
        self.error: ShardError | None = None

    def __iter__(self) -> Iterator[ShardSample]:
        self.members, self.error = 0, None
        key: str | None = None
        image: tuple[str, bytes] | None = None
        others: list[str] = []
        try:
            with tarfile.open(self.path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    self.members += 1
                    member_key, ext = _split_key(member.name)
                    if member_key != key:
                        if key is not None:
                            yield self._sample(key, image, others)
                        key, image, others = member_key, None, []
                    fh = tar.extractfile(member)
                    if image is None and f".{ext.rpartition('.')[2]}" in IMAGE_EXTENSIONS and fh is not None:
                        image = (member.name, fh.read())
                    else:
                        others.append(member.name)
                end = tar.offset  # where the members end: a complete .tar has its two zero blocks after it
            if self.path.lower().endswith(".tar") and os.path.getsize(self.path) < end + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("cut at a member boundary: no end-of-archive marker")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            why = str(exc) or type(exc).__name__
            self.error = ShardError(f"{self.path}: unreadable after {self.members} member(s) ({why})")
            logger.warning("%s", self.error)
        if key is not None and self.error is None:
            yield self._sample(key, image, others)
        elif key is not None:  # the last sample may be cut: yield it only with its image complete
            if image is not None:
                yield self._sample(key, image, others)
        if self.error is not None and self.strict:
            raise self.error

    def _sample(self, key: str, image: tuple[str, bytes] | None, others: list[str]) -> ShardSample:
        return ShardSample(f"{self.shard}/{key}", key, image[1] if image else None, image[0] if image else None,
                           list(others))


def sample_source(sample: ShardSample) -> bytes | ImageDecodeError:
    """What :meth:`gamma.Scorer.iter_named_scores` decodes for a sample: its image bytes, or the error of a key
    without an image member."""
    if sample.image is None:
        found = ", ".join(sample.others) or "no members"
        return ImageDecodeError(sample.name, f"no image member for this key (found {found})")
    return sample.image


# ------------------------------------------------------------------------------------------------ per-shard files
def stage_path(folder: str | os.PathLike, shard: str | os.PathLike, suffix: str = ".jsonl") -> Path:
    """Where the finished rows of ``shard`` live in ``folder``: ``<folder>/<shard name><suffix>``."""
    return Path(folder) / f"{shard_name(shard)}{suffix}"


def clear_partials(folder: str | os.PathLike) -> int:
    """Delete temporaries of shards a killed run left half-done (they are redone); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = list(folder.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


@dataclass
class ShardTally:
    """What scoring one shard did."""

    shard: str
    rows: int = 0
    failed: int = 0
    members: int = 0
    error: str | None = None  # the tar's own error (truncated ...), if any
    failures: list[str] = field(default_factory=list)


def score_shard(results: Iterable[Any], dest: str | os.PathLike, write_rows: Callable[[str, list[dict]], None],
                tally: ShardTally) -> Path:
    """Collect a shard's results and write them to ``dest`` atomically (``write_rows(tmp_path, rows)``).

    ``results`` are :class:`gamma.scorer.ScoreResult` s; a failed one becomes a row with ``score`` None and its
    ``error``, so the merge can report it. The file appears only when the shard is complete.
    """
    rows = []
    for r in results:
        row = {"name": r.name, "score": r.score if r.ok else None, "mos": r.mos, **r.values, "error": r.error}
        rows.append(row)
        if r.ok:
            tally.rows += 1
        else:
            tally.failed += 1
            tally.failures.append(r.error or r.name)
    atomic_write(Path(dest), lambda tmp: write_rows(tmp, rows))
    return Path(dest)


def write_jsonl_rows(path: str, rows: list[dict]) -> None:
    """One JSON object a line (the staging format of per-shard rows before a merge)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def read_jsonl_rows(path: str | os.PathLike) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


__all__ = ["SHARD_SUFFIXES", "ShardError", "ShardReader", "ShardSample", "ShardTally", "clear_partials",
           "expand_braces", "expand_shard_specs", "is_shard_spec", "read_shard_list", "sample_source",
           "score_shard", "shard_name", "shards_for_rank", "stage_path"]
