"""Tar shards in (gamma.shards, gamma.cli.shards) and Parquet out (gamma.parquet_out), through the real command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import read_rows
from PIL import Image

from gamma.data.photos import distorted_photos
from gamma.shards import (
    ShardError,
    ShardReader,
    expand_braces,
    expand_shard_specs,
    read_shard_list,
    shard_name,
    shards_for_rank,
)

pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size=(96, 80)) -> bytes:
    images, _ = distorted_photos(1, size=size, seed=seed)
    array = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, keys: list[str], *, bad: str | None = None, no_image: str | None = None) -> dict:
    """An img2dataset-style shard: key.jpg, key.json, key.txt; ``bad`` gets corrupt image bytes, ``no_image`` none.
    Returns key -> the image bytes (for the samples that have an image)."""
    images = {}
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            if key != no_image:
                data = b"not an image at all" if key == bad else _jpeg(i + 7 * len(keys))
                _add(tar, f"{key}.jpg", data)
                images[key] = data
            _add(tar, f"{key}.json", json.dumps({"key": key, "caption": f"picture {i}"}).encode())
            _add(tar, f"{key}.txt", f"picture {i}".encode())
    return images


def gamma_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`gamma score ARGS` run in this process (the command's own entry point, :func:`gamma.cli.main`, in ``cwd``):
    a fresh interpreter per call would cost seconds of imports; torchrun below runs the real processes."""
    from gamma.cli import main

    argv = ["score", *args, "--model", "gamma_test", "--no-progress", "--workers", "0", "--crops", "center"]
    err = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return subprocess.CompletedProcess(argv, status, "", err.getvalue())


# ------------------------------------------------------------------------------------------------ specs
def test_brace_ranges_keep_zero_padding_and_lists_expand():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain{}.tar") == ["plain{}.tar"]


def test_expand_specs_globs_lists_and_missing(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    found = expand_shard_specs([str(tmp_path / "{00000..00001}.tar"), str(tmp_path / "*.tar")])
    assert [Path(p).name for p in found] == ["00000.tar", "00001.tar", "00002.tar"]  # each once, in order
    with pytest.raises(FileNotFoundError, match="00003.tar: no such shard"):
        expand_shard_specs([str(tmp_path / "{00000..00007}.tar")])
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shard_specs([str(tmp_path / "x*.tar")])
    (tmp_path / "list.txt").write_text("# shards\n00002.tar\n00000.tar\n")
    assert [Path(p).name for p in read_shard_list(tmp_path / "list.txt")] == ["00002.tar", "00000.tar"]
    assert shard_name("a/b/00012.tar") == "00012" and shard_name("x.tar.gz") == "x"
    assert shards_for_rank(list("abcde"), 1, 2) == ["b", "d"]


# ------------------------------------------------------------------------------------------------ reading
def test_reader_groups_members_by_key(tmp_path):
    images = make_shard(tmp_path / "00003.tar", ["k0", "k1", "k2"], no_image="k1")
    reader = ShardReader(tmp_path / "00003.tar")
    samples = list(reader)
    assert [s.name for s in samples] == ["00003/k0", "00003/k1", "00003/k2"]
    assert samples[0].image == images["k0"] and samples[2].image == images["k2"]
    assert samples[1].image is None and samples[1].others == ["k1.json", "k1.txt"]
    assert reader.members == 8 and reader.error is None


def test_truncated_tar_reports_members_read(tmp_path):
    make_shard(tmp_path / "full.tar", [f"k{i}" for i in range(6)])
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])  # inside a member
    (tmp_path / "edge.tar").write_bytes(data[: (len(data) // 2) // 512 * 512])  # at a block boundary
    edge = ShardReader(tmp_path / "edge.tar")
    assert len(list(edge)) < 6 and edge.error is not None
    reader = ShardReader(tmp_path / "cut.tar")
    samples = list(reader)
    assert 1 <= len(samples) < 6 and all(s.image for s in samples)
    assert reader.error is not None and f"after {reader.members} member(s)" in str(reader.error)
    with pytest.raises(ShardError, match="cut.tar"):
        list(ShardReader(tmp_path / "cut.tar", strict=True))


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture
def shard_dir(tmp_path):
    make_shard(tmp_path / "00000.tar", ["a0", "a1", "a2"], bad="a1")
    make_shard(tmp_path / "00001.tar", ["b0", "b1"], no_image="b1")
    make_shard(tmp_path / "00002.tar", ["c0", "c1", "c2"])
    return tmp_path


def test_score_shards_to_parquet_and_out_dir(shard_dir):
    """Rows named shard/key, typed Parquet columns with metadata, a bad member and a key without image counted;
    --out-dir writes one Parquet file per shard."""
    r = gamma_cmd("{00000..00002}.tar", "--out", "s.parquet", "--out-dir", "per", "--distribution", cwd=shard_dir)
    assert r.returncode == 1, r.stderr  # two samples could not be scored
    assert "00000/a1" in r.stderr and "00001/b1: no image member" in r.stderr
    table = pq.read_table(shard_dir / "s.parquet")
    assert table.column("name").to_pylist() == ["00000/a0", "00000/a2", "00001/b0", "00002/c0", "00002/c1",
                                                "00002/c2"]
    assert str(table.schema.field("name").type) == "string" and str(table.schema.field("score").type) == "double"
    record = json.loads(table.schema.metadata[b"gamma"])["provenance"]
    assert "p_good" in table.schema.names and record["model"]["family"] == "gamma"
    assert sorted(p.name for p in (shard_dir / "per").iterdir()) == ["00000.parquet", "00001.parquet",
                                                                    "00002.parquet", "shards.meta.json"]
    per = pq.read_table(shard_dir / "per" / "00002.parquet").to_pylist()
    merged = {row["name"]: row for row in table.to_pylist()}
    assert all(merged[row["name"]] == row for row in per)  # the same rows, joinable by name


def test_resume_skips_finished_shards_and_redoes_half_done(shard_dir):
    """A shard finished is skipped; one killed half-way (only its temporary left) is redone; no duplicates."""
    first = gamma_cmd("00000.tar", "00001.tar", "--out", "s.csv", cwd=shard_dir)
    assert first.returncode == 1
    staging = shard_dir / ".s.csv.shards"
    assert sorted(p.name for p in staging.iterdir()) == ["00000.done", "00001.done", "shards.meta.json"]
    (staging / ".00002.jsonl.123.tmp").write_text('{"name": "00002/c0"')  # what a killed shard leaves
    again = gamma_cmd("{00000..00002}.tar", "--out", "s.csv", cwd=shard_dir)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = gamma_cmd("{00000..00002}.tar", "--out", "s.csv", "--resume", cwd=shard_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 shard(s) already finished" in resumed.stderr
    names = [row[0] for row in read_rows(shard_dir / "s.csv")[1:]]
    assert names == ["00000/a0", "00000/a2", "00001/b0", "00002/c0", "00002/c1", "00002/c2"]
    assert not list(staging.glob("*.tmp"))
    once = gamma_cmd("{00000..00002}.tar", "--out", "single.csv", cwd=shard_dir)
    rows_once = read_rows(shard_dir / "single.csv")
    assert read_rows(shard_dir / "s.csv") == rows_once and once.returncode == 1


def test_resume_over_shards_scored_differently_is_refused_before_scoring(shard_dir):
    """The staged shards record how they were scored; --resume with other outputs (the level distribution's columns)
    is refused, naming the difference, and neither the output nor the finished shards change."""
    assert gamma_cmd("00002.tar", "--out", "s.csv", cwd=shard_dir).returncode == 0
    before = (shard_dir / "s.csv").read_bytes()
    staging = shard_dir / ".s.csv.shards"
    finished = sorted(p.name for p in staging.iterdir())
    other = gamma_cmd("00001.tar", "00002.tar", "--out", "s.csv", "--resume", "--distribution", cwd=shard_dir)
    assert other.returncode == 2 and "cannot resume" in other.stderr and "column" in other.stderr, other.stderr
    assert (shard_dir / "s.csv").read_bytes() == before and sorted(p.name for p in staging.iterdir()) == finished
    same = gamma_cmd("00001.tar", "00002.tar", "--out", "s.csv", "--resume", cwd=shard_dir)
    assert same.returncode == 1 and "1 shard(s) already finished" in same.stderr  # 00001/b1 has no image


def test_shards_mixed_with_images_refused(shard_dir):
    (shard_dir / "x.png").write_bytes(b"")
    r = gamma_cmd("00000.tar", "x.png", "--out", "s.csv", cwd=shard_dir)
    assert r.returncode == 2 and "cannot be mixed" in r.stderr
    r = gamma_cmd("00000.tar", cwd=shard_dir)
    assert r.returncode == 2 and "--out-dir" in r.stderr


@pytest.mark.slow
def test_torchrun_assigns_whole_shards(shard_dir):
    """torchrun x2: shard i to rank i % 2; the merged output equals a single process's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["{00000..00002}.tar", "--model", "gamma_test", "--no-progress", "--workers", "0", "--crops", "center"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "gamma", "score", *common, "--out", "two.parquet", "--device", "cpu"],
                       cwd=shard_dir, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 1, r.stderr
    one = gamma_cmd("{00000..00002}.tar", "--out", "one.parquet", cwd=shard_dir)
    assert one.returncode == 1
    assert pq.read_table(shard_dir / "two.parquet").to_pylist() == pq.read_table(shard_dir / "one.parquet").to_pylist()


def test_import_gamma_and_help_load_no_optional_engine():
    """`import gamma`, `gamma --help` and `gamma score --help` import none of pyarrow, ray, onnx, onnxruntime."""
    code = ("import sys, contextlib, io\nimport gamma, gamma.cli, gamma.shards, gamma.export, gamma.cli.shards\n"
            "import gamma.parquet_out, gamma.integrations.ray, gamma.cli.ray_engine, gamma.cli.export\n"
            "for argv in (['--help'], ['score', '--help'], ['export', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        gamma.cli.main(argv)\n"
            "print(sorted(m for m in ('pyarrow', 'ray', 'onnx', 'onnxruntime', 'webdataset') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
