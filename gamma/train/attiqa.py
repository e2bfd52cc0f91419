"""Stage ``attiqa_pretrain``: ATTIQA's attribute-aware pretraining of a student (docs/attiqa.md#trainer-stages).

The student (:class:`gamma.archs.AttiqaModel`) learns the *order* of five teacher attribute scores (one per head: the
student's ``attributes``, the teacher's prompt pairs; Table 7's single-prompt ablation has one) with the
margin-ranking loss (:func:`gamma.archs.attribute_ranking_loss`) on the in-batch pairs of each micro-batch, summed
over the attributes. It runs in the trainer's own loop (:func:`gamma.train.loop.train` with an
:class:`~gamma.train.loop.Objective`), so checkpoints, ``--resume``, DDP, signals and the run folder are those of every
stage. What is ATTIQA's:

- **images**: the training part of every ``data`` entry (its MOS unused; the split keeps the held-out part unseen by
  pretraining, so fine-tuning on the same entries is evaluated on pictures pretraining never saw) and every image under
  ``attiqa.folders`` (unlabelled, e.g. ImageNet; short side ``attiqa.resize``, random ``attiqa.crop_size`` crop);
- **teacher labels**: computed once per image before training (:func:`gamma.train.teacher.label_images`, by rank 0) and
  cached under ``attiqa.labels_dir/<dataset>/``, so a rerun or a resumed run reuses them and a killed labelling
  resumes; the teacher is a CLIP-layout checkpoint or ``measured`` (pixel statistics, the offline demo);
- **evaluation**: each head's agreement with the teacher (SRCC / PLCC / KRCC of its output against the teacher's
  score of that attribute) on the held-out parts of the ``data`` / ``eval_data`` entries and ``attiqa.eval_folders``,
  pooled; the student's test protocol (``eval.crop_mode``) is used. The "datasets" of the run's evaluation records
  and tables are the attributes.

At the end the final weights are written as ``attiqa.output`` (a student checkpoint,
``gamma.create_model(None, pretrained=...)``), the file the stages of ``attiqa.then`` start from. Stage
``attiqa_finetune`` (:mod:`gamma.train.stages`) is MOS training of a student in the same loop as Gamma's.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Subset

from .._files import atomic_write
from ..archs import AttiqaModel, attribute_ranking_loss
from ..archs.attiqa import check_attribute_targets
from ..config import AttiqaConfig, get_attiqa_variant
from ..data import DatasetEntry, IQADataset, build_dataset, collate
from ..data.synthetic import generate_for_entries
from ..factory import create_model, list_models
from ..families import family_of_checkpoint
from ..hub import resolve_weights
from ..io import list_image_files
from ..metrics import evaluate_scores
from ..prompts import ATTRIBUTES
from ..weights import read_checkpoint, save_checkpoint
from .checkpoint import LAST, write_json
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, all_gather_objects, barrier, broadcast_object, cleanup, setup, wait_for_main
from .evaluate import METRICS, autocast
from .loop import Run, build_datasets, build_model, train
from .objective import Objective
from .run_folder import finished_results, run_dir_of, split_config
from .teacher import MEASURED, check_prompts, label_images, read_labels

logger = logging.getLogger(__name__)

FOLDER_LIST = "images.csv"  # the meta file written for an unlabelled folder (custom format, MOS column 0)


# ------------------------------------------------------------------------------------------------ the stage
def pretrain(cfg: TrainConfig, resume: bool = False, all_splits: bool = False,  # noqa: ARG001
             dist: DistInfo | None = None) -> dict[str, Any]:
    """Run stage ``attiqa_pretrain`` (one run on ``cfg.split_index``; ``all_splits`` does not apply) in the process
    group of ``dist`` (None: joined here and left at the end).

    Returns:
        the loop's results (``results.json``) plus ``'backbone'``: the pretrained student's file, and ``'teacher'``:
        the label caches used.
    """
    check_pretrain(cfg)
    if resume and (done := finished_results(cfg)) is not None:  # finished: its folder is left as it is
        return done
    own = dist is None
    dist = setup(cfg.device, cfg.ddp.backend, cfg.ddp.timeout_s) if own else dist
    try:
        objective, caches = pretraining_objective(cfg, dist)
        run_dir = run_dir_of(cfg)
        result = train(cfg, dist, resume=resume and (run_dir / LAST).exists(), objective=objective)
        out = run_dir / cfg.attiqa.output
        if dist.is_main:
            # The final weights (last.pth also holds the optimiser) as a plain student checkpoint.
            student = create_model(None, pretrained=run_dir / LAST)
            save_checkpoint(student, out, kind="weights", stage="attiqa_pretrain")
            logger.info("pretrained ATTIQA student written to %s", out)
        barrier(dist)
    finally:
        if own:
            cleanup(dist)
    result.update(backbone=str(out), teacher=caches)
    if dist.is_main:
        write_json(run_dir / "results.json", result)
    return result


def check_pretrain(cfg: TrainConfig) -> None:
    """Configuration checks of stage ``attiqa_pretrain`` (each error names its key)."""
    a = cfg.attiqa
    names = check_student(cfg).attributes
    if not a.teacher:
        raise ConfigError("attiqa.teacher: stage attiqa_pretrain needs a teacher: a CLIP-layout checkpoint (OpenAI "
                          f"ViT-B/16 for the paper) or {MEASURED!r}")
    if not a.margin > 0:
        raise ConfigError(f"attiqa.margin must be > 0, got {a.margin}")
    for key in ("crop_size", "teacher_batch_size", "chunk_size"):
        if getattr(a, key) < 1:
            raise ConfigError(f"attiqa.{key} must be >= 1, got {getattr(a, key)}")
    if a.resize and a.resize < a.crop_size:
        raise ConfigError(f"attiqa.resize ({a.resize}) must be 0 or at least attiqa.crop_size ({a.crop_size})")
    if not cfg.data and not a.folders:
        raise ConfigError("stage attiqa_pretrain has no images: list data entries or attiqa.folders")
    if a.prompts is not None:
        if a.teacher == MEASURED:
            raise ConfigError(f"attiqa.prompts: the {MEASURED!r} teacher has no prompts; give a CLIP-layout teacher")
        read_prompts(a.prompts, names)
    elif names != ATTRIBUTES:
        raise ConfigError(f"attiqa.prompts: the student's heads ({', '.join(names)}) are not the five attributes of "
                          "Table 1's prompt pairs; give the teacher a [positive, negative] pair for each head")


def read_prompts(value: str | Mapping[str, Sequence[str]],
                 names: Sequence[str] = ATTRIBUTES) -> dict[str, tuple[str, str]]:
    """The teacher's prompt pairs from ``attiqa.prompts``: ``{name: [positive, negative]}`` with a pair for each of
    ``names`` (the student's heads: the five attributes, or Table 7's single ``quality``), given inline or as a YAML
    file (:func:`gamma.train.teacher.check_prompts`). Returned in the order of ``names``.

    Raises:
        ConfigError: the file is missing or not YAML, or not one pair per name (the message names the file).
    """
    if isinstance(value, Mapping):
        try:
            return check_prompts(value, names)
        except ValueError as exc:
            raise ConfigError(f"attiqa.prompts: {exc}") from None
    try:
        with open(value, encoding="utf-8") as fh:
            return check_prompts(yaml.safe_load(fh), names)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"attiqa.prompts: {value}: {exc}") from None


def check_student(cfg: TrainConfig) -> AttiqaConfig:
    """The run's model must be an ATTIQA student (a variant name, or a student checkpoint as ``model.pretrained``).

    Returns:
        its config, ``model.overrides`` applied (the heads it will have: ``attributes``).
    """
    name = cfg.model.name
    if name is not None:
        if name not in list_models("attiqa"):
            raise ConfigError(f"model.name: stage {cfg.stage} trains an ATTIQA student "
                              f"({', '.join(list_models('attiqa'))}), got {name!r}")
        config = get_attiqa_variant(name)
    else:
        path = resolve_weights(path=cfg.model.pretrained)
        ckpt = read_checkpoint(path, allow_unsafe=cfg.model.allow_unsafe)
        if family_of_checkpoint(ckpt).name != "attiqa":
            raise ConfigError(f"model.pretrained: {path} is not an ATTIQA student; stage {cfg.stage} trains one "
                              f"(model.name: one of {', '.join(list_models('attiqa'))})")
        config = ckpt.config
    overrides = {k: v for k, v in cfg.model.overrides.items() if k != "backbone"}  # backbone: a weight file
    try:
        return config.replace(**overrides) if overrides else config
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None


# ------------------------------------------------------------------------------------------------ data
class TeacherLabelled(Dataset):
    """An :class:`IQADataset` whose items also carry ``teacher``: the teacher's scores (A,) of the picture.

    Pictures without a label (unreadable when the teacher ran; listed in the cache's ``skipped.csv``) are left out.
    """

    def __init__(self, ds: IQADataset, labels: dict[str, np.ndarray]) -> None:
        root = ds.entry.image_root
        keys = [Path(os.path.relpath(p, root)).as_posix() for p in ds.paths]
        kept = [i for i, k in enumerate(keys) if k in labels]
        if not kept:
            raise ValueError(f"dataset {ds.entry.name!r}: none of its {len(keys)} images has a teacher label")
        if len(kept) < len(keys):
            logger.warning("dataset %s (%s): %d image(s) without a teacher label left out", ds.entry.name, ds.phase,
                           len(keys) - len(kept))
            ds = IQADataset(ds.entry, ds.phase, ds.table, [ds.rows[i] for i in kept], ds.transform)
        self.ds = ds
        self.entry = ds.entry
        self.teacher = np.stack([labels[keys[i]] for i in kept]).astype(np.float32)  # (N, A)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.ds[i]
        item["teacher"] = torch.from_numpy(self.teacher[i])
        return item


def folder_entry(cfg: TrainConfig, folder: str, crop: bool) -> DatasetEntry:
    """A dataset entry for an unlabelled image folder, every row in every phase. Its meta file is the folder's file
    list, ``<label cache>/images.csv`` (custom format: ``image, mos`` with MOS 0), written by :func:`write_folder_list`.
    ``crop``: training crops of ``attiqa.crop_size`` after resizing to ``attiqa.resize``."""
    name = _folder_name(folder)
    size = {"resize": cfg.attiqa.resize, "crop_size": cfg.attiqa.crop_size} if crop else {}
    return DatasetEntry(name=name, root=folder, meta_file=str((_cache_dir(cfg, name) / FOLDER_LIST).resolve()),
                        mos_range=(0.0, 1.0), split_index="all", data_root=cfg.data_root, **size)


def _folder_name(folder: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.strip("/")) or "images"


def _cache_dir(cfg: TrainConfig, name: str) -> Path:
    base = Path(cfg.attiqa.labels_dir)
    return (base if base.is_absolute() else Path(cfg.output_dir) / base) / name


def write_folder_list(entry: DatasetEntry) -> None:
    """List the images under a folder entry's root into its meta file (see :func:`folder_entry`)."""
    files = list_image_files(entry.image_root)
    if not files:
        raise FileNotFoundError(f"attiqa.folders: no images under {entry.image_root}")
    root = entry.image_root

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "mos"])
            w.writerows((Path(os.path.relpath(f, root)).as_posix(), 0) for f in files)

    Path(entry.meta_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(entry.meta_path), write)
    logger.info("%s: %d images listed in %s", root, len(files), entry.meta_path)


def pretraining_objective(cfg: TrainConfig, dist: DistInfo) -> tuple[Objective, dict[str, str]]:
    """The pretraining's datasets (with teacher labels, computed by rank 0 when not cached; rank 0 also writes the
    synthetic datasets first when ``pretrain.synthetic`` asks for them), loss and evaluation.

    Returns:
        the objective and ``{dataset name: its label cache}``.
    """
    a = cfg.attiqa
    heads = check_student(cfg).attributes  # the teacher's label columns, one per head
    folders = [folder_entry(cfg, f, crop=True) for f in a.folders]
    eval_folders = [folder_entry(cfg, f, crop=False) for f in a.eval_folders]
    names = [e.name for e in (*cfg.data, *cfg.eval_data, *folders, *eval_folders)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"attiqa: more than one dataset named {dup[0]!r} (a folder is named after its path); give "
                          "each its own name")
    train_entries = [*cfg.data, *folders]
    eval_entries = [*cfg.data, *cfg.eval_data, *eval_folders]
    error = None
    if dist.is_main:
        try:
            if cfg.pretrain.synthetic.enabled:
                generate_for_entries(cfg.pretrain.synthetic, cfg.data, cfg.data_root)
            for entry in (*folders, *eval_folders):
                write_folder_list(entry)
            _label_all(cfg, train_entries, eval_entries, heads, dist.device)
        except BaseException as exc:  # noqa: BLE001 - other ranks must hear about it before they block
            error = exc
    wait_for_main(dist)  # labelling may outlast ddp.timeout_s: the other ranks wait without NCCL's watchdog
    error_text = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", dist)
    if error is not None:
        raise error
    if error_text is not None:
        raise RuntimeError(f"rank 0 failed to label the pretraining images: {error_text}")
    labels = {e.name: read_labels(_cache_dir(cfg, e.name)).as_dict() for e in (*train_entries, *eval_entries)}
    train_sets = [TeacherLabelled(build_dataset(e, "train"), labels[e.name]) for e in train_entries]
    eval_sets = {e.name: TeacherLabelled(build_dataset(e, e.eval_key), labels[e.name]) for e in eval_entries}
    margin, kind = a.margin, a.loss

    def loss_sum(pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of the micro-batch's real samples, weighted by their number: the ranking loss of the pairs
        within it, or (``attiqa.loss: l2``) :func:`attribute_l2_loss`."""
        real = batch["weight"].to(pred.device) > 0
        n = int(real.sum())
        if n < (2 if kind == "ranking" else 1):  # no pair: a zero that still reaches every parameter (DDP)
            return pred.sum() * 0.0
        teacher = batch["teacher"].to(pred.device, non_blocking=True).float()
        if kind == "l2":
            return attribute_l2_loss(pred[real], teacher[real]) * n
        return attribute_ranking_loss(pred[real], teacher[real], margin) * n

    objective = Objective(train_sets=train_sets, eval_sets=eval_sets, loss_sum=loss_sum, evaluate=head_agreement,
                          configure_model=lambda m: m.set_stage("pretrain"))
    return objective, {e.name: str(_cache_dir(cfg, e.name)) for e in (*train_entries, *eval_entries)}


def attribute_l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The L2 pretraining loss of ATTIQA's Table 7 ablation: per attribute, the mean over the batch of
    ``(pred - target) ** 2`` (the teacher's score values, not their order), summed over the attributes as the ranking
    loss is.

    Raises:
        ValueError: shapes differ or are not (B, A), or the targets are not finite.
    """
    check_attribute_targets(pred, target)
    return (pred - target.to(pred.dtype)).square().mean(dim=0).sum()


def _label_all(cfg: TrainConfig, train_entries: list[DatasetEntry], eval_entries: list[DatasetEntry],
               names: Sequence[str], device: torch.device) -> None:
    """Teacher labels of every picture the run uses (cached; only missing ones are computed), one cache per dataset,
    one column per name (the student's heads); the teacher runs on ``device``, the run's (rank 0's) device."""
    a = cfg.attiqa
    files: dict[str, tuple[DatasetEntry, list[str]]] = {}
    for entry, phase in [*((e, "train") for e in train_entries), *((e, e.eval_key) for e in eval_entries)]:
        ds = build_dataset(entry, phase)
        files.setdefault(entry.name, (entry, []))[1].extend(ds.paths)
    teacher = a.teacher if a.teacher == MEASURED else str(resolve_weights(path=a.teacher))
    model = None
    for name, (entry, paths) in files.items():
        if model is None and teacher != MEASURED:
            model = create_model(None, pretrained=teacher, allow_unsafe=cfg.model.allow_unsafe, device=device)
        label_images(list(dict.fromkeys(paths)), model if model is not None else MEASURED, _cache_dir(cfg, name),
                     root=entry.image_root, batch_size=a.teacher_batch_size, chunk_size=a.chunk_size,
                     on_error="skip", prompts=read_prompts(a.prompts, names) if a.prompts is not None else None)


# ------------------------------------------------------------------------------------------------ feature analysis
FEATURES_FILE = "feature_similarity.json"


def feature_similarity(cfg: TrainConfig, all_splits: bool = False) -> dict[str, Any]:
    """The paper's feature analysis (Table 5) after stage ``attiqa_finetune`` (``attiqa.feature_similarity``): the
    cosine similarity of each held-out picture's pooled backbone feature (2048-d, averaged over the test crops) under
    the starting weights and under the fine-tuned ones (the run's ``last.pth``), averaged over each held-out set.

    Written to each split's ``feature_similarity.json`` by the main process (rank 0; other processes return {}).

    Returns:
        ``{split index: {'datasets': {name: {'cosine': mean, 'images': n}}, 'mean': mean over datasets}}``.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {}
    for k in (cfg.splits if all_splits else [cfg.split_index]):
        cfg_k = split_config(cfg, k) if all_splits else cfg
        run_dir = run_dir_of(cfg_k)
        before = build_model(cfg_k).to(device).eval()  # the run's start: same weights, same seed
        after = create_model(None, pretrained=run_dir / LAST).to(device).eval()
        for m in (before, after):
            m.set_crop_protocol(mode=cfg.eval.crop_mode, num=cfg.eval.crops, seed=cfg.eval.crop_seed)
        _, held = build_datasets(cfg_k)
        per = {name: {"cosine": float(np.mean(sims)), "images": len(sims)}
               for name, ds in held.items() if (sims := _feature_cosines(before, after, ds, device))}
        result = {"datasets": per, "mean": float(np.mean([v["cosine"] for v in per.values()])) if per else None}
        write_json(run_dir / FEATURES_FILE, result)
        logger.info("split %d: backbone features before vs after fine-tuning, mean cosine similarity %s", k,
                    ", ".join(f"{n} {v['cosine']:.4f}" for n, v in per.items()))
        out[str(k)] = result
    return out


@torch.no_grad()
def _feature_cosines(before: AttiqaModel, after: AttiqaModel, ds: Dataset, device: torch.device) -> list[float]:
    """Per picture of ``ds``: cosine similarity of the two models' crop-averaged pooled backbone features."""
    sims = []
    for i in range(len(ds)):
        img = ds[i]["img"][None].to(device)
        a, b = before.crop_features(img), after.crop_features(img)
        sims.append(float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).item()))
    return sims


# ------------------------------------------------------------------------------------------------ evaluation
def head_agreement(run: Run) -> dict[str, Any]:
    """Each attribute head's SRCC / PLCC / KRCC against the teacher on the held-out pictures (pooled over datasets),
    with the student's test protocol; the same on every process."""
    model, cfg = run.model, run.cfg
    was_training = model.training
    model.eval()
    model.set_crop_protocol(mode=cfg.eval.crop_mode, num=cfg.eval.crops, seed=cfg.eval.crop_seed)
    try:
        preds, targets = [], []
        for ds in run.eval_sets.values():
            preds.append(predict_attributes(model, ds, run.dist, cfg.eval.batch_size, cfg.amp,
                                            cfg.eval.workers if cfg.eval.workers is not None else cfg.workers))
            targets.append(ds.teacher)
    finally:
        model.train(was_training)
    per: dict[str, dict[str, float]] = {}
    if preds:
        pred, target = np.concatenate(preds), np.concatenate(targets)
        per = {a: evaluate_scores(pred[:, k], target[:, k]) for k, a in enumerate(model.attribute_names)}
    mean = {m: float(np.mean([v[m] for v in per.values()])) if per else float("nan") for m in METRICS}
    return {"datasets": per, "mean": mean, "predictions": {}}


@torch.no_grad()
def predict_attributes(model: AttiqaModel, ds: Dataset, dist: DistInfo, batch_size: int, amp: str = "none",
                       workers: int = 0) -> np.ndarray:
    """The student's attribute predictions (N, A) of every picture of ``ds`` (test protocol), gathered over processes
    (each scores every ``world_size``-th picture; pictures of one batch that differ in size are scored apart)."""
    mine = list(range(dist.rank, len(ds), dist.world_size))
    loader = DataLoader(Subset(ds, mine), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate)
    rows: list[list[float]] = []
    for batch in loader:
        images = batch["img"]
        images = list(images) if isinstance(images, torch.Tensor) else images
        out = torch.empty(len(images), len(model.attribute_names), dtype=torch.float64)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(i)
        for idx in groups.values():
            x = torch.stack([images[i] for i in idx]).to(dist.device)
            with autocast(dist.device, amp):
                scores = torch.stack(list(model.attributes(x).values()), dim=-1)  # (b, A)
            out[idx] = scores.float().cpu().double()
        rows.extend(out.tolist())
    parts = all_gather_objects(rows, dist)
    width = len(model.attribute_names)
    full = np.empty((len(ds), width), dtype=np.float64)
    for rank, part in enumerate(parts):
        full[rank :: dist.world_size] = np.asarray(part, dtype=np.float64).reshape(-1, width)
    return full
