"""What the ``Scorer`` takes as images, flattened into (name, decode) items and decoded ahead in threads.

Inputs: paths, folders (recursive) and globs; PIL images; tensors (3, H, W) or (B, 3, H, W) in [0, 1]; numpy arrays
(H, W), (H, W, 3) or (H, W, 4); bytes; lists of these. Files and PIL images are read by the model family's reader
(:attr:`gamma.families.Scoring.read`), tensors and arrays made what the model takes by its ``fit``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from .io import iter_image_files, load_image
from .prompt_file import PromptFileError

#: One input item: its display name and a function that decodes it into (3, H, W) in [0, 1].
Item = tuple[str, Callable[[], torch.Tensor]]


class InputReader:
    """Turns inputs into items.

    Args:
        read: decodes a file path, bytes or PIL image as the model reads it.
        fit: makes a decoded tensor or array what the model takes (None: as it is).
    """

    def __init__(self, read: Callable[[Any], torch.Tensor],
                 fit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.read, self.fit = read, fit

    def items(self, inputs: Any) -> Iterator[Item]:
        """Flatten ``inputs`` into (name, decode) pairs, lazily (folders are walked as they are consumed).

        Inputs without a file name are called ``<tensor i>``, ``<image i>`` ... after their position i in the
        flattened input.
        """
        yield from self._expand(inputs, iter(range(1 << 62)))

    def _expand(self, obj: Any, counter: Iterator[int]) -> Iterator[Item]:
        if isinstance(obj, (str, os.PathLike)):
            for path in iter_image_files(obj):
                next(counter)
                yield path, self._file_loader(path)
        elif isinstance(obj, Image.Image):
            index = next(counter)
            yield getattr(obj, "filename", "") or f"<image {index}>", self._file_loader(obj)
        elif isinstance(obj, torch.Tensor):
            if obj.dim() == 3:
                yield f"<tensor {next(counter)}>", self._fitted(_tensor_loader(obj))
            elif obj.dim() == 4:
                for image in obj:
                    yield f"<tensor {next(counter)}>", self._fitted(_tensor_loader(image))
            else:
                raise ValueError(f"image tensors must be (3, H, W) or (B, 3, H, W), got shape {tuple(obj.shape)}")
        elif isinstance(obj, np.ndarray):
            yield f"<array {next(counter)}>", self._fitted(_array_loader(obj))
        elif isinstance(obj, (bytes, bytearray)):
            yield f"<bytes {next(counter)}>", self._file_loader(obj)
        elif isinstance(obj, Iterable):
            for item in obj:
                yield from self._expand(item, counter)
        else:
            raise TypeError(
                f"cannot score a {type(obj).__name__}; pass paths, folders, PIL images, tensors, arrays or lists"
            )

    def one_item(self, obj: Any, index: int) -> Item:
        """One prompt image as an item: a path taken literally (no folder or glob expansion), or any other input."""
        if isinstance(obj, (str, os.PathLike)):
            return os.fspath(obj), self._file_loader(os.fspath(obj))
        found = list(self._expand(obj, iter(range(index, index + 2))))
        if len(found) != 1:
            raise PromptFileError(f"prompt image {index + 1} must be one image, got {len(found)}")
        return found[0]

    def _file_loader(self, source: Any) -> Callable[[], torch.Tensor]:
        return lambda: self.read(source)

    def _fitted(self, load: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        if self.fit is None:
            return load
        return lambda: self.fit(load())


def decoded(items: Iterable[Item], num_workers: int, batch_size: int) -> Iterator[tuple[str, torch.Tensor | Exception]]:
    """Decode items in order, ``num_workers`` threads ahead; a failure is yielded as its exception."""
    if num_workers == 0:
        for name, load in items:
            yield name, _try(load)
        return
    ahead = batch_size + 2 * num_workers  # bounded look-ahead: memory stays O(batch)
    with ThreadPoolExecutor(num_workers, thread_name_prefix="gamma-decode") as pool:
        queue: deque[tuple[str, Future]] = deque()
        for name, load in items:
            queue.append((name, pool.submit(_try, load)))
            if len(queue) >= ahead:
                done_name, future = queue.popleft()
                yield done_name, future.result()
        while queue:
            done_name, future = queue.popleft()
            yield done_name, future.result()


def _try(load: Callable[[], torch.Tensor]) -> torch.Tensor | Exception:
    try:
        return load()
    except ValueError as exc:  # ImageDecodeError, or an invalid tensor / array
        return exc


def _tensor_loader(image: torch.Tensor) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W), got shape {tuple(image.shape)}")
        return image.detach()

    return load


def _array_loader(array: np.ndarray) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        a = array
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
        if a.dtype == np.uint8:
            return load_image(Image.fromarray(a))
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"image arrays must be uint8, or float in [0, 1]; got dtype {a.dtype}")
        return torch.from_numpy(np.ascontiguousarray(a[..., :3].transpose(2, 0, 1), dtype=np.float32))

    return load
