"""``gamma report``: one HTML page about a scores file; its arguments and ``run`` live in gamma/report.py."""

from ..report import add_parser, run

NAME = "report"

__all__ = ["NAME", "add_parser", "run"]
