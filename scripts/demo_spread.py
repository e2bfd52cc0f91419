"""Run the offline demo (options/demo.yml) once per seed and thread count, and tabulate the spread of its figures.

The demo's held-out SRCC / PLCC come from a few minutes of training on a few thousand 32x32 pictures; float rounding
differs between CPUs and thread counts, so one run's figures (and the margin between Gamma and the baseline without
MoAE) move from machine to machine. This script shows how far: for every ``--seeds`` x ``--threads`` combination it runs

    python train.py -opt options/demo.yml seed=N output_dir=<output-dir>/seed_N_threads_T data_root=<data-root> ...

as a subprocess with ``OMP_NUM_THREADS=T`` (its log in that folder's ``train.log``), reads the run's ``summary.json``
(``demo_clip/split_1/``: the held-out figures of stages demo_gamma and demo_nomoae) and writes a markdown table (per run
Gamma and no-MoAE mean SRCC / PLCC and the margin, then the min-max of every column) to ``<output-dir>/spread.md`` and
``spread.json``. The synthetic data depends on ``pretrain.synthetic.seed`` (0), not on the run seed: it is written once
under ``--data-root`` and every run reads the same pictures and splits. Resumable: a combination whose summary exists
is read, not run again.

    python scripts/demo_spread.py --seeds 123 1 2 --threads 1 --output-dir /tmp/demo_spread   # ~10 min per run
    python scripts/demo_spread.py --seeds 123 --threads 2 --output-dir /tmp/demo_spread epochs=4   # extra overrides
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUMMARY = Path("demo_clip", "split_1", "summary.json")  # under a run's output_dir (demo.yml's name and split)
GAMMA, BASELINE = "demo_gamma", "demo_nomoae"  # the follow-up stages compared

logger = logging.getLogger("demo_spread")


def run_folder(output_dir: Path, seed: int, threads: int) -> Path:
    """The ``output_dir`` of one demo run."""
    return output_dir / f"seed_{seed}_threads_{threads}"


def demo_command(seed: int, out: Path, data_root: Path, extra: list[str], python: str = sys.executable) -> list[str]:
    """The command line of one demo run (run from the repository root: the option files name each other from there)."""
    return [python, "train.py", "-opt", "options/demo.yml", f"seed={seed}", f"output_dir={out}",
            f"data_root={data_root}", "log.progress=false", *extra]


def read_result(out: Path) -> dict[str, Any] | None:
    """The held-out mean figures of one finished demo run, or None when its summary is missing or incomplete.

    Returns:
        ``{'gamma': {'srcc', 'plcc'}, 'nomoae': {'srcc', 'plcc'}, 'margin': {'srcc', 'plcc'}, 'seconds'}``.
    """
    path = out / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        runs = summary["runs"]
        gamma = {k: float(runs[GAMMA]["mean"][k]) for k in ("srcc", "plcc")}
        base = {k: float(runs[BASELINE]["mean"][k]) for k in ("srcc", "plcc")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s is incomplete or unreadable (%s): the run counts as not done", path, exc)
        return None
    return {"gamma": gamma, "nomoae": base, "margin": {k: gamma[k] - base[k] for k in gamma},
            "seconds": summary.get("seconds")}


COLUMNS = [("gamma", "srcc", "Gamma SRCC"), ("gamma", "plcc", "Gamma PLCC"), ("nomoae", "srcc", "no-MoAE SRCC"),
           ("nomoae", "plcc", "no-MoAE PLCC"), ("margin", "srcc", "margin SRCC"), ("margin", "plcc", "margin PLCC")]


TIE = 0.01  # SRCC margins within +-TIE count as a tie: below what the seed alone moves one stage's figure by


def build_table(rows: list[dict[str, Any]], tie: float = TIE) -> str:
    """A markdown table: one line per run (``seed``, ``threads``, ``result`` from :func:`read_result` or None), then
    the min-max of every column over the finished runs, and how many runs have Gamma ahead by more than ``tie`` on
    held-out mean SRCC, how many within ``tie`` and how many behind."""
    head = "| seed | threads | " + " | ".join(c[2] for c in COLUMNS) + " | minutes |"
    lines = [head, "|---" * (len(COLUMNS) + 3) + "|"]
    done = [r for r in rows if r["result"] is not None]
    for r in rows:
        res = r["result"]
        if res is None:
            cells = ["not run"] + ["-"] * len(COLUMNS)
        else:
            cells = [f"{res[part][k]:+.3f}" if part == "margin" else f"{res[part][k]:.3f}" for part, k, _ in COLUMNS]
            cells.append(f"{res['seconds'] / 60:.1f}" if res.get("seconds") is not None else "-")
        lines.append(f"| {r['seed']} | {r['threads']} | " + " | ".join(cells) + " |")
    if done:
        cells = []
        for part, k, _ in COLUMNS:
            values = [r["result"][part][k] for r in done]
            fmt = "{:+.3f}" if part == "margin" else "{:.3f}"
            cells.append(f"{fmt.format(min(values))} to {fmt.format(max(values))}")
        lines.append(f"| min to max | {len(done)} runs | " + " | ".join(cells) + " | |")
        margins = [r["result"]["margin"]["srcc"] for r in done]
        ahead, behind = sum(m > tie for m in margins), sum(m < -tie for m in margins)
        lines.append("")
        lines.append(f"Held-out mean SRCC, Gamma (MoAE) against the baseline without MoAE, over {len(done)} runs: "
                     f"ahead by more than {tie:g} in {ahead}, within +-{tie:g} in {len(done) - ahead - behind}, "
                     f"behind by more than {tie:g} in {behind}.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[123, 1, 2], help="run seeds (default: 123 1 2)")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="OMP_NUM_THREADS of the runs; every seed runs at every count (default: 1)")
    p.add_argument("--data-root", type=Path, default=REPO / "demo_data",
                   help="where the synthetic datasets are written once and read by every run (default: demo_data)")
    p.add_argument("--output-dir", type=Path, default=REPO / "experiments" / "demo_spread",
                   help="one folder per run under it, and spread.md / spread.json")
    p.add_argument("--no-run", action="store_true", help="only tabulate the runs already finished")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to every run (e.g. epochs=4)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    output_dir, data_root = args.output_dir.resolve(), args.data_root.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for threads in args.threads:
        for seed in args.seeds:
            out = run_folder(output_dir, seed, threads)
            result = read_result(out)
            if result is not None:
                logger.info("seed %d, %d thread(s): finished earlier (%s), not run again", seed, threads, out)
            elif not args.no_run:
                out.mkdir(parents=True, exist_ok=True)
                cmd = demo_command(seed, out, data_root, args.overrides)
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                logger.info("seed %d, %d thread(s): %s", seed, threads, " ".join(cmd))
                t0 = time.perf_counter()
                with open(out / "train.log", "w", encoding="utf-8") as log:
                    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                logger.info("seed %d, %d thread(s): exit %d after %.0f s", seed, threads, rc, time.perf_counter() - t0)
                result = read_result(out)
                if rc != 0 or result is None:
                    failed += 1
                    logger.error("seed %d, %d thread(s) failed (exit %d): see %s", seed, threads, rc, out / "train.log")
            rows.append({"seed": seed, "threads": threads, "result": result})
    table = build_table(rows)
    (output_dir / "spread.md").write_text(table, encoding="utf-8")
    (output_dir / "spread.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(table)  # noqa: T201 - the CLI's output
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
