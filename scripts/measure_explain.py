#!/usr/bin/env python
"""Measure, on held-out data, what docs/explain.md says needs measuring: the automatic scene and the level std.

    python scripts/measure_explain.py -opt options/demo_gamma_sdp.yml \\
        --checkpoint experiments/demo_gamma_sdp/split_1/best.pth --json explain.json

The option file gives the datasets (the held-out part of each ``data`` / ``eval_data`` entry of the run's split, each
with its scene) and the test-time crops (``eval.*``); ``key=value`` arguments override it as for the trainer. For each
dataset, and pooled over all of them:

- **automatic scene** (SDP models only): the accuracy of ``scene="auto"`` against the entries' scenes (among the
  model's ``auto_scenes``, and among the scenes present in the data), and the SRCC / PLCC of the scores with the
  chosen scenes against those with the true scenes (``lost`` = true - auto);
- **std against error**: Spearman and Pearson correlation between the level distribution's std and the absolute
  error |score - normalised MOS|, with the true scenes. A positive value means larger errors where the std is larger;
  nothing more is claimed (the std is not calibrated).

It prints a markdown table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch.utils.data import DataLoader

import gamma
from gamma.data import build_dataset, collate
from gamma.metrics import evaluate_scores
from gamma.prompts import SCENES
from gamma.train.config import load_config

logger = logging.getLogger("measure_explain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-opt", "--opt", required=True, help="option file naming the datasets and the test-time crops")
    p.add_argument("--checkpoint", required=True, help="a Gamma checkpoint (ours or the release's)")
    p.add_argument("--descriptions", choices=("all", "first"), default="all",
                   help="scene descriptions for 'auto': every one (as shipped) or each scene's first only")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides (split_index=2 ...)")
    return p.parse_args(argv)


def assess_dataset(model: gamma.GammaModel, ds: Any, batch_size: int, sdp: bool,
                   present: list[str]) -> dict[str, np.ndarray | list[str]]:
    """Scores and stds with the true scenes; with SDP also the scores and scenes of ``"auto"`` (and the scene picked
    among ``present``)."""
    out: dict[str, list] = {"score": [], "std": [], "auto_score": [], "auto_scene": [], "present_scene": [],
                            "scene": []}
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    with torch.inference_mode():
        for batch in loader:
            images = batch["img"]
            images = list(images) if isinstance(images, torch.Tensor) else images
            groups: dict[tuple, list[int]] = {}
            for i, img in enumerate(images):
                groups.setdefault(tuple(img.shape), []).append(i)
            rows: dict[int, tuple] = {}
            for idx in groups.values():
                x = torch.stack([images[i] for i in idx])
                scenes = [batch["scene"][i] for i in idx]
                named = model.assess(x, scene=scenes)
                auto = model.assess(x, scene="auto") if sdp else None
                picked = model.detect_scene(x, present) if sdp else [None] * len(idx)
                for j, i in enumerate(idx):
                    rows[i] = (float(named.score[j]), float(named.std[j]),
                               float(auto.score[j]) if auto is not None else np.nan,
                               auto.scenes[j] if auto is not None else None, picked[j], scenes[j])
            for i in range(len(images)):
                for key, value in zip(out, rows[i], strict=True):
                    out[key].append(value)
    return {k: (np.asarray(v, dtype=np.float64) if k in ("score", "std", "auto_score") else v) for k, v in out.items()}


def figures(parts: dict[str, Any], labels: np.ndarray, sdp: bool) -> dict[str, Any]:
    err = np.abs(parts["score"] - labels)
    row: dict[str, Any] = {"n": int(len(labels)), "named": evaluate_scores(parts["score"], labels),
                           "mean_abs_error": float(err.mean()), "mean_std": float(parts["std"].mean()),
                           "std_vs_abs_error": {"spearman": float(stats.spearmanr(parts["std"], err).statistic),
                                                "pearson": float(stats.pearsonr(parts["std"], err).statistic)}}
    if sdp:
        auto = evaluate_scores(parts["auto_score"], labels)
        truth = parts["scene"]
        row.update(auto=auto, srcc_lost=row["named"]["srcc"] - auto["srcc"],
                   plcc_lost=row["named"]["plcc"] - auto["plcc"],
                   scene_accuracy=float(np.mean([a == t for a, t in zip(parts["auto_scene"], truth, strict=True)])),
                   scene_accuracy_present=float(np.mean([a == t for a, t in zip(parts["present_scene"], truth,
                                                                                  strict=True)])))
    return row


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    cfg = load_config(args.opt, args.overrides)
    model = gamma.create_model(None, pretrained=args.checkpoint).eval()
    model.set_crop_protocol(mode=cfg.eval.crop_mode, num=cfg.eval.crops, seed=cfg.eval.crop_seed)
    sdp = model.config.prompt_set == "sdp"
    if args.descriptions == "first":
        model.scene_tokens = model.scene_tokens[:, :1]  # (scenes, 1, C), before any use fills the text cache
    entries = [*cfg.data, *cfg.eval_data]
    present = sorted({e.scene for e in entries}, key=SCENES.index)
    per, pooled = {}, {"score": [], "std": [], "auto_score": [], "auto_scene": [], "present_scene": [], "scene": []}
    all_labels = []
    for entry in entries:
        ds = build_dataset(entry, entry.eval_key)
        parts = assess_dataset(model, ds, cfg.eval.batch_size, sdp, present)
        labels = np.asarray(ds.labels, dtype=np.float64)
        per[entry.name] = figures(parts, labels, sdp)
        for k in pooled:
            pooled[k].extend(list(parts[k]))
        all_labels.append(labels)
        logger.info("%s: %d held-out images", entry.name, len(ds))
    pooled_arrays = {k: (np.asarray(v, dtype=np.float64) if k in ("score", "std", "auto_score") else v)
                     for k, v in pooled.items()}
    per["all (pooled)"] = figures(pooled_arrays, np.concatenate(all_labels), sdp)
    result = {"checkpoint": str(args.checkpoint), "option_file": str(args.opt), "split_index": cfg.split_index,
              "prompt_set": model.config.prompt_set, "crops": f"{cfg.eval.crop_mode} x {cfg.eval.crops}",
              "auto_scenes": list(model.auto_scenes), "scenes_present": present, "descriptions": args.descriptions,
              "datasets": per}
    head = "| dataset | n | SRCC / PLCC (true scene) | "
    head += "SRCC / PLCC (auto) | SRCC lost | scene acc. (auto / present) | " if sdp else ""
    print(f"{args.checkpoint}: {model.config.prompt_set} prompts, crops {result['crops']}, split {cfg.split_index}\n")
    print(head + "std vs abs. error (Spearman / Pearson) |")
    print("|---" * (4 + 3 * sdp) + "|")
    for name, r in per.items():
        cells = [name, str(r["n"]), f"{r['named']['srcc']:.3f} / {r['named']['plcc']:.3f}"]
        if sdp:
            cells += [f"{r['auto']['srcc']:.3f} / {r['auto']['plcc']:.3f}", f"{r['srcc_lost']:+.3f}",
                      f"{r['scene_accuracy']:.3f} / {r['scene_accuracy_present']:.3f}"]
        cells.append(f"{r['std_vs_abs_error']['spearman']:+.3f} / {r['std_vs_abs_error']['pearson']:+.3f}")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
