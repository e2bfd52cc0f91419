"""Teacher pseudo-labels for ATTIQA pretraining: five zero-shot CLIP attribute scores per image, cached on disk.

The teacher is any CLIP-layout checkpoint gamma loads (OpenAI CLIP, UniQA, a Gamma file), scoring with
:meth:`gamma.GammaModel.attributes`. Labels are computed once per image and written to a cache folder:

- ``teacher.json``: how they were computed (prompts, teacher weights fingerprint, towers, preprocessing), written
  first; resuming with a different teacher or preprocessing is refused;
- ``part-NNNNN.csv``: one file per chunk of images (``path, sharpness, contrast, brightness, colorfulness,
  noisiness``, or the names of other prompt pairs), each written atomically, so a kill loses at most the chunk in
  progress and a rerun resumes after the last complete chunk;
- ``labels.csv``: every label in input order, written (atomically) once all images are done; ``skipped.csv`` lists
  images that could not be read when ``on_error='skip'``.

Preprocessing (docs/attiqa.md): each image's short side is resized to the teacher's input size, then the scores of
three crops spread over the long side (``grid`` protocol; one crop for a square image) are averaged, so the labels
describe the whole picture at the scale CLIP was trained on.

The teacher ``"measured"`` (:data:`MEASURED`) needs no model: :func:`measure_attributes` computes five classical
pixel statistics of the whole decoded picture (sharpness, RMS contrast, mean luminance, Hasler-Suesstrunk
colourfulness, Immerkaer's noise estimate). It is the offline demo's stand-in for CLIP (whose prompts a model trained
here never learned); its labels go through the same cache.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .._files import atomic_write
from ..archs.crops import CropProtocol
from ..archs.gamma import GammaModel
from ..archs.moae import MoAE
from ..assess import pair_probabilities
from ..data.transforms import resize_short_side
from ..factory import create_model
from ..families import is_family
from ..io import ImageDecodeError, list_image_files, load_image
from ..prompts import ATTRIBUTE_PROMPTS, ATTRIBUTES

logger = logging.getLogger(__name__)

SETTINGS_FILE = "teacher.json"
LABELS_FILE = "labels.csv"
SKIPPED_FILE = "skipped.csv"
FORMAT_VERSION = 1
_PART = re.compile(r"^part-(\d{5,})\.csv$")


@dataclass
class TeacherLabels:
    """Pseudo-labels: ``scores[i]`` (one per attribute, in ``attributes`` order) belong to ``paths[i]``."""

    paths: list[str]
    scores: np.ndarray  # (N, A) float32, each in (0, 1); higher = better (a high noisiness score means little noise)
    skipped: list[str]  # inputs that could not be read (on_error='skip')
    attributes: tuple[str, ...] = ATTRIBUTES  # the columns: the five attributes, or the names of other prompt pairs

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(zip(self.paths, self.scores, strict=True))


# ------------------------------------------------------------------------------------------ measured teacher
MEASURED = "measured"  # the teacher name of :func:`measure_attributes`

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights
# Immerkaer (1996), "Fast noise variance estimation": this kernel cancels image structure up to second order, so what
# remains of a picture is mostly its noise; sigma = sqrt(pi / 2) / 6 * mean |Y * kernel|.
_NOISE_KERNEL = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))


def measure_attributes(images: torch.Tensor) -> torch.Tensor:
    """Five pixel statistics per picture (B, 5), :data:`ATTRIBUTES` order, each in (0, 1], higher = better pole.

    - sharpness: mean gradient magnitude of the luminance at half resolution (2x2 average, which damps pixel noise),
      over its standard deviation + 0.05 (so a flat or faded picture is not called blurred for its low contrast);
    - contrast: twice the RMS contrast (standard deviation of the luminance);
    - brightness: the mean luminance;
    - colorfulness: Hasler and Suesstrunk's (2003) M = sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2);
    - noisiness: 0.02 / (0.02 + sigma), sigma Immerkaer's noise estimate (high for a clean picture, as the CLIP
      teacher's "Peerless" pole).

    Unbounded statistics x are mapped to (0, 1) by x / (1 + x); the student learns only their order.

    Args:
        images: (B, 3, H, W) RGB in [0, 1], H and W >= 4.
    """
    if images.dim() != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 4:
        raise ValueError(f"images must be (B, 3, H, W) with H, W >= 4, got {tuple(images.shape)}")
    x = images.float()
    luma = torch.einsum("bchw,c->bhw", x, x.new_tensor(_LUMA))[:, None]  # (B, 1, H, W)
    std = luma.std(dim=(1, 2, 3))
    half = F.avg_pool2d(luma, 2)
    grad = torch.sqrt((half[..., 1:, :-1] - half[..., :-1, :-1]) ** 2 + (half[..., :-1, 1:] - half[..., :-1, :-1]) ** 2)
    sharp = grad.mean(dim=(1, 2, 3)) / (std + 0.05)
    r, g, b = x.unbind(dim=1)
    rg, yb = r - g, 0.5 * (r + g) - b
    colourful = (torch.sqrt(rg.var(dim=(1, 2)) + yb.var(dim=(1, 2)))
                 + 0.3 * torch.sqrt(rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2))
    kernel = x.new_tensor(_NOISE_KERNEL)[None, None]
    sigma = math.sqrt(math.pi / 2) / 6 * F.conv2d(luma, kernel).abs().mean(dim=(1, 2, 3))
    out = torch.stack([sharp / (1 + sharp), (2 * std).clamp(max=1.0), luma.mean(dim=(1, 2, 3)),
                       colourful / (1 + colourful), 0.02 / (0.02 + sigma)], dim=-1)
    return out.clamp(min=1e-6)


class MeasuredTeacher:
    """:func:`measure_attributes` with the interface of the CLIP teacher's ``attributes`` (no weights, CPU)."""

    settings = {
        "format_version": FORMAT_VERSION,
        "teacher": MEASURED,
        # recorded in teacher.json: kept when the module moved to gamma.train, so earlier caches stay valid
        "score": "gamma.teacher.measure_attributes: sharpness, RMS contrast, mean luminance, Hasler-Suesstrunk "
                 "colourfulness, Immerkaer noise (version 1)",
        "preprocess": "none: the whole decoded picture",
    }

    def attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(ATTRIBUTES, measure_attributes(images).unbind(dim=-1), strict=True))


def label_images(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    teacher: GammaModel | MeasuredTeacher | str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    batch_size: int = 32,
    chunk_size: int = 256,
    device: str | torch.device | None = None,
    on_error: str = "raise",
    allow_unsafe: bool = False,
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> TeacherLabels:
    """Compute (or resume computing) the teacher's attribute scores of images and cache them in ``cache_dir``.

    Args:
        inputs: a folder (searched recursively), an image file, or a list of image files.
        teacher: a GammaModel, or a checkpoint file of CLIP layout (plain OpenAI/UniQA CLIP, release or our Gamma
            file) to build one from; or ``"measured"`` (a :class:`MeasuredTeacher`): pixel statistics, no model.
        cache_dir: the cache folder (created); rerunning with the same folder skips what is done.
        root: labels are keyed by path relative to ``root``; default: relative to ``inputs`` when it is a folder,
            else the path as given.
        batch_size: images per forward pass (images of equal size after resizing are batched together).
        chunk_size: images per ``part-*.csv`` file (the unit a kill can lose).
        device: where the teacher runs (default: where it is).
        on_error: ``raise`` stops at an unreadable image (its name in the error; finished chunks stay on disk);
            ``skip`` logs it, lists it in ``skipped.csv`` and goes on.
        allow_unsafe: passed to :func:`gamma.create_model` for a teacher checkpoint that needs a full unpickle.
        prompts: other (positive, negative) prompt pairs, ``{name: (pos, neg)}``, one label column per pair in this
            order: the five attributes' (ATTIQA's Table 7: the pairs of median or lowest proxy-task score) or any
            others (Table 7's single pair ``{"quality": ("Good image", "Bad image")}``); None: Table 1's pairs
            (:data:`gamma.prompts.ATTRIBUTE_PROMPTS`). Recorded in ``teacher.json``, so a cache of other prompts is
            refused. A CLIP teacher only.

    Returns:
        the labels of every readable input, in input order.

    Raises:
        ValueError: bad arguments, no images, or a cache written by a different teacher or preprocessing.
        gamma.io.ImageDecodeError: an unreadable image with ``on_error='raise'``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    files, keys = _inputs(inputs, root)
    if isinstance(teacher, str) and teacher == MEASURED:
        teacher = MeasuredTeacher()
    pairs = check_prompts(prompts, names=None) if prompts is not None else dict(ATTRIBUTE_PROMPTS)
    if isinstance(teacher, MeasuredTeacher):
        if prompts is not None:
            raise ValueError("prompts: the measured teacher has no prompts; give a CLIP-layout teacher")
        return _label(files, keys, teacher, Path(cache_dir), dict(teacher.settings), batch_size, chunk_size, on_error)
    given = isinstance(teacher, nn.Module)
    checkpoint = None if given else str(teacher)
    model = teacher if given else create_model(None, pretrained=teacher, allow_unsafe=allow_unsafe)
    if not is_family(model, "gamma"):  # the attribute prompts need CLIP towers with a text side
        raise ValueError(f"the teacher must be a CLIP-layout model, got {type(model).__name__}")
    if device is not None:
        model = model.to(device)
    protocol, was_training, tokens = model.crop_protocol, model.training, model.attribute_tokens
    model.eval()
    model.crop_protocol = CropProtocol(mode="grid", num=3, size=model.config.vision.image_size)
    if pairs != ATTRIBUTE_PROMPTS:
        _use_prompts(model, pairs)
    try:
        return _label(files, keys, model, Path(cache_dir), _settings(model, checkpoint, pairs), batch_size,
                      chunk_size, on_error)
    finally:
        model.crop_protocol = protocol
        model.train(was_training)
        model.attribute_tokens = tokens  # the text cache compares prompts by value: nothing to invalidate


def check_prompts(prompts: Mapping[str, Sequence[str]],
                  names: Sequence[str] | None = ATTRIBUTES) -> dict[str, tuple[str, str]]:
    """``prompts`` as ``{name: (positive, negative)}`` in the order of ``names``: the five attributes (the default),
    or the attribute heads of an ATTIQA student of another kind (Table 7's single pair: ``("quality",)``); None: the
    mapping's own names, in its order.

    Raises:
        ValueError: not a mapping of exactly these names to two non-empty strings each (the message names the
            first problem).
    """
    if not isinstance(prompts, Mapping):
        raise ValueError(f"prompts must map each attribute to a (positive, negative) pair, got "
                         f"{type(prompts).__name__}")
    names = tuple(prompts) if names is None else tuple(names)
    unknown, missing = sorted(map(str, set(prompts) - set(names))), [a for a in names if a not in prompts]
    if unknown or missing or not names:
        raise ValueError(f"prompts must give a pair for each of {', '.join(names) or '(no name)'}"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                         + (f"; missing: {', '.join(missing)}" if missing else ""))
    out = {}
    for a in names:
        pair = prompts[a]
        if (isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2
                or not all(isinstance(p, str) and p.strip() for p in pair)):
            raise ValueError(f"prompts.{a}: a pair of non-empty strings [positive, negative], got {pair!r}")
        out[a] = (pair[0].strip(), pair[1].strip())
    return out


def _use_prompts(model: GammaModel, pairs: Mapping[str, tuple[str, str]]) -> None:
    """Make the model score these pairs (until the caller restores ``attribute_tokens``)."""
    ctx = model.attribute_tokens.shape[-1]
    tokens = open_clip.tokenize([p for a in pairs for p in pairs[a]], context_length=ctx)
    model.attribute_tokens = tokens.view(len(pairs), 2, ctx).to(model.attribute_tokens.device)


def _label(files: list[str], keys: list[str], model: GammaModel | MeasuredTeacher, cache: Path, settings: dict,
           batch_size: int, chunk_size: int, on_error: str) -> TeacherLabels:
    """The cached loop of :func:`label_images`: check the settings, label what is missing chunk by chunk, then write
    ``labels.csv`` (and ``skipped.csv``)."""
    _check_settings(cache, settings)
    names = tuple(settings["prompts"]) if "prompts" in settings else ATTRIBUTES

    done = _read_parts(cache, names)
    todo = [(f, k) for f, k in zip(files, keys, strict=True) if k not in done]
    logger.info("teacher labels: %d images, %d cached in %s, %d to compute (%s)", len(keys), len(keys) - len(todo),
                cache, len(todo), settings.get("towers", settings.get("teacher")))
    skipped: dict[str, str] = {}
    part = max((int(m.group(1)) for p in cache.glob("part-*.csv") if (m := _PART.match(p.name))), default=-1) + 1
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        rows = _label_chunk(model, chunk, batch_size, on_error, skipped)
        if rows:
            _write_csv(cache / f"part-{part:05d}.csv", rows, names)
            part += 1
            done.update((k, s) for k, *s in rows)
        logger.info("teacher labels: %d / %d images done", len(keys) - len(todo) + start + len(chunk), len(keys))

    paths = [k for k in keys if k in done]
    scores = np.array([done[k] for k in paths], dtype=np.float32).reshape(len(paths), len(names))
    _write_csv(cache / LABELS_FILE, [(k, *map(float, s)) for k, s in zip(paths, scores, strict=True)], names)
    if skipped:
        atomic_write(cache / SKIPPED_FILE, lambda tmp: _write_rows(tmp, ("path", "error"), list(skipped.items())))
        logger.warning("teacher labels: %d unreadable images skipped (listed in %s)", len(skipped),
                       cache / SKIPPED_FILE)
    return TeacherLabels(paths=paths, scores=scores, skipped=list(skipped), attributes=names)


def read_labels(cache_dir: str | os.PathLike) -> TeacherLabels:
    """The labels cached in ``cache_dir``: ``labels.csv`` when complete, else the finished chunks so far.

    Raises:
        ValueError: no labels there, or a malformed file (named, with its line).
    """
    cache = Path(cache_dir)
    names = _cached_names(cache)
    if (cache / LABELS_FILE).is_file():
        rows = _read_csv(cache / LABELS_FILE, names)
    else:
        rows = list(_read_parts(cache, names).items())
    if not rows:
        raise ValueError(f"no teacher labels in {cache}")
    skipped = [r[0] for r in _csv_rows(cache / SKIPPED_FILE)[1:]] if (cache / SKIPPED_FILE).is_file() else []
    return TeacherLabels(paths=[k for k, _ in rows], scores=np.array([s for _, s in rows], dtype=np.float32),
                         skipped=skipped, attributes=names)


def _cached_names(cache: Path) -> tuple[str, ...]:
    """The label columns of a cache: the names of the prompt pairs in its ``teacher.json`` (the five attributes for
    Table 1's pairs and for the measured teacher)."""
    try:
        settings = json.loads((cache / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ATTRIBUTES
    return tuple(settings["prompts"]) if isinstance(settings.get("prompts"), dict) else ATTRIBUTES


# ------------------------------------------------------------------------------------------------ inputs
def _inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike],
            root: str | os.PathLike | None) -> tuple[list[str], list[str]]:
    """Image files and their keys (relative to ``root``, or to ``inputs`` when it is a folder), duplicates dropped."""
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
        base = Path(root) if root is not None else Path(inputs)
        files = list_image_files(inputs)
    else:
        base = Path(root) if root is not None else None
        files = [str(f) for f in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not files:
        raise ValueError(f"no images found in {inputs}")
    out_files, out_keys, seen = [], [], set()
    for f in files:
        key = Path(os.path.relpath(f, base)).as_posix() if base is not None else str(f)
        if key in seen:
            continue
        if "\n" in key or "\r" in key:
            raise ValueError(f"image path with a line break cannot be a label key: {key!r}")
        seen.add(key)
        out_files.append(str(f))
        out_keys.append(key)
    return out_files, out_keys


def _label_chunk(model: GammaModel | MeasuredTeacher, chunk: Sequence[tuple[str, str]], batch_size: int,
                 on_error: str, skipped: dict[str, str]) -> list[tuple]:
    """Rows ``(key, A scores)`` of a chunk of (file, key), in chunk order (unreadable files skipped or raised)."""
    clip = not isinstance(model, MeasuredTeacher)
    images: dict[str, torch.Tensor] = {}
    for file, key in chunk:
        try:
            img = load_image(file)
            # (3, size, L) for CLIP; the measures take the picture as it is
            images[key] = resize_short_side(img, model.config.vision.image_size, mode="bicubic") if clip else img
        except ImageDecodeError as exc:
            if on_error == "raise":
                raise
            logger.warning("teacher labels: skipping %s", exc)
            skipped[key] = str(exc)
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, img in images.items():
        groups.setdefault(tuple(img.shape), []).append(key)
    device = model.score_level.device if clip else torch.device("cpu")
    scores: dict[str, list[float]] = {}
    with torch.inference_mode():
        for keys in groups.values():
            for i in range(0, len(keys), batch_size):
                batch = keys[i : i + batch_size]
                x = torch.stack([images[k] for k in batch]).to(device)
                out = _teacher_scores(model, x).float().cpu()  # (b, A)
                scores.update(zip(batch, out.tolist(), strict=True))
    return [(key, *scores[key]) for _, key in chunk if key in scores]


def _teacher_scores(model: GammaModel | MeasuredTeacher, images: torch.Tensor) -> torch.Tensor:
    """Label columns (b, A) of a batch: the CLIP teacher's P(positive) of each prompt pair it holds (whatever their
    number), or the five measures."""
    if not isinstance(model, MeasuredTeacher):  # the CLIP teacher
        return pair_probabilities(model, *model.crop_features(model.check_images(images)))
    return torch.stack(list(model.attributes(images).values()), dim=-1)


# ------------------------------------------------------------------------------------------------ cache files
def _settings(model: GammaModel, checkpoint: str | None, pairs: Mapping[str, tuple[str, str]]) -> dict:
    digest = hashlib.sha1()
    for name, tensor in _tower_state(model).items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "format_version": FORMAT_VERSION,
        "prompts": {a: list(pairs[a]) for a in pairs},
        "score": "softmax over (positive, negative) of logit_scale.exp() * cosine; P(positive)",
        "weights_sha1": digest.hexdigest(),
        "checkpoint": checkpoint,
        "towers": model.tower_description(),
        "preprocess": f"short side resized to {model.config.vision.image_size} (bicubic, antialiased), mean of the "
                      f"scores of a 3-crop grid of {model.config.vision.image_size} crops",
    }


def _tower_state(model: GammaModel) -> dict[str, torch.Tensor]:
    """The tensors the attribute scores depend on: the CLIP towers, without the level head (adapter, levels) and
    without the routers and experts of MoAE blocks whose merge factor is 0 (they add exact zeros; a CLIP file leaves
    the routers at their random initial values)."""
    idle = [f"{name}." for name, m in model.named_modules()
            if isinstance(m, MoAE) and m.scale is not None and not bool(m.scale.detach().ne(0).item())]
    return {k: v for k, v in model.state_dict().items()
            if k.startswith("clip_model.") and not any(k.startswith((p + "experts.", p + "gating.")) for p in idle)}


def _check_settings(cache: Path, settings: dict) -> None:
    path = cache / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable teacher settings ({exc}); delete the cache folder to start over") \
                from exc
        differ = [k for k in settings if k != "checkpoint" and old.get(k) != settings[k]]
        if differ:
            raise ValueError(f"{cache} holds labels from a different teacher or preprocessing ({', '.join(differ)} "
                             "differ); use another cache folder or delete this one")
        return
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8"))


def _read_parts(cache: Path, names: Sequence[str] = ATTRIBUTES) -> dict[str, list[float]]:
    done: dict[str, list[float]] = {}
    for path in sorted(p for p in cache.glob("part-*.csv") if _PART.match(p.name)):
        done.update(_read_csv(path, names))
    return done


def _read_csv(path: Path, names: Sequence[str] = ATTRIBUTES) -> list[tuple[str, list[float]]]:
    header = ("path", *names)
    rows = _csv_rows(path)
    if not rows or tuple(rows[0]) != header:
        raise ValueError(f"{path}: not a teacher-label file (header should be {','.join(header)})")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            if len(row) != len(header):
                raise ValueError(f"{len(row)} columns")
            out.append((row[0], [float(v) for v in row[1:]]))
        except ValueError as exc:
            raise ValueError(f"{path}, line {line}: malformed label row ({exc})") from None
    return out


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [r for r in csv.reader(fh) if r]


def _write_csv(path: Path, rows: Sequence[tuple], names: Sequence[str] = ATTRIBUTES) -> None:
    atomic_write(path, lambda tmp: _write_rows(tmp, ("path", *names), rows))


def _write_rows(tmp: str, header: Sequence[str], rows: Sequence[tuple]) -> None:
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([repr(v) if isinstance(v, float) else v for v in row])
