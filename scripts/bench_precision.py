"""Reduced precision: agreement of bf16 / fp16 / int8 scores with fp32, and their speed, measured in one run.

Agreement: the fp32 scores of :func:`gamma.data.photos.distorted_photos` (64 distorted crops of the photographs that
ship with scikit-image) against each precision's: max and mean |delta score|, SRCC and PLCC. The model is ``--variant``
(default the full-size ``gamma_vitb16``) with random weights whose MoAE alphas, routers and experts, adapter and logit
scale are perturbed so that every part matters, or ``--checkpoint`` (e.g. the offline demo's trained model).

Speed: scoring a batch of ``--batch`` crops under ``inference_mode`` with each precision, interleaved (fp32 bf16 int8
fp32 ...) and summarised by medians, plus ``torch.autocast`` around the fp32 model and the machine's square-matmul rates
per dtype. On a shared machine compare the ratios of one run, not absolute times across runs.

    python scripts/bench_precision.py                                 # gamma_vitb16, several minutes on 2 cores
    python scripts/bench_precision.py --variant gamma_test --rounds 3   # seconds
    python scripts/bench_precision.py --checkpoint experiments/demo_gamma/split_1/best.pth --skip timing
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gamma  # noqa: E402
from gamma.archs import precision as prec  # noqa: E402
from gamma.data.photos import distorted_photos  # noqa: E402

logger = logging.getLogger("bench_precision")


def perturbed_model(variant: str, seed: int = 0) -> gamma.GammaModel:
    """``variant`` with random weights, every trainable part perturbed, and OpenAI CLIP's logit scale (100)."""
    torch.manual_seed(seed)
    model = gamma.create_model(variant)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moae_modules():
            if m.scale is not None:
                m.scale.fill_(0.5)
            m.gating.layer1.weight.normal_(0, 0.05, generator=gen)
            for expert in m.experts.values():
                for p in expert.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3 * float(p.std().clamp_min(1e-3)))
        for p in model.adapter.parameters():
            p.normal_(0, 0.05, generator=gen)
        model.clip_model.logit_scale.fill_(float(np.log(100.0)))
    return model


def score(model: gamma.GammaModel, images: torch.Tensor, scene: str | None, batch: int = 8) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch], scene=scene) for i in range(0, len(images), batch)])


def agreement(model: gamma.GammaModel, precisions: list[str], images: torch.Tensor,
              scene: str | None) -> dict[str, Any]:
    """Each precision's scores against fp32's on the same images."""
    start = time.perf_counter()
    ref = score(model, images, scene)
    out: dict[str, Any] = {"images": len(images), "fp32_std": float(ref.std()),
                           "fp32_range": [float(ref.min()), float(ref.max())],
                           "fp32_seconds": time.perf_counter() - start}
    for p in precisions:
        low = copy.deepcopy(model).to_precision(p, allow_slow=True)
        start = time.perf_counter()
        s = score(low, images, scene)
        delta = (s - ref).abs()
        out[p] = {"max_abs_delta": float(delta.max()), "mean_abs_delta": float(delta.mean()),
                  "srcc": float(spearmanr(s.numpy(), ref.numpy())[0]),
                  "plcc": float(pearsonr(s.numpy(), ref.numpy())[0]), "seconds": time.perf_counter() - start}
        logger.info("agreement %s: %s", p, out[p])
        del low
    return out


def timing(model: gamma.GammaModel, precisions: list[str], batch: int, rounds: int,
           scene: str | None) -> dict[str, Any]:
    """Median seconds per batch of crops for fp32, autocast-bf16 around fp32, and each precision; ratios to fp32."""
    size = model.config.vision.image_size
    crops = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    models = {"fp32": model}
    models.update({p: copy.deepcopy(model).to_precision(p, allow_slow=True) for p in precisions})

    def run(m: gamma.GammaModel, autocast: bool = False) -> None:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            m.score_crops(crops, scene=scene)

    fns = {name: (lambda m=m: run(m)) for name, m in models.items()}
    fns["fp32+autocast_bf16"] = lambda: run(model, autocast=True)
    for fn in fns.values():  # warm-up: caches (text features, stacked and int8 weights) and allocator
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in samples.items()}
    return {"batch": batch, "rounds": rounds, "median_seconds": med,
            "speedup_vs_fp32": {name: med["fp32"] / v for name, v in med.items()}}


def matmul_rates(n: int, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n x n matmul per dtype, and of int8 x int8 -> int32 (torch._int_mm), interleaved."""
    mats = {name: (torch.randn(n, n, dtype=d), torch.randn(n, n, dtype=d))
            for name, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    fns = {name: (lambda a=a, b=b: torch.mm(a, b)) for name, (a, b) in mats.items()}
    if hasattr(torch, "_int_mm"):
        qa, qb = (torch.randint(-127, 128, (n, n), dtype=torch.int8) for _ in range(2))
        fns["int8"] = lambda: torch._int_mm(qa, qb)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: 2 * n**3 / statistics.median(v) / 1e9 for name, v in samples.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="gamma_vitb16")
    p.add_argument("--checkpoint", help="trained weights instead of a perturbed random variant")
    p.add_argument("--precisions", default="bf16,int8", help="comma-separated, among bf16, fp16, int8")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--scene", default="natural", help="scene for SDP models")
    p.add_argument("--skip", default="", help="comma-separated: agreement,timing")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = [s for s in args.precisions.split(",") if s]
    skip = set(args.skip.split(","))
    if args.checkpoint:
        model, source = gamma.create_model(pretrained=args.checkpoint), str(args.checkpoint)
    else:
        model, source = perturbed_model(args.variant), f"{args.variant}, random weights with perturbed MoAE and head"
    scene = args.scene if model.config.prompt_set == "sdp" else None
    flags = sorted(prec.cpu_flags() & {f for v in prec.CPU_FLAGS.values() for f in v})
    res: dict[str, Any] = {
        "model": source, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_flags": flags,
        "fast_precisions": list(prec.fast_precisions("cpu")), "auto": prec.resolve_precision("auto", "cpu"),
    }
    res["matmul_gflops"] = matmul_rates(args.matmul_size)
    logger.info("matmul GFLOP/s: %s", res["matmul_gflops"])
    if "agreement" not in skip:
        images, _ = distorted_photos(args.images, size=model.config.vision.image_size, seed=0)
        res["agreement"] = agreement(model, precisions, images, scene)
    if "timing" not in skip:
        res["timing"] = timing(model, precisions, args.batch, args.rounds, scene)
        logger.info("timing: %s", res["timing"])
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
