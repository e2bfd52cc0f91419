"""The ``gamma`` command: score images, list what is available, analyse experts, train.

    gamma score photos/ --weights Gamma.pth --out scores.csv        # recursive; streaming; resumable
    gamma score 'shots/**/*.png' --weights Gamma-Prompt.pth --prompt-set sdp --scene underwater --out s.jsonl
    gamma score photos/ --weights Gamma.pth --attributes --distribution --out s.csv    # + std, p_*, sharpness ...
    gamma score photos/ --weights Gamma-Prompt.pth --prompt-set sdp --scene auto --out s.csv  # + scene, per image
    gamma score photos/ --model promptiqa --weights best_model.pth.tar --isp isp.csv   # PromptIQA
    gamma score photos/ --weights Gamma.pth --isp isp.csv --out s.csv          # + adapted (to isp.csv's scale)
    gamma score --list files.txt --weights Gamma.pth --out scores.csv   # a list of paths, read lazily
    torchrun --nproc_per_node=8 -m gamma score --list files.txt --out scores.csv   # sharded over 8 processes/GPUs
    gamma convert Gamma.pth Gamma.safetensors                          # loads memory-mapped, in seconds
    gamma list
    gamma --version

Each command is a module of this package named in :data:`COMMANDS`, with ``NAME``, ``add_parser(subparsers)`` (its
arguments; returns its parser) and ``run(args)`` (the exit status; a :class:`~gamma.cli.common.UsageError` becomes
``gamma: error: ...`` and status 2). A module with ``TAKES_ARGV = True`` gets the words after its name unparsed, as
``args.argv`` (``gamma train``, whose parser is the trainer's). Adding a command is a module and its name in
:data:`COMMANDS`.

What a command runs (the model stack: open_clip and torchvision take seconds to import; scipy, the trainer, the
process group) is imported inside its ``run``, not at the top of its module: the parser is built from light modules
only, so ``gamma --help`` and ``gamma --version`` cost torch's import and little more. The one exception in gamma to
imports at the top of a module, for its own modules as for heavy third-party packages.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from .. import __version__
from .common import CliWordsFilter, PeerError, UsageError, add_verbose, warn_renamed

# The modules of the commands, in the order `gamma --help` lists them.
COMMANDS: tuple[str, ...] = ("score", "convert", "export", "listing", "analyze", "train", "demo", "report", "plot")

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]


def _command_modules() -> list[ModuleType]:
    return [importlib.import_module(f".{name}", __name__) for name in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    """The ``gamma`` parser: one sub-command per module in :data:`COMMANDS`; ``args.run(args)`` runs the command."""
    parser = argparse.ArgumentParser(
        prog="gamma", description="Gamma image quality and aesthetics assessment (MoAE + scene-based prompts).",
    )
    parser.add_argument("--version", action="version", version=f"gamma {__version__}")
    add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        command = module.add_parser(sub)
        command.set_defaults(run=module.run)
        if not getattr(module, "TAKES_ARGV", False):
            add_verbose(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gamma`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for module in _command_modules():
        if getattr(module, "TAKES_ARGV", False) and argv[:1] == [module.NAME]:
            return _run(module.run, argparse.Namespace(command=module.NAME, argv=argv[1:], verbose=False))
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    warn_renamed(args)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    words, handlers = CliWordsFilter(), list(logging.getLogger().handlers)
    for handler in handlers:  # the library's advice in the command line's words, for this command only
        handler.addFilter(words)
    try:
        return _run(args.run, args)
    finally:
        for handler in handlers:
            handler.removeFilter(words)


def _run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return command(args)
    except UsageError as exc:
        print(f"gamma: error: {exc}", file=sys.stderr)
        return 2
    except PeerError:  # sharded scoring: rank 0 printed it
        return 2
    except BrokenPipeError:  # `gamma score ... | head`
        sys.stderr.close()
        return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="gamma: %(levelname)s: %(message)s")

