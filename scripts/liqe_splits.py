#!/usr/bin/env python
"""LIQE's released train / validation / test lists as split pickles, for the paper's Table 12 (LIQE's setting).

LIQE (github zwx8981/LIQE) ships ten splits of each of its six training datasets, 70% / 10% / 20% of the images
(in LIVE's lists all versions of a reference image sit in one part), as text files
``<k>/<prefix>_{train,val,test}_clip.txt`` (k = 1..10) under ``IQA_Database/<dataset folder>/splits2/``: one image per
line, its path relative to the dataset folder first, then tab-separated labels. This script finds each listed image's
row in a meta file (by the longest matching path suffix, so ``jp2k/img39.bmp`` and ``1024x768/826373.jpg`` match
``databaserelease2/jp2k/img39.bmp`` and ``826373.jpg``) and writes ``{k: {'train': rows, 'val': rows, 'test': rows}}``,
the split pickle format gamma reads::

    python scripts/liqe_splits.py bid LIQE/IQA_Database/BID/splits2 -o $GAMMA_DATA_ROOT/meta_info/bid_liqe_10split.pkl

Then ``options/appendix_b/t12_liqe_setting.yml`` trains on the 'train' parts and tests on the 'test' parts
(docs/paper-protocols.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from gamma.data import get_dataset_info
from gamma.data.meta import read_meta
from gamma.data.splits import save_splits

logger = logging.getLogger("liqe_splits")

PARTS: tuple[str, ...] = ("train", "val", "test")

#: Registry name -> the file prefix of LIQE's lists.
LIQE_PREFIX: dict[str, str] = {
    "live": "live", "csiq": "csiq", "kadid10k": "kadid10k", "bid": "bid", "livec": "clive", "koniq10k": "koniq10k",
}


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.strip().replace("\\", "/").split("/") if p and p != ".")


class SuffixIndex:
    """Meta rows by every trailing run of their path components (``a/b/c.png`` -> ``c.png``, ``b/c.png``, ...)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._paths = [_parts(p) for p in paths]
        self._rows: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for row, parts in enumerate(self._paths):
            for i in range(len(parts)):
                self._rows[parts[i:]].add(row)

    def find(self, path: str) -> int | None:
        """The row whose path ends like ``path`` does (longest suffix first), or ``None``. Rows that repeat one path
        (a meta file may list an image twice) count as one: the first is returned.

        Raises:
            ValueError: the longest matching suffix is shared by different meta paths.
        """
        parts = _parts(path)
        for i in range(len(parts)):
            rows = self._rows.get(parts[i:])
            if not rows:
                continue
            if len({self._paths[r] for r in rows}) == 1:
                return min(rows)
            shown = ", ".join(map(str, sorted(rows)[:5]))
            raise ValueError(f"{path!r} matches {len(rows)} meta rows ({shown}) by {'/'.join(parts[i:])!r} alone; "
                             "the meta paths must share more of the listed path to tell them apart")
        return None


def read_list(file: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, image path) of each non-blank line of one of LIQE's list files."""
    out = []
    with open(file, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                out.append((n, line.rstrip("\n").split("\t")[0].strip()))
    return out


def convert(split_dir: str | os.PathLike, prefix: str, meta_paths: Sequence[str],
            splits: Sequence[int] = range(1, 11)) -> dict[int, dict[str, list[int]]]:
    """Row indices of LIQE's lists under ``split_dir`` (``<k>/<prefix>_<part>_clip.txt``) in a meta table.

    A part whose file is absent is left empty (with a warning).

    Raises:
        FileNotFoundError: no list file at all for a split.
        ValueError: a listed image is not in the meta table, or matches more than one row (file and line named).
    """
    index = SuffixIndex(meta_paths)
    out: dict[int, dict[str, list[int]]] = {}
    for k in splits:
        folder = Path(split_dir) / str(k)
        files = {part: folder / f"{prefix}_{part}_clip.txt" for part in PARTS}
        if not any(f.is_file() for f in files.values()):
            raise FileNotFoundError(f"no {prefix}_{{train,val,test}}_clip.txt in {folder}")
        out[k] = {}
        for part, file in files.items():
            if not file.is_file():
                logger.warning("%s is missing: split %d has an empty %r part", file, k, part)
                out[k][part] = []
                continue
            rows = []
            for line, path in read_list(file):
                try:
                    row = index.find(path)
                except ValueError as exc:
                    raise ValueError(f"{file}, line {line}: {exc}") from None
                if row is None:
                    raise ValueError(f"{file}, line {line}: {path!r} is not in the meta file")
                rows.append(row)
            out[k][part] = sorted(rows)
        shared = set(out[k]["train"]) & set(out[k]["test"])
        if shared:
            logger.warning("split %d: %d image(s) in both 'train' and 'test'", k, len(shared))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="liqe_splits.py", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help=f"registered dataset name ({', '.join(LIQE_PREFIX)})")
    p.add_argument("split_dir", help="LIQE's splits2 folder of that dataset (holding 1/ ... 10/)")
    p.add_argument("-o", "--output", required=True, help="split pickle to write")
    p.add_argument("--meta", help="meta CSV (default: the registry's, under --data-root)")
    p.add_argument("--data-root", default=os.environ.get("GAMMA_DATA_ROOT", "."),
                   help="data root for the registry's meta file (default $GAMMA_DATA_ROOT, else .)")
    p.add_argument("--prefix", help="file prefix of LIQE's lists (default: the dataset's, e.g. clive for livec)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        info = get_dataset_info(args.dataset)
    except ValueError as exc:
        p.error(str(exc))
    prefix = args.prefix or LIQE_PREFIX.get(info.name)
    if prefix is None:
        p.error(f"no LIQE list prefix known for {info.name!r}; give --prefix")
    if os.path.exists(args.output) and not args.force:
        p.error(f"{args.output} exists; pass --force to overwrite")
    meta = args.meta or os.path.join(args.data_root, info.meta_file)
    try:
        table = read_meta(meta, info.kind)
        splits = convert(args.split_dir, prefix, table.paths)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_splits(splits, args.output)
    sizes = " / ".join(str(len(splits[1][part])) for part in PARTS)
    print(f"wrote {len(splits)} splits of {len(table)} rows to {args.output}: split 1 has {sizes} train / val / test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
