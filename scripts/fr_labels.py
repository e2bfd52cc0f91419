"""Relabel a full-reference dataset with a full-reference metric: PromptIQA's "reconstituted" requirements (Table 3).

PromptIQA's paper tests adaptation to requirements no training set had by giving TID2013 and KADID-10k new labels from
SSIM, FSIM and LPIPS (SSIM and FSIM: higher is better, like MOS; LPIPS: lower is better, like DMOS), then prompting
with 10 ISPs from each relabelled training part. This script writes such a meta file with pyiqa's own metrics::

    python scripts/fr_labels.py --dataset tid2013 --metric ssim --ref_root tid2013/reference_images \\
        --out meta_info/reconstituted/tid2013_ssim.csv

The file lists the dataset's rows in their order (``ref_name, dist_name, <metric>, mos``: the metric is the label the
'fr' meta reader takes, the original label is kept last), so the dataset's split file indexes it unchanged;
options/promptiqa/reconstituted.yml reads the six files. Paths are relative to ``--data_root`` (default
``$GAMMA_DATA_ROOT``). LPIPS needs its network weights, which pyiqa downloads on first use; without network access put
them in torch's hub cache first.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from gamma._files import atomic_write
from gamma.data import DatasetEntry
from gamma.data.meta import read_meta

logger = logging.getLogger("fr_labels")

METRICS = ("ssim", "fsim", "lpips")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="registered dataset (tid2013, kadid10k, ...) or a name for --meta")
    p.add_argument("--metric", required=True, help=f"a pyiqa full-reference metric ({', '.join(METRICS)} ...)")
    p.add_argument("--out", required=True, help="meta CSV to write (relative paths: under --data_root)")
    p.add_argument("--ref_root", help="folder of the reference images (default: the dataset's image folder)")
    p.add_argument("--root", help="folder of the distorted images (default: the registry's)")
    p.add_argument("--meta", help="the dataset's 'fr' meta CSV (default: the registry's)")
    p.add_argument("--data_root", help="root of relative paths (default: $GAMMA_DATA_ROOT, else the working dir)")
    p.add_argument("--device", default="cpu", help="torch device for the metric (cpu, cuda ...)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Compute the metric for every row and write the meta file; returns its path."""
    args = parse_args(argv)
    fields = {"name": args.dataset, "split_index": "all", "check_files": False, "kind": "fr"}
    if args.root:
        fields["root"] = args.root
    if args.meta:
        fields["meta_file"] = args.meta
        fields.setdefault("mos_range", [0, 1])
    entry = DatasetEntry.from_dict(fields, data_root=args.data_root)
    table = read_meta(entry.meta_path, "fr")
    ref_root = entry.resolve(args.ref_root) if args.ref_root else entry.image_root
    missing = [r for r in table.records
               if not os.path.isfile(os.path.join(entry.image_root, r.path))
               or not os.path.isfile(os.path.join(ref_root, r.group))]
    if missing:
        r = missing[0]
        raise FileNotFoundError(f"{len(missing)} row(s) of {table.file} lack an image, e.g. line {r.line}: "
                                f"{os.path.join(entry.image_root, r.path)} / {os.path.join(ref_root, r.group)}")
    import pyiqa  # the one metric library; only this script needs it here

    try:
        metric = pyiqa.create_metric(args.metric, device=args.device, as_loss=False)
    except Exception as exc:  # noqa: BLE001 - pyiqa raises many kinds (unknown name, weights not downloadable)
        raise RuntimeError(f"pyiqa cannot create metric {args.metric!r}: {type(exc).__name__}: {exc}. LPIPS and "
                           "other learned metrics need their weights in torch's hub cache (pyiqa downloads them on "
                           "first use).") from exc
    if metric.metric_mode != "FR":
        raise ValueError(f"{args.metric} is not a full-reference metric in pyiqa")
    rows = []
    for rec in tqdm(table.records, desc=f"{args.metric} on {entry.name}", dynamic_ncols=True):
        value = float(metric(os.path.join(entry.image_root, rec.path), os.path.join(ref_root, rec.group)).item())
        if not math.isfinite(value):
            raise ValueError(f"{args.metric} of {rec.path} (line {rec.line}) is {value}")
        rows.append((rec.group, rec.path, value, rec.mos))
    out = Path(entry.resolve(args.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ref_name", "dist_name", args.metric, "mos"])
    w.writerows((ref, dist, f"{v:.6f}", f"{m:.6g}") for ref, dist, v, m in rows)
    text = buf.getvalue()
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    values = [v for _, _, v, _ in rows]
    logger.info("%s: %d rows of %s, %s in [%.4f, %.4f] (%s is better)", out, len(rows), entry.name, args.metric,
                min(values), max(values), "lower" if metric.lower_better else "higher")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except (OSError, ValueError, RuntimeError) as exc:
        logger.error("%s", exc)
        sys.exit(2)
