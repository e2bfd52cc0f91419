"""Command line of the trainer: ``python train.py -opt options/unified.yml [--split_index N] [--resume | --restart]
[--all_splits] [key=value ...]`` and the console command ``gamma-train``.

:func:`main` takes an argument list and returns the results as a dict (tests call it); :func:`cli` is the console
entry point (logging to the terminal, exit codes, messages instead of tracebacks for configuration mistakes).

Under ``torchrun --nproc_per_node=N train.py ...`` every process runs :func:`main`; the process group comes from
torchrun's environment. :func:`main` joins it once, hands it to every stage (chained ones included) and leaves it at
exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..weights import CheckpointError
from .checkpoint import RunLockedError
from .config import ConfigError, config_to_dict, config_to_yaml, load_config
from .distributed import cleanup, setup
from .evaluate import median_table, write_table
from .loop import NonFiniteLossError, TrainingInterrupted
from .run_folder import LOG_FORMAT
from .stages import run_stage

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gamma-train",
        description="Train / evaluate Gamma from an option file (see options/). Extra key=value arguments override "
                    "options with dotted keys, e.g. optim.lr=1e-4 epochs=2 data.0.root=/data/koniq.",
    )
    p.add_argument("-opt", "--opt", metavar="YAML", help="option file (its base: files are read too)")
    p.add_argument("--split_index", type=int, metavar="N", help="train and test on split N of every dataset (1-10)")
    p.add_argument("--all_splits", action="store_true",
                   help="run every split in `splits` (default 1-10) one after another, then write the median table")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's last checkpoint (with --all_splits: skip finished splits)")
    p.add_argument("--restart", action="store_true",
                   help="start over, replacing what the run folder holds (also an unfinished run, which an overwrite: "
                        "true from an option file does not replace)")
    p.add_argument("--eval_only", action="store_true", help="only evaluate model.pretrained (same as eval_only=true)")
    p.add_argument("--table", metavar="DIR",
                   help="only summarise: write the median table of the finished split_*/results.json under DIR")
    p.add_argument("--print_config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run what the arguments ask for and return its results.

    Returns:
        one training: its ``results.json`` content; ``--all_splits``: ``{'splits': [results...], 'table': ...,
        'files': {...}}``; ``--table``: ``{'table': ..., 'files': ...}``; ``--print_config``: ``{'config': ...}``;
        stage ``pretrain_clip``: what :func:`gamma.train.stages.run_stage` returns (the pretraining's results and
        those of the stages that followed it).
    """
    # intermixed: `-opt x.yml name=a --resume epochs=4` (overrides on both sides of a flag) must parse
    args = build_parser().parse_intermixed_args(list(argv) if argv is not None else None)
    if args.table:
        summary = summarize(args.table)
        print(Path(summary["files"]["md"]).read_text(encoding="utf-8"), end="")  # noqa: T201 - command-line output
        print(f"written to {', '.join(summary['files'].values())}")  # noqa: T201
        return summary
    if not args.opt:
        raise ConfigError("no option file: pass -opt options/<experiment>.yml (see options/)")
    overrides = list(args.overrides)
    if args.split_index is not None:
        overrides.append(f"split_index={args.split_index}")
    if args.eval_only:
        overrides.append("eval_only=true")
    if args.restart and args.resume:
        raise ConfigError("--restart and --resume contradict each other: continue the run, or start it over")
    cfg = load_config(args.opt, overrides)
    cfg.restart = cfg.restart or args.restart
    if args.print_config:
        print(config_to_yaml(cfg), end="")  # noqa: T201 - command-line output
        return {"config": config_to_dict(cfg)}
    dist = setup(cfg.device, cfg.ddp.backend, cfg.ddp.timeout_s)  # once per process, for every chained stage
    try:
        return run_stage(cfg, resume=args.resume, all_splits=args.all_splits, dist=dist)
    finally:
        cleanup(dist)


def summarize(folder: str | Path, label: str | None = None) -> dict[str, Any]:
    """Median table of the finished splits under ``folder`` (``split_*/results.json``), written next to them."""
    folder = Path(folder)
    files = sorted(folder.glob("split_*/results.json"), key=lambda f: _split_number(f.parent.name))
    if not files:
        if (folder / "results.json").is_file() and folder.name.startswith("split_"):  # one split's own folder
            raise ConfigError(f"--table {folder}: this is one split's folder; the table is made over the splits of "
                              f"the run: --table {folder.parent}")
        raise ConfigError(f"--table {folder}: no split_*/results.json found (has any split finished?)")
    results, unfinished = [], []
    for f in files:
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{f} is unreadable ({exc}); run that split again with --all_splits --resume") from None
        (results if r.get("finished") else unfinished).append(r)
    if unfinished:
        logger.warning("%s: leaving out unfinished split(s) %s", folder, [r.get("split_index") for r in unfinished])
    if not results:
        raise ConfigError(f"--table {folder}: no split has finished yet")
    table = median_table(results)
    files_out = write_table(table, folder, label or folder.name)
    return {"table": table, "files": {k: str(v) for k, v in files_out.items()}}


def _split_number(name: str) -> int:
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return 10**9


# Exit codes: 2 configuration / input error (as argparse), 1 diverged, 128 + signal when stopped by a signal.
def cli(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``gamma-train``): logs to the terminal and turns known errors into one-line messages."""
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    try:
        main(argv)
    except TrainingInterrupted as exc:  # already logged where it happened
        return 128 + int(exc.signum or signal.SIGINT)
    except NonFiniteLossError as exc:
        logger.error("%s", exc)
        return 1
    except (ConfigError, CheckpointError, RunLockedError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:  # disk full, no permission ...: the message names the file
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
