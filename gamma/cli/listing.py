"""``gamma list``: model variants, known weights (and whether they are found), scenes, crop modes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..archs.crops import CROP_MODES
from ..hub import KNOWN_WEIGHTS, WeightsNotFoundError, resolve_weights, weights_dir
from ..prompts import SCENES

NAME = "list"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return subparsers.add_parser(NAME, help="model variants, known weights (and whether they are found), scenes, "
                                 "crop modes")


def run(args: argparse.Namespace) -> int:
    from ..families import FAMILIES

    out = sys.stdout
    print("model variants (--model):", file=out)
    for family in FAMILIES.values():  # the family table, in registration order
        note = f"  ({family.title}: needs --isp)" if family.scoring is not None and family.scoring.takes_isp else ""
        for name in family.variants:
            print(f"  {name}{note}", file=out)
    print(f"weights (--weights NAME or a path; cache folder {weights_dir()}):", file=out)
    for name, entry in KNOWN_WEIGHTS.items():
        try:
            where = f"found: {resolve_weights(name, download=False)}"
        except WeightsNotFoundError:
            where = f"not found (set {entry.env_var} or place {entry.filename} in the cache folder)"
        print(f"  {name:<10} {entry.description}; {where}", file=out)
    print(f"scenes (--scene): {', '.join(SCENES)}", file=out)
    print(f"crop modes (--crops): {', '.join(CROP_MODES)}", file=out)
    return 0
