"""One prepared command for a GPU machine: what gamma's CUDA paths do, in one report.

Steps (each timed, each failure recorded and the next step run anyway):

1. **cuda tests**: the ``cuda``-marked tests (``pytest -m cuda``; skipped with a reason where CUDA is absent);
2. **training**: 20 optimiser steps of the full-size model (``gamma_vitb16``) under AMP bf16 and fp16 (fp16 with a
   GradScaler), as the trainer runs them (:func:`gamma.train.loop.mse_sum`, the trainer's autocast): every loss finite,
   eval-mode predictions float32;
3. **scoring**: a folder of distorted photographs (:func:`gamma.data.photos.distorted_photos`) scored with
   :class:`gamma.scorer.Scorer` at fp32 / bf16 / fp16 on the device (10 crops), each precision's agreement with fp32
   (max |delta|, SRCC);
4. **bench**: ``scripts/bench.py --device cuda`` rows: batch 64 at each precision beside the GPU's matmul rate in
   that precision, and the 10-crop protocol on a 1024x768 picture.

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``. On a GPU machine with PyTorch but without
open_clip_torch or network, carry the wheels in an ignored folder and install them offline first::

    pip wheel --no-deps -w wheels/ open_clip_torch . # here, once (gamma's wheel and open_clip's)
    pip install --no-index --no-deps wheels/*.whl && python scripts/gpu_check.py --out gpu_report   # there

``--device cpu --quick`` runs the same steps at toy size (tests/test_perf.py runs it in CI). The whole run is meant to
take at most 8 minutes on one H100 / H200 (``--budget`` seconds; a step that would start after it is skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gamma  # noqa: E402
from gamma.archs import precision as prec  # noqa: E402

logger = logging.getLogger("gpu_check")


# ------------------------------------------------------------------------------------------------ steps
def cuda_tests(args: argparse.Namespace) -> dict[str, Any]:
    """The cuda-marked tests, in a child pytest (only the test files that hold some, so collection is quick)."""
    files = sorted(str(f) for f in (ROOT / "tests").glob("test_*.py") if "pytest.mark.cuda" in f.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs", *files]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.step_timeout)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {k: int(n) for n, k in (w.split(" ", 1) for w in _summary_words(tail))}
    ok = done.returncode in (0, 5) and not counts.get("failed") and not counts.get("error")  # 5: none collected
    return {"ok": ok, "summary": tail, "counts": counts, "files": [Path(f).name for f in files],
            "output_tail": done.stdout[-3000:] + done.stderr[-2000:]}


def _summary_words(line: str) -> list[str]:
    """``'3 passed, 2 skipped in 4.1s'`` -> ``['3 passed', '2 skipped']``."""
    words = [w.strip().strip("=").strip() for w in line.split(",")]
    out = []
    for w in words:
        parts = w.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out.append(f"{parts[0]} {parts[1]}")
    return out


def training(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """20 steps (``--quick``: 3) under each AMP setting the device has; losses finite, predictions float32."""
    from gamma.train.evaluate import autocast
    from gamma.train.loop import mse_sum

    steps = 3 if args.quick else 20
    batch = 4 if args.quick else 32
    out: dict[str, Any] = {"variant": args.variant, "steps": steps, "batch": batch, "amp": {}}
    for amp in ("bf16", "fp16"):
        if amp == "fp16" and device.type != "cuda":
            out["amp"][amp] = {"ok": True, "skipped": "amp=fp16 needs CUDA"}
            continue
        torch.manual_seed(0)
        model = gamma.create_model(args.variant).to(device).train()
        size = model.config.vision.image_size
        opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-5)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        gen = torch.Generator().manual_seed(1)
        losses = []
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            images = torch.rand(batch, 3, size, size, generator=gen).to(device, non_blocking=True)
            b = {"mos": torch.rand(batch, generator=gen), "weight": torch.ones(batch)}
            opt.zero_grad(set_to_none=True)
            with autocast(device, amp):
                pred = model(images, scene=["natural"] * batch if model.config.prompt_set == "sdp" else None)
            loss = mse_sum(pred.float(), b) / batch
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())
        _sync(device)
        seconds = time.perf_counter() - t0
        losses_f = [float(v) for v in torch.stack(losses).cpu()]
        model.eval()
        with torch.no_grad():
            pred = model(torch.rand(2, 3, size, size, generator=gen).to(device))
        out["amp"][amp] = {
            "ok": all(math.isfinite(v) for v in losses_f) and pred.dtype == torch.float32,
            "losses_first_last": [losses_f[0], losses_f[-1]], "all_finite": all(map(math.isfinite, losses_f)),
            "prediction_dtype": str(pred.dtype).replace("torch.", ""), "steps_per_s": steps / seconds,
            "grad_scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
        }
        del model, opt
    out["ok"] = all(r["ok"] for r in out["amp"].values())
    return out


def scoring(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    """A folder of photographs scored at fp32 / bf16 / fp16 on ``device``, agreement of each with fp32."""
    from PIL import Image
    from scipy.stats import spearmanr

    from gamma.data.photos import distorted_photos
    from gamma.scorer import Scorer
    from gamma.weights import save_checkpoint

    bench = _bench_module()
    count = 8 if args.quick else 64
    pictures, _ = distorted_photos(count, size=(96, 128) if args.quick else (384, 512), seed=0)
    folder = work / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(pictures):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    model = gamma.create_model(args.variant)
    bench.perturb(model)  # every part of the model changes the score (random init barely does)
    weights = save_checkpoint(model, work / "weights.pth")
    out: dict[str, Any] = {"images": count, "folder_image_size": list(pictures.shape[-2:]), "precisions": {}}
    base = None
    for p in ("fp32", "bf16", "fp16"):
        try:
            prec.check_precision(p, device)
        except ValueError as exc:
            out["precisions"][p] = {"ok": True, "skipped": str(exc).split(";")[0]}
            continue
        scorer = Scorer(weights, device=device, precision=p, batch_size=16, num_workers=0)  # the model's 10 crops
        _sync(device)
        t0 = time.perf_counter()
        df = scorer.score(str(folder))
        _sync(device)
        seconds = time.perf_counter() - t0
        scores = np.asarray(df.sort_values("name")["score"], dtype=np.float64)
        row: dict[str, Any] = {"images_per_s": count / seconds, "ok": bool(np.isfinite(scores).all())}
        if base is None:
            base = scores
        else:
            delta = np.abs(scores - base)
            row.update(max_abs_delta=float(delta.max()), mean_abs_delta=float(delta.mean()),
                       srcc=float(spearmanr(scores, base)[0]))
            row["ok"] = row["ok"] and row["max_abs_delta"] < 0.05 and row["srcc"] > 0.9
        out["precisions"][p] = row
        del scorer
    out["ok"] = all(r["ok"] for r in out["precisions"].values())
    return out


def bench_rows(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    """scripts/bench.py's precision rows (batch 64; ``--quick``: 2) and 10-crop protocol (1024x768; quick 320x240)."""
    fast = ["bf16"] if args.quick else [p for p in ("bf16", "fp16") if p in prec.fast_precisions(device)]
    out_file = work / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", str(device), "--variant", args.variant,
           "--skip", "scoring,protocol,train,agreement,precision_agreement", "--out", str(out_file)]
    if fast:
        cmd += ["--precision", ",".join(fast)]
    else:
        cmd += ["--precision", "fp32"]
    if args.quick:
        cmd += ["--batches", "2", "--rounds", "1", "--matmul-size", "256", "--precision-image", "240x320",
                "--threads", "1"]
    else:
        cmd += ["--batches", "64", "--rounds", "5", "--precision-image", "768x1024"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.step_timeout)
    if done.returncode != 0:
        return {"ok": False, "error": (done.stderr or done.stdout)[-3000:]}
    res = json.loads(out_file.read_text())
    rows = [{"batch": r["batch"], "precision": r["precision"], "images_per_s": r["images_per_s"],
             "matmul_gflops": r["matmul_gflops"], "max_abs_score_diff_vs_fp32": r.get("max_abs_score_diff_vs_fp32")}
            for r in res["precision"]["rows"]]
    protocol = res["precision"].get("protocol", {})
    return {"ok": bool(rows), "rows": rows, "protocol_seconds_per_image": protocol.get("seconds_per_image"),
            "protocol_image": res["args"]["precision_image"], "table": res.get("table", "")}


# ------------------------------------------------------------------------------------------------ running
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    return bench


def machine(device: torch.device) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "gamma": gamma.__version__,
            "device": str(device), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    return info


def run_step(name: str, fn: Callable[[], dict[str, Any]], report: dict[str, Any], started: float,
             budget: float) -> None:
    if time.perf_counter() - started > budget:
        report["steps"][name] = {"ok": False, "skipped": f"over the {budget:.0f} s budget"}
        return
    logger.info("step %s ...", name)
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the report; the other steps still run
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = time.perf_counter() - t0
    report["steps"][name] = result
    logger.info("step %s: %s (%.0f s)", name, "ok" if result.get("ok") else "FAILED", result["seconds"])


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["steps"]
    lines = [f"# gamma GPU check: {m.get('gpu', m['device'])}", "",
             f"torch {m['torch']}, gamma {m['gamma']}, device {m['device']}"
             + (f" ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else "")
             + f"; {report['seconds']:.0f} s in all{' (--quick)' if report['quick'] else ''}.", "",
             "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {'ok' if v.get('ok') else 'FAILED'}{' - ' + v['skipped'] if 'skipped' in v else ''} | "
              f"{v.get('seconds', 0):.1f} |" for k, v in s.items()]
    if "cuda_tests" in s:
        lines += ["", f"cuda tests: {s['cuda_tests'].get('summary', s['cuda_tests'].get('error', ''))}"]
    t = s.get("training", {})
    if "amp" in t:
        lines += ["", f"## Training ({t['variant']}, {t['steps']} steps of batch {t['batch']})", "",
                  "| amp | first / last loss | predictions | steps/s |", "|---|---|---|---|"]
        for amp, r in t["amp"].items():
            if "skipped" in r:
                lines.append(f"| {amp} | skipped: {r['skipped']} | | |")
            else:
                lines.append(f"| {amp} | {r['losses_first_last'][0]:.4f} / {r['losses_first_last'][1]:.4f} | "
                             f"{r['prediction_dtype']} | {r['steps_per_s']:.2f} |")
    sc = s.get("scoring", {})
    if "precisions" in sc:
        lines += ["", f"## Scoring a folder ({sc['images']} images, 10 crops)", "",
                  "| precision | images/s | max abs delta vs fp32 | SRCC vs fp32 |", "|---|---|---|---|"]
        for p, r in sc["precisions"].items():
            if "skipped" in r:
                lines.append(f"| {p} | skipped: {r['skipped']} | | |")
            else:
                lines.append(f"| {p} | {r['images_per_s']:.1f} | {r.get('max_abs_delta', 0):.2e} | "
                             f"{r.get('srcc', 1.0):.5f} |")
    b = s.get("bench", {})
    if "rows" in b:
        lines += ["", "## scripts/bench.py", "", "| batch | precision | images/s | matmul GFLOP/s |",
                  "|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['precision']} | {r['images_per_s']:.1f} | {r['matmul_gflops']:.0f} |"
                  for r in b["rows"]]
        if b.get("protocol_seconds_per_image"):
            lines += ["", f"10-crop protocol, {b['protocol_image']} picture: " + ", ".join(
                f"{p} {v:.3f} s/image" for p, v in b["protocol_seconds_per_image"].items())]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: the CI run)")
    p.add_argument("--quick", action="store_true", help="toy sizes (gamma_test, a few images and steps)")
    p.add_argument("--out", default="gpu_report", help="folder for gpu_check.json / gpu_check.md")
    p.add_argument("--variant", default=None, help="model (default gamma_vitb16; --quick: gamma_test)")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: cuda_tests,training,scoring,bench")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; steps that would start later are skipped")
    p.add_argument("--step-timeout", type=float, default=300.0, help="seconds for each child process")
    args = p.parse_args(argv)
    args.variant = args.variant or ("gamma_test" if args.quick else "gamma_vitb16")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --device cpu --quick to check the script itself)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(device), "quick": args.quick, "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "cuda_tests": lambda: cuda_tests(args),
            "training": lambda: training(args, device),
            "scoring": lambda: scoring(args, device, work),
            "bench": lambda: bench_rows(args, device, work),
        }
        for name, fn in steps.items():
            if name not in skip:
                run_step(name, fn, report, started, args.budget)
    report["seconds"] = time.perf_counter() - started
    report["ok"] = all(s.get("ok") for s in report["steps"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))  # noqa: T201 - command-line output
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
