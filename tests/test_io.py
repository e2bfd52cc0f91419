"""gamma.io: decoding real files of every kind users have, rejecting bad ones by name, expanding folders and globs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gamma.io import ImageDecodeError, is_image_file, iter_image_files, list_image_files, load_image


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photograph (skimage's astronaut), small."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((96, 64), Image.BICUBIC)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def reference(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------- good files
@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"),
                                     ("TIFF", "tif"), ("GIF", "gif")])
def test_formats_decode_to_rgb_unit_range(tmp_path, photo, fmt, ext):
    path = tmp_path / f"img.{ext}"
    path.write_bytes(encode(photo, fmt))
    x = load_image(path)
    assert x.shape == (3, 64, 96) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless: exactly the pixels
        assert torch.equal(x, reference(photo))
    else:
        assert (x - reference(photo)).abs().mean() < 0.08


def test_path_bytes_stream_and_pil_inputs_agree(tmp_path, photo):
    data = encode(photo, "PNG")
    (tmp_path / "a.png").write_bytes(data)
    from_path = load_image(tmp_path / "a.png")
    assert torch.equal(from_path, load_image(str(tmp_path / "a.png")))
    assert torch.equal(from_path, load_image(data))
    assert torch.equal(from_path, load_image(io.BytesIO(data)))
    assert torch.equal(from_path, load_image(photo))


def test_grayscale_and_one_bit_are_replicated(photo):
    gray = photo.convert("L")
    x = load_image(encode(gray, "PNG"))
    assert x.shape == (3, 64, 96) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.allclose(x[0], torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255))
    bits = load_image(encode(photo.convert("1"), "PNG"))
    assert set(bits.unique().tolist()) <= {0.0, 1.0}


def test_rgba_is_composited_on_the_background():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, :3, 3] = 255  # left half opaque, right half fully transparent
    img = Image.fromarray(rgba, "RGBA")
    white = load_image(encode(img, "PNG"))
    assert torch.allclose(white[:, :, :3], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 4, 3))
    assert torch.allclose(white[:, :, 3:], torch.ones(3, 4, 3))
    blue = load_image(encode(img, "PNG"), background=(0, 0, 255))
    assert torch.allclose(blue[:, 0, 5], torch.tensor([0.0, 0.0, 1.0]))
    half = rgba.copy()
    half[..., 3] = 128
    mixed = load_image(Image.fromarray(half, "RGBA"), background=(0, 0, 0))
    assert torch.allclose(mixed[0], torch.full((4, 6), 128 / 255), atol=1e-6)


def test_palette_with_transparency_and_la(photo):
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    idx = np.asarray(pal)
    x = load_image(encode(pal, "PNG", transparency=0), background=(0, 255, 0))
    transparent = torch.from_numpy(idx == 0)
    assert transparent.any()
    assert torch.allclose(x[:, transparent], torch.tensor([0.0, 1.0, 0.0])[:, None])
    la = load_image(encode(photo.convert("LA"), "PNG"))
    assert la.shape == (3, 64, 96)


def test_cmyk_jpeg_and_tiff(photo):
    for fmt in ("JPEG", "TIFF"):
        x = load_image(encode(photo.convert("CMYK"), fmt))
        assert x.shape == (3, 64, 96)
        assert (x - reference(photo)).abs().mean() < 0.08


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_sixteen_bit_images_keep_their_scale():
    ramp = (np.arange(32 * 16).reshape(16, 32) * 128).astype(np.uint16)  # 0 .. 65408
    for fmt in ("PNG", "TIFF"):
        x = load_image(encode(Image.fromarray(ramp), fmt))
        assert x.shape == (3, 16, 32)
        assert torch.allclose(x[0], torch.from_numpy(ramp / 65535.0).float(), atol=1e-6), fmt
    rgb16 = np.random.default_rng(0).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    x = load_image(_png16_rgb(rgb16))  # PIL reads 16-bit RGB as 8-bit RGB
    assert x.shape == (3, 8, 8)
    assert (x - torch.from_numpy(rgb16 / 65535.0).permute(2, 0, 1).float()).abs().max() < 1 / 255 + 1e-6


def test_integer_and_float_modes():
    eight = np.full((4, 4), 200, np.uint8)
    assert torch.allclose(load_image(Image.fromarray(eight).convert("I")), torch.full((3, 4, 4), 200 / 255))
    wide = Image.fromarray(np.full((4, 4), 30000, np.int32), "I")
    assert torch.allclose(load_image(wide), torch.full((3, 4, 4), 30000 / 65535))
    unit = Image.fromarray(np.full((4, 4), 0.25, np.float32), "F")
    assert torch.allclose(load_image(encode(unit, "TIFF")), torch.full((3, 4, 4), 0.25))
    scaled = Image.fromarray(np.full((4, 4), 51.0, np.float32), "F")
    assert torch.allclose(load_image(scaled), torch.full((3, 4, 4), 0.2))
    nan = Image.fromarray(np.full((4, 4), np.nan, np.float32), "F")
    with pytest.raises(ImageDecodeError, match="NaN"):
        load_image(nan)


@pytest.mark.parametrize("orientation,shape", [(1, (3, 4, 6)), (3, (3, 4, 6)), (6, (3, 6, 4)), (8, (3, 6, 4))])
def test_exif_orientation_is_applied(orientation, shape):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = 255  # a white top-left corner shows where the image went
    exif = Image.Exif()
    exif[0x0112] = orientation
    x = load_image(encode(Image.fromarray(pixels), "PNG", exif=exif))
    assert x.shape == shape
    corner = {1: (0, 0), 3: (-1, -1), 6: (0, -1), 8: (-1, 0)}[orientation]
    assert float(x[0][corner]) == 1.0 and float(x[0].sum()) == 1.0


def test_jpeg_exif_rotation(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "phone.jpg"
    photo.save(path, exif=exif.tobytes())
    assert load_image(path).shape == (3, 96, 64)


def test_first_frame_of_an_animation(photo):
    frames = [photo, photo.transpose(Image.FLIP_LEFT_RIGHT)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(data).shape == (3, 64, 96)


# ----------------------------------------------------------------------------------------------- bad files
def _header_only_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.jpg", lambda p: b"", "empty file"),
        ("text.png", lambda p: b"this is not an image, just text\n" * 4, "not an image file"),
        ("truncated.jpg", lambda p: encode(p, "JPEG")[:600], "corrupt or truncated"),
        ("truncated.png", lambda p: encode(p, "PNG")[: len(encode(p, "PNG")) // 2], "corrupt or truncated"),
        ("header.png", lambda p: encode(p, "PNG")[:30], "corrupt or truncated|not an image"),
        ("bomb.png", lambda p: _header_only_png(100_000, 100_000), "decompression bomb"),
        ("random.webp", lambda p: np.random.default_rng(1).bytes(2048), "not an image"),
    ],
)
def test_bad_files_raise_decode_error_naming_the_file(tmp_path, photo, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content(photo))
    with pytest.raises(ImageDecodeError, match=reason) as err:
        load_image(path)
    assert str(err.value).startswith(str(path))
    assert err.value.source == str(path)
    assert err.value.__cause__ is None  # no PIL traceback chained onto ours


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(TypeError, match="cannot load an image from a int"):
        load_image(3)


def test_bomb_guard_uses_max_pixels_on_the_declared_size(photo):
    data = encode(photo, "PNG")  # 96 x 64 = 6144 pixels
    with pytest.raises(ImageDecodeError, match=r"96x64 = 6,144 pixels exceeds the limit of 6,000"):
        load_image(data, max_pixels=6000)
    assert load_image(data, max_pixels=6144).shape == (3, 64, 96)
    assert load_image(data, max_pixels=None).shape == (3, 64, 96)
    # A file declaring 10 billion pixels is refused from its header, in milliseconds, whatever the limit.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(_header_only_png(100_000, 100_000), max_pixels=10**9)


def test_background_is_validated(photo):
    with pytest.raises(ValueError, match="background"):
        load_image(photo, background=(0, 0))
    with pytest.raises(ValueError, match="background"):
        load_image(photo, background=(0, 0, 300))


# ----------------------------------------------------------------------------------------------- properties
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBa", "La", "I;16"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), width=st.integers(1, 24), height=st.integers(1, 24),
       fmt=st.sampled_from([None, "PNG", "TIFF"]), seed=st.integers(0, 2**16))
def test_property_any_mode_decodes_to_valid_tensor(mode, width, height, fmt, seed):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    source: object = img
    if fmt is not None:
        try:
            source = encode(img, fmt)
        except (OSError, ValueError, KeyError):
            return  # this format cannot store this mode: nothing to decode
    x = load_image(source)
    assert x.shape == (3, height, width) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all()) and 0 <= float(x.min()) and float(x.max()) <= 1


@pytest.mark.filterwarnings("ignore:.*EXIF:UserWarning")  # PIL warns about the random EXIF it reads
@settings(max_examples=150, deadline=None)
@given(data=st.binary(min_size=0, max_size=512), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                                                                       b"GIF89a", b"II*\x00", b"BM", b"RIFF"]))
def test_property_random_bytes_only_raise_decode_error(data, prefix):
    try:
        x = load_image(prefix + data)
    except ImageDecodeError as exc:
        assert str(exc).startswith("<bytes>: ")
    else:  # against the odds a valid image: then it must be a valid tensor
        assert x.dim() == 3 and x.shape[0] == 3 and 0 <= float(x.min()) and float(x.max()) <= 1


# ----------------------------------------------------------------------------------------------- file lists
def test_folders_globs_and_files_expand_in_order(tmp_path):
    for rel in ["b.jpg", "a.PNG", "notes.txt", "sub/c.webp", "sub/deeper/d.tif", ".hidden/e.jpg", "sub/.f.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    root = str(tmp_path)
    assert list(iter_image_files(root)) == [f"{root}/a.PNG", f"{root}/b.jpg", f"{root}/sub/c.webp",
                                             f"{root}/sub/deeper/d.tif"]
    assert list(iter_image_files(root, recursive=False)) == [f"{root}/a.PNG", f"{root}/b.jpg"]
    assert list(iter_image_files(f"{root}/**/*.tif")) == [f"{root}/sub/deeper/d.tif"]
    # an explicit file is tried whatever its suffix; a missing path is passed on for the loader to report
    assert list(iter_image_files([f"{root}/notes.txt", f"{root}/gone.jpg"])) == [f"{root}/notes.txt",
                                                                               f"{root}/gone.jpg"]
    assert list(iter_image_files(f"{root}/nothing*.jpg")) == []
    both = list_image_files([root, f"{root}/b.jpg"])
    assert both == sorted(set(both)) and len(both) == 4
    assert is_image_file("X.JPEG") and not is_image_file("x.txt")


def test_expansion_is_lazy(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    it = iter_image_files(Path(tmp_path))
    assert next(it).endswith("0.png")  # a generator: nothing beyond the first listing is built
