"""Output files of ``gamma score`` that a killed run can continue: CSV (stdout or file), JSON Lines, JSON.

:class:`RowWriter` streams one row per image and flushes it; with ``--resume`` it first reads the names already
written (dropping a half-written last row), so the run skips them. ``.json`` is built in a JSON Lines side file and
written atomically at the end.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from .._files import atomic_write
from ..data.meta import is_number
from .common import UsageError

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


def truncate_partial_line(path: Path) -> None:
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
    truncate_partial_line(path)
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
    truncate_partial_line(path)
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
                self._csv.writerow([_format(row[c]) for c in self.columns])
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


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


# ------------------------------------------------------------------------------------------------ choosing the writer
def check_output(out: str | None, resume: bool, overwrite: bool) -> str:
    """The output format of ``out`` (``stdout`` for None, ``parquet`` for ``.parquet``), checked as
    :meth:`RowWriter.check_target` does; reads nothing, so it runs before the model is built."""
    if out is not None and Path(out).suffix.lower() == ".parquet":
        from ..parquet_out import ParquetRowWriter  # pyarrow is imported only when rows are written or read

        try:
            return ParquetRowWriter.check_target(out, resume, overwrite)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if out is not None and Path(out).suffix.lower() not in OUTPUT_FORMATS:
        raise UsageError(f"--out must end in one of {', '.join([*OUTPUT_FORMATS, '.parquet'])}, got {out}")
    return RowWriter.check_target(out, resume, overwrite)


def open_writer(out: str | None, columns: list[str], resume: bool, overwrite: bool,
                metadata: dict[str, Any] | None = None) -> Any:
    """The writer of ``--out``: :class:`gamma.parquet_out.ParquetRowWriter` for ``.parquet`` (the ``parquet`` extra;
    ``metadata`` goes into its schema metadata, and what a resumed file holds is its ``existing_metadata``), else a
    :class:`RowWriter`. Both take the same calls (``done``, ``open``, ``write``, ``close``)."""
    if check_output(out, resume, overwrite) != "parquet":
        return RowWriter(out, columns, resume=resume, overwrite=overwrite)
    try:
        from ..parquet_out import ParquetRowWriter

        return ParquetRowWriter(out, columns, resume=resume, overwrite=overwrite, metadata=metadata)
    except ImportError:
        raise UsageError("--out *.parquet needs pyarrow: pip install 'gamma-iqa[parquet]'") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
