"""Stage ``pretrain_clip``: contrastive pretraining of a CLIP backbone on captioned images.

The paper starts Gamma from UniQA, a CLIP fine-tuned on quality and aesthetics captions. Offline there is no such
checkpoint, so this stage makes a small stand-in: a CLIP of the run's architecture (MoAE off), trained with CLIP's
symmetric InfoNCE loss on the training part of every ``data`` entry, each image paired with the caption of its meta
row (the synthetic datasets describe each image's distortions: "a heavily blurred underwater photo"). It writes the
backbone as a plain OpenAI-layout CLIP state_dict (``visual.conv1.weight``, ...), which the ``gamma`` stage loads
with ``model.pretrained`` exactly as it would load UniQA's file: experts start as copies of its MLPs.

A stage may name the option files to run after it (``pretrain.then``); they run with the same split and with
``model.pretrained`` pointing at the new backbone, and their held-out results are tabulated side by side. The demo
(options/demo.yml) is such a chain: synthetic data -> this stage -> Gamma with MoAE -> the same backbone without MoAE.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader

from .._files import atomic_write
from ..archs.clip import encode_image, encode_text
from ..data import build_dataset, collate
from ..data.synthetic import SyntheticCfg
from ..factory import create_model

logger = logging.getLogger(__name__)

CAPTION_COLUMN = "caption"


@dataclass
class PretrainCfg:
    """The ``pretrain:`` section (stage ``pretrain_clip``). Batch size, epochs, optimiser, seed, data and the model's
    architecture come from the rest of the run's configuration."""

    output: str = "clip_pretrained.pth"  # backbone file, relative to the run folder
    caption_column: str = CAPTION_COLUMN  # meta-file column (by header name) holding each image's caption
    warmup: float = 0.1  # linear warm-up over this fraction of the steps, then cosine decay to optim.min_lr
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) to this
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)  # write the synthetic datasets first (if missing)
    # Stages run next with this backbone: an option file (path from the working directory), optionally followed by
    # key=value overrides ("options/demo_gamma.yml epochs=2").
    then: list[str] = field(default_factory=list)
    threads: int | None = None  # torch.set_num_threads for the whole chain (None: torch's default)


# ------------------------------------------------------------------------------------------------ captions
def read_captions(meta_file: str | Path, column: str = CAPTION_COLUMN) -> list[str]:
    """The ``column`` of a meta CSV, one caption per data row (row indices as split files count them).

    Raises:
        ValueError: the file has no such column or a row has no caption (the message names file and line).
    """
    with open(meta_file, newline="", encoding="utf-8") as fh:
        rows = [(n, r) for n, r in enumerate(csv.reader(fh), start=1) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{meta_file}: empty meta file")
    header = [c.strip().lower() for c in rows[0][1]]
    if column.lower() not in header:
        raise ValueError(f"{meta_file}: no {column!r} column for CLIP pretraining (columns: {', '.join(header)})")
    col = header.index(column.lower())
    out = []
    for line, r in rows[1:]:
        if col >= len(r) or not r[col].strip():
            raise ValueError(f"{meta_file}, line {line}: empty {column!r}")
        out.append(r[col].strip())
    return out


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, caption_index: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE when captions repeat within a batch.

    Args:
        image: L2-normalised image features (B, E).
        text: L2-normalised features of the batch's distinct captions (U, E).
        caption_index: which of the U captions belongs to each image (B,).
        logit_scale: log of the similarity scale.

    Images with the same caption are all positives of that caption (a plain InfoNCE would push them apart): image to
    text is a U-way cross-entropy, text to image a cross-entropy against the uniform distribution over its images.
    """
    logits = logit_scale.exp() * image @ text.t()  # (B, U)
    image_to_text = F.cross_entropy(logits, caption_index)
    owners = (caption_index[None, :] == torch.arange(text.shape[0], device=text.device)[:, None]).float()  # (U, B)
    owners = owners / owners.sum(dim=1, keepdim=True)
    text_to_image = -(owners * logits.t().log_softmax(dim=-1)).sum(dim=-1).mean()
    return (image_to_text + text_to_image) / 2


def lr_at(step: int, total: int, base: float, floor: float, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine from ``base`` to ``floor``."""
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ------------------------------------------------------------------------------------------------ the stage
def run(cfg: Any) -> dict[str, Any]:
    """Run stage ``pretrain_clip`` of a :class:`gamma.train.config.TrainConfig` (and the stages of ``then``).

    Returns:
        ``{'backbone': path, 'run_dir': ..., 'steps': n, 'seconds': s, 'losses': [...], 'stages': {name: results},
        'summary': {...}}``.
    """
    from .config import save_config
    from .loop import MetricsLog, run_dir_of

    p: PretrainCfg = cfg.pretrain
    t_start = time.perf_counter()
    if p.threads:
        torch.set_num_threads(p.threads)
    if p.synthetic.enabled:
        from ..data.synthetic import generate_for_entries

        generate_for_entries(p.synthetic, cfg.data, cfg.data_root)
    run_dir = run_dir_of(cfg)
    backbone = run_dir / p.output
    if not cfg.overwrite and backbone.exists():
        raise FileExistsError(f"{backbone} exists; start over with overwrite=true or choose another name=")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir, cfg.log.tensorboard)
    try:
        result = _pretrain(cfg, p, backbone, log)
    finally:
        log.close()
    result["run_dir"] = str(run_dir)
    stages = {}
    for option_file in p.then:
        stages.update(_run_next(option_file, cfg, backbone))
    result["stages"] = stages
    result["seconds_total"] = time.perf_counter() - t_start
    if stages:
        result["summary"] = write_summary(run_dir, stages, result["seconds_total"])
    from .checkpoint import write_json

    write_json(run_dir / "results.json", {k: v for k, v in result.items() if k != "stages"})
    return result


def _pretrain(cfg: Any, p: PretrainCfg, out: Path, log: Any) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    overrides = {**cfg.model.overrides, "moae_layers": 0, "num_experts": 0}
    model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, allow_unsafe=cfg.model.allow_unsafe,
                         **overrides)
    clip = model.clip_model
    clip.requires_grad_(True)
    clip.train()
    size = model.config.vision.image_size

    sets, captions = [], []
    for entry in cfg.data:
        if entry.crop_size != size:
            raise ValueError(f"data entry {entry.name!r}: crop_size {entry.crop_size} differs from the model's input "
                             f"size {size}")
        ds = build_dataset(entry, "train")
        table = read_captions(entry.meta_path, p.caption_column)
        sets.append(ds)
        captions.append([table[r] for r in ds.rows])
    if not sets:
        raise ValueError("data: stage pretrain_clip needs at least one dataset entry with captions")
    names = {ds.entry.name: k for k, ds in enumerate(sets)}
    vocab = sorted({c for cs in captions for c in cs})
    caption_id = [[vocab.index(c) for c in cs] for cs in captions]
    # Every distinct caption is tokenised once; only the batch's captions go through the text tower.
    tokens = open_clip.tokenize(vocab, context_length=model.config.text.context_length)

    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(ConcatDataset(sets), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.workers, collate_fn=collate, generator=loader_gen,
                        persistent_workers=cfg.workers > 0)
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    if total < 1:
        raise ValueError(f"no pretraining steps: {sum(map(len, sets))} images, batch_size {cfg.batch_size}")
    o = cfg.optim
    decay = [q for n, q in clip.named_parameters() if q.ndim >= 2 and "embedding" not in n]
    rest = [q for n, q in clip.named_parameters() if not (q.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=o.betas, eps=o.eps)
    logger.info("pretraining CLIP (%.1f M parameters) on %d captioned images (%d distinct captions): %d epochs x %d "
                "steps of %d", sum(q.numel() for q in clip.parameters()) / 1e6, sum(map(len, sets)), len(vocab),
                cfg.epochs, steps_per_epoch, cfg.batch_size)
    bar = None
    if cfg.log.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="pretrain CLIP", dynamic_ncols=True, leave=False)
    losses: list[float] = []
    max_scale = math.log(p.max_logit_scale)
    step, t0 = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        for i, batch in enumerate(loader):
            if i >= steps_per_epoch:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, o.lr, o.min_lr, p.warmup)
            ids = torch.tensor([caption_id[names[d]][_row_position(sets[names[d]], r)]
                                for d, r in zip(batch["dataset"], batch["index"].tolist(), strict=True)])
            distinct, inverse = torch.unique(ids, return_inverse=True)
            pixels = (batch["img"] - model.pixel_mean) / model.pixel_std
            image = F.normalize(encode_image(clip, pixels), dim=-1)  # (B, E)
            text = F.normalize(encode_text(clip, tokens[distinct]), dim=-1)  # (U, E)
            loss = contrastive_loss(image, text, inverse, clip.logit_scale)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step + 1}; lower optim.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(clip.parameters(), o.grad_clip)
            opt.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, max_scale)
            step += 1
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if cfg.log.every_steps and step % cfg.log.every_steps == 0:
                window = losses[-cfg.log.every_steps:]
                log.write({"kind": "pretrain", "epoch": epoch + 1, "step": step, "loss": float(np.mean(window)),
                           "lr": opt.param_groups[0]["lr"], "logit_scale": clip.logit_scale.exp().item()})
                logger.info("pretrain step %d/%d: loss %.4f", step, total, float(np.mean(window)))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    logger.info("pretrained CLIP backbone written to %s (%d steps, %.0f s, final loss %.4f)", out, step, seconds,
                float(np.mean(losses[-20:])))
    return {"backbone": str(out), "steps": step, "seconds": seconds, "losses": losses}


def _row_position(ds: Any, row: int) -> int:
    """Position in ``ds`` of meta row ``row`` (cached inverse of ``ds.rows``)."""
    inverse = getattr(ds, "_row_position", None)
    if inverse is None:
        inverse = {r: i for i, r in enumerate(ds.rows)}
        ds._row_position = inverse
    return inverse[row]


def _run_next(item: str, cfg: Any, backbone: Path) -> dict[str, Any]:
    """Run one follow-up stage: ``item`` is an option file, optionally followed by ``key=value`` overrides.

    The stage shares this stage's data, data root, output folder, split, seed, workers, overwrite and log settings,
    and starts from the new backbone (``model.pretrained``); its own overrides come last.
    """
    from .config import config_to_dict
    from .main import main

    option_file, *own = shlex.split(item)
    shared = {"data": [e.to_dict() for e in cfg.data], "data_root": cfg.data_root, "output_dir": cfg.output_dir,
              "split_index": cfg.split_index, "seed": cfg.seed, "workers": cfg.workers, "overwrite": cfg.overwrite,
              "log": config_to_dict(cfg.log), "model.pretrained": str(backbone)}
    args = ["-opt", option_file, *(f"{k}={json.dumps(v)}" for k, v in shared.items()), *own]
    logger.info("next stage: %s %s", option_file, " ".join(own))
    result = main(args)
    return {result.get("name", Path(option_file).stem): result}


def write_summary(run_dir: Path, stages: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Held-out SRCC / PLCC of each follow-up stage's best epoch side by side (``summary.md`` / ``summary.json``)."""
    table: dict[str, Any] = {}
    for name, res in stages.items():
        best = res.get("best") or {}
        table[name] = {"datasets": best.get("datasets", {}), "mean": best.get("mean", {}),
                       "seconds": res.get("seconds")}
    datasets = list(dict.fromkeys(d for row in table.values() for d in row["datasets"]))
    lines = ["| run | " + " | ".join(datasets) + " | mean |", "|---" * (len(datasets) + 2) + "|"]
    for name, row in table.items():
        cells = [f"{row['datasets'][d]['srcc']:.3f} / {row['datasets'][d]['plcc']:.3f}" if d in row["datasets"]
                 else "-" for d in datasets]
        mean = row["mean"]
        cells.append(f"{mean['srcc']:.3f} / {mean['plcc']:.3f}" if mean else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = ("Held-out SRCC / PLCC (content never seen in training), best epoch of each run.\n\n" + "\n".join(lines)
            + f"\n\nTotal time {seconds:.0f} s.\n")
    atomic_write(run_dir / "summary.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    summary = {"runs": table, "seconds": seconds}
    atomic_write(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    for line in text.strip().splitlines():
        logger.info("%s", line)
    return summary
