"""``gamma export SRC --onnx FILE``: an ONNX graph of a Gamma model (:func:`gamma.export.export_onnx`) or of a PromptIQA
model with an ISP set baked in (``--isp``, :func:`gamma.export.export_promptiqa_onnx`), optionally an int8
copy; score with it by ``gamma score ... --backend onnxruntime --weights FILE``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..hub import KNOWN_WEIGHTS, WeightsNotFoundError
from ..prompts import PROMPT_SETS
from ..weights import CheckpointError
from .common import UsageError, add_renamed

NAME = "export"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    release_names = ", ".join(name for name, entry in KNOWN_WEIGHTS.items() if entry.prompt_set)
    x = subparsers.add_parser(NAME, help="export a Gamma model (or PromptIQA with its ISPs) to ONNX",
                              description="Write an ONNX graph of a Gamma model with its text features baked in; "
                              "input a batch of 224x224 crops in [0, 1] (CLIP normalisation inside), a dynamic batch "
                              "axis; see docs/scale.md for the contract. Score with it: gamma score ... --backend "
                              "onnxruntime --weights gamma.onnx")
    x.add_argument("source", nargs="?", help=f"weight file, or a known name ({release_names}); with --model alone: "
                   "random weights")
    x.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    x.add_argument("--model", help=argparse.SUPPRESS)
    prompt_set = x.add_argument("--prompt-set", choices=PROMPT_SETS, help="the CLIP text prompts the weights expect")
    add_renamed(x, "--prompt", prompt_set)
    x.add_argument("--scene", help="SDP models: bake this scene only (default: every scene)")
    x.add_argument("--outputs", default="score,distribution,attributes", help="comma-separated: score, "
                   "distribution, attributes (default: all three)")
    x.add_argument("--isp", metavar="CSV", help="PromptIQA: the image-score pairs to bake in (CSV image,score; "
                   "paths relative to it): the graph scores against them")
    x.add_argument("--int8", metavar="FILE", help="also write an int8 copy (onnxruntime dynamic quantisation)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing file")
    x.add_argument("--allow-unsafe-pickle", action="store_true", help="allow a source that needs a full unpickle")
    return x


def run(args: argparse.Namespace) -> int:
    """Export; print what was written."""
    targets = [Path(args.onnx)] + ([Path(args.int8)] if args.int8 else [])
    for target in targets:
        if target.suffix != ".onnx":
            raise UsageError(f"the exported file must end in .onnx, got {target}")
        if target.exists() and not args.overwrite:
            raise UsageError(f"{target} exists: pass --overwrite to replace it")
    if args.source is None and args.model is None:
        raise UsageError("give the weights to export (a file or a known name)")
    try:
        import onnx  # noqa: F401 - the `onnx` extra
    except ImportError:
        raise UsageError("gamma export needs onnx and onnxruntime: pip install 'gamma-iqa[onnx]'") from None
    import torch

    from ..export import export_onnx, export_promptiqa_onnx, quantize_onnx
    from ..factory import create_model
    from ..families import is_family
    from ..prompt_file import PromptFileError

    torch.manual_seed(0)  # --model alone: the same random weights as `gamma score --model` uses
    try:
        model = create_model(args.model, pretrained=args.source, allow_unsafe=args.allow_unsafe_pickle,
                             **({"prompt_set": args.prompt_set} if args.prompt_set else {}))
        if is_family(model, "promptiqa"):
            if args.isp is None:
                raise UsageError("a PromptIQA model is exported with its image-score pairs baked in: pass --isp CSV")
            from ..scorer import Scorer  # the ISP set read and encoded as `gamma score --isp` does

            scorer = Scorer(model=model, isp=args.isp, num_workers=0, device="cpu")
            written = export_promptiqa_onnx(model, args.onnx, scorer.encoded_isp, isp_source=str(args.isp),
                                            backend=scorer.backend, source=args.source or "")
        else:
            if args.isp is not None:
                raise UsageError("--isp applies to PromptIQA models (their ISP set is baked into the graph)")
            outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
            written = export_onnx(model, args.onnx, scene=args.scene, outputs=outputs, source=args.source or "")
    except (WeightsNotFoundError, CheckpointError, PromptFileError, ValueError) as exc:
        raise UsageError.from_library(exc) from None
    print(f"wrote {written} ({written.stat().st_size / 2**20:,.1f} MiB)")
    if args.int8:
        quantized = quantize_onnx(written, args.int8)
        print(f"wrote {quantized} ({quantized.stat().st_size / 2**20:,.1f} MiB, int8)")
    return 0
