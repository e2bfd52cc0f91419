"""``gamma analyze routing|experts``: the expert analyses of :mod:`gamma.analysis`; prints the files written."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..archs.crops import CROP_MODES
from ..hub import WeightsNotFoundError
from ..prompts import PROMPT_SETS, SCENES
from ..weights import CheckpointError
from .common import UsageError, add_prompt_set_override, add_renamed, add_verbose

NAME = "analyze"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="expert analysis: router weights per block and scene; single-expert "
                                   "scores")
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", "-w", help="weight file or known name (default: find the release file)")
    common.add_argument("--model", help=argparse.SUPPRESS)
    prompt_set = common.add_argument("--prompt-set", choices=PROMPT_SETS, help="the CLIP text prompts the weights "
                                     "expect")
    add_renamed(common, "--prompt", prompt_set)
    add_prompt_set_override(common)
    common.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    common.add_argument("--batch-size", "-b", type=int, default=8)
    common.add_argument("--crops", choices=CROP_MODES, help="crop protocol")
    common.add_argument("--num-crops", type=int, help="crops per image")
    common.add_argument("--out-dir", "-o", default="gamma_analysis", help="output folder (default gamma_analysis)")
    add_verbose(common)

    r = sub.add_parser("routing", parents=[common], help="mean router weight per block and expert for each group")
    r.add_argument("groups", nargs="+", metavar="NAME=PATH[:SCENE]",
                   help="a group of images (folder, file or glob) and its name, e.g. koniq10k=data/koniq/512x384 "
                        "or mine=photos/:natural; a dataset or scene name gives SDP models their scene")
    r.add_argument("--max-images", type=int, help="use at most this many images per group")
    r.add_argument("--plot", action="store_true", help="also draw routing_heatmap.png: groups x experts per block")

    e = sub.add_parser("experts", parents=[common], help="SRCC/PLCC with all experts and with each one alone (Table 6)")
    e.add_argument("meta", help="CSV: image path (relative to --root), MOS; more columns ignored")
    e.add_argument("--root", help="image folder (default: the CSV's folder)")
    e.add_argument("--scene", help=f"scene for SDP models: {', '.join(SCENES)}")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..analysis import (
        EXPERT_COLUMNS,
        read_labels,
        routing_statistics,
        single_expert_evaluation,
        write_routing,
        write_rows,
    )
    from ..families import is_family
    from ..scorer import Scorer

    try:
        scorer = Scorer(args.weights, model=args.model, prompt_set=args.prompt_set,
                        prompt_set_override=args.prompt_set_override, device=args.device,
                        batch_size=args.batch_size, crops=args.crops, num_crops=args.num_crops, num_workers=0)
    except (WeightsNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError.from_library(exc) from None
    model = scorer.model
    if not is_family(model, "gamma"):
        raise UsageError(f"gamma analyze reads Gamma's MoAE routers and experts; {args.weights or args.model} holds a "
                         f"{type(model).__name__}, which has none")
    try:
        if args.analysis == "routing":
            groups, scenes = _parse_groups(args.groups)
            rows = routing_statistics(model, groups, scenes=scenes, batch_size=args.batch_size,
                                      device=scorer.device, max_images=args.max_images)
            written = write_routing(rows, args.out_dir)
            if args.plot:  # the heat maps of gamma.plots (Fig. 4-5 kind)
                from ..plots import plot_routing_heatmaps

                written.append(plot_routing_heatmaps(rows, Path(args.out_dir) / "routing_heatmap.png"))
        else:
            paths, labels = read_labels(args.meta, args.root)
            rows = single_expert_evaluation(model, paths, labels, scene=args.scene, batch_size=args.batch_size,
                                            device=scorer.device)
            written = [write_rows(rows, Path(args.out_dir) / "single_expert.csv", EXPERT_COLUMNS)]
            for row in rows:
                print(f"{row['setting']:<16} SRCC {row['srcc']:.4f}  PLCC {row['plcc']:.4f}  ({row['images']} images)")
    except ValueError as exc:
        raise UsageError.from_library(exc) from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _parse_groups(specs: Sequence[str]) -> tuple[dict[str, str], dict[str, str | None]]:
    """``NAME=PATH[:SCENE]`` arguments -> (name -> path, name -> scene)."""
    groups: dict[str, str] = {}
    scenes: dict[str, str | None] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"a group is NAME=PATH[:SCENE], got {spec!r}")
        path, scene = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and head and not os.path.exists(rest) and "/" not in tail and "\\" not in tail:
            path, scene = head, tail
        groups[name], scenes[name] = path, scene
    return groups, scenes
