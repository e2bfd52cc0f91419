"""Output files of ``gamma score`` that a killed run can continue: CSV (stdout or file), JSON Lines, JSON.

:class:`RowWriter` streams one row per image and flushes it; with ``--resume`` it first reads the names already
written (dropping a half-written last row), so the run skips them. ``.json`` is built in a JSON Lines side file and
written atomically at the end. Given a :class:`~gamma.cli.provenance.Provenance`, it writes the output's record
beside it (``<out>.meta.json``) and refuses to continue an output whose record or columns differ.
:class:`ErrorWriter` lists the files that could not be scored (``--errors``).
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
from .provenance import Provenance, check_recorded, check_resume, sidecar_path, write_sidecar

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


def _read_jsonl_names(path: Path, columns: list[str], shown: Path) -> set[str]:
    """The names in a JSON Lines stream; a usage error when a row's fields are not ``columns`` (in order)."""
    truncate_partial_line(path)
    done: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s:%d: ignoring an unreadable row", path, line_no)
                continue
            if list(row) != columns:
                raise UsageError(f"cannot resume {shown}: its rows hold the columns {list(row)}, this run writes "
                                 f"{columns}; score into another --out or pass --overwrite")
            done.add(name)
    return done


class RowWriter:
    """Streams result rows to stdout (CSV), a CSV file, a JSON Lines file, or a JSON file.

    CSV and JSON Lines rows are appended and flushed one by one, so a killed run loses at most the row being written
    (which ``--resume`` drops). A ``.json`` output is built in a JSON Lines side file (``.<name>.partial.jsonl``) and
    written atomically at the end; until then the ``.json`` file is either absent or the previous complete one.
    """

    def __init__(self, out: str | None, columns: list[str], resume: bool, overwrite: bool,
                 provenance: Provenance | None = None) -> None:
        self.columns = columns
        self.provenance = provenance.with_columns(columns) if provenance is not None else None
        self.done: set[str] = set()
        self.path = Path(out) if out else None
        self.format = self.check_target(out, resume, overwrite)
        self._fh: TextIO | None = None
        self._replace = overwrite and not resume
        if self.path is None:
            return
        stream_path = self.partial_path if self.format == "json" else self.path
        if self._replace or not (self.path.exists() or stream_path.exists()):
            return
        if self.provenance is not None:  # before anything is read or repaired: a refusal leaves the file as it was
            check_resume(self.path, self.provenance)
        if self.format == "json" and resume and self.path.exists() and not stream_path.exists():
            self._seed_partial_from_json()
        if stream_path.exists():
            if self.format == "csv":
                self.done = _read_csv_names(stream_path, columns)
            else:
                self.done = _read_jsonl_names(stream_path, columns, self.path)

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
        if self.provenance is not None:
            write_sidecar(self.path, self.provenance)
        elif self._replace:  # a record of the replaced rows would describe rows that are gone
            sidecar_path(self.path).unlink(missing_ok=True)
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


class ErrorWriter:
    """``--errors FILE``: a CSV ``name,error`` of the files this run could not score, one row each, flushed as they
    come (replaced at every run: a resumed run tries the failed files again, so its list is the complete one)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.count = 0
        self._fh: TextIO | None = None

    def open(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._csv = csv.writer(self._fh, lineterminator="\n")
        self._csv.writerow(["name", "error"])
        self._fh.flush()

    def write(self, name: str, error: str) -> None:
        self.count += 1
        if self._fh is None:
            return
        self._csv.writerow([name, error])
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def error_reason(name: str, error: str | None) -> str:
    """The reason of a failed input, without the name the scorer's message starts with."""
    text = error or "unknown error"
    return text[len(name) + 2:] if text.startswith(f"{name}: ") else text


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
                provenance: Provenance | None = None) -> Any:
    """The writer of ``--out``: :class:`gamma.parquet_out.ParquetRowWriter` for ``.parquet`` (the ``parquet`` extra;
    ``provenance`` goes into its schema metadata and a resumed file's record is checked against it), else a
    :class:`RowWriter` (``provenance`` in the ``.meta.json`` sidecar). Both take the same calls (``done``, ``open``,
    ``write``, ``close``).

    Raises:
        UsageError: ``--resume`` of an output scored differently (each difference named), or without a record.
    """
    if check_output(out, resume, overwrite) != "parquet":
        return RowWriter(out, columns, resume=resume, overwrite=overwrite, provenance=provenance)
    record = provenance.with_columns(columns) if provenance is not None else None
    try:
        from ..parquet_out import ParquetRowWriter

        writer = ParquetRowWriter(out, columns, resume=resume, overwrite=overwrite,
                                  metadata={"provenance": record.to_dict()} if record is not None else None)
    except ImportError:
        raise UsageError("--out *.parquet needs pyarrow: pip install 'gamma-iqa[parquet]'") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if record is not None and resume and (writer.done or writer.existing_metadata is not None):
        check_recorded((writer.existing_metadata or {}).get("provenance"), record, str(out),
                       "its Parquet schema metadata has none")
    return writer
