"""Reliability battery, part 1: odd and bad images (files, bytes, tensors, arrays) through gamma.io and the Scorer.

Every file is written by the tests. Each case: a valid input is decoded (and scored), an invalid one is rejected with
an ``ImageDecodeError`` / ``ValueError`` whose message names the input and says why, raised from gamma's own code —
never a PIL or torch exception from deep inside a library.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import gamma
from gamma.io import ImageDecodeError, load_image
from gamma.scorer import Scorer

GAMMA_DIR = Path(gamma.__file__).resolve().parent
# PIL warns about the broken EXIF and TIFF data these files hold on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")


def assert_raised_by_gamma(excinfo: pytest.ExceptionInfo) -> None:
    """The exception was raised by gamma's code (its innermost frame is in the gamma package), not by PIL or torch."""
    frame = Path(str(excinfo.traceback[-1].path)).resolve()
    assert GAMMA_DIR in frame.parents, f"raised from {frame}, not from gamma: {excinfo.value!r}"


# ------------------------------------------------------------------------------------------- building files
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
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
    "truncated.jpg": (lambda: _encode(_noise(64, 64), "JPEG")[:1500], "truncated"),
    "truncated.png": (lambda: _encode(_noise(64, 64), "PNG")[:2000], "truncated|corrupt"),
    "truncated_header.png": (lambda: _encode(_noise(8, 8), "PNG")[:20], "not .*image|truncated|corrupt"),
    "text.jpg": (lambda: b"this is a text file, not a photo\n" * 20, "not an image"),
    "html.png": (lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not an image"),
    "random.webp": (lambda: np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
    "jpeg_magic_only.jpg": (lambda: b"\xff\xd8\xff\xe0" + b"\x00" * 64, "not .*image|truncated|corrupt"),
    "bad_crc.png": (lambda: _flip_idat(_encode(_noise(16, 16), "PNG")), "corrupt|truncated|not .*image"),
    "bomb.png": (lambda: png_header_only(50_000, 50_000), "decompression bomb"),
    "zero_size.png": (lambda: png_header_only(0, 0), "no pixels|not .*image|corrupt"),
}


def _flip_idat(data: bytes) -> bytes:
    at = data.index(b"IDAT") + 10
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    for name, (build, _) in BAD_FILES.items():
        (root / name).write_bytes(build())
    (root / "folder.jpg").mkdir()  # a folder with an image suffix
    return root


# tests/test_io.py already feeds load_image empty, text, truncated JPEG/PNG, header-only, bomb and random files.
IN_TEST_IO = {"zero_byte.jpg", "text.jpg", "truncated.jpg", "truncated.png", "truncated_header.png", "bomb.png",
              "random.webp"}


@pytest.mark.parametrize("name", [*(set(BAD_FILES) - IN_TEST_IO), "folder.jpg", "missing.jpg"])
def test_bad_file_is_rejected_with_its_name(bad_dir, name):
    path = bad_dir / name
    with pytest.raises(ImageDecodeError) as excinfo:
        load_image(path)
    message = str(excinfo.value)
    assert message.startswith(str(path) + ": "), message
    expected = BAD_FILES.get(name, (None, "is a directory" if name == "folder.jpg" else "no such file"))[1]
    assert excinfo.match(expected)
    err = excinfo.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "PIL's error is chained"
    assert_raised_by_gamma(excinfo)


@pytest.mark.parametrize("name", ["truncated.jpg", "text.jpg", "bomb.png"])
def test_bad_bytes_and_streams_are_rejected(name):
    data = BAD_FILES[name][0]()
    with pytest.raises(ImageDecodeError, match=r"^<bytes>: "):
        load_image(data)
    stream = io.BytesIO(data)
    stream.name = f"upload/{name}"
    with pytest.raises(ImageDecodeError, match=rf"^upload/{name}: "):
        load_image(stream)


def test_bomb_guard_reads_only_the_header_and_is_configurable(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(50_000, 50_000))
    with pytest.raises(ImageDecodeError, match=r"big.png: .*decompression bomb.*2500000000 pixels.*max_pixels"):
        load_image(path)
    small = tmp_path / "small.png"
    _noise(100, 100).save(small)
    with pytest.raises(ImageDecodeError, match=r"exceeds the limit of 5,000 pixels.*max-pixels"):
        load_image(small, max_pixels=5_000)
    assert load_image(small, max_pixels=10_000).shape == (3, 100, 100)
    assert load_image(small, max_pixels=None).shape == (3, 100, 100)


# ------------------------------------------------------------------------------------------ odd but valid files
def _exif_rotated_jpeg() -> bytes:
    """16x8 (W x H) JPEG, left half red, right half blue, EXIF orientation 6 (display rotated 90° clockwise)."""
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif)


def _odd_exif(garbage: bool) -> bytes:
    """A JPEG whose EXIF orientation is out of range (9), or whose EXIF block is garbage."""
    img = Image.new("RGB", (6, 4), (200, 10, 10))
    if not garbage:
        exif = Image.Exif()
        exif[0x0112] = 9
        return _encode(img, "JPEG", exif=exif)
    app1 = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + b"\xff" * 40
    data = _encode(img, "JPEG")
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def _palette(transparent: bool) -> bytes:
    img = Image.new("P", (6, 5), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    return _encode(img, "PNG", **({"transparency": 0} if transparent else {}))


def _gif_two_frames() -> bytes:
    frames = [Image.new("RGB", (5, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _float_tiff(value: float) -> bytes:
    return _encode(Image.fromarray(np.full((3, 4), value, np.float32), mode="F"), "TIFF")


# name: (bytes builder, expected (H, W), check of the (3, H, W) tensor decoded on a black background)
ODD_FILES = {
    "one_pixel.png": (lambda: _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1),
                      lambda t: torch.allclose(t[:, 0, 0], torch.tensor([10, 20, 30]) / 255)),
    "one_pixel.jpg": (lambda: _encode(Image.new("RGB", (1, 1), (128, 128, 128)), "JPEG"), (1, 1),
                      lambda t: abs(float(t.mean()) - 128 / 255) < 0.02),
    "one_by_many.png": (lambda: _encode(Image.new("RGB", (1, 40)), "PNG"), (40, 1), lambda t: True),
    "gray.png": (lambda: _encode(Image.new("L", (7, 3), 77), "PNG"), (3, 7),
                 lambda t: torch.all(t == 77 / 255)),
    "gray_alpha.png": (lambda: _encode(Image.new("LA", (4, 4), (200, 0)), "PNG"), (4, 4),
                       lambda t: torch.all(t == 0)),  # fully transparent: the background
    "bilevel.png": (lambda: _encode(Image.new("1", (9, 2), 1), "PNG"), (2, 9), lambda t: torch.all(t == 1)),
    "palette.png": (lambda: _palette(False), (5, 6),
                    lambda t: torch.equal(t[:, 1, 1], torch.tensor([1.0, 0, 0])) and torch.all(t[:, 0, 0] == 0)),
    "palette_transparent.png": (lambda: _palette(True), (5, 6),
                                lambda t: torch.all(t[:, 0, 0] == 0) and t[0, 1, 1] == 1),
    "rgba_half.png": (lambda: _encode(Image.new("RGBA", (3, 3), (255, 255, 255, 128)), "PNG"), (3, 3),
                      lambda t: torch.allclose(t, torch.full_like(t, 128 / 255))),
    "cmyk.jpg": (lambda: _encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), (8, 8),
                 lambda t: t[0].mean() > 0.9 and t[1:].mean() < 0.1),  # cyan 0, magenta+yellow full: red
    "cmyk.tiff": (lambda: _encode(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "TIFF"), (4, 4),
                  lambda t: t[0].max() < 0.05 and t[1:].min() > 0.95),  # cyan
    "sixteen_bit.png": (lambda: _encode(Image.fromarray(np.array([[1000, 60000]], np.uint16)), "PNG"), (1, 2),
                        lambda t: abs(float(t[0, 0, 0]) - 1000 / 65535) < 1e-6 and abs(
                            float(t[0, 0, 1]) - 60000 / 65535) < 1e-6),
    "float_in_unit_range.tiff": (lambda: _float_tiff(0.25), (3, 4), lambda t: torch.all(t == 0.25)),
    "exif_rotated.jpg": (_exif_rotated_jpeg, (16, 8),  # displayed as 8 wide, 16 high: red on top, blue below
                         lambda t: t[0, :6].mean() > 0.9 and t[2, 10:].mean() > 0.9 and t[2, :6].mean() < 0.1),
    "bad_orientation.jpg": (lambda: _odd_exif(False), (4, 6), lambda t: t[0].mean() > 0.7),  # shown as stored
    "garbage_exif.jpg": (lambda: _odd_exif(True), (4, 6), lambda t: t[0].mean() > 0.7),
    "animated.gif": (_gif_two_frames, (4, 5), lambda t: t[0].mean() > 0.9 and t[1].mean() < 0.1),  # first frame
    "lossless.webp": (lambda: _encode(Image.new("RGB", (5, 5), (0, 255, 0)), "WEBP", lossless=True), (5, 5),
                      lambda t: torch.all(t[1] == 1) and torch.all(t[0] == 0)),
    "windows.bmp": (lambda: _encode(Image.new("RGB", (3, 2), (1, 2, 3)), "BMP"), (2, 3),
                    lambda t: torch.allclose(t[:, 1, 2], torch.tensor([1, 2, 3]) / 255)),
    "upper_case.JPEG": (lambda: _encode(_noise(10, 10), "JPEG"), (10, 10), lambda t: True),
    "png_named.jpg": (lambda: _encode(Image.new("RGB", (2, 2), (0, 0, 255)), "PNG"), (2, 2),  # wrong suffix
                      lambda t: torch.all(t[2] == 1)),
}


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd")
    for name, (build, _, _) in ODD_FILES.items():
        (root / name).write_bytes(build())
    return root


# Modes, alpha, CMYK, 16-bit, float, EXIF and GIF frames are checked pixel by pixel in tests/test_io.py; here only what
# it does not try. Every odd file is still scored through the Scorer and the CLI below.
NOT_IN_TEST_IO = ["one_pixel.png", "one_pixel.jpg", "one_by_many.png", "palette.png", "lossless.webp", "windows.bmp",
                  "upper_case.JPEG", "png_named.jpg", "bad_orientation.jpg", "garbage_exif.jpg"]


@pytest.mark.parametrize("name", NOT_IN_TEST_IO)
def test_odd_but_valid_file_decodes(odd_dir, name):
    _, size, check = ODD_FILES[name]
    t = load_image(odd_dir / name, background=(0, 0, 0))
    assert t.dtype == torch.float32 and t.shape == (3, *size)
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert check(t), f"{name}: unexpected pixels {t[:, :2, :2]}"


# -------------------------------------------------------------------------------------------------- the Scorer
@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return Scorer(model="gamma_test", device="cpu", batch_size=4, num_workers=2, crops="center")


def test_scorer_skips_every_bad_file_and_scores_every_good_one(scorer, bad_dir, odd_dir, tmp_path):
    # One folder holding both kinds: the good ones are scored, each bad one is reported by name, nothing stops early.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src in [*bad_dir.iterdir(), *odd_dir.iterdir()]:
        if src.is_file():
            (mixed / src.name).write_bytes(src.read_bytes())
    (mixed / "notes.txt").write_text("not picked up: no image suffix")
    rows = scorer.score(mixed, on_error="skip")
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    by_name = {Path(r["name"]).name: r for r in rows}
    assert set(by_name) == {*BAD_FILES, *ODD_FILES}
    for name in ODD_FILES:
        assert math.isfinite(by_name[name]["score"]) and not isinstance(by_name[name].get("error"), str), name
    for name in BAD_FILES:
        row = by_name[name]
        assert math.isnan(row["score"]) and row["error"].startswith(str(mixed / name)), row
    # the default is to stop at the first bad file, naming it
    with pytest.raises(ImageDecodeError, match=r"bad_crc.png: .*corrupt"):  # first in name order
        scorer.score(mixed)


def test_scorer_scores_a_one_pixel_image_like_its_upscaled_self(scorer, odd_dir):
    rows = scorer.score([str(odd_dir / "one_pixel.png"), torch.tensor([10, 20, 30]).view(3, 1, 1) / 255])
    scores = list(rows["score"]) if hasattr(rows, "to_dict") else [r["score"] for r in rows]
    assert math.isfinite(scores[0]) and scores[0] == pytest.approx(scores[1], abs=1e-6)


# ------------------------------------------------------------------------------------------------------ tensors
# Cases that tests/test_model.py's input checks do not already cover.
BAD_TENSORS = {
    "rank_2": (torch.rand(224, 224), "shape \\(B, 3, H, W\\)"),
    "rank_5": (torch.rand(1, 1, 3, 32, 32), "shape \\(B, 3, H, W\\)"),
    "two_channels": (torch.rand(2, 2, 32, 32), "3 \\(RGB\\) channels, got 2"),
    "int64": (torch.randint(0, 2, (1, 3, 32, 32)), "floating-point.*int64"),
    "bool": (torch.ones(1, 3, 32, 32, dtype=torch.bool), "floating-point.*bool"),
    "one_nan_pixel": (torch.rand(2, 3, 32, 32).index_put_((torch.tensor(1), torch.tensor(2), torch.tensor(5),
                                                           torch.tensor(7)), torch.tensor(float("nan"))), "NaN"),
    "neg_inf": (torch.rand(1, 3, 32, 32).index_fill_(2, torch.tensor([0]), float("-inf")), "infinite"),
    "slightly_over": (torch.full((1, 3, 32, 32), 1.01), "in \\[0, 1\\].*1.01"),
    "zero_height": (torch.rand(1, 3, 0, 32), "empty"),
}


@pytest.mark.parametrize("name", list(BAD_TENSORS))
def test_bad_tensor_is_rejected_by_the_model(tiny_model, name):
    bad, message = BAD_TENSORS[name]
    with pytest.raises(ValueError, match=message) as excinfo:
        tiny_model(bad)
    assert_raised_by_gamma(excinfo)


@pytest.mark.parametrize(
    "good",
    [torch.rand(1, 3, 1, 1), torch.rand(2, 3, 5, 300), torch.rand(1, 3, 40, 40, dtype=torch.float64),
     torch.rand(1, 3, 40, 40).half(), torch.full((1, 3, 40, 40), 1.0005), torch.full((1, 3, 40, 40), -0.0005)],
    ids=["1x1", "5x300", "float64", "float16", "within_tolerance_high", "within_tolerance_low"],
)
def test_odd_but_valid_tensor_is_scored(tiny_model, good):
    with torch.no_grad():
        scores = tiny_model(good)
    assert scores.shape == (good.shape[0],) and torch.isfinite(scores).all()


def test_scorer_isolates_bad_tensors_and_arrays_by_name(scorer):
    good = torch.rand(3, 32, 32)
    inputs = [good, torch.full((3, 32, 32), float("nan")), torch.rand(3, 32, 32) * 255, torch.rand(4, 32, 32),
              np.zeros((8, 8, 3), np.int32), np.full((8, 8, 3), 0.5, np.float32), good.clone()]
    rows = scorer.score(inputs, on_error="skip")
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert [r["name"] for r in rows] == ["<tensor 0>", "<tensor 1>", "<tensor 2>", "<tensor 3>", "<array 4>",
                                         "<array 5>", "<tensor 6>"]
    errors = [r.get("error") if isinstance(r.get("error"), str) else None for r in rows]
    assert errors[0] is None and errors[5] is None and errors[6] is None
    assert rows[0]["score"] == pytest.approx(rows[6]["score"], abs=1e-6)  # the bad neighbours change nothing
    assert errors[1].startswith("<tensor 1>: ") and "NaN" in errors[1]
    assert errors[2].startswith("<tensor 2>: ") and "divide 0-255 images by 255" in errors[2]
    assert errors[3].startswith("<tensor 3>: ") and "(3, H, W)" in errors[3]
    assert errors[4].startswith("<array 4>: ") and "int32" in errors[4]
    with pytest.raises(ValueError, match=r"^<tensor 1>: .*NaN"):
        scorer.score(inputs[:3])


# ------------------------------------------------------------------------------------------ property-based tests
_FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


_MODES = ["RGB", "L", "RGBA", "LA", "P", "1", "I;16", "CMYK"]
_FORMATS = {"PNG": {"RGB", "L", "RGBA", "LA", "P", "1", "I;16"}, "BMP": {"RGB", "L", "P", "1"},
            "TIFF": {"RGB", "L", "RGBA", "P", "1", "I;16", "CMYK"}, "WEBP": {"RGB", "RGBA"},
            "JPEG": {"RGB", "L", "CMYK"}, "GIF": {"L", "P"}}


@st.composite
def encoded_images(draw):
    mode = draw(st.sampled_from(_MODES))
    fmt = draw(st.sampled_from(sorted(f for f, modes in _FORMATS.items() if mode in modes)))
    w, h = draw(st.integers(1, 33)), draw(st.integers(1, 33))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
    return mode, fmt, (h, w), _encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), img


@_FAST
@given(case=encoded_images(), cut=st.floats(0.0, 1.0))
def test_property_any_prefix_of_a_valid_file_decodes_or_is_a_clean_error(case, cut):
    mode, fmt, size, data, img = case
    t = load_image(data)
    assert t.shape == (3, *size) and t.dtype == torch.float32, (mode, fmt)
    assert torch.isfinite(t).all() and float(t.min()) >= 0 and float(t.max()) <= 1, (mode, fmt)
    if fmt in ("PNG", "BMP", "TIFF") and mode == "RGB":  # lossless formats round-trip exactly
        assert torch.equal(t, torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1))
    # Any prefix of a valid file decodes (some formats end with optional bytes) or is a clean decode error.
    prefix = data[: int(len(data) * cut)]
    try:
        t = load_image(prefix)
    except ImageDecodeError as exc:
        assert str(exc).startswith("<bytes>: ")
    else:
        assert t.shape[0] == 3 and torch.isfinite(t).all() and float(t.min()) >= 0 and float(t.max()) <= 1


def test_elongated_strip_is_refused_by_name_not_upscaled_into_gigabytes(tmp_path):
    # 1x20000 is 20 kpx on disk; upscaled to a short side of 224 it would be 224x4,480,000 (12 GB as float32).
    path = tmp_path / "spacer.png"
    Image.new("RGB", (20_000, 1), (90, 90, 90)).save(path)
    default = Scorer(model="gamma_test", device="cpu", num_workers=0)
    rows = default.score([path], on_error="skip")
    row = rows.to_dict("records")[0] if hasattr(rows, "to_dict") else rows[0]
    assert math.isnan(row["score"]) and row["error"].startswith(f"{path}: ") and "too elongated" in row["error"]
    resized = Scorer(model=default.model, num_workers=0, crops="resize", device="cpu").score([path])
    assert math.isfinite(float(resized["score"][0] if hasattr(resized, "to_dict") else resized[0]["score"]))
