"""``gamma convert SRC DST``: a weight file in gamma's safetensors format (:func:`gamma.factory.convert_checkpoint`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..hub import KNOWN_WEIGHTS, WeightsNotFoundError
from ..prompts import PROMPT_SETS
from ..weights import STORED_DTYPES, CheckpointError
from .common import UsageError, add_prompt_set_override, add_renamed

NAME = "convert"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    release_names = ", ".join(name for name, entry in KNOWN_WEIGHTS.items() if entry.prompt_set)
    c = subparsers.add_parser(NAME, help="write a weight file in gamma's safetensors format (loads in seconds)",
                              description="Convert the release's .pth (or any weight file gamma reads) into gamma's "
                              "own format: safetensors with the model config, loaded memory-mapped. The weight lookup "
                              "uses X.safetensors instead of X.pth beside it while X.pth is unchanged.")
    c.add_argument("source", help=f"weight file, or a known name ({release_names})")
    c.add_argument("dest", help="the .safetensors file to write")
    c.add_argument("--precision", choices=list(STORED_DTYPES), default="fp32", help="store the model in this "
                   "precision (default fp32: exact); bf16/fp16 store the image tower's matmul weights as "
                   "to_precision does (a smaller file that loads as a bf16/fp16 model; scores as with --precision)")
    prompt_set = c.add_argument("--prompt-set", choices=PROMPT_SETS, help="the CLIP text prompts the weights expect, "
                                "recorded in DEST (default: the one the source records, else from a known name or "
                                "file name, else naive)")
    add_renamed(c, "--prompt", prompt_set)
    add_prompt_set_override(c)
    c.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    c.add_argument("--allow-unsafe-pickle", action="store_true", help="allow a source that needs a full unpickle")
    return c


def run(args: argparse.Namespace) -> int:
    """Convert; print what was written."""
    from ..factory import convert_checkpoint

    dest = Path(args.dest)
    if dest.suffix != ".safetensors":
        raise UsageError(f"the converted file must end in .safetensors, got {dest}")
    if dest.exists() and not args.overwrite:
        raise UsageError(f"{dest} exists: pass --overwrite to replace it")
    try:
        written = convert_checkpoint(args.source, dest, precision=args.precision, prompt_set=args.prompt_set,
                                     prompt_set_override=args.prompt_set_override,
                                     allow_unsafe=args.allow_unsafe_pickle)
    except (WeightsNotFoundError, CheckpointError, ValueError) as exc:
        raise UsageError.from_library(exc) from None
    size = written.stat().st_size / 2**20
    print(f"wrote {written} ({size:,.0f} MiB, {args.precision} weights)")
    return 0
