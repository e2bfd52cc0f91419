"""``gamma demo``: the local web page (gamma/demo/); its arguments and ``run`` live with the tool."""

from ..demo import add_parser, run

NAME = "demo"

__all__ = ["NAME", "add_parser", "run"]
