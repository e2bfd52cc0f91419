"""``gamma train ARGS`` is ``gamma-train ARGS`` (:func:`gamma.train.main.cli`): the words after ``train`` go to the
trainer's own parser unparsed (``TAKES_ARGV``)."""

from __future__ import annotations

import argparse
from typing import Any

NAME = "train"
TAKES_ARGV = True  # run() gets args.argv, the rest of the command line


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return subparsers.add_parser(NAME, help="train or fine-tune (arguments are passed to gamma.train)", add_help=False)


def run(args: argparse.Namespace) -> int:
    from ..train.main import cli as train_cli

    return int(train_cli(list(args.argv)) or 0)
