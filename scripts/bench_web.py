"""Benchmark web-scale scoring: tar shards vs files, Parquet vs CSV, Ray Data vs torchrun, onnxruntime vs PyTorch.

Rows (each part can be skipped with --skip):

- ``input``: images/s of ``gamma score`` (decoding included; the rate line of ``--verbose``, which counts from the
  first image, after the model is built) on the same pictures as PNG files and packed into tar shards, with 1 and 2
  processes (torchrun, gloo);
- ``writers``: seconds to write N result rows with the CSV writer and the Parquet writer (row groups of 4096);
- ``engines``: wall time (start-up included) and images/s of ``--engine ray`` with 2 actors and torchrun x2 on the
  same files;
- ``onnx``: crops/s of onnxruntime (fp32, and int8 from ``quantize_dynamic``) against the PyTorch model in fp32 and
  bf16, interleaved in the same rounds (medians); the int8 graph's SRCC and max |delta| against fp32 on 64 distorted
  photographs.

    python scripts/bench_web.py --images 48 --model gamma_test            # minutes on 2 cores
    python scripts/bench_web.py --skip input,engines --onnx-model gamma_vitb16

Random weights (nothing downloaded). Numbers from a shared machine vary with its load: compare rows of one run.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gamma.data.photos import distorted_photos  # noqa: E402


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _write_inputs(folder: Path, count: int, per_shard: int) -> tuple[Path, list[Path]]:
    """``count`` PNG files under folder/files and the same bytes in tar shards of ``per_shard``."""
    images, _ = distorted_photos(count, size=(256, 320), seed=0)
    files = folder / "files"
    files.mkdir()
    encoded = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
        (files / f"{i:06d}.png").write_bytes(buf.getvalue())
        encoded.append(buf.getvalue())
    shards = []
    for s in range(0, count, per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(count, s + per_shard)):
                info = tarfile.TarInfo(f"{i:06d}.png")
                info.size = len(encoded[i])
                tar.addfile(info, io.BytesIO(encoded[i]))
        shards.append(path)
    return files, shards


def _gamma(args: list[str], procs: int, cwd: Path) -> tuple[float, float]:
    """(images/s from the rate line, wall seconds) of one ``gamma score`` run."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m",
                "gamma"] if procs > 1 else [sys.executable, "-m", "gamma"]
    start = time.perf_counter()
    r = subprocess.run([*launcher, "--verbose", "score", *args, "--no-progress"], cwd=cwd, env=_env(),
                       capture_output=True, text=True)
    wall = time.perf_counter() - start
    rate = re.search(r"rate: ([0-9.]+) images/s", r.stderr)
    if r.returncode != 0 or rate is None:
        raise RuntimeError(f"gamma score failed ({r.returncode}): {r.stderr[-1500:]}")
    return float(rate.group(1)), wall


def bench_input(args: argparse.Namespace, work: Path, files: Path, shards: list[Path]) -> list[str]:
    common = ["--model", args.model, "--crops", args.crops, "--workers", "1", "--device", "cpu"]
    rows = []
    for procs in (1, 2):
        for kind, inputs in (("files", [str(files)]), ("tar shards", [str(s) for s in shards])):
            out = work / f"in_{kind[0]}{procs}.csv"
            rate, wall = _gamma([*inputs, *common, "--out", str(out), "--overwrite"], procs, work)
            rows.append(f"| {kind} | {procs} | {rate:.2f} | {wall:.1f} |")
    return ["| input | processes | images/s | wall s |", "|---|---|---|---|", *rows]


def bench_writers(args: argparse.Namespace, work: Path) -> list[str]:
    from gamma.cli.writers import RowWriter
    from gamma.parquet_out import ParquetRowWriter

    columns = ["name", "score", "std", "p_bad", "p_poor", "p_fair", "p_good", "p_perfect"]
    rng = np.random.default_rng(0)
    data = rng.random((args.rows, len(columns) - 1)).tolist()
    rows = [{"name": f"{i // 10000:05d}/{i:09d}", **dict(zip(columns[1:], v, strict=True))} for i, v in
            enumerate(data)]
    out = ["| writer | rows | seconds | rows/s | file MiB |", "|---|---|---|---|---|"]
    for name, make, suffix in (("CSV", RowWriter, ".csv"), ("Parquet", ParquetRowWriter, ".parquet")):
        path = work / f"rows{suffix}"
        start = time.perf_counter()
        writer = make(str(path), columns, resume=False, overwrite=True)
        writer.open()
        for row in rows:
            writer.write(row)
        writer.close(complete=True)
        sec = time.perf_counter() - start
        out.append(f"| {name} | {args.rows} | {sec:.2f} | {args.rows / sec:,.0f} | {path.stat().st_size / 2**20:.2f} |")
    return out


def bench_engines(args: argparse.Namespace, work: Path, files: Path) -> list[str]:
    common = [str(files), "--model", args.model, "--crops", args.crops, "--device", "cpu", "--workers", "0"]
    out = ["| engine | workers | images/s | wall s (start-up included) |", "|---|---|---|---|"]
    rate, wall = _gamma([*common, "--engine", "ray", "--ray-actors", "2", "--out", str(work / "ray.csv"),
                         "--overwrite"], 1, work)
    out.append(f"| Ray Data (local) | 2 actors | {rate:.2f} | {wall:.1f} |")
    rate, wall = _gamma([*common, "--out", str(work / "tr.csv"), "--overwrite"], 2, work)
    out.append(f"| torchrun | 2 processes | {rate:.2f} | {wall:.1f} |")
    return out


def bench_onnx(args: argparse.Namespace, work: Path) -> list[str]:
    import gamma
    from gamma.export import OnnxGammaModel, export_onnx, quantize_onnx
    from gamma.metrics import srcc

    torch.manual_seed(0)
    model = gamma.create_model(args.onnx_model).eval()
    fp32_path = export_onnx(model, work / "g.onnx", outputs=["score"])
    int8_path = quantize_onnx(fp32_path, work / "g8.onnx")
    runners = {"onnxruntime fp32": OnnxGammaModel(fp32_path, threads=args.threads),
               "onnxruntime int8": OnnxGammaModel(int8_path, threads=args.threads)}
    torch.manual_seed(0)
    bf16 = gamma.create_model(args.onnx_model).eval().to_precision("bf16")
    crops = torch.rand(args.onnx_batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def torch_run(m):
        with torch.inference_mode():
            return m.score_crops(crops)

    calls = {"PyTorch fp32": lambda: torch_run(model), "PyTorch bf16": lambda: torch_run(bf16),
             **{k: (lambda r=r: r.crop_outputs(crops)) for k, r in runners.items()}}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    photos, _ = distorted_photos(64, size=224, seed=0)
    with torch.inference_mode():
        ref = model.score_crops(photos)
    agree = {}
    for name, runner in runners.items():
        got = torch.from_numpy(runner.crop_outputs(photos)["score"][:, 0])
        agree[name] = (float((got - ref).abs().max()), float(srcc(got.numpy(), ref.numpy())))
    with torch.inference_mode():
        got = bf16.score_crops(photos)
    agree["PyTorch bf16"] = (float((got - ref).abs().max()), float(srcc(got.float().numpy(), ref.numpy())))
    out = [f"| backend ({args.onnx_model}, batch {args.onnx_batch}) | crops/s (median of {args.rounds}) | "
           "max abs delta vs fp32 | SRCC vs fp32 (64 photos) |", "|---|---|---|---|"]
    for name in calls:
        med = statistics.median(times[name])
        d, s = agree.get(name, (0.0, 1.0))
        out.append(f"| {name} | {args.onnx_batch / med:.1f} | {d:.2e} | {s:.5f} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--model", default="gamma_test")
    p.add_argument("--crops", default="center")
    p.add_argument("--rows", type=int, default=200_000, help="rows for the writer benchmark")
    p.add_argument("--onnx-model", default="gamma_test")
    p.add_argument("--onnx-batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads in the onnx part (default 1: "
                   "on a shared machine more threads than free cores slow PyTorch down far more than onnxruntime)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: input, writers, engines, onnx")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} cores (shared with other jobs: figures vary with load), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files, shards = _write_inputs(work, args.images, args.per_shard)
        parts = [("input", lambda: bench_input(args, work, files, shards)),
                 ("writers", lambda: bench_writers(args, work)),
                 ("engines", lambda: bench_engines(args, work, files)),
                 ("onnx", lambda: bench_onnx(args, work))]
        for name, run in parts:
            if name in skip:
                continue
            print(f"\n## {name}")
            print("\n".join(run()), flush=True)


if __name__ == "__main__":
    main()
