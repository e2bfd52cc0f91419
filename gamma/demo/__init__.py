"""``gamma demo``: a local web page for scoring, ranking, adapting and reading the experts (the ``demo`` extra).

This module only builds the command line; :mod:`gamma.demo.app` (Gradio, FastAPI) is imported when the command runs,
so ``import gamma`` and ``gamma --help`` never import Gradio.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gamma demo``."""
    from ..cli.common import add_prompt_set_override
    from ..prompts import PROMPT_SETS

    parser.add_argument("--weights", "-w", help="weight file, or a known name (default: find the release file as "
                        "`gamma score` does); e.g. experiments/demo_gamma/split_1/best.pth after the offline demo")
    parser.add_argument("--prompt-set", "--prompt", dest="prompt_set", choices=PROMPT_SETS,
                        help="prompts the weights expect (default: the one the file records, else by the release's "
                        "file names: naive for Gamma.pth, sdp for Gamma-Prompt.pth, else naive)")
    add_prompt_set_override(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    parser.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests scored at once; the rest queue "
                        "(default 1)")
    parser.add_argument("--max-upload-mb", type=float, default=25, help="largest upload accepted (default 25 MB)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image decoded, in pixels "
                        "(default 40 million)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``gamma demo`` on a ``gamma`` sub-command parser."""
    parser = subparsers.add_parser("demo", help="a local web page: score, rank, adapt, see the experts (extra: demo)",
                                   description="Serve the demo page on http://HOST:PORT (this machine only unless "
                                   "--host says otherwise; never shared publicly). POST /score takes one image "
                                   "(multipart field 'file') and returns its scores as JSON.")
    add_arguments(parser)
    return parser


def make_service(args: argparse.Namespace) -> object:
    """A :class:`~gamma.demo.service.DemoService` for the arguments; missing weights are reported, not raised."""
    from ..hub import WeightsNotFoundError, resolve_weights
    from .service import DemoService

    weights, missing = None, None
    try:
        weights = resolve_weights("gamma", args.weights, download=False)
    except WeightsNotFoundError as exc:
        missing = str(exc)
    return DemoService(weights, missing=missing, prompt_set=args.prompt_set,
                       prompt_set_override=getattr(args, "prompt_set_override", False), device=args.device,
                       max_pixels=args.max_pixels, max_upload_bytes=int(args.max_upload_mb * 2**20))


def run(args: argparse.Namespace) -> int:
    """Serve the page until Ctrl-C; returns the exit status."""
    t0 = time.perf_counter()
    try:
        from .app import DemoServer
    except ImportError as exc:
        print(f"gamma: error: gamma demo needs the demo extra (pip install 'gamma-iqa[demo]'): {exc}", file=sys.stderr)
        return 2
    service = make_service(args)
    if service.weights is None:
        print(f"gamma demo: NO WEIGHTS FOUND: {service.missing}\ngamma demo: the page opens and says so; start it "
              "with --weights FILE to score.", file=sys.stderr)
    else:
        try:
            print(f"gamma demo: model: {service.describe()}", file=sys.stderr)
        except (OSError, ValueError) as exc:
            from ..cli.common import cli_words  # the library's advice in the command line's words

            print(f"gamma: error: cannot load {service.weights}: {cli_words(str(exc))}", file=sys.stderr)
            return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"gamma demo: binding {args.host}: other machines can reach this page", file=sys.stderr)
    server = DemoServer(service, host=args.host, port=args.port, concurrency=args.concurrency)
    url = server.start()
    print(f"gamma demo: serving {url}  (POST {url}/score; ready in {time.perf_counter() - t0:.1f} s; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        while server.thread.is_alive():
            server.thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
