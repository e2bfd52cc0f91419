"""Benchmark the extra outputs of the Scorer: what the columns cost, and what encoding a PromptIQA prompt once saves.

- **gamma**: ``Scorer.score`` over ``--images`` photos (skimage's, resized to 512x384 and 384x512) with a full-size SDP
  model (random weights; ``--gamma-model``), the release's 10 random crops: plain scores (scene ``natural``), then
  ``distribution=True``, ``attributes=True``, and everything with ``scene='auto'``. Medians over ``--rounds``
  interleaved rounds, after a warm-up (text features are computed once per model); ratios to the plain scores.
- **promptiqa**: the full-size PromptIQA (random weights; ``--promptiqa-model``), a prompt of ``--pairs`` images and
  ``--targets`` targets in batches of ``--batch``: the prompt encoded once and reused (what the scorer does), against
  the official test loop's re-encoding for every batch (the model's prompt cache cleared before each batch).

    python scripts/bench_outputs.py --images 4 --rounds 2    # both; about 30 minutes on 2 busy cores
    python scripts/bench_outputs.py --sections gamma --gamma-model gamma_test_sdp --rounds 1   # a smoke run

Timings on a shared machine move; the ratios within one run are the figures to quote. Results:
``runs/bench-outputs.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gamma  # noqa: E402
from gamma.io import load_promptiqa_image  # noqa: E402
from gamma.scorer import Scorer  # noqa: E402

logger = logging.getLogger("bench_outputs")
PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "hubble_deep_field", "coins",
            "moon", "page", "retina", "colorwheel", "brick", "logo", "text", "clock")


def write_photos(folder: Path, count: int, sizes: tuple[tuple[int, int], ...]) -> list[Path]:
    from skimage import data

    paths = []
    for i in range(count):
        img = Image.fromarray(getattr(data, PICTURES[i % len(PICTURES)])()).convert("RGB")
        paths.append(folder / f"{i:03d}.png")
        img.resize(sizes[i % len(sizes)], Image.BICUBIC).save(paths[-1])
    return paths


def interleaved(jobs: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median seconds of each job over ``rounds`` rounds run in turn (A B C A B C ...)."""
    samples: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            samples[name].append(time.perf_counter() - start)
            logger.info("round %d/%d %s: %.2f s", r + 1, rounds, name, samples[name][-1])
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_gamma(variant: str, photos: list[Path], rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = gamma.create_model(variant)
    configs = {
        "plain": {"scene": "natural"},
        "distribution": {"scene": "natural", "distribution": True},
        "attributes": {"scene": "natural", "attributes": True},
        "all+auto": {"scene": "auto", "distribution": True, "attributes": True},
    }
    scorers = {name: Scorer(model=model, device="cpu", batch_size=8, num_workers=1, **kw) for name, kw in
               configs.items()}
    for scorer in scorers.values():  # warm-up: the text features of every prompt kind, the allocator
        scorer.score(photos[:1])
    med = interleaved({name: (lambda s=s: s.score(photos)) for name, s in scorers.items()}, rounds)
    return {"model": variant, "images": len(photos), "rounds": rounds,
            "seconds_per_image": {k: v / len(photos) for k, v in med.items()},
            "ratio_to_plain": {k: v / med["plain"] for k, v in med.items()}}


def bench_promptiqa(variant: str, photos: list[Path], pairs: int, targets: int, batch: int,
                    rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = gamma.create_model(variant)
    size = model.config.image_size
    prompt = torch.stack([load_promptiqa_image(p, size) for p in photos[:pairs]])
    scores = torch.linspace(0.05, 0.95, pairs)
    images = torch.stack([load_promptiqa_image(p, size) for p in photos[pairs : pairs + targets]])

    def once() -> None:
        with torch.inference_mode():
            isp = model.encode_prompt(prompt, scores)
            for i in range(0, targets, batch):
                model(images[i : i + batch], prompt=isp)
        model.clear_prompt_cache()

    def every_batch() -> None:
        with torch.inference_mode():
            for i in range(0, targets, batch):
                model.clear_prompt_cache()  # the official loop encodes the prompt again for each batch
                model(images[i : i + batch], prompt=(prompt, scores))

    with torch.inference_mode():  # warm-up (the allocator), on a small prompt
        model(images[:1], prompt=(prompt[:2], scores[:2]))
    model.clear_prompt_cache()
    med = interleaved({"encoded once": once, "encoded per batch": every_batch}, rounds)
    return {"model": variant, "pairs": pairs, "targets": targets, "batch": batch, "rounds": rounds,
            "seconds_per_target": {k: v / targets for k, v in med.items()},
            "speedup_of_encoding_once": med["encoded per batch"] / med["encoded once"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="gamma,promptiqa")
    p.add_argument("--gamma-model", default="gamma_vitb16_sdp")
    p.add_argument("--promptiqa-model", default="promptiqa")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "runs" / "bench-outputs.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    sections = args.sections.split(",")
    result: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if "gamma" in sections:
            photos = write_photos(Path(tmp), args.images, ((512, 384), (384, 512)))
            result["gamma"] = bench_gamma(args.gamma_model, photos, args.rounds)
            logger.info("gamma: %s", result["gamma"])
        if "promptiqa" in sections:
            folder = Path(tmp) / "piqa"
            folder.mkdir()
            photos = write_photos(folder, args.pairs + args.targets, ((512, 384), (640, 480)))
            result["promptiqa"] = bench_promptiqa(args.promptiqa_model, photos, args.pairs, args.targets, args.batch,
                                                  args.rounds)
            logger.info("promptiqa: %s", result["promptiqa"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
