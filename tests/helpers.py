"""Helpers shared by several test modules.

Test modules import them as ``from helpers import ...``: pytest puts tests/ on ``sys.path`` (``pythonpath`` in
pyproject.toml's pytest section). conftest.py only sets the suite up (environment, threads, seeds, fixtures).
"""

from __future__ import annotations

import csv
import io
import multiprocessing as mp
import os
import signal
import socket
import struct
import time
import traceback
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import gamma
from gamma.data import make_splits, save_splits
from gamma.train import loop
from gamma.train.main import main


# ------------------------------------------------------------------------------------------------ comparisons
def assert_close(actual: Any, expected: Any, *, rtol: float, atol: float, msg: str | None = None) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` element by element.

    Takes tensors, arrays, numbers, and lists or dicts of them (dict keys must match). Both tolerances are explicit:
    the relative one covers rounding that grows with the values compared, the absolute one values near zero. Where
    rounding grows with the largest value of a tensor rather than with each element (sums of large terms that
    cancel), pass an ``atol`` proportional to that value. Shapes must match; values are compared in float64.
    """
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and set(actual) == set(expected), (msg, sorted(actual), sorted(expected))
        for key in expected:
            assert_close(actual[key], expected[key], rtol=rtol, atol=atol, msg=f"{msg or ''}[{key!r}]")
        return
    a, e = _float64(actual), _float64(expected)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=(lambda m: f"{msg}: {m}") if msg else None)


def read_rows(path: Path) -> list[list[str]]:
    """The rows of a CSV file (header included), as strings."""
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def max_abs(x: Any) -> float:
    """The largest magnitude in ``x``: the scale for an ``atol`` that follows a tensor's largest values."""
    return float(_float64(x).abs().max())


def _float64(x: Any) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().cpu().to(torch.float64)
    return torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: pandas columns may be read-only


# ------------------------------------------------------------------------------------------------ models
def perturbed_gamma(name: str = "gamma_test", seed: int = 0, logit_scale: float = 4.0) -> gamma.GammaModel:
    """A tiny model whose every trainable part matters: MoAE (alphas, routers, experts), adapter, levels, and a logit
    scale of ``logit_scale``."""
    torch.manual_seed(seed)
    model = gamma.create_model(name)
    perturb_moae(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.normal_(0, 0.2, generator=gen)
        model.score_level.copy_(torch.tensor([0.1, 0.35, 0.5, 0.8, 1.1]))
        model.clip_model.logit_scale.fill_(logit_scale)
    return model


def perturb_moae(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give a model's MoAE blocks non-trivial values (alphas, routers, experts) so that they change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moae_modules():
            if m.scale is not None:
                m.scale.fill_(0.7)
            m.gating.layer1.weight.normal_(0, 1.0, generator=gen)
            for expert in m.experts.values():
                for p in expert.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))


def perturb_promptiqa(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Make a random-init model a sensitive one: open the self-attention gates (0 at init), give BatchNorm statistics,
    and scale up the weight matrices after the visual encoder (at PyTorch's init scale the prompt barely matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (model.i_p_fusion, model.mlp, model.prompt_fusion, model.blocks, model.score_block):
            for p in part.parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.5, 1.5, generator=gen)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model


# ------------------------------------------------------------------------------------------------ training
def write_noise_dataset(root: Path, name: str, n: int, lo: float, hi: float, seed: int,
                        size: tuple[int, int]) -> None:
    """``root/name``: n small pictures (H, W = ``size``) whose noise level sets the MOS (``lo`` .. ``hi``), an NR CSV
    meta file and a 10-split pickle."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "img").mkdir(parents=True)
    rows = []
    h, w = size
    for i in range(n):
        ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None] * rng.uniform(0.3, 1, 3)
        quality = i / (n - 1)
        img = np.clip(ramp + rng.normal(0, 0.4 * (1 - quality), (h, w, 3)), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / "img" / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", f"{lo + quality * (hi - lo):.4f}"))
    with open(folder / "meta.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "mos"])
        writer.writerows(rows)
    save_splits(make_splits(n, seed=seed), folder / "split.pkl")


def write_two_dataset_run(root: Path, sizes: tuple[int, int] = (20, 15), **options: Any) -> Path:
    """Two noise datasets under ``root/data`` with different MOS scales and scenes (alpha: 0-100, natural; beta: 1-5,
    aigc) and ``root/base.yml`` training the tiny SDP model on them; ``options`` override or add top-level keys.
    Returns the option file."""
    import yaml

    write_noise_dataset(root / "data", "alpha", sizes[0], 0, 100, seed=1, size=(72, 96))
    write_noise_dataset(root / "data", "beta", sizes[1], 1, 5, seed=2, size=(96, 64))
    base = {
        "name": "tiny", "output_dir": str(root / "runs"), "epochs": 2, "batch_size": 4, "workers": 0,
        "device": "cpu", "model": {"name": "gamma_test_sdp"}, "optim": {"lr": 1e-3},
        "data_root": str(root / "data"),
        "data": [
            {"name": "alpha", "root": "alpha/img", "meta_file": "alpha/meta.csv", "split_file": "alpha/split.pkl",
             "mos_range": [0, 100]},
            {"name": "beta", "root": "beta/img", "meta_file": "beta/meta.csv", "split_file": "beta/split.pkl",
             "mos_range": [1, 5], "scene": "aigc"},
        ],
        "eval": {"crops": 3},
        "log": {"every_steps": 1, "progress": False, "tensorboard": False},
    }
    path = root / "base.yml"
    path.write_text(yaml.safe_dump({**base, **options}, sort_keys=False))
    return path


def interrupt_at(monkeypatch, step: int) -> None:
    """Deliver a real SIGINT while step ``step`` is being logged (the trainer stops after the next step)."""
    write = loop.MetricsLog.write

    def wrapped(self, record):
        write(self, record)
        if record["kind"] == "train" and record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop.MetricsLog, "write", wrapped)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, ports: list[int], argvs: list[list[str]]) -> None:
    """One process of a CPU process group, as torchrun would start it: each argv is one main() call."""
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(world), "RANK": str(rank),
                           "LOCAL_RANK": str(rank)})
        for port, argv in zip(ports, argvs, strict=True):
            os.environ["MASTER_PORT"] = str(port)
            main(argv)
    except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def launch_ddp(world: int, argvs: list[list[str]], timeout: float = 300) -> None:
    """Run the trainer's ``main(argv)`` for each argv in turn in ``world`` forked CPU processes (gloo), each call on its
    own port; every process must exit with 0 within ``timeout`` seconds (a hung process is killed and fails)."""
    ctx = mp.get_context("fork")  # torch is already imported here: children start at once
    ports = [free_port() for _ in argvs]
    procs = [ctx.Process(target=_ddp_rank, args=(r, world, ports, argvs)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 0.1))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} still running after {timeout} s (a collective that not every rank reached?)"
    assert [p.exitcode for p in procs] == [0] * world


# ------------------------------------------------------------------------------------------------ odd and bad images
# The reliability battery's files: tests/test_reliability_inputs.py decodes and scores them,
# tests/test_reliability_cli.py runs them through the `gamma score` command.
def encode_image(img: Image.Image, fmt: str, **kw) -> bytes:
    """The file ``img`` would be in format ``fmt``, as bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A w x h RGB picture of seeded uniform noise."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit RGB) but holds one compressed empty row: costs ~60 bytes to build."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
            + _png_chunk(b"IEND", b""))


BAD_FILES: dict[str, tuple[callable, str]] = {
    # name: (bytes builder, regex the message must match after the file name)
    "zero_byte.jpg": (lambda: b"", "empty file"),
    "zero_byte.png": (lambda: b"", "empty file"),
    "truncated.jpg": (lambda: encode_image(noise_image(64, 64), "JPEG")[:1500], "truncated"),
    "truncated.png": (lambda: encode_image(noise_image(64, 64), "PNG")[:2000], "truncated|corrupt"),
    "truncated_header.png": (lambda: encode_image(noise_image(8, 8), "PNG")[:20], "not .*image|truncated|corrupt"),
    "text.jpg": (lambda: b"this is a text file, not a photo\n" * 20, "not an image"),
    "html.png": (lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not an image"),
    "random.webp": (lambda: np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
    "jpeg_magic_only.jpg": (lambda: b"\xff\xd8\xff\xe0" + b"\x00" * 64, "not .*image|truncated|corrupt"),
    "bad_crc.png": (lambda: _flip_idat(encode_image(noise_image(16, 16), "PNG")), "corrupt|truncated|not .*image"),
    "bomb.png": (lambda: png_header_only(50_000, 50_000), "decompression bomb"),
    "zero_size.png": (lambda: png_header_only(0, 0), "no pixels|not .*image|corrupt"),
}


def _flip_idat(data: bytes) -> bytes:
    at = data.index(b"IDAT") + 10
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]



def _exif_rotated_jpeg() -> bytes:
    """16x8 (W x H) JPEG, left half red, right half blue, EXIF orientation 6 (display rotated 90° clockwise)."""
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode_image(Image.fromarray(arr), "JPEG", quality=95, exif=exif)


def _odd_exif(garbage: bool) -> bytes:
    """A JPEG whose EXIF orientation is out of range (9), or whose EXIF block is garbage."""
    img = Image.new("RGB", (6, 4), (200, 10, 10))
    if not garbage:
        exif = Image.Exif()
        exif[0x0112] = 9
        return encode_image(img, "JPEG", exif=exif)
    app1 = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + b"\xff" * 40
    data = encode_image(img, "JPEG")
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _palette(transparent: bool) -> bytes:
    img = Image.new("P", (6, 5), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    return encode_image(img, "PNG", **({"transparency": 0} if transparent else {}))


def _gif_two_frames() -> bytes:
    frames = [Image.new("RGB", (5, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    return encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _float_tiff(value: float) -> bytes:
    return encode_image(Image.fromarray(np.full((3, 4), value, np.float32), mode="F"), "TIFF")


# name: (bytes builder, expected (H, W), check of the (3, H, W) tensor decoded on a black background)
ODD_FILES = {
    "one_pixel.png": (lambda: encode_image(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1),
                      lambda t: torch.allclose(t[:, 0, 0], torch.tensor([10, 20, 30]) / 255)),
    "one_pixel.jpg": (lambda: encode_image(Image.new("RGB", (1, 1), (128, 128, 128)), "JPEG"), (1, 1),
                      lambda t: abs(float(t.mean()) - 128 / 255) < 0.02),
    "one_by_many.png": (lambda: encode_image(Image.new("RGB", (1, 40)), "PNG"), (40, 1), lambda t: True),
    "gray.png": (lambda: encode_image(Image.new("L", (7, 3), 77), "PNG"), (3, 7),
                 lambda t: torch.all(t == 77 / 255)),
    "gray_alpha.png": (lambda: encode_image(Image.new("LA", (4, 4), (200, 0)), "PNG"), (4, 4),
                       lambda t: torch.all(t == 0)),  # fully transparent: the background
    "bilevel.png": (lambda: encode_image(Image.new("1", (9, 2), 1), "PNG"), (2, 9), lambda t: torch.all(t == 1)),
    "palette.png": (lambda: _palette(False), (5, 6),
                    lambda t: torch.equal(t[:, 1, 1], torch.tensor([1.0, 0, 0])) and torch.all(t[:, 0, 0] == 0)),
    "palette_transparent.png": (lambda: _palette(True), (5, 6),
                                lambda t: torch.all(t[:, 0, 0] == 0) and t[0, 1, 1] == 1),
    "rgba_half.png": (lambda: encode_image(Image.new("RGBA", (3, 3), (255, 255, 255, 128)), "PNG"), (3, 3),
                      lambda t: torch.allclose(t, torch.full_like(t, 128 / 255))),
    "cmyk.jpg": (lambda: encode_image(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), (8, 8),
                 lambda t: t[0].mean() > 0.9 and t[1:].mean() < 0.1),  # cyan 0, magenta+yellow full: red
    "cmyk.tiff": (lambda: encode_image(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "TIFF"), (4, 4),
                  lambda t: t[0].max() < 0.05 and t[1:].min() > 0.95),  # cyan
    "sixteen_bit.png": (lambda: encode_image(Image.fromarray(np.array([[1000, 60000]], np.uint16)), "PNG"), (1, 2),
                        lambda t: abs(float(t[0, 0, 0]) - 1000 / 65535) < 1e-6 and abs(
                            float(t[0, 0, 1]) - 60000 / 65535) < 1e-6),
    "float_in_unit_range.tiff": (lambda: _float_tiff(0.25), (3, 4), lambda t: torch.all(t == 0.25)),
    "exif_rotated.jpg": (_exif_rotated_jpeg, (16, 8),  # displayed as 8 wide, 16 high: red on top, blue below
                         lambda t: t[0, :6].mean() > 0.9 and t[2, 10:].mean() > 0.9 and t[2, :6].mean() < 0.1),
    "bad_orientation.jpg": (lambda: _odd_exif(False), (4, 6), lambda t: t[0].mean() > 0.7),  # shown as stored
    "garbage_exif.jpg": (lambda: _odd_exif(True), (4, 6), lambda t: t[0].mean() > 0.7),
    "animated.gif": (_gif_two_frames, (4, 5), lambda t: t[0].mean() > 0.9 and t[1].mean() < 0.1),  # first frame
    "lossless.webp": (lambda: encode_image(Image.new("RGB", (5, 5), (0, 255, 0)), "WEBP", lossless=True), (5, 5),
                      lambda t: torch.all(t[1] == 1) and torch.all(t[0] == 0)),
    "windows.bmp": (lambda: encode_image(Image.new("RGB", (3, 2), (1, 2, 3)), "BMP"), (2, 3),
                    lambda t: torch.allclose(t[:, 1, 2], torch.tensor([1, 2, 3]) / 255)),
    "upper_case.JPEG": (lambda: encode_image(noise_image(10, 10), "JPEG"), (10, 10), lambda t: True),
    "png_named.jpg": (lambda: encode_image(Image.new("RGB", (2, 2), (0, 0, 255)), "PNG"), (2, 2),  # wrong suffix
                      lambda t: torch.all(t[2] == 1)),
}
