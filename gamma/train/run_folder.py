"""The run folder ``<output_dir>/<name>/split_<k>/`` of every stage: where it is, what a fresh or resumed run may
find in it, its ``train.log`` and its metrics log (``metrics.jsonl``, ``metrics.csv``, TensorBoard under ``tb/``),
what a run writes at the end (``results.json``'s content, predictions), and the runner over all splits.

Checkpoints and the folder's lock are in :mod:`gamma.train.checkpoint`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._files import atomic_write
from .checkpoint import LAST, RunLock, json_safe
from .config import ConfigError, TrainConfig, resolve_entries, save_config
from .distributed import DistInfo, broadcast_object
from .evaluate import METRICS, headline_prompt_set, median_table, write_table
from .selection import best_per_dataset, block

try:  # optional: metrics also go to TensorBoard when it is installed
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # pragma: no cover - tensorboard not installed
    SummaryWriter = None

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_dir_of(cfg: TrainConfig) -> Path:
    """``<output_dir>/<name>/split_<k>``."""
    return Path(cfg.output_dir) / cfg.name / f"split_{cfg.split_index}"


def split_config(cfg: TrainConfig, split_index: int) -> TrainConfig:
    """A copy of ``cfg`` for split ``split_index`` of a run over all splits (its dataset entries resolved)."""
    cfg_k = copy.deepcopy(cfg)
    cfg_k.split_index = split_index
    return resolve_entries(cfg_k)


def read_finished(run_dir: Path) -> dict[str, Any] | None:
    """The content of ``run_dir/results.json`` when it says the run finished, else None (also for a damaged file,
    which is logged: the folder's checkpoint then decides what is left to do)."""
    done = run_dir / "results.json"
    if not done.is_file():
        return None
    try:
        previous = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); counting the run as unfinished", done, exc)
        return None
    return previous if isinstance(previous, dict) and previous.get("finished") else None


def finished_results(cfg: TrainConfig) -> dict[str, Any] | None:
    """For ``--resume``: the results of the run of ``cfg`` when it finished at ``cfg.epochs`` (it is not run again and
    its folder is left as it is), else None (nothing finished, or ``epochs`` raised to extend it).

    Raises:
        ConfigError: ``epochs`` is below the epochs the finished run trained.
    """
    run_dir = run_dir_of(cfg)
    previous = read_finished(run_dir)
    if previous is None:
        return None
    trained = int(previous.get("epochs") or 0)
    if previous.get("eval_only") or cfg.eval_only:
        what = "an evaluation-only run" if previous.get("eval_only") else f"a run of {trained} epochs"
        if previous.get("eval_only") != cfg.eval_only:
            raise ConfigError(f"{run_dir} holds {what}; --resume cannot turn it into the other kind: start over with "
                              "--restart, or choose another name=")
        logger.info("split %d: %s holds a finished evaluation (nothing to resume; start over with --restart)",
                    cfg.split_index, run_dir)
        return previous
    if cfg.epochs > trained:
        return None  # extended: the loop resumes it with its schedule re-planned
    if cfg.epochs < trained:
        raise ConfigError(f"epochs={cfg.epochs}: {run_dir} holds a finished run of {trained} epochs, which cannot be "
                          f"shortened; extend it with --resume epochs=N (N > {trained}), or start over with --restart")
    logger.info("split %d: %s holds a finished run of %d epoch%s; nothing to resume (results.json kept). To train it "
                "longer: --resume epochs=N with N > %d (the learning-rate schedule is re-planned); to start over: "
                "--restart", cfg.split_index, run_dir, trained, "" if trained == 1 else "s", trained)
    return previous


def prepare_folder(cfg: TrainConfig, run_dir: Path, resume: bool) -> None:
    """Make ``run_dir`` ready for a run (its lock is held): remove half-written files, refuse to start over a run
    unless asked, and when starting over remove what a new run would otherwise mix with the old one's.

    An unfinished run (``last.pth`` without a finished ``results.json``) is only replaced when the command line asks
    (``--restart``, or ``overwrite=true`` given there: ``cfg.restart``); a finished one also by ``overwrite: true``
    from an option file (the demo's re-runs).
    """
    for partial in run_dir.glob(".*.tmp"):  # half-written by a run killed while saving (we hold the folder's lock)
        logger.info("removing %s, left by an interrupted write", partial)
        partial.unlink(missing_ok=True)
    has_state = (run_dir / LAST).exists()
    if resume and not has_state:
        logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", run_dir)
    finished = not resume and read_finished(run_dir) is not None
    if not resume and has_state and not finished and not cfg.restart:
        inherited = (" (overwrite: true from an option file does not replace an unfinished run)" if cfg.overwrite
                     else "")
        raise ConfigError(f"{run_dir} holds an unfinished run ({LAST}); continue it with --resume, start over with "
                          f"--restart (or overwrite=true on the command line), or choose another name={inherited}")
    if finished and has_state and not (cfg.overwrite or cfg.restart):
        raise ConfigError(f"{run_dir} holds a finished run; extend it with --resume epochs=N, start over with "
                          "--restart (or overwrite=true), or choose another name=")
    if not resume and (cfg.overwrite or cfg.restart):
        for stale in ("metrics.jsonl", "metrics.csv", "results.json", LAST, "best.pth", "best.safetensors", "table.md",
                      "table.csv", "table.json"):
            (run_dir / stale).unlink(missing_ok=True)


@contextmanager
def open_run(cfg: TrainConfig, dist: DistInfo, resume: bool) -> Iterator[tuple[Path, MetricsLog | None]]:
    """The run folder of ``cfg``, held for one run: yields ``(run_dir, log)`` (``log`` on rank 0 only).

    Rank 0 takes the folder's lock, makes the folder ready (:func:`prepare_folder`), copies the log into
    ``train.log`` and writes ``config.yaml``; a failure there reaches every rank (the others raise a RuntimeError
    naming it) before anyone blocks. On leaving, the metrics log is closed, ``train.log`` detached and the lock
    released.
    """
    run_dir = run_dir_of(cfg)
    lock = RunLock(run_dir) if dist.is_main else None
    error: BaseException | None = None
    if lock is not None:
        try:
            lock.acquire()
            prepare_folder(cfg, run_dir, resume)
        except BaseException as exc:  # noqa: BLE001 - other ranks must hear about it before they block
            error = exc
    error_text = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", dist)
    if error is not None:
        lock.release()
        raise error
    if error_text is not None:
        raise RuntimeError(f"rank 0 failed to set up {run_dir}: {error_text}")
    handler = attach_file_log(run_dir) if dist.is_main else None
    log = None
    try:
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
            log = MetricsLog(run_dir, cfg.log.tensorboard)
        yield run_dir, log
    finally:
        if log is not None:
            log.close()
        if handler is not None:
            detach_file_log(handler)
        if lock is not None:
            lock.release()


def attach_file_log(run_dir: Path) -> logging.Handler:
    """Copy gamma's log records (INFO and above) into ``<run_dir>/train.log``; remove with :func:`detach_file_log`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("gamma")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def detach_file_log(handler: logging.Handler) -> None:
    logging.getLogger("gamma").removeHandler(handler)
    handler.close()


class MetricsLog:
    """``metrics.jsonl`` (every record), ``metrics.csv`` (evaluations) and TensorBoard scalars (when installed)."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.tb = None
        if tensorboard and SummaryWriter is not None:
            self.tb = SummaryWriter(str(run_dir / "tb"))
        elif tensorboard:
            logger.debug("tensorboard is not installed; metrics go to metrics.jsonl / metrics.csv only")

    def truncate_after(self, step: int, drop_eval_at_step: bool = False) -> None:
        """Drop records written after the checkpoint a resumed run starts from: those past ``step`` (and the
        evaluation at ``step`` when the checkpoint still has it pending)."""
        if not self.jsonl.exists():
            return
        kept = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            rec = _parse(line)
            if rec is None or rec.get("step", math.inf) > step:
                continue
            if drop_eval_at_step and rec.get("kind") == "eval" and rec.get("step") == step:
                continue
            kept.append(line)
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.jsonl, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self._write_csv()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(json_safe(record)) + "\n"
        try:
            with open(self.jsonl, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:  # a full disk: name the file (a bare "[Errno 28]" does not say which)
            raise OSError(exc.errno, f"cannot append to the metrics log: {exc.strerror}", str(self.jsonl)) from exc
        if self.tb is not None:
            step = record["step"]
            for key, value in flatten(record).items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch") and math.isfinite(value):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, step)
        if record["kind"] == "eval":
            self._write_csv()

    def _write_csv(self) -> None:
        rows = [_parse(line) for line in self.jsonl.read_text(encoding="utf-8").splitlines()]
        rows = [flatten(r) for r in rows if r is not None and r.get("kind") == "eval"]
        if not rows:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "kind"))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
        atomic_write(self.csv, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse(line: str) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
        return None
    return rec if isinstance(rec, dict) else None


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with ``/``-joined keys (``{'mean': {'srcc': x}}`` -> ``{'mean/srcc': x}``)."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out


def run_all_splits(cfg: TrainConfig, dist: DistInfo, train_split: Callable[..., dict[str, Any]],
                   resume: bool = False) -> dict[str, Any]:
    """Train and evaluate every split of ``cfg.splits`` in turn with ``train_split(cfg_k, dist, resume=...)`` (a
    stage's one-split run, e.g. :func:`gamma.train.loop.train`), then write the median table (rank 0).

    With ``resume``, splits whose ``results.json`` says finished are read, not re-run, and an interrupted split
    continues from its checkpoint.
    """
    results = []
    for k in cfg.splits:
        cfg_k = split_config(cfg, k)
        previous = finished_results(cfg_k) if resume else None
        if previous is not None:
            results.append(previous)
            continue
        logger.info("split %d of %s", k, cfg.splits)
        results.append(train_split(cfg_k, dist, resume=resume and (run_dir_of(cfg_k) / "last.pth").exists()))
    out: dict[str, Any] = {"splits": results}
    table = median_table(results)
    out["table"] = table
    if dist.is_main:
        out["files"] = {k: str(v) for k, v in write_table(table, Path(cfg.output_dir) / cfg.name, cfg.name).items()}
        logger.info("median table over %d split(s) written to %s", len(results), out["files"]["md"])
    return out


# ------------------------------------------------------------------------------------------------ results
def run_results(run: Any, seconds: float) -> dict[str, Any]:
    """What ``results.json`` holds for a :class:`gamma.train.loop.Run`: the run's figures at the final epoch (the
    headline), at the best epoch and at each dataset's own best epoch (:mod:`gamma.train.selection`), the evaluated
    epochs and the whole history."""
    cfg, p = run.cfg, run.progress
    evals = [h for h in p.history if h["kind"] == "eval"]
    finished = p.epoch >= cfg.epochs or cfg.eval_only
    final = block(evals[-1]) if evals and finished else None
    best = None if p.best is None else {**p.best, "selected_on": cfg.eval.select_on}
    out = {
        "run_dir": str(run.run_dir),
        "name": cfg.name,
        "split_index": cfg.split_index,
        "finished": finished,
        "eval_only": cfg.eval_only,
        "epochs": p.epoch,
        "global_step": p.global_step,
        "seconds": seconds,
        "headline": "final",
        "final": final,
        "best": best,
        "best_per_dataset": best_per_dataset(evals, cfg.eval.select_metric),
        "evaluated_epochs": [h["epoch"] for h in evals],
        "selection": {"on": cfg.eval.select_on, "metric": cfg.eval.select_metric,
                      "holdout_fraction": cfg.eval.holdout_fraction if run.select_sets else None,
                      "holdout_images": {n: len(d) for n, d in run.select_sets.items()}},
        "history": p.history,
        "step_losses": list(run.step_losses),
    }
    if cfg.eval.prompt_sets:
        out["headline_prompt_set"] = headline_prompt_set(run.model.config.prompt_set, cfg.eval.prompt_sets)
    return out


def log_summary(results: dict[str, Any]) -> None:
    for kind in ("final", "best"):
        part = results.get(kind)
        if part:
            means = ", ".join(f"{m.upper()} {part['mean'][m]:.4f}" for m in METRICS)
            logger.info("%s: epoch %s (mean over datasets: %s)", kind, part["epoch"], means)
    logger.info("results in %s", results["run_dir"])


def write_predictions(run: Any, predictions: dict[str, list[float]], folder_name: str = "predictions") -> None:
    """``<run_dir>/<folder_name>/<dataset>.csv``: path, raw MOS, normalised label and prediction of each image."""
    folder = run.run_dir / folder_name
    folder.mkdir(exist_ok=True)
    for name, scores in predictions.items():
        ds = run.eval_sets[name]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "mos", "label", "pred"])
        for path, raw, label, pred in zip(ds.paths, ds.mos_raw, ds.labels, scores, strict=True):
            w.writerow([os.path.relpath(path, ds.entry.image_root), f"{raw:.6g}", f"{label:.6f}", f"{pred:.6f}"])
        text = buf.getvalue()
        atomic_write(folder / f"{name}.csv", lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"))
