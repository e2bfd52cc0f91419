"""Stage ``pretrain_clip``: contrastive pretraining of a CLIP backbone on captioned images.

The paper starts Gamma from UniQA, a CLIP fine-tuned on quality and aesthetics captions. Offline there is no such
checkpoint, so this stage makes a small stand-in: a CLIP of the run's architecture (MoAE off), trained with CLIP's
symmetric InfoNCE loss on the training part of every ``data`` entry, each image paired with the caption of its meta
row (the synthetic datasets describe each image's distortions: "a heavily blurred underwater photo"). It writes the
backbone as a plain OpenAI-layout CLIP state_dict (``visual.conv1.weight``, ...), which the ``gamma`` stage loads
with ``model.pretrained`` exactly as it would load UniQA's file: experts start as copies of its MLPs.

The stage's options are the ``pretrain:`` section (:class:`gamma.train.config.PretrainCfg`). The option files named in
``pretrain.then`` run after it, starting from the new backbone (:mod:`gamma.train.stages`). The demo
(options/demo.yml) is such a chain: synthetic data -> this stage -> Gamma with MoAE -> the same backbone without MoAE.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm

from .._files import atomic_write
from ..archs import GammaModel
from ..archs.clip import encode_image, encode_text
from ..data import IQADataset, build_dataset, collate
from ..data.synthetic import generate_for_entries
from ..factory import create_model
from .checkpoint import write_json
from .config import CAPTION_COLUMN, OptimCfg, TrainConfig, save_config
from .distributed import DistInfo, broadcast_object, wait_for_main
from .run_folder import MetricsLog, run_dir_of

logger = logging.getLogger(__name__)


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
def run(cfg: TrainConfig, dist: DistInfo | None = None) -> dict[str, Any]:
    """Run stage ``pretrain_clip`` (writing the synthetic datasets first when ``pretrain.synthetic`` asks for them)
    on ``dist.device``.

    Pretraining is one process's work: under torchrun rank 0 pretrains and the other ranks wait (without the NCCL
    timeout, :func:`gamma.train.distributed.wait_for_main`), then read its results.

    Returns:
        ``{'backbone': path, 'steps': n, 'seconds': s, 'losses': [...], 'run_dir': ...}``, also written to the run
        folder's ``results.json``.
    """
    dist = dist or DistInfo()
    result, error = None, None
    if dist.is_main:
        try:
            result = _run_main(cfg, dist.device)
        except BaseException as exc:  # noqa: BLE001 - the other ranks must hear about it before they give up waiting
            error = exc
    wait_for_main(dist)
    error_text = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", dist)
    if error is not None:
        raise error
    if error_text is not None:
        raise RuntimeError(f"rank 0 failed to pretrain: {error_text}")
    return broadcast_object(result, dist)


def _run_main(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    p = cfg.pretrain
    if p.threads:
        torch.set_num_threads(p.threads)
    if p.synthetic.enabled:
        generate_for_entries(p.synthetic, cfg.data, cfg.data_root)
    run_dir = run_dir_of(cfg)
    backbone = run_dir / p.output
    if not cfg.overwrite and backbone.exists():
        raise FileExistsError(f"{backbone} exists; start over with overwrite=true or choose another name=")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    log = MetricsLog(run_dir, cfg.log.tensorboard)
    try:
        result = _pretrain(cfg, backbone, log, device)
    finally:
        log.close()
    result["run_dir"] = str(run_dir)
    write_json(run_dir / "results.json", result)
    return result


def _pretrain(cfg: TrainConfig, out: Path, log: MetricsLog, device: torch.device) -> dict[str, Any]:
    p, o = cfg.pretrain, cfg.optim
    model = _backbone(cfg).to(device)
    clip = model.clip_model
    data = _captioned_data(cfg, model.config.vision.image_size)
    # Every distinct caption is tokenised once; only the batch's captions go through the text tower.
    tokens = open_clip.tokenize(data.vocab, context_length=model.config.text.context_length).to(device)
    loader = DataLoader(ConcatDataset(data.sets), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.workers, collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    if total < 1:
        raise ValueError(f"no pretraining steps: {sum(map(len, data.sets))} images, batch_size {cfg.batch_size}")
    opt = _optimizer(clip, o)
    logger.info("pretraining CLIP (%.1f M parameters) on %d captioned images (%d distinct captions): %d epochs x %d "
                "steps of %d", sum(q.numel() for q in clip.parameters()) / 1e6, sum(map(len, data.sets)),
                len(data.vocab), cfg.epochs, steps_per_epoch, cfg.batch_size)
    bar = tqdm(total=total, desc="pretrain CLIP", dynamic_ncols=True, leave=False) if cfg.log.progress else None
    losses: list[float] = []
    step, t0 = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        for i, batch in enumerate(loader):
            if i >= steps_per_epoch:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, o.lr, o.min_lr, p.warmup)
            loss = _batch_loss(model, batch, data.caption_ids(batch), tokens)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step + 1}; lower optim.lr")
            _update(clip, opt, loss, o.grad_clip, math.log(p.max_logit_scale))
            step += 1
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if cfg.log.every_steps and step % cfg.log.every_steps == 0:
                _log_steps(log, clip, opt, epoch, step, total, losses[-cfg.log.every_steps:])
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    state = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    logger.info("pretrained CLIP backbone written to %s (%d steps, %.0f s, final loss %.4f)", out, step, seconds,
                float(np.mean(losses[-20:])))
    return {"backbone": str(out), "steps": step, "seconds": seconds, "losses": losses}


def _backbone(cfg: TrainConfig) -> GammaModel:
    """The run's model without MoAE, its whole CLIP trainable (random parts initialised from the run seed)."""
    torch.manual_seed(cfg.seed)
    overrides = {**cfg.model.overrides, "moae_layers": 0, "num_experts": 0}
    model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, allow_unsafe=cfg.model.allow_unsafe,
                         prompt_set_override=cfg.model.prompt_set_override, **overrides)
    model.clip_model.requires_grad_(True)
    model.clip_model.train()
    return model


@dataclass
class CaptionedData:
    """The training parts of a run's datasets and the caption of every image."""

    sets: list[IQADataset]
    vocab: list[str]  # the distinct captions, sorted
    caption_of: dict[str, dict[int, int]]  # dataset name -> meta row -> index into vocab

    def caption_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B,) index into ``vocab`` of each image of a collated batch."""
        return torch.tensor([self.caption_of[d][r] for d, r in zip(batch["dataset"], batch["index"].tolist(),
                                                                    strict=True)])


def _captioned_data(cfg: TrainConfig, size: int) -> CaptionedData:
    sets, captions = [], {}
    for entry in cfg.data:
        if entry.crop_size != size:
            raise ValueError(f"data entry {entry.name!r}: crop_size {entry.crop_size} differs from the model's input "
                             f"size {size}")
        ds = build_dataset(entry, "train")
        table = read_captions(entry.meta_path, cfg.pretrain.caption_column)
        sets.append(ds)
        captions[ds.entry.name] = {r: table[r] for r in ds.rows}
    if not sets:
        raise ValueError("data: stage pretrain_clip needs at least one dataset entry with captions")
    vocab = sorted({c for rows in captions.values() for c in rows.values()})
    index = {c: i for i, c in enumerate(vocab)}
    return CaptionedData(sets, vocab, {name: {r: index[c] for r, c in rows.items()} for name, rows in captions.items()})


def _optimizer(clip: torch.nn.Module, o: OptimCfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on embeddings, biases, norms, the logit scale), as CLIP trains."""
    decay = [q for n, q in clip.named_parameters() if q.ndim >= 2 and "embedding" not in n]
    rest = [q for n, q in clip.named_parameters() if not (q.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=o.lr, betas=o.betas, eps=o.eps)


def _batch_loss(model: GammaModel, batch: dict[str, Any], caption_ids: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
    """The contrastive loss of one batch; captions shared by several images go through the text tower once."""
    clip = model.clip_model
    distinct, inverse = torch.unique(caption_ids, return_inverse=True)
    device = model.pixel_mean.device
    distinct, inverse = distinct.to(device), inverse.to(device)
    pixels = (batch["img"].to(device, non_blocking=True) - model.pixel_mean) / model.pixel_std
    image = F.normalize(encode_image(clip, pixels), dim=-1)  # (B, E)
    text = F.normalize(encode_text(clip, tokens[distinct]), dim=-1)  # (U, E)
    return contrastive_loss(image, text, inverse, clip.logit_scale)


def _update(clip: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None,
            max_log_scale: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(clip.parameters(), grad_clip)
    opt.step()
    with torch.no_grad():
        clip.logit_scale.clamp_(0, max_log_scale)


def _log_steps(log: MetricsLog, clip: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int, total: int,
               window: list[float]) -> None:
    log.write({"kind": "pretrain", "epoch": epoch + 1, "step": step, "loss": float(np.mean(window)),
               "lr": opt.param_groups[0]["lr"], "logit_scale": clip.logit_scale.exp().item()})
    logger.info("pretrain step %d/%d: loss %.4f", step, total, float(np.mean(window)))
