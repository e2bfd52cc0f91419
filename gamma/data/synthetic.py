"""Synthetic multi-scene IQA datasets for the offline demo and the tests.

No IQA dataset or pretrained CLIP can be downloaded offline, so the demo trains on pictures made here: procedural
content (fractal noise, shapes, gratings, gradients and, when scikit-image is installed, crops of the photos it ships)
degraded by distortions of known strength. The MOS of each picture is a function of those strengths, so the task is
learnable and a model's ranking can be checked against it.

Each synthetic dataset is written in the pyiqa / release layout (docs/datasets.md#meta-files):

- ``<root>/<name>/images/*.png``: the pictures (PNG, lossless, so JPEG artefacts are stored as generated);
- ``<root>/<name>/meta_info.csv``: header, then ``image_name, mos, caption, content, distortion, strength`` (column 0
  relative to the dataset root, column 1 the label on the dataset's own scale; the rest is ignored by IQA readers);
- ``<root>/<name>/split.pkl``: ``{1..10: {'train': [rows], 'val': [rows]}}``, 80/20 by *content*: every version of a
  source picture is on the same side, so held-out images show content never seen in training.

The datasets differ in scene, label scale and label bias, and they weigh the distortions differently (each has its
own "raters"): mixed training of them has the problem MoAE addresses. ``caption`` describes the distortion in words
("a heavily blurred underwater photo") for the contrastive pretraining stage (:mod:`gamma.train.pretrain`); it names
no dataset-specific MOS.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from .meta import denormalize_mos

logger = logging.getLogger(__name__)

META_FILE = "meta_info.csv"
SPLIT_FILE = "split.pkl"
STAMP_FILE = "synthetic.json"  # generation settings; written last, so it also marks a complete dataset
GENERATOR_VERSION = 1  # bump when the pictures or labels a spec produces change
META_HEADER = ("image_name", "mos", "caption", "content", "distortion", "strength")
DISTORTIONS: tuple[str, ...] = ("blur", "noise", "jpeg", "contrast", "saturation", "pixelate")

# Words for a distortion at strength s in (0, 1]: (upper bound of s, adverb).
_DEGREES: tuple[tuple[float, str], ...] = ((0.34, "slightly"), (0.67, "moderately"), (1.01, "heavily"))
_ADJECTIVES = {
    "blur": "blurred",
    "noise": "noisy",
    "jpeg": "compressed",
    "contrast": "washed-out",
    "saturation": "desaturated",
    "pixelate": "pixelated",
}
_SCENE_NOUNS = {"natural": "photo", "underwater": "underwater photo", "aigc": "AI-generated picture"}


@dataclass
class SyntheticSpec:
    """One synthetic dataset: its content style, label scale and how its raters weigh distortions."""

    name: str  # folder name under the data root
    scene: str  # content style and SDP scene: "natural" | "underwater" | "aigc"
    label: str = "mos"  # "mos" (higher is better) or "dmos" (lower is better)
    mos_range: tuple[float, float] = (0.0, 100.0)  # (lo, hi) of the label scale
    quality_span: tuple[float, float] = (0.05, 0.95)  # normalised label of the worst / best picture
    # Per-distortion weight: how much a distortion of strength 1 lowers quality (in [0, 1]).
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DISTORTIONS, 0.9))
    rater_noise: float = 0.02  # std of the label noise, on the normalised scale
    num_contents: int = 400  # source pictures: many, so that a model learns distortions rather than pictures
    versions: int = 4  # pictures per source: one pristine, the rest distorted


#: The demo's three datasets: different scenes, label scales, biases and distortion weights.
DEMO_SPECS: tuple[SyntheticSpec, ...] = (
    SyntheticSpec("synth_natural", "natural", "mos", (0.0, 100.0), (0.05, 0.95),
                  dict(blur=0.9, noise=0.9, jpeg=0.9, contrast=0.8, saturation=0.6, pixelate=0.9)),
    SyntheticSpec("synth_underwater", "underwater", "mos", (1.0, 5.0), (0.05, 0.7),
                  dict(blur=1.0, noise=0.7, jpeg=0.8, contrast=0.4, saturation=0.2, pixelate=0.9)),
    SyntheticSpec("synth_aigc", "aigc", "dmos", (0.0, 1.0), (0.3, 1.0),
                  dict(blur=0.5, noise=1.0, jpeg=1.0, contrast=0.9, saturation=0.9, pixelate=0.7)),
)


# ------------------------------------------------------------------------------------------------ content
def fractal_noise(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Colour 1/f^beta noise (size, size, 3) in [0, 1]: cloud- or landscape-like texture."""
    f = np.fft.fftfreq(size)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    amp = radius ** (-beta / 2)
    amp[0, 0] = 0.0
    spec = amp[..., None] * np.exp(2j * math.pi * rng.random((size, size, 3)))
    x = np.fft.ifft2(spec, axes=(0, 1)).real
    x = x @ rng.normal(size=(3, 3)) * 0.5 + x  # correlated channels: coloured, not rainbow, noise
    lo, hi = np.percentile(x, [1, 99], axis=(0, 1))
    return np.clip((x - lo) / (hi - lo + 1e-8), 0, 1)


def gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear or radial two-colour gradient (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * math.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
    else:
        cx, cy = rng.random(2)
        t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    t = (t - t.min()) / (np.ptp(t) + 1e-8)
    a, b = rng.random(3), rng.random(3)
    return a + (b - a) * t[..., None]


def grating(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sinusoidal stripes or a checkerboard in two random colours (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    freq = rng.uniform(0.04, 0.25)
    angle = rng.uniform(0, math.pi)
    t = np.sin(2 * math.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    if rng.random() < 0.4:
        t = np.sign(t * np.sin(2 * math.pi * freq * (-np.sin(angle) * xx + np.cos(angle) * yy)))
    t = (t + 1) / 2
    a, b = rng.random(3), rng.random(3)
    return a + (b - a) * t[..., None]


def draw_shapes(rng: np.random.Generator, img: Image.Image, count: int, flat: bool = False) -> Image.Image:
    """Random ellipses, rectangles, polygons and lines drawn onto ``img`` (in place; returned)."""
    draw = ImageDraw.Draw(img)
    size = img.size[0]
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 4)
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.5, 2) * size
        box = [x0, y0, x0 + w, y0 + h]
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        elif kind == 2:
            pts = [tuple(p) for p in (rng.uniform(0, 1, (int(rng.integers(3, 7)), 2)) * size)]
            draw.polygon(pts, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(1, 4 if flat else 6)))
    return img


def _photo_pool() -> list[np.ndarray]:
    """RGB photos (H, W, 3) uint8 that ship with scikit-image; empty when it is not installed."""
    try:
        import skimage.data as sk
    except ImportError:
        return []
    pool = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
                 "colorwheel", "camera", "brick", "grass", "gravel", "moon", "coins"):
        try:
            img = np.asarray(getattr(sk, name)())
        except Exception:  # noqa: BLE001 - a picture that needs a download (or fails to load) is just skipped
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        pool.append(np.ascontiguousarray(img[..., :3]))
    return pool


def photo_crop(rng: np.random.Generator, pool: Sequence[np.ndarray], size: int) -> np.ndarray:
    """A random rescaled crop (size, size, 3) in [0, 1] of a random photo of ``pool``."""
    img = Image.fromarray(pool[int(rng.integers(len(pool)))])
    scale = rng.uniform(size / min(img.size), 1.0) if min(img.size) > size else size / min(img.size)
    w, h = max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))
    img = img.resize((w, h), Image.BILINEAR)
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    arr = np.asarray(img.crop((x, y, x + size, y + size)), dtype=np.float64) / 255
    return arr[:, ::-1] if rng.random() < 0.5 else arr


def make_content(rng: np.random.Generator, size: int, scene: str, pool: Sequence[np.ndarray] = ()) -> Image.Image:
    """A pristine source picture (RGB, size x size) in the style of ``scene``.

    Every picture mixes a detailed layer (fractal texture, grating or photo) with shapes so that it has edges and
    fine detail everywhere: blur or noise must be visible on any content for a label derived from strength to be fair.
    """
    kind = int(rng.integers(0, 4 if pool else 3))
    if kind == 0:
        base = fractal_noise(rng, size, rng.uniform(2.0, 3.0))
    elif kind == 1:
        base = 0.5 * gradient(rng, size) + 0.5 * fractal_noise(rng, size, rng.uniform(1.8, 2.6))
    elif kind == 2:
        base = 0.6 * grating(rng, size) + 0.4 * fractal_noise(rng, size, rng.uniform(2.0, 2.8))
    else:
        base = photo_crop(rng, pool, size)
    if scene == "aigc":
        # "Rendered" look: smooth saturated gradients under flat, posterised shapes.
        base = 0.6 * gradient(rng, size) + 0.4 * base
    img = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    img = draw_shapes(rng, img, int(rng.integers(3, 12)), flat=scene == "aigc")
    if kind != 3 and rng.random() < 0.7:  # texture inside the shapes, too
        detail = fractal_noise(rng, size, rng.uniform(1.8, 2.4))
        arr = np.asarray(img, dtype=np.float64) / 255
        img = Image.fromarray((np.clip(0.8 * arr + 0.2 * detail, 0, 1) * 255).astype(np.uint8))
    # Pristine pictures use the full tonal range, so a loss of contrast is visible without the reference.
    img = ImageOps.autocontrast(img, cutoff=1)
    if scene == "aigc":
        img = ImageEnhance.Color(img.filter(ImageFilter.SMOOTH)).enhance(1.6)
        img = img.quantize(colors=int(rng.integers(24, 64)), method=Image.Quantize.MEDIANCUT).convert("RGB")
    elif scene == "underwater":
        # Water absorbs red first and scatters blue-green light: a tinted, hazy picture.
        arr = np.asarray(img, dtype=np.float64) / 255
        arr = arr * np.array([rng.uniform(0.3, 0.55), rng.uniform(0.75, 0.95), 1.0])
        haze = np.array([0.05, rng.uniform(0.35, 0.5), rng.uniform(0.45, 0.6)])
        mix = rng.uniform(0.15, 0.3)
        img = Image.fromarray((np.clip((1 - mix) * arr + mix * haze, 0, 1) * 255).astype(np.uint8))
    return img


# ------------------------------------------------------------------------------------------------ distortions
def distort(img: Image.Image, kind: str, strength: float, rng: np.random.Generator) -> Image.Image:
    """``img`` degraded by one distortion of ``strength`` in [0, 1] (0 leaves it unchanged)."""
    s = float(strength)
    if s <= 0:
        return img
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=0.4 + 2.6 * s))
    if kind == "noise":
        arr = np.asarray(img, dtype=np.float64) / 255
        arr = arr + rng.normal(0, 0.02 + 0.16 * s, arr.shape)
        return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=max(2, round(45 * (1 - s) ** 1.5 + 2)))
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    if kind == "contrast":
        return ImageEnhance.Contrast(img).enhance(1 - 0.8 * s)
    if kind == "saturation":
        return ImageEnhance.Color(img).enhance(1 - 0.95 * s)
    if kind == "pixelate":
        w, h = img.size
        block = 1.5 + 6.5 * s
        small = img.resize((max(1, round(w / block)), max(1, round(h / block))), Image.BOX)
        return small.resize((w, h), Image.NEAREST)
    raise ValueError(f"unknown distortion {kind!r}; known: {', '.join(DISTORTIONS)}")


def caption(scene: str, distortions: Sequence[tuple[str, float]]) -> str:
    """Words for what was done to a picture: ``"a heavily blurred, slightly noisy underwater photo"``."""
    noun = _SCENE_NOUNS.get(scene, "image")
    parts = [f"{next(w for t, w in _DEGREES if s < t)} {_ADJECTIVES[k]}" for k, s in distortions if s > 0]
    if not parts:
        return f"a pristine {noun}"
    text = ", ".join(parts)
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text} {noun}"


def normalised_quality(spec: SyntheticSpec, distortions: Sequence[tuple[str, float]]) -> float:
    """Noise-free label in [0, 1] (higher is better) of a picture with ``distortions`` for ``spec``'s raters."""
    q = 1.0
    for kind, s in distortions:
        q *= 1 - spec.weights[kind] * s
    lo, hi = spec.quality_span
    return lo + (hi - lo) * q


def to_label(spec: SyntheticSpec, y: float) -> float:
    """A normalised quality (higher is better) on ``spec``'s own scale (flipped for DMOS)."""
    return denormalize_mos(y, spec.mos_range, lower_better=spec.label == "dmos")


# ------------------------------------------------------------------------------------------------ writing
def content_splits(contents: Sequence[int], num_splits: int = 10, train_ratio: float = 0.8,
                   seed: int = 0) -> dict[int, dict[str, list[int]]]:
    """Seeded 80/20 splits of rows grouped by content id: all rows of one source land on the same side."""
    ids = sorted(set(contents))
    rows_of: dict[int, list[int]] = {c: [] for c in ids}
    for row, c in enumerate(contents):
        rows_of[c].append(row)
    splits = {}
    for k in range(1, num_splits + 1):
        order = np.random.default_rng([seed, k]).permutation(len(ids))
        n_train = max(1, min(len(ids) - 1, round(train_ratio * len(ids))))
        train_ids = sorted(ids[i] for i in order[:n_train])
        val_ids = sorted(ids[i] for i in order[n_train:])
        splits[k] = {"train": [r for c in train_ids for r in rows_of[c]],
                     "val": [r for c in val_ids for r in rows_of[c]]}
    return splits


def write_dataset(spec: SyntheticSpec, folder: str | Path, size: int = 64, seed: int = 0,
                  pool: Sequence[np.ndarray] | None = None) -> Path:
    """Generate one dataset into ``folder`` (``images/``, meta CSV, split pickle, ``synthetic.json``)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pool = _photo_pool() if pool is None else pool
    rng = np.random.default_rng([seed, sum(map(ord, spec.name))])
    rows, contents = [], []
    for c in range(spec.num_contents):
        source = make_content(rng, size, spec.scene, pool)
        for v in range(spec.versions):
            if v == 0:
                dists: list[tuple[str, float]] = []
            else:
                # Each distortion type appears at evenly spread strengths across a source's versions; a third of the
                # distorted versions carry a second, weaker distortion.
                kind = DISTORTIONS[(c + v) % len(DISTORTIONS)]
                s = float(np.clip((v - 1 + rng.random()) / (spec.versions - 1), 0.03, 1.0))
                dists = [(kind, s)]
                if rng.random() < 1 / 3:
                    other = DISTORTIONS[int(rng.integers(len(DISTORTIONS)))]
                    if other != kind:
                        dists.append((other, float(rng.uniform(0.05, 0.5))))
            img = source
            for kind, s in dists:
                img = distort(img, kind, s, rng)
            y = float(np.clip(normalised_quality(spec, dists) + rng.normal(0, spec.rater_noise), 0, 1))
            name = f"images/c{c:03d}_v{v:02d}.png"
            img.save(folder / name, compress_level=1)
            rows.append((name, f"{to_label(spec, y):.5f}", caption(spec.scene, dists), c,
                         "+".join(k for k, _ in dists) or "none", "+".join(f"{s:.3f}" for _, s in dists) or "0"))
            contents.append(c)
    with open(folder / META_FILE, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(META_HEADER)
        writer.writerows(rows)
    with open(folder / SPLIT_FILE, "wb") as fh:
        pickle.dump(content_splits(contents, seed=seed), fh)
    # Written last: its presence (with the same settings) means the dataset is complete.
    (folder / STAMP_FILE).write_text(json.dumps(_stamp(spec, size, seed), indent=1))
    return folder


def _stamp(spec: SyntheticSpec, size: int, seed: int) -> dict:
    return {"version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec), "size": size, "seed": seed}


def is_complete(folder: str | Path, spec: SyntheticSpec, size: int, seed: int) -> bool:
    """Whether ``folder`` holds ``spec`` generated with these settings (by this version of the generator)."""
    stamp = Path(folder) / STAMP_FILE
    if not stamp.is_file():
        return False
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return saved == json.loads(json.dumps(_stamp(spec, size, seed)))


@dataclass
class SyntheticCfg:
    """Generation of the synthetic datasets before a run (the ``pretrain.synthetic`` option section)."""

    enabled: bool = False  # write every data entry named like a synthetic spec into its root, unless already there
    size: int = 64  # side of the square pictures
    seed: int = 0
    num_contents: int | None = None  # source pictures per dataset (None: the spec's)
    versions: int | None = None  # pictures per source (None: the spec's)


def spec_for(name: str, cfg: SyntheticCfg | None = None) -> SyntheticSpec:
    """The synthetic spec called ``name`` with ``cfg``'s counts applied."""
    specs = {s.name: s for s in DEMO_SPECS}
    if name not in specs:
        raise ValueError(f"no synthetic dataset named {name!r}; known: {', '.join(specs)}")
    spec = specs[name]
    if cfg is not None:
        changes = {k: v for k, v in {"num_contents": cfg.num_contents, "versions": cfg.versions}.items()
                   if v is not None}
        spec = dataclasses.replace(spec, **changes)
    return spec


def generate_for_entries(cfg: SyntheticCfg, entries: Sequence, data_root: str | None = None) -> list[Path]:
    """Write the synthetic dataset of every entry (a :class:`gamma.data.DatasetEntry`) named like a spec into the
    entry's image root, unless it is already there with the same settings.

    Raises:
        ValueError: an entry's meta or split file is not where the generator writes them (``<root>/meta_info.csv``,
            ``<root>/split.pkl``).
    """
    known = {s.name for s in DEMO_SPECS}
    out, pool = [], None
    for entry in entries:
        if entry.name not in known:
            continue
        folder = Path(entry.image_root)
        for what, path, expected in (("meta_file", entry.meta_path, META_FILE),
                                     ("split_file", entry.split_path, SPLIT_FILE)):
            if path is not None and Path(path) != folder / expected:
                raise ValueError(f"dataset {entry.name!r}: {what} must be <root>/{expected} for generated data, "
                                 f"got {path}")
        spec = spec_for(entry.name, cfg)
        if is_complete(folder, spec, cfg.size, cfg.seed):
            logger.info("synthetic dataset %s: already in %s", entry.name, folder)
        else:
            t0 = time.perf_counter()
            if pool is None:
                pool = _photo_pool()
            write_dataset(spec, folder, size=cfg.size, seed=cfg.seed, pool=pool)
            logger.info("synthetic dataset %s: %d pictures written to %s in %.1f s", entry.name,
                        spec.num_contents * spec.versions, folder, time.perf_counter() - t0)
        out.append(folder)
    return out


def generate(root: str | Path, specs: Sequence[SyntheticSpec] = DEMO_SPECS, size: int = 64, seed: int = 0,
             num_contents: int | None = None, versions: int | None = None, overwrite: bool = False) -> list[Path]:
    """Write every dataset of ``specs`` under ``root`` (skipping complete ones unless ``overwrite``).

    Args:
        root: data root; each dataset goes to ``root/<name>``.
        specs: the datasets.
        size: side of the (square) pictures.
        seed: everything (content, distortions, label noise, splits) is a function of it.
        num_contents / versions: override the specs' counts (the tests use small ones).
        overwrite: regenerate datasets whose meta file already exists.

    Returns:
        the dataset folders.
    """
    pool = _photo_pool()
    out = []
    for spec in specs:
        changes = {k: v for k, v in {"num_contents": num_contents, "versions": versions}.items() if v is not None}
        spec = dataclasses.replace(spec, **changes)
        folder = Path(root) / spec.name
        if not overwrite and is_complete(folder, spec, size, seed):
            logger.info("%s exists; keeping it", folder)
            out.append(folder)
            continue
        logger.info("writing %s: %d sources x %d versions", folder, spec.num_contents, spec.versions)
        out.append(write_dataset(spec, folder, size=size, seed=seed, pool=pool))
    return out
