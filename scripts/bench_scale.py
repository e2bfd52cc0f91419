"""Benchmark start-up and scale-out: import time, time to a ready Scorer, and 1- vs 2-process scoring rates.

Each measurement runs in fresh interpreters (what a user waits for), interleaved over rounds (A B C A B C ...) and
summarised by medians; a second checkout given with ``--baseline`` (e.g. ``git worktree add ../gamma-before <commit>``)
is measured in the same rounds, so "before" and "after" come from one run on one (shared, noisy) machine.

- **imports**: ``import torch``; ``import gamma``; ``python -m gamma.cli --help`` (the parser); plus a ``-X importtime``
  breakdown of ``import gamma`` (open_clip, torchvision, scipy, pandas, pyiqa: which of them it loads);
- **load**: ``Scorer(weights)`` on a full-size model with random weights (``--model``, default ``gamma_vitb16``, about
  1.1 GB) saved in the release's layout (``Gamma.pth``, a pickle), and the same file after ``gamma convert``
  (``Gamma.safetensors``): the time of the call, imports excluded;
- **shards**: ``gamma score --list`` over ``--images`` photos (skimage's, resized to 512x384 ... 1152x864) with the
  converted model: one process (all threads, and one thread) against ``torchrun --nproc_per_node=2`` (one thread each):
  images/s of the scoring itself, from the rate each run logs (the slowest process, for two).

    python scripts/bench_scale.py                                   # all three, about 10 minutes on 2 cores
    python scripts/bench_scale.py --sections imports --baseline ../gamma-before --rounds 9

The model files are written to a temporary folder and deleted at the end. Results: ``runs/bench-scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("open_clip", "torchvision", "transformers", "scipy", "pandas", "pyiqa")
PHOTO_SIZES = ((512, 384), (640, 480), (768, 512), (1024, 768), (1152, 864))


def run(cmd: list[str], tree: Path, env: dict[str, str] | None = None, timeout: float = 1800) -> tuple[float, str]:
    """Wall time of ``cmd`` with gamma imported from ``tree``; its stderr+stdout."""
    full_env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", **(env or {})}
    start = time.perf_counter()
    result = subprocess.run(cmd, env=full_env, cwd=tree, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1):  # 1: gamma score's "some images failed" (none here), torchrun's report of it
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def interleaved(jobs: dict[str, Any], rounds: int) -> dict[str, dict[str, Any]]:
    """Run each job once per round, in turn; ``job()`` returns seconds. Medians, minimum and all samples."""
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            samples[name].append(job())
            print(f"  round {r + 1}/{rounds} {name}: {samples[name][-1]:.2f} s", file=sys.stderr, flush=True)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v} for name, v in samples.items()}


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


# ------------------------------------------------------------------------------------------------ imports
def bench_imports(trees: dict[str, Path], rounds: int) -> dict[str, Any]:
    jobs: dict[str, Any] = {"import torch": lambda: run(py("-c", "import torch"), REPO)[0]}
    for label, tree in trees.items():
        jobs[f"import gamma ({label})"] = lambda tree=tree: run(py("-c", "import gamma"), tree)[0]
        jobs[f"gamma --help ({label})"] = lambda tree=tree: run(py("-m", "gamma.cli", "--help"), tree)[0]
    res: dict[str, Any] = {"wall": interleaved(jobs, rounds)}
    torch_s = res["wall"]["import torch"]["median_s"]
    for entry in res["wall"].values():
        entry["over_torch_s"] = entry["median_s"] - torch_s
        entry["vs_torch"] = entry["median_s"] / torch_s
    res["importtime"] = {label: importtime(tree) for label, tree in trees.items()}
    return res


def importtime(tree: Path) -> dict[str, Any]:
    """``python -X importtime -c 'import gamma'``: cumulative microseconds of torch, gamma and the heavy packages."""
    _, text = run(py("-X", "importtime", "-c", "import gamma"), tree)
    cumulative: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and m.group(4) in ("torch", "gamma", *HEAVY):
            cumulative[m.group(4)] = int(m.group(2))
    return {"cumulative_us": cumulative, "heavy_loaded": [m for m in HEAVY if m in cumulative]}


# ------------------------------------------------------------------------------------------------ load
MAKE_RELEASE = """
import sys, torch, gamma
from gamma.weights import release_state_dict
torch.manual_seed(0)
torch.save(release_state_dict(gamma.create_model(sys.argv[1])), sys.argv[2])
"""

TIME_SCORER = """
import sys, time, torch
from gamma.scorer import Scorer
start = time.perf_counter()
scorer = Scorer(sys.argv[1], device="cpu", prompt_set="naive")
print(f"SCORER_S {time.perf_counter() - start:.4f}")
"""


def bench_load(trees: dict[str, Path], folder: Path, model: str, rounds: int) -> dict[str, Any]:
    pickle = folder / "Gamma.pth"
    converted = folder / "Gamma.safetensors"
    run(py("-c", MAKE_RELEASE, model, str(pickle)), REPO)
    convert_s, _ = run(py("-m", "gamma", "convert", str(pickle), str(converted)), REPO)

    def scorer_seconds(tree: Path, path: Path) -> float:
        _, text = run(py("-c", TIME_SCORER, str(path)), tree)
        return float(re.search(r"SCORER_S ([\d.]+)", text).group(1))

    jobs = {f"Scorer from the pickle ({label})": (lambda tree=tree: scorer_seconds(tree, pickle))
            for label, tree in trees.items()}
    jobs["Scorer from the converted file (this tree)"] = lambda: scorer_seconds(REPO, converted)
    return {"model": model, "pickle_bytes": pickle.stat().st_size, "converted_bytes": converted.stat().st_size,
            "convert_command_s": convert_s, "scorer": interleaved(jobs, rounds)}


# ------------------------------------------------------------------------------------------------ shards
def make_photos(folder: Path, count: int) -> Path:
    from PIL import Image
    from skimage import data

    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        img = Image.fromarray(getattr(data, names[i % len(names)])()).convert("RGB")
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        paths.append(folder / f"{i:03d}.jpg")
        img.resize((w, h), Image.BICUBIC).save(paths[-1], quality=90)
    listing = folder / "files.txt"
    listing.write_text("\n".join(map(str, paths)) + "\n")
    return listing


def bench_shards(folder: Path, weights: Path, images: int, crops: str, rounds: int, threads: int) -> dict[str, Any]:
    listing = make_photos(folder / "photos", images)
    common = ["-v", "score", "--list", str(listing), "--weights", str(weights), "--prompt-set", "naive",
              "--crops", crops, "--no-progress", "--workers", "1", "--overwrite"]

    def rate(cmd: list[str], env: dict[str, str]) -> float:
        _, text = run(cmd, REPO, env)
        return float(re.search(r"rate: ([\d.]+) images/s", text).group(1))

    out = str(folder / "scores.csv")
    jobs = {
        f"1 process, {threads} threads": lambda: rate(py("-m", "gamma", *common, "--out", out),
                                                      {"OMP_NUM_THREADS": str(threads)}),
        "1 process, 1 thread": lambda: rate(py("-m", "gamma", *common, "--out", out), {"OMP_NUM_THREADS": "1"}),
        "2 processes, 1 thread each": lambda: rate(
            py("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gamma", *common,
               "--out", out), {"OMP_NUM_THREADS": "1"}),
    }
    # Here a job's number is images/s, not seconds: the medians are rates.
    res = interleaved(jobs, rounds)
    table = {name: {"images_per_s_median": v["median_s"], "samples": v["samples_s"]} for name, v in res.items()}
    best_one = table[f"1 process, {threads} threads"]["images_per_s_median"]
    table["2 processes, 1 thread each"]["vs_1_process"] = table["2 processes, 1 thread each"][
        "images_per_s_median"] / best_one
    return {"images": images, "crops": crops, "sizes": PHOTO_SIZES, "rates": table}


# ------------------------------------------------------------------------------------------------ report
def report(res: dict[str, Any]) -> str:
    lines = []
    if "imports" in res:
        lines += ["| command | median s | min s | over `import torch` s | × `import torch` |", "|---|---|---|---|---|"]
        for name, v in res["imports"]["wall"].items():
            lines.append(f"| `{name}` | {v['median_s']:.2f} | {v['min_s']:.2f} | {v['over_torch_s']:+.2f} | "
                         f"{v['vs_torch']:.2f} |")
        for label, it in res["imports"]["importtime"].items():
            loaded = ", ".join(it["heavy_loaded"]) or "none of " + ", ".join(HEAVY)
            ms = ", ".join(f"{k} {v / 1000:.0f}" for k, v in it["cumulative_us"].items())
            lines.append(f"\n`import gamma` ({label}) loads: {loaded} (cumulative ms: {ms})")
        lines.append("")
    if "load" in res:
        ld = res["load"]
        lines += [f"{ld['model']}: pickle {ld['pickle_bytes'] / 2**20:,.0f} MiB, converted "
                  f"{ld['converted_bytes'] / 2**20:,.0f} MiB (`gamma convert`: {ld['convert_command_s']:.1f} s)", "",
                  "| Scorer(...) | median s | min s |", "|---|---|---|"]
        lines += [f"| {n} | {v['median_s']:.2f} | {v['min_s']:.2f} |" for n, v in ld["scorer"].items()]
        lines.append("")
    if "shards" in res:
        sh = res["shards"]
        lines += [f"{sh['images']} photos, --crops {sh['crops']}:", "", "| run | images/s (median) | vs 1 process |",
                  "|---|---|---|"]
        for n, v in sh["rates"].items():
            ratio = f"{v['vs_1_process']:.2f}×" if "vs_1_process" in v else ""
            lines.append(f"| {n} | {v['images_per_s_median']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="imports,load,shards", help="comma-separated: imports,load,shards")
    p.add_argument("--baseline", type=Path, help="another checkout of gamma to measure in the same rounds (before)")
    p.add_argument("--rounds", type=int, default=5, help="rounds for imports and load (default 5)")
    p.add_argument("--shard-rounds", type=int, default=2, help="rounds for shards (default 2)")
    p.add_argument("--model", default="gamma_vitb16", help="variant saved for load and shards (default gamma_vitb16)")
    p.add_argument("--images", type=int, default=20, help="photos scored in shards (default 20)")
    p.add_argument("--crops", default="center", help="crop mode in shards (default center: one pass per image)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the model files (default: a temporary one)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-scale.json")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    trees = {"this tree": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    folder = Path(tempfile.mkdtemp(prefix="gamma-bench-scale-", dir=args.tmp))
    res: dict[str, Any] = {"load_average_start": os.getloadavg(), "nproc": os.cpu_count(),
                           "trees": {k: str(v) for k, v in trees.items()}}
    try:
        if "imports" in sections:
            res["imports"] = bench_imports(trees, args.rounds)
        if "load" in sections or "shards" in sections:
            res["load"] = bench_load(trees, folder, args.model, args.rounds if "load" in sections else 1)
        if "shards" in sections:
            res["shards"] = bench_shards(folder, folder / "Gamma.safetensors", args.images, args.crops,
                                         args.shard_rounds, os.cpu_count() or 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    res["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(report(res))
    print(f"\nload average {res['load_average_start']} -> {res['load_average_end']}; wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
