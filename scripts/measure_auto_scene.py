#!/usr/bin/env python
"""Measure how often ``scene="auto"`` picks the right scene, on datasets whose scene is known (docs/explain.md).

    python scripts/measure_auto_scene.py --checkpoint experiments/demo_clip/split_1/clip_pretrained.pth \\
        --dataset demo_data/synth_natural=natural --dataset demo_data/synth_underwater=underwater \\
        --dataset demo_data/synth_aigc=aigc

Each ``--dataset FOLDER=SCENE`` is a folder with ``meta_info.csv`` (column 0: image path relative to the folder); when
it also holds ``split.pkl``, only the held-out part of ``--split`` is used (images whose content the checkpoint may not
have seen in training). Three ways of choosing a scene are compared, all zero-shot through the checkpoint's towers:

- ``describe`` (what ``scene="auto"`` does): the descriptions of ``gamma.prompts.SCENE_DESCRIPTIONS``, averaged per
  scene, against the image feature before the adapter, among ``--candidates`` (default: the auto scenes);
- ``describe-present``: the same among the scenes present in the measured datasets only (an easier upper bound);
- ``sdp-fit``: the scene whose five SDP level prompts fit the image best (log-sum-exp of their scaled cosines), with
  the same image feature.

It prints a markdown table (accuracy per dataset and overall, and the confusion of ``describe``); ``--json`` writes
the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

import gamma
from gamma.archs.clip import encode_text
from gamma.data.meta import read_meta
from gamma.data.splits import load_split_file, split_indices
from gamma.io import load_image
from gamma.prompts import AUTO_SCENES, SCENES, SDP_PROMPTS, canonical_scene

logger = logging.getLogger("measure_auto_scene")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="any checkpoint gamma loads (plain CLIP, release, ours)")
    p.add_argument("--dataset", action="append", required=True, metavar="FOLDER=SCENE",
                   help="a folder with meta_info.csv (and optionally split.pkl) whose images all show SCENE")
    p.add_argument("--split", type=int, default=1, help="split index of split.pkl (default 1)")
    p.add_argument("--part", default="val", help="held-out part of the split (default val)")
    p.add_argument("--candidates", nargs="+", default=list(AUTO_SCENES), help="scenes to choose from")
    p.add_argument("--crops", default=None, help="test-time crop mode (default: the model's)")
    p.add_argument("--descriptions", choices=("all", "first"), default="all",
                   help="describe with every description of a scene (as shipped) or its first one only (for small "
                        "models that never saw the other descriptions' words)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def dataset_images(folder: Path, split: int, part: str) -> list[Path]:
    table = read_meta(folder / "meta_info.csv")
    rows = range(len(table))
    if (folder / "split.pkl").is_file():
        rows = split_indices(load_split_file(folder / "split.pkl"), split, part, len(table), str(folder / "split.pkl"))
    return [folder / table.records[r].path for r in rows]


def sdp_text(model: gamma.GammaModel, rows: list[int]) -> torch.Tensor:
    """Normalised SDP level-prompt features (K, 5, E) of the candidate scenes, through the model's text tower."""
    prompts = [p for r in rows for p in SDP_PROMPTS[SCENES[r]]]
    tokens = open_clip.tokenize(prompts, context_length=model.config.text.context_length)
    return F.normalize(encode_text(model.clip_model, tokens), dim=-1).view(len(rows), 5, -1)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model = gamma.create_model(None, pretrained=args.checkpoint)
    if args.crops:
        model.set_crop_protocol(mode=args.crops)
    if args.descriptions == "first":
        model.scene_tokens = model.scene_tokens[:, :1]  # (5 scenes, 1, C), before any use fills the text cache
    datasets = []
    for spec in args.dataset:
        folder, _, scene = spec.rpartition("=")
        datasets.append((Path(folder), canonical_scene(scene)))
    candidates = [canonical_scene(c) for c in args.candidates]
    present = sorted({s for _, s in datasets}, key=SCENES.index)
    methods = {"describe": candidates, "describe-present": present, "sdp-fit": candidates}
    correct = {m: Counter() for m in methods}
    totals: Counter = Counter()
    confusion: Counter = Counter()
    rows = [SCENES.index(c) for c in candidates]
    with torch.inference_mode():
        text = sdp_text(model, rows)  # (K, 5, E)
        scale = model.clip_model.logit_scale.exp()
        for folder, scene in datasets:
            files = dataset_images(folder, args.split, args.part)
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for f in files:
                img = load_image(f)
                by_shape.setdefault(tuple(img.shape), []).append(img)
            for imgs in by_shape.values():
                for i in range(0, len(imgs), args.batch_size):
                    x = torch.stack(imgs[i : i + args.batch_size])
                    for method in ("describe", "describe-present"):
                        picked = model.detect_scene(x, methods[method])
                        correct[method][folder.name] += sum(p == scene for p in picked)
                        if method == "describe":
                            confusion.update((scene, p) for p in picked)
                    feats, weights = model._crop_features(x)  # (U, B, E): the same crops as the score
                    image = F.normalize(feats, dim=-1)
                    fit = torch.logsumexp(scale * torch.einsum("ube,kle->ubkl", image, text), dim=-1)  # (U, B, K)
                    fit = (weights.to(fit).view(-1, 1, 1) * fit).sum(0)
                    picked = [candidates[k] for k in fit.argmax(-1).tolist()]
                    correct["sdp-fit"][folder.name] += sum(p == scene for p in picked)
                    totals[folder.name] += x.shape[0]
            logger.info("%s (%s): %d images", folder.name, scene, totals[folder.name])

    names = [f.name for f, _ in datasets]
    result = {
        "checkpoint": str(args.checkpoint),
        "towers": model.tower_description(),
        "candidates": candidates,
        "descriptions": args.descriptions,
        "images": dict(totals),
        "accuracy": {m: {**{n: correct[m][n] / totals[n] for n in names},
                         "all": sum(correct[m].values()) / sum(totals.values())} for m in methods},
        "confusion_describe": {f"{t}->{p}": c for (t, p), c in sorted(confusion.items())},
    }
    print(f"Automatic scene on {args.checkpoint} ({result['towers']}); candidates: {', '.join(candidates)}; "
          f"descriptions: {args.descriptions}\n")
    print("| method | " + " | ".join(f"{n} ({totals[n]})" for n in names) + " | all |")
    print("|---" * (len(names) + 2) + "|")
    for m in methods:
        acc = result["accuracy"][m]
        print(f"| {m} | " + " | ".join(f"{acc[n]:.3f}" for n in names) + f" | {acc['all']:.3f} |")
    print("\nConfusion of `describe` (true scene -> picked): " + ", ".join(
        f"{k}: {v}" for k, v in result["confusion_describe"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
