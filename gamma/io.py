"""Image decoding shared by the CLI, the scorer, the datasets and the pyiqa path.

:func:`load_image` turns whatever users have — JPEG, PNG, WebP, BMP, TIFF, GIF; EXIF-rotated photos; grayscale,
palette, RGBA, CMYK, 16-bit and float images — into one thing: an RGB float32 tensor (3, H, W) in [0, 1]. Anything it
cannot decode (missing, empty, truncated or non-image files, declared sizes past a decompression-bomb limit) raises
:class:`ImageDecodeError` whose message names the file; PIL's own exceptions never escape.

:func:`iter_image_files` / :func:`list_image_files` expand files, folders (recursively) and glob patterns;
:func:`iter_listed_files` streams the paths a text or CSV file list names.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .archs.promptiqa import resize_like_cv2

logger = logging.getLogger(__name__)

#: Default decompression-bomb limit: PIL's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS`` of a fresh PIL, ~179 MP).
#: A 179 MP image is already 2.1 GB as a float32 tensor.
MAX_PIXELS = 2 * 89_478_485

#: File suffixes (lower case) picked up when a folder or glob is expanded. Explicitly named files are always tried.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)

ImageSource = Union[str, os.PathLike, bytes, bytearray, IO[bytes], Image.Image]  # noqa: UP007 - runtime alias (py3.10)

_GLOB_CHARS = frozenset("*?[")
_PIL_LIMIT_LOCK = threading.Lock()

#: How a dataset entry's images are decoded (``decode:``): ``gamma`` is :func:`load_image`, ``release`` is
#: :func:`load_image_release` (the authors' release, for exact reproduction;
#: docs/model.md#differences-from-the-release).
DECODERS: tuple[str, ...] = ("gamma", "release")


class ImageDecodeError(ValueError):
    """An image cannot be decoded; ``str(err)`` starts with the file's name and says why.

    Attributes:
        source: the file name (or ``<bytes>`` / ``<stream>``) that failed.
        reason: why, in words.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


# --------------------------------------------------------------------------------------------------- decoding
def load_image(
    source: ImageSource,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = MAX_PIXELS,
) -> torch.Tensor:
    """Decode an image into an RGB float32 tensor (3, H, W) with values in [0, 1].

    - EXIF orientation is applied (a phone photo comes out the way it is displayed).
    - Grayscale is replicated to three channels; palette, CMYK, YCbCr, LAB and HSV images are converted to RGB.
    - Transparency (RGBA, LA, palette with a transparent colour) is composited on ``background``.
    - 16-bit images keep their precision (divided by 65535); 32-bit integer images are divided by 255 or 65535,
      whichever range holds their values; float images in [0, 1] are kept, in 0..255 or 0..65535 divided.
    - Multi-frame files (GIF, multi-page TIFF) give their first frame.

    Args:
        source: a file path, the encoded bytes, a binary file object, or a ``PIL.Image.Image``.
        background: the RGB colour (0..255) that transparent pixels are composited on.
        max_pixels: refuse images whose *declared* size (read from the header, before any decoding) exceeds this many
            pixels, to guard against decompression bombs. A value above PIL's own hard limit (2 x
            ``PIL.Image.MAX_IMAGE_PIXELS``) replaces it; ``None`` leaves only PIL's limit.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, not an image, too large, or holds NaN/inf.
    """
    bg = _check_background(background)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        with _TRUNCATED_GATE.shared():  # (a lazily opened image is decoded here)
            return _decode(source, name, bg, max_pixels)
    name, opened = _open_source(source)
    # No warnings.catch_warnings() here: it is not thread-safe, and the scorer decodes in threads.
    with _pil_limit(max_pixels), _TRUNCATED_GATE.shared():
        try:
            with opened as fh:
                try:
                    img = Image.open(fh)
                except Image.DecompressionBombError as exc:
                    raise ImageDecodeError(name, _bomb_message(exc)) from None
                except Image.UnidentifiedImageError:
                    raise ImageDecodeError(name, "not an image file, or an unsupported format") from None
                except Exception as exc:  # noqa: BLE001 - PIL plugins raise many types on bad data
                    raise ImageDecodeError(name, f"corrupt or truncated image header ({_why(exc)})") from None
                with img:
                    return _decode(img, name, bg, max_pixels)
        except OSError as exc:  # opening the file itself
            raise ImageDecodeError(name, f"cannot open file ({_why(exc)})") from None


def load_image_release(source: str | os.PathLike | bytes | bytearray | IO[bytes]) -> torch.Tensor:
    """Decode an image as the release's dataset loaders do, for exact reproduction of its training data.

    The release reads every image with ``PIL.Image.open(path).convert('RGB')`` while ``ImageFile.LOAD_TRUNCATED_IMAGES``
    is set (its AVA dataset module sets it on import, and its data package imports every dataset module, so in its
    training process it holds for every dataset). Compared with :func:`load_image`:

    - EXIF orientation is *not* applied (a phone photo comes out as stored, possibly sideways);
    - a truncated file is decoded as far as its data goes (PIL fills the rest) instead of being an error;
    - transparency is dropped rather than composited, 16-bit and float images go through PIL's ``convert('RGB')``.

    PIL's truncation switch is a process-wide global. It is set only while this function decodes, and never while
    :func:`load_image` decodes in another thread (a shared/exclusive gate), so other datasets, the scorer's threads and
    later calls keep failing on truncated files. (DataLoader workers are processes, each with its own PIL.)

    Returns:
        (3, H, W) float32 in [0, 1].

    Raises:
        ImageDecodeError: missing, empty or unreadable files, and files PIL cannot decode even with truncation allowed.
    """
    name, opened = _open_source(source)
    with _TRUNCATED_GATE.exclusive():
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            with opened as fh:
                with Image.open(fh) as img:
                    rgb = img.convert("RGB")  # (the release's call; it loads the pixels)
        except Image.UnidentifiedImageError:
            raise ImageDecodeError(name, "not an image file, or an unsupported format") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(name, _bomb_message(exc)) from None
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot decode, even allowing truncated data ({_why(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - PIL plugins raise many types on bad data
            raise ImageDecodeError(name, f"corrupt image ({_why(exc)})") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved
    array = np.asarray(rgb, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class _SharedExclusiveGate:
    """Many shared holders at once, or one exclusive holder (a readers-writer lock; a waiting exclusive holder goes
    before new shared ones, so it is not starved by a stream of decodes)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# Decodes by load_image hold it shared; load_image_release, which sets PIL's global truncation switch, exclusive.
_TRUNCATED_GATE = _SharedExclusiveGate()


def _decode(img: Image.Image, name: str, bg: np.ndarray, max_pixels: int | None) -> torch.Tensor:
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError(name, f"image has no pixels (size {width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            name,
            f"declared size {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} pixels "
            "(a possible decompression bomb); raise max_pixels (CLI: --max-pixels) if the image is genuine",
        )
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, _bomb_message(exc)) from None
    except MemoryError:
        raise ImageDecodeError(name, f"not enough memory to decode a {width}x{height} image") from None
    except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, broken headers anything
        raise ImageDecodeError(name, f"corrupt or truncated image data ({_why(exc)})") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good image
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, _why(exc))
    try:
        array = _to_float_rgb(img, bg)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(name, f"cannot convert image mode {img.mode!r} to RGB ({_why(exc)})") from None
    if not np.isfinite(array).all():
        raise ImageDecodeError(name, "image contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


def _to_float_rgb(img: Image.Image, bg: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1], alpha composited on ``bg`` (3,) in [0, 1]."""
    mode = img.mode
    if mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
        img = img.convert("LA" if mode == "La" else "RGBA")
        mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "L" and "transparency" in img.info or mode == "LA":
        img = img.convert("RGBA")
        mode = "RGBA"
    elif mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"

    if mode == "RGBA":
        arr = np.asarray(img, dtype=np.float32) / 255.0
        rgb, alpha = arr[..., :3], arr[..., 3:]
        return (rgb * alpha + bg * (1.0 - alpha)).astype(np.float32)
    if mode in ("1", "L"):
        gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.float64)
        return np.repeat(_scale_integer(values, mode)[..., None], 3, axis=-1).astype(np.float32)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        return np.repeat(_scale_float(values)[..., None], 3, axis=-1).astype(np.float32)
    if mode != "RGB":  # CMYK, YCbCr, LAB, HSV, RGBX ...
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def _scale_integer(values: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        return values / 65535.0
    # Mode "I" (32-bit signed) carries no bit depth: older PILs give 16-bit PNGs this way, 8-bit data converted to
    # "I" stays in 0..255. Judge by the values: a 16-bit image whose brightest pixel is below 256 would be black.
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo >= 0 and hi <= 255:
        return values / 255.0
    if lo >= 0 and hi <= 65535:
        return values / 65535.0
    logger.warning("32-bit integer image with values in [%g, %g]: rescaled by its own range", lo, hi)
    return (values - lo) / max(hi - lo, 1.0)


def _scale_float(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size != values.size:
        return values  # rejected by the caller with a clear message
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo >= -1e-3 and hi <= 1 + 1e-3:
        return np.clip(values, 0.0, 1.0)
    if lo >= 0 and hi <= 255:
        return values / 255.0
    if lo >= 0 and hi <= 65535:
        return values / 65535.0
    logger.warning("float image with values in [%g, %g]: rescaled by its own range", lo, hi)
    return (values - lo) / max(hi - lo, 1e-12)


def _check_background(background: tuple[int, int, int]) -> np.ndarray:
    try:
        bg = np.asarray(background, dtype=np.float64).reshape(3)
    except (TypeError, ValueError):
        raise ValueError(f"background must be three integers in 0..255, got {background!r}") from None
    if not np.all((bg >= 0) & (bg <= 255)):
        raise ValueError(f"background must be three integers in 0..255, got {background!r}")
    return (bg / 255.0).astype(np.float32)


def _open_source(source: ImageSource) -> tuple[str, IO[bytes]]:
    """(name for messages, a context-managed binary stream)."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("<bytes>", "empty input (0 bytes)")
        return "<bytes>", io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(source)
        if not path.exists():
            raise ImageDecodeError(name, "no such file")
        if path.is_dir():
            raise ImageDecodeError(name, "is a directory, not an image file")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot open file ({_why(exc)})") from None
        if size == 0:
            raise ImageDecodeError(name, "empty file (0 bytes)")
        try:
            return name, open(path, "rb")  # noqa: SIM115 - closed by the caller's `with`
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot open file ({_why(exc)})") from None
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        return name, _NoClose(source)
    raise TypeError(
        f"cannot load an image from a {type(source).__name__}; pass a path, bytes, a binary file or a PIL image"
    )


class _NoClose:
    """Context manager that hands out a caller-owned stream without closing it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream

    def __enter__(self) -> IO[bytes]:
        return self.stream

    def __exit__(self, *exc: object) -> None:
        return None


@contextmanager
def _pil_limit(max_pixels: int | None) -> Iterator[None]:
    """Lift PIL's global bomb limit while opening when ``max_pixels`` is larger; ``None`` keeps PIL's limit."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is None or max_pixels is None or max_pixels <= 2 * pil_limit:
        yield
        return
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _bomb_message(exc: BaseException) -> str:
    return f"refused as a possible decompression bomb ({exc}); raise max_pixels (CLI: --max-pixels) if it is genuine"


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------- PromptIQA
PROMPTIQA_BACKENDS = ("cv2", "pil")


def load_promptiqa_image(
    source: str | os.PathLike | bytes | np.ndarray,
    size: int = 224,
    *,
    backend: str = "cv2",
    max_pixels: int | None = MAX_PIXELS,
) -> torch.Tensor:
    """An image prepared the way the official PromptIQA demo prepares it: RGB float32 (3, size, size) in [0, 1].

    ``backend="cv2"`` (the default) is the official path bit for bit: ``cv2.imread(IMREAD_COLOR)`` (EXIF rotation
    applied, alpha dropped, 16-bit reduced to 8-bit), the whole image resized to size x size with ``INTER_CUBIC`` on
    the 8-bit data, BGR -> RGB, / 255. The model then applies (x - 0.5) / 0.5, so its input equals the official one.

    ``backend="pil"`` needs no OpenCV: :func:`load_image` decodes (EXIF, alpha composited on white, 16-bit kept),
    then :func:`gamma.archs.promptiqa.resize_like_cv2` resizes. For 8-bit RGB files it differs from the official path
    by one level (1/255) on about 0.02% of the pixels.

    Args:
        source: a file path, the encoded bytes, or an RGB uint8 array (H, W, 3) (not BGR: the official demo's web UI
            passed RGB arrays where BGR was expected, which swaps red and blue).
        size: the model's input size (``config.image_size``).
        backend: ``cv2`` or ``pil``.
        max_pixels: decompression-bomb limit of the ``pil`` backend (OpenCV applies its own).

    Raises:
        ImageDecodeError: the file is missing, empty or cannot be decoded (the message names it).
        ImportError: ``backend="cv2"`` without OpenCV installed (the message says what to install).
    """
    if backend not in PROMPTIQA_BACKENDS:
        raise ValueError(f"backend must be one of {PROMPTIQA_BACKENDS}, got {backend!r}")
    if backend == "pil":
        if isinstance(source, np.ndarray):
            source = Image.fromarray(_rgb_uint8(source))
        img = load_image(source, max_pixels=max_pixels)
        return img if img.shape[-2:] == (size, size) else resize_like_cv2(img[None], size)[0]
    cv2 = _import_cv2()
    if isinstance(source, np.ndarray):  # resizing acts on each channel alone, so RGB order gives the same pixels
        resized = cv2.resize(_rgb_uint8(source), (size, size), interpolation=cv2.INTER_CUBIC)
    else:
        bgr = _cv2_decode(cv2, source)
        resized = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_CUBIC), cv2.COLOR_BGR2RGB)
    array = np.asarray(resized).astype(np.float32) / 255  # (size, size, 3), as the official demo computes it
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, size, size)


def _import_cv2() -> object:
    try:
        import cv2  # optional dependency: extra "promptiqa"
    except ImportError as exc:
        raise ImportError(
            f"the official PromptIQA preprocessing needs OpenCV ({exc}); install it with "
            "`pip install 'gamma-iqa[promptiqa]'` (opencv-python), or pass backend='pil' "
            "(no OpenCV; one level off on about 0.02% of the pixels)"
        ) from None
    return cv2


def _cv2_decode(cv2: object, source: str | os.PathLike | bytes) -> np.ndarray:
    """BGR uint8 (H, W, 3) of a path or encoded bytes, decoded by OpenCV as ``cv2.imread(IMREAD_COLOR)`` does."""
    if isinstance(source, (bytes, bytearray)):
        name = "<bytes>"
        if not source:
            raise ImageDecodeError(name, "empty input (0 bytes)")
        img = cv2.imdecode(np.frombuffer(bytes(source), dtype=np.uint8), cv2.IMREAD_COLOR)
    elif isinstance(source, (str, os.PathLike)):
        name, handle = _open_source(source)  # missing, a folder, empty: a clear error naming the file
        handle.close()
        img = cv2.imread(os.fspath(source), cv2.IMREAD_COLOR)
    else:
        raise TypeError(f"cannot load an image from a {type(source).__name__}; pass a path, bytes or an RGB uint8 "
                        "array (H, W, 3)")
    if img is None or img.size == 0:
        raise ImageDecodeError(name, "OpenCV cannot decode it (not an image, an unsupported format, or corrupt)")
    return img


def _rgb_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"an image array must be RGB uint8 of shape (H, W, 3), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------------------------- finding files
def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the path has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def iter_image_files(inputs: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = True,
                     on_skip: Callable[[str], None] | None = None) -> Iterator[str]:
    """Expand files, folders and glob patterns lazily, in a deterministic order.

    - a file is yielded as given, whatever its suffix;
    - a folder yields its image files (by suffix, :data:`IMAGE_EXTENSIONS`), sorted by name, descending into
      sub-folders (sorted) when ``recursive``; hidden files and folders (``.name``) are skipped;
    - a pattern with ``*``, ``?`` or ``[`` is expanded with :func:`glob.glob` (``**`` matches sub-folders), its
      matches sorted; matching folders are expanded as above;
    - a path that does not exist is yielded as given, so that the caller reports it like any unreadable file;
    - ``on_skip`` (if given) is called with each file of a listed folder left out for its suffix.

    Nothing but the current folder's listing is held in memory, so a million files cost no more than a thousand.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for item in inputs:
        text = os.fspath(item)
        if os.path.isdir(text):
            yield from _walk(text, recursive, on_skip=on_skip)
        elif os.path.exists(text) or not (_GLOB_CHARS & set(text)):
            yield text
        else:
            matches = sorted(glob.iglob(text, recursive=True))
            if not matches:
                logger.warning("no files match %s", text)
            for match in matches:
                if os.path.isdir(match):
                    yield from _walk(match, recursive, on_skip=on_skip)
                elif is_image_file(match):
                    yield match


def _walk(folder: str, recursive: bool, _seen: set[tuple[int, int]] | None = None,
          on_skip: Callable[[str], None] | None = None) -> Iterator[str]:
    seen = set() if _seen is None else _seen
    try:
        st = os.stat(folder)
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        logger.warning("cannot list %s (%s)", folder, _why(exc))
        return
    if (st.st_dev, st.st_ino) in seen:  # a symlink back to a folder already listed: a loop would never end
        logger.warning("skipping %s: it links to a folder already listed", folder)
        return
    seen.add((st.st_dev, st.st_ino))
    subdirs = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:  # a link to itself
            continue
        if is_dir:
            subdirs.append(entry.path)
        elif is_image_file(entry.name):
            yield entry.path
        elif on_skip is not None:
            on_skip(entry.path)
    if recursive:
        for sub in subdirs:
            yield from _walk(sub, recursive, seen, on_skip)


def list_image_files(inputs: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = True) -> list[str]:
    """:func:`iter_image_files` as a sorted list without duplicates."""
    return sorted(set(iter_image_files(inputs, recursive=recursive)))


#: Header names of the path column in a CSV file list, in order of preference (compared without case).
LIST_COLUMNS = ("image", "path", "name", "file", "filename")


def iter_listed_files(list_file: str | os.PathLike) -> Iterator[str]:
    """The paths a file list names, read line by line (a list of millions of paths is never held in memory).

    - ``.csv``: a header row, then one row per image; the path is in the column called ``image``, ``path``, ``name``,
      ``file`` or ``filename`` (the first of these present, any case); other columns are ignored.
    - any other file: one path per line; blank lines and lines starting with ``#`` are skipped, surrounding
      whitespace is stripped.

    Paths are yielded as written (relative ones are relative to the current folder, as on the command line) and taken
    literally: no folder or glob expansion.

    Raises:
        OSError: the list cannot be opened.
        ValueError: a CSV list without a header naming the path column, or a row without that column (the message
            names the file and line).
    """
    name = os.fspath(list_file)
    with open(name, newline="" if name.lower().endswith(".csv") else None, encoding="utf-8-sig") as fh:
        if not name.lower().endswith(".csv"):
            for line in fh:
                text = line.strip()
                if text and not text.startswith("#"):
                    yield text
            return
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        column = next((header.index(c) for c in LIST_COLUMNS if c in header), None)
        if column is None:
            raise ValueError(f"{name}: a CSV file list needs a header row naming the path column "
                             f"({', '.join(LIST_COLUMNS)}); got {header or 'an empty file'}")
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= column or not row[column].strip():
                raise ValueError(f"{name}:{reader.line_num}: no value in column {header[column]!r}")
            yield row[column].strip()
