"""``gamma report``: one HTML page about a scores file (gamma/report.py); its arguments and ``run`` live with the tool."""

from ..report import add_parser, run

NAME = "report"

__all__ = ["NAME", "add_parser", "run"]
