"""``gamma report scores.csv``: one self-contained HTML page about a table of scores (the output of ``gamma score``).

The page holds the score histogram, the best and worst images (thumbnails embedded with ``--images``, else their
names), scatter plots of the score against each attribute when those columns exist, and a summary per folder. Figures
are PNGs and thumbnails JPEGs, embedded as ``data:`` URIs: the file can be mailed or opened offline, and loads nothing.
Its size is bounded whatever the number of rows: the scatter plots draw at most :data:`MAX_SCATTER_POINTS` sampled
rows, :data:`SHOWN` thumbnails each side, and at most :data:`MAX_FOLDERS` folders. pandas and matplotlib (the
``analysis`` extra) are imported when a report is written.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .prompts import ATTRIBUTES

logger = logging.getLogger(__name__)

#: Best and worst images shown.
SHOWN = 12
#: Rows drawn in each scatter plot (a seeded sample above this).
MAX_SCATTER_POINTS = 5000
#: Folders listed in the per-folder summary (the largest).
MAX_FOLDERS = 50
#: Longest side of an embedded thumbnail, in pixels.
THUMB_SIZE = 160
#: Images larger than this are not opened for a thumbnail (decompression-bomb guard).
THUMB_MAX_PIXELS = 100_000_000


def read_scores(path: str | os.PathLike) -> Any:
    """A ``gamma score`` output (.csv, .jsonl or .json) as a DataFrame with at least ``name`` and ``score``.

    Raises:
        ValueError: an unknown suffix, or no ``name`` / ``score`` column.
    """
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df = pd.read_csv(path)
    elif suffix == ".jsonl":
        df = pd.read_json(path, lines=True)
    elif suffix == ".json":
        df = pd.read_json(path)
    else:
        raise ValueError(f"{path}: a scores file is .csv, .jsonl or .json (the outputs of gamma score)")
    missing = [c for c in ("name", "score") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: no {' / '.join(missing)} column; columns are {', '.join(map(str, df.columns))}")
    df["score"] = pd.to_numeric(df["score"], errors="coerce")
    return df


def write_report(scores: str | os.PathLike, out: str | os.PathLike, *, images: bool = False,
                 root: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Write the HTML report of the scores file ``scores`` to ``out``; returns ``out``.

    Args:
        scores: a ``gamma score`` output.
        out: the HTML file to write.
        images: embed thumbnails of the best and worst images (read from ``root / name``).
        root: the folder the names are relative to (default: the current folder, where ``gamma score`` ran).
        title: the page's title (default: the scores file's name).
    """
    df = read_scores(scores)
    root = Path(root) if root is not None else Path.cwd()
    ok = df[np.isfinite(df["score"].to_numpy(dtype=float))]
    failed = len(df) - len(ok)
    title = title or f"gamma report: {Path(scores).name}"
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p>{len(df)} rows, {len(ok)} scored{f', {failed} failed' if failed else ''}.</p>"]
    if len(ok):
        s = ok["score"]
        parts.append(_stats_table(s))
        parts.append(_img(_histogram(s.to_numpy(dtype=float)), "score histogram"))
        ranked = ok.sort_values("score", ascending=False, kind="stable")
        for label, rows in (("Best", ranked.head(SHOWN)), ("Worst", ranked.tail(SHOWN).iloc[::-1])):
            parts.append(f"<h2>{label} {len(rows)}</h2>" + _gallery(rows, root if images else None))
        attrs = [a for a in (*ATTRIBUTES, "mos", "adapted") if a in ok.columns]
        if attrs:
            parts.append("<h2>Score against the attributes</h2>")
            parts.append(_img(_scatter(ok, attrs), "score against attributes"))
        parts.append("<h2>Per folder</h2>" + _folders(ok))
    if failed:
        bad = df[~np.isfinite(df["score"].to_numpy(dtype=float))].head(SHOWN)
        rows = "".join(f"<tr><td>{_e(r['name'])}</td><td>{_e(r.get('error', ''))}</td></tr>"
                       for _, r in bad.iterrows())
        parts.append(f"<h2>Failed ({failed})</h2><table><tr><th>name</th><th>error</th></tr>{rows}</table>")
    page = _PAGE.format(title=_e(title), body="\n".join(parts))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _stats_table(s: Any) -> str:
    q = np.quantile(s.to_numpy(dtype=float), [0, 0.25, 0.5, 0.75, 1])
    cells = "".join(f"<td>{v:.4f}</td>" for v in (s.mean(), *q))
    return ("<table><tr><th>mean</th><th>min</th><th>25%</th><th>median</th><th>75%</th><th>max</th></tr>"
            f"<tr>{cells}</tr></table>")


def _histogram(values: np.ndarray) -> bytes:
    fig = _figure(6.4, 3.2)
    ax = fig.subplots()
    ax.hist(values, bins=min(50, max(5, int(math.sqrt(len(values))))), color="#4477aa", edgecolor="white")
    ax.set_xlabel("score")
    ax.set_ylabel("images")
    ax.set_title(f"{len(values)} images")
    fig.tight_layout()
    return _png(fig)


def _scatter(df: Any, columns: list[str]) -> bytes:
    sample = df if len(df) <= MAX_SCATTER_POINTS else df.sample(MAX_SCATTER_POINTS, random_state=0)
    cols = min(3, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig = _figure(3.4 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        ax.scatter(sample[column], sample["score"], s=24 if len(sample) <= 500 else 5, alpha=0.6, color="#aa3377",
                   linewidths=0)
        ax.set_xlabel(column)
        ax.set_ylabel("score")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    if len(sample) < len(df):
        fig.suptitle(f"a random {len(sample)} of {len(df)} rows", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _folders(df: Any) -> str:
    folders = df["name"].astype(str).map(lambda n: os.path.dirname(n) or ".")
    grouped = df.assign(folder=folders).groupby("folder")["score"].agg(["count", "mean", "median", "min", "max"])
    grouped = grouped.sort_values("count", ascending=False, kind="stable")
    shown = grouped.head(MAX_FOLDERS)
    rows = "".join(f"<tr><td>{_e(name)}</td><td>{int(r['count'])}</td>" +
                   "".join(f"<td>{r[c]:.4f}</td>" for c in ("mean", "median", "min", "max")) + "</tr>"
                   for name, r in shown.iterrows())
    more = f"<p>and {len(grouped) - len(shown)} smaller folders.</p>" if len(grouped) > len(shown) else ""
    return ("<table><tr><th>folder</th><th>images</th><th>mean</th><th>median</th><th>min</th><th>max</th></tr>"
            f"{rows}</table>{more}")


def _gallery(rows: Any, root: Path | None) -> str:
    cards = []
    for _, r in rows.iterrows():
        name = str(r["name"])
        thumb = _thumbnail(root / name) if root is not None else None
        picture = (f'<img src="data:image/jpeg;base64,{thumb}" alt="{_e(name)}">' if thumb
                   else '<div class="noimg">no thumbnail</div>')
        cards.append(f'<figure>{picture}<figcaption>{r["score"]:.4f}<br>{_e(os.path.basename(name))}'
                     "</figcaption></figure>")
    return f'<div class="gallery">{"".join(cards)}</div>'


def _thumbnail(path: Path) -> str | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            if img.width * img.height > THUMB_MAX_PIXELS:
                return None
            img.draft("RGB", (THUMB_SIZE * 2, THUMB_SIZE * 2))
            small = ImageOps.exif_transpose(img).convert("RGB")
            small.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=75)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        logger.info("no thumbnail for %s: %s", path, exc)
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img class="figure" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _e(text: Any) -> str:
    return html.escape("" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; width: 170px; text-align: center; font-size: 12px; word-break: break-all; }}
figure img {{ max-width: 160px; max-height: 160px; }} .noimg {{ height: 60px; background: #eee; line-height: 60px; }}
img.figure {{ max-width: 100%; }}
</style></head>
<body>
{body}
<p><small>Written by gamma report. Scores of a random or tiny model mean nothing.</small></p>
</body></html>
"""


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gamma report``."""
    parser.add_argument("scores", metavar="SCORES", help="the output of gamma score (.csv, .jsonl or .json)")
    parser.add_argument("--images", action="store_true", help="embed thumbnails of the best and worst images")
    parser.add_argument("--root", help="folder the image names are relative to (default: the current folder)")
    parser.add_argument("--out", "-o", help="the HTML file (default: SCORES with .html)")
    parser.add_argument("--title", help="the page's title")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``gamma report`` on a ``gamma`` sub-command parser."""
    parser = subparsers.add_parser("report", help="one self-contained HTML page about a scores file",
                                   description="Histogram, best and worst images, attribute scatter plots and a "
                                   "summary per folder of a gamma score output, in one HTML file.")
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """``gamma report``: prints the file written."""
    out = Path(args.out) if args.out else Path(args.scores).with_suffix(".html")
    try:
        written = write_report(args.scores, out, images=args.images, root=args.root, title=args.title)
    except (OSError, ValueError) as exc:
        print(f"gamma: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} ({written.stat().st_size / 1024:.0f} KB)")
    return 0
