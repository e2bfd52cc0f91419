"""Reliability battery, part 1: odd and bad images (files, bytes, tensors, arrays) through gamma.io and the Scorer.

Every file is written by the tests. Each case: a valid input is decoded (and scored), an invalid one is rejected with
an ``ImageDecodeError`` / ``ValueError`` whose message names the input and says why, raised from gamma's own code —
never a PIL or torch exception from deep inside a library.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BAD_FILES, ODD_FILES, assert_close, encode_image, noise_image, png_header_only
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


# ------------------------------------------------------------------------------------------------- bad files
# The files themselves (BAD_FILES, ODD_FILES) are built in tests/helpers.py, which tests/test_reliability_cli.py shares.
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
    noise_image(100, 100).save(small)
    with pytest.raises(ImageDecodeError, match=r"exceeds the limit of 5,000 pixels.*max-pixels"):
        load_image(small, max_pixels=5_000)
    assert load_image(small, max_pixels=10_000).shape == (3, 100, 100)
    assert load_image(small, max_pixels=None).shape == (3, 100, 100)


# ------------------------------------------------------------------------------------------ odd but valid files
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
    assert math.isfinite(scores[0])
    assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-6)


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
    assert_close(rows[6]["score"], rows[0]["score"], rtol=1e-5, atol=1e-6)  # the bad neighbours change nothing
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
    return mode, fmt, (h, w), encode_image(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), img


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
