"""Parquet output for ``gamma score --out scores.parquet``: typed columns, written in row groups as scoring proceeds.

The writer has the interface of the command's CSV/JSON writer (``RowWriter``: built with the columns and the
--resume / --overwrite flags, ``done`` holds the names already written, ``open``, ``write(row)``, ``close(complete)``).

Crash safety: a Parquet file is readable only once its footer is written, at the end. So the rows go, one row group at
a time, into complete small Parquet files beside the output (``.scores.parquet.parts/00000.parquet`` ..., each
written atomically when its group is full), and ``close`` streams the output's earlier row groups and every part into
the final ``scores.parquet`` (atomically), then deletes the parts. A killed run loses at most the open row group (the
rows in memory); ``--resume`` reads the names of the output and of the parts, and its ``close`` merges them all.

Columns: ``name`` and ``scene`` are strings, every other column float64 (``score``, ``mos``, ``adapted``, ``std``,
``p_*``, attribute scores). The schema metadata key ``gamma`` holds a JSON object with the gamma version, the columns
and what the scorer records about the run (model, attribute towers, adaptation ...). Requires the ``parquet`` extra.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ._files import atomic_write

logger = logging.getLogger(__name__)

#: Columns held as strings; every other column is float64.
STRING_COLUMNS = frozenset({"name", "scene", "error"})
#: Rows per row group by default.
ROW_GROUP_SIZE = 4096


def parquet_schema(columns: list[str], metadata: dict[str, Any] | None = None) -> Any:
    """The pyarrow schema of ``columns`` (strings for name/scene, float64 otherwise) with gamma's metadata."""
    import pyarrow as pa

    from . import __version__

    fields = [pa.field(c, pa.string() if c in STRING_COLUMNS else pa.float64()) for c in columns]
    record = {"gamma_version": __version__, "columns": columns, **(metadata or {})}
    return pa.schema(fields, metadata={"gamma": json.dumps(record, default=str)})


def stored_metadata(schema: Any) -> dict[str, Any] | None:
    """The ``metadata`` a gamma Parquet schema records (key ``gamma``, less the version and columns); None if none."""
    raw = (schema.metadata or {}).get(b"gamma")
    if raw is None:
        return None
    record = json.loads(raw)
    return {k: v for k, v in record.items() if k not in ("gamma_version", "columns")}


def rows_to_table(rows: list[dict[str, Any]], schema: Any) -> Any:
    """A pyarrow Table of ``rows`` (dicts by column name; None/NaN floats kept as null/NaN) with ``schema``."""
    import pyarrow as pa

    arrays = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if f.name not in STRING_COLUMNS:
            values = [None if v is None else float(v) for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table(path: str | os.PathLike, rows: list[dict[str, Any]], columns: list[str],
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``rows`` as one Parquet file, atomically (the per-shard files of ``--out-dir``)."""
    import pyarrow.parquet as pq

    table = rows_to_table(rows, parquet_schema(columns, metadata))
    return atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))


class ParquetRowWriter:
    """Streams result rows into a Parquet file in row groups (see the module docstring).

    Args:
        out: the ``.parquet`` file.
        columns: the columns, in order (``name`` first).
        resume: continue an existing output: its names (and those of parts a killed run left) are in :attr:`done`.
        overwrite: replace an existing output (and drop such parts).
        metadata: recorded in the schema metadata (key ``gamma``).
        row_group_size: rows per row group.
    """

    format = "parquet"

    def __init__(self, out: str | os.PathLike, columns: list[str], resume: bool, overwrite: bool,
                 metadata: dict[str, Any] | None = None, row_group_size: int = ROW_GROUP_SIZE) -> None:
        self.path = Path(out)
        self.columns = list(columns)
        self.check_target(out, resume, overwrite)
        self.schema = parquet_schema(self.columns, metadata)
        self.row_group_size = max(1, int(row_group_size))
        self._replace = overwrite and not resume
        self._rows: list[dict[str, Any]] = []
        self._next_part = 0
        self._open = False
        self.done: set[str] = set()
        #: The ``metadata`` recorded in the output (or the first part) this run continues: None without one.
        self.existing_metadata: dict[str, Any] | None = None
        if not self._replace:
            self.done = self._names_written()

    @staticmethod
    def check_target(out: str | os.PathLike, resume: bool, overwrite: bool) -> str:
        """``parquet``; a ValueError for an output (or a killed run's parts) that exists without resume / overwrite."""
        path = Path(out)
        if path.suffix.lower() != ".parquet":
            raise ValueError(f"a Parquet output must end in .parquet, got {path}")
        parts = path.with_name(f".{path.name}.parts")
        if not (resume or overwrite) and (path.exists() or parts.exists()):
            raise ValueError(f"{path} exists: pass --resume to continue it, or --overwrite to replace it")
        return "parquet"

    @property
    def parts_dir(self) -> Path:
        return self.path.with_name(f".{self.path.name}.parts")

    def _part_files(self) -> list[Path]:
        return sorted(self.parts_dir.glob("*.parquet")) if self.parts_dir.is_dir() else []

    def _names_written(self) -> set[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        names: set[str] = set()
        for source in ([self.path] if self.path.exists() else []) + self._part_files():
            try:
                schema = pq.read_schema(source)
                if schema.names != self.columns:
                    raise ValueError(f"cannot resume {source}: its columns {schema.names} differ from this run's "
                                     f"{self.columns}")
                names.update(pq.read_table(source, columns=["name"]).column("name").to_pylist())
                if self.existing_metadata is None:
                    self.existing_metadata = stored_metadata(schema)
            except (OSError, pa.ArrowInvalid) as exc:
                if source == self.path:
                    raise ValueError(f"cannot resume {source}: not a readable Parquet file ({exc})") from None
                logger.warning("%s: ignoring an unreadable part (%s)", source, exc)
                source.unlink(missing_ok=True)
        return names

    def open(self) -> None:
        """Start writing (after the checks of ``__init__``: a setup error leaves the output untouched)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._replace:
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.parts_dir.mkdir(exist_ok=True)
        for stale in self.parts_dir.glob(".*.tmp"):  # a part being written when the run was killed
            stale.unlink(missing_ok=True)
        existing = self._part_files()
        self._next_part = int(existing[-1].stem) + 1 if existing else 0
        self._open = True

    def write(self, row: dict[str, Any]) -> None:
        """Add a row; a full row group is written out at once."""
        self._rows.append({c: row.get(c) for c in self.columns})
        if len(self._rows) >= self.row_group_size:
            self.flush()

    def flush(self) -> None:
        """Write the open row group (as a complete part file)."""
        if not self._rows:
            return
        import pyarrow.parquet as pq

        table = rows_to_table(self._rows, self.schema)
        atomic_write(self.parts_dir / f"{self._next_part:06d}.parquet", lambda tmp: pq.write_table(table, tmp))
        self._next_part += 1
        self._rows = []

    def close(self, complete: bool) -> None:
        """Write the open row group; with ``complete``, merge the output and the parts into the final file."""
        if not self._open:
            return
        self.flush()
        self._open = False
        if complete:
            self.merge()

    def merge(self) -> Path:
        """``out`` := its earlier row groups + every part, streamed row group by row group (atomic); parts deleted."""
        import pyarrow.parquet as pq

        parts = self._part_files()
        if not parts and self.path.exists():
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return self.path
        sources = ([self.path] if self.path.exists() else []) + parts

        def write(tmp: str) -> None:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                for source in sources:
                    reader = pq.ParquetFile(source)
                    for k in range(reader.num_row_groups):
                        writer.write_table(reader.read_row_group(k).cast(self.schema))

        atomic_write(self.path, write)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return self.path


def read_scores(path: str | os.PathLike) -> Any:
    """A written Parquet output as a pandas DataFrame, with its gamma metadata in ``DataFrame.attrs``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    df = table.to_pandas()
    raw = (table.schema.metadata or {}).get(b"gamma")
    if raw:
        df.attrs.update(json.loads(raw))
    return df


__all__ = ["ROW_GROUP_SIZE", "STRING_COLUMNS", "ParquetRowWriter", "parquet_schema", "read_scores", "rows_to_table",
           "stored_metadata", "write_table"]
