"""What every ``gamma`` command shares: the usage error, argument types, ``-v``, and renamed options that still work."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("gamma.cli")


class UsageError(Exception):
    """A problem with the command line or the setup; printed without a traceback, exit status 2."""


class PeerError(Exception):
    """Sharded scoring: rank 0 reports the error (once); the other processes exit with the same status, silently."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_verbose(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``-v/--verbose`` before the command (``top``) and after it: a command's copy has no default of its own, so
    ``gamma -v score ...`` is not undone by the score parser's default."""
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="log debug messages")


class _RenamedOption(argparse.Action):
    """An option's former name: stores what the new option would, and notes its use for :func:`warn_renamed`."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        renamed = dict(getattr(namespace, "renamed_options", {}))
        renamed[option_string or self.option_strings[0]] = self.new
        namespace.renamed_options = renamed


def add_renamed(parser: argparse.ArgumentParser, old: str, new: argparse.Action) -> None:
    """Accept ``old``, the former name of the option ``new`` (what ``add_argument`` returned): the same value, hidden
    from ``--help``; :func:`warn_renamed` warns once per run that it was used."""
    if new.nargs == 0:  # a flag (store_true)
        parser.add_argument(old, action=_RenamedOption, dest=new.dest, new=new.option_strings[0], nargs=0,
                            const=new.const)
    else:
        parser.add_argument(old, action=_RenamedOption, dest=new.dest, new=new.option_strings[0], type=new.type,
                            choices=new.choices, metavar=new.metavar)


def warn_renamed(args: argparse.Namespace) -> None:
    """One warning per former option name used on this command line (after logging is set up)."""
    for old, new in getattr(args, "renamed_options", {}).items():
        logger.warning("%s is now called %s; the old name still works but will go in a later release", old, new)
