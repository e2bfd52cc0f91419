"""``gamma plot``: training curves and tables as PNGs (gamma/plots.py); its arguments and ``run`` live with the tool."""

from ..plots import add_parser, run

NAME = "plot"

__all__ = ["NAME", "add_parser", "run"]
