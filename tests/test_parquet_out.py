"""The Parquet writer (gamma.parquet_out): typed columns, row groups written as scoring proceeds, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pq = pytest.importorskip("pyarrow.parquet")

from gamma.parquet_out import ParquetRowWriter, read_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["name", "score", "std", "p_good", "scene", "sharpness"]


def _row(i: int) -> dict:
    return {"name": f"00000/{i:04d}", "score": i / 10, "std": 0.1, "p_good": math.nan if i == 3 else 0.5,
            "scene": "natural", "sharpness": 0.25}


def test_typed_columns_metadata_and_row_groups(tmp_path):
    out = tmp_path / "s.parquet"
    writer = ParquetRowWriter(out, COLUMNS, resume=False, overwrite=False, metadata={"model": "gamma"},
                              row_group_size=4)
    writer.open()
    for i in range(10):
        writer.write(_row(i))
    assert len(list(writer.parts_dir.glob("*.parquet"))) == 2  # two full groups are on disk before the end
    writer.close(complete=True)
    table = pq.read_table(out)
    assert table.schema.names == COLUMNS and not writer.parts_dir.exists()
    assert [str(table.schema.field(c).type) for c in COLUMNS] == ["string", "double", "double", "double", "string",
                                                                  "double"]
    assert table.column("name").to_pylist() == [f"00000/{i:04d}" for i in range(10)]
    assert math.isnan(table.column("p_good").to_pylist()[3])
    assert pq.ParquetFile(out).num_row_groups == 3
    df = read_scores(out)
    assert df.attrs["model"] == "gamma" and df.attrs["columns"] == COLUMNS
    with pytest.raises(ValueError, match="--resume"):
        ParquetRowWriter(out, COLUMNS, resume=False, overwrite=False)
    resumed = ParquetRowWriter(out, COLUMNS, resume=True, overwrite=False, metadata={"model": "other"})
    assert resumed.existing_metadata == {"model": "gamma"}  # what the file holds, for a check before appending
    assert ParquetRowWriter(tmp_path / "new.parquet", COLUMNS, resume=True, overwrite=False).existing_metadata is None
    with pytest.raises(ValueError, match="columns"):
        ParquetRowWriter(out, COLUMNS[:3], resume=True, overwrite=False)


def test_killed_writer_loses_at_most_the_open_row_group_and_resume_completes(tmp_path):
    """Killed (os._exit) after 11 rows in groups of 4: 8 readable rows are left; resume adds the rest, once."""
    out = tmp_path / "s.parquet"
    code = (f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom gamma.parquet_out import ParquetRowWriter\n"
            f"w = ParquetRowWriter({str(out)!r}, {COLUMNS!r}, resume=False, overwrite=False, row_group_size=4)\n"
            "w.open()\n"
            "for i in range(11):\n"
            "    w.write({'name': f'00000/{i:04d}', 'score': i / 10, 'std': 0.1, 'p_good': 0.5, 'scene': 'natural', "
            "'sharpness': 0.2})\n"
            "os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 9, r.stderr
    assert not out.exists()
    resumed = ParquetRowWriter(out, COLUMNS, resume=True, overwrite=False, row_group_size=4)
    assert resumed.done == {f"00000/{i:04d}" for i in range(8)}  # two complete groups survived
    resumed.open()
    for i in range(12):
        if _row(i)["name"] not in resumed.done:
            resumed.write(_row(i))
    resumed.close(complete=True)
    names = pq.read_table(out).column("name").to_pylist()
    assert sorted(names) == [f"00000/{i:04d}" for i in range(12)] and len(set(names)) == 12
    again = ParquetRowWriter(out, COLUMNS, resume=True, overwrite=False)
    assert len(again.done) == 12
    meta = json.loads(pq.read_schema(out).metadata[b"gamma"])
    assert meta["columns"] == COLUMNS


def test_cli_parquet_out_and_resume(tmp_path, capsys):
    """`gamma score FILES --out s.parquet` (one process): the rows of the CSV output, typed; --resume adds the new
    files only; an unknown suffix names the Parquet one among the choices."""
    import numpy as np
    from helpers import assert_close, read_rows
    from PIL import Image

    from gamma.cli import main
    from gamma.data.photos import distorted_photos

    images, _ = distorted_photos(4, size=(64, 72), seed=3)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(tmp_path / f"p{i}.png")
    common = ["--model", "gamma_test", "--crops", "center", "--no-progress", "--workers", "0"]
    files = sorted(str(p) for p in tmp_path.glob("p*.png"))
    assert main(["score", *files[:3], *common, "--out", str(tmp_path / "s.parquet")]) == 0
    assert main(["score", *files, *common, "--out", str(tmp_path / "s.parquet"), "--resume"]) == 0
    assert "skipped 3" in capsys.readouterr().err
    assert main(["score", *files, *common, "--out", str(tmp_path / "s.csv")]) == 0
    table = pq.read_table(tmp_path / "s.parquet")
    expected = read_rows(tmp_path / "s.csv")
    assert table.column("name").to_pylist() == [row[0] for row in expected[1:]]
    # other batches than the CSV run's (3 + 1 images): the same scores up to float rounding and the CSV's 6 decimals
    assert_close(table.column("score").to_pylist(), [float(row[1]) for row in expected[1:]], rtol=0, atol=2e-6)
    assert main(["score", *files, *common, "--out", str(tmp_path / "s.txt")]) == 2
    assert ".parquet" in capsys.readouterr().err


def test_cli_parquet_resume_checks_the_recorded_provenance(tmp_path, capsys):
    """A Parquet output records how it was scored in its schema metadata; `--resume` with another crop protocol is
    refused, naming the difference, and leaves the file as it was."""
    import hashlib

    import numpy as np
    from PIL import Image

    from gamma.cli import main
    from gamma.data.photos import distorted_photos

    images, _ = distorted_photos(3, size=(64, 72), seed=5)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(tmp_path / f"q{i}.png")
    files = sorted(str(p) for p in tmp_path.glob("q*.png"))
    out = tmp_path / "s.parquet"
    common = ["--model", "gamma_test", "--no-progress", "--workers", "0", "--out", str(out)]
    assert main(["score", *files[:2], *common, "--crops", "center"]) == 0
    record = json.loads(pq.read_schema(out).metadata[b"gamma"])["provenance"]
    assert record["crops"]["mode"] == "center" and record["model"]["variant"] == "gamma_test"
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(["score", *files, *common, "--crops", "five", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "crop" in err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert main(["score", *files, *common, "--crops", "center", "--resume"]) == 0  # the same protocol continues
    assert pq.read_table(out).num_rows == 3
