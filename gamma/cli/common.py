"""What every ``gamma`` command shares: the usage error, argument types, ``-v``, and renamed options that still work."""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("gamma.cli")


class UsageError(Exception):
    """A problem with the command line or the setup; printed without a traceback, exit status 2."""

    @classmethod
    def from_library(cls, exc: BaseException) -> UsageError:
        """A library error, its Python keyword arguments (``prompt_set='sdp'``) said as the options that set them
        (``--prompt-set sdp``)."""
        return cls(cli_words(str(exc)))


class PeerError(Exception):
    """Sharded scoring: rank 0 reports the error (once); the other processes exit with the same status, silently."""


# Python keyword arguments in library messages -> the command line's options (a "(CLI: --x)" hint already there wins).
_CLI_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(?:allow_slow|allow_unsafe|prompt_set|precision|prompt)=\S+ \(CLI: (--[\w-]+)\)"), r"\1"),
    (re.compile(r"\ballow_slow=True\b"), "--allow-slow"),
    (re.compile(r"\ballow_unsafe=True\b"), "--allow-unsafe-pickle"),
    (re.compile(r"\bprompt_set_override=True\b"), "--prompt-set-override"),
    (re.compile(r"\bprompt_set=(['\"])(\w+)\1"), r"--prompt-set \2"),
    (re.compile(r"\bprecision=(['\"])(\w+)\1"), r"--precision \2"),
    (re.compile(r"\bprompt=(['\"])([^'\"]+)\1"), r"--isp \2"),
)


def cli_words(message: str) -> str:
    """``message`` with the Python keyword arguments it names said as command-line options."""
    for pattern, replacement in _CLI_WORDS:
        message = pattern.sub(replacement, message)
    return message


class CliWordsFilter(logging.Filter):
    """Says the library's log messages in command-line words (:func:`cli_words`): a warning that suggests
    ``prompt_set='sdp'`` reads ``--prompt-set sdp`` on the command line. Put on the handler that prints them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        worded = cli_words(message)
        if worded != message:
            record.msg, record.args = worded, None
        return True


def add_prompt_set_override(parser: argparse.ArgumentParser) -> None:
    """``--prompt-set-override``: a ``--prompt-set`` that contradicts the prompt set the weight file records is meant
    (the library's ``prompt_set_override=True``; :func:`gamma.hub.resolve_prompt_set`)."""
    parser.add_argument("--prompt-set-override", action="store_true", help="use --prompt-set even where the weight "
                        "file records another prompt set (deliberately: other prompts on the same weights); without "
                        "it that is an error")


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
