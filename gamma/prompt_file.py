"""ISP files: a few images with their scores, as a CSV ``image,score`` (docs/usage.md#isp-files).

The same file steers PromptIQA (its image-score pair prompt, docs/promptiqa.md) and adapts Gamma to a scale
(:mod:`gamma.adapt`)::

    image,score
    ref/0001.png,3.2
    ref/0002.png,1.8
    /data/other/0003.jpg,4.6

- A header row names the columns: the image in ``image``, ``path``, ``name``, ``file`` or ``filename`` (the first
  present, any case; as in file lists), the score in ``score``, ``mos`` or ``dmos``. Other columns are ignored; blank
  rows are skipped.
- Relative paths are relative to the CSV's folder, not the current one, so a prompt folder can be moved as a whole.
- Errors name the file and the line: a missing image, a score that is not a finite number, fewer than two pairs. What
  range the scores must have depends on the model (PromptIQA: [0, 1]) and is checked where the model is known.

Nothing here decodes an image or imports torch.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .io import LIST_COLUMNS

logger = logging.getLogger(__name__)

#: Header names of the score column, in order of preference (compared without case).
SCORE_COLUMNS = ("score", "mos", "dmos")

#: Fewest pairs a prompt may have (a scale needs two points; adapting Gamma needs more, see gamma.adapt.MIN_PAIRS).
MIN_PROMPT_PAIRS = 2


class PromptFileError(ValueError):
    """A prompt file (or prompt given in code) that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class PromptPairs:
    """Image-score pairs of a prompt.

    Attributes:
        images: image sources (absolute or CWD-relative paths for a file's pairs; whatever was given otherwise).
        scores: one finite number per image, on the prompt's own scale.
        source: where the pairs came from (a file name, or ``<prompt>``), for messages.
    """

    images: tuple[Any, ...]
    scores: tuple[float, ...]
    source: str = "<prompt>"

    def __len__(self) -> int:
        return len(self.scores)


def read_prompt_file(path: str | os.PathLike) -> PromptPairs:
    """Read a prompt CSV (see the module docstring) and check that every image file exists.

    Raises:
        PromptFileError: the file is missing or unreadable, has no header naming both columns, a row lacks a value, a
            score is not a finite number, an image file does not exist, or there are fewer than 2 pairs.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise PromptFileError(f"prompt file {name}: no such file")
    folder = os.path.dirname(os.path.abspath(name))
    images: list[str] = []
    scores: list[float] = []
    missing: list[str] = []
    try:
        with open(name, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            image_col = next((header.index(c) for c in LIST_COLUMNS if c in header), None)
            score_col = next((header.index(c) for c in SCORE_COLUMNS if c in header), None)
            if image_col is None or score_col is None:
                raise PromptFileError(
                    f"{name}: a prompt file is a CSV whose header names an image column ({', '.join(LIST_COLUMNS)}) "
                    f"and a score column ({', '.join(SCORE_COLUMNS)}), e.g. 'image,score'; got "
                    f"{header or 'an empty file'}")
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                where = f"{name}:{reader.line_num}"
                cells = [row[c].strip() if c < len(row) else "" for c in (image_col, score_col)]
                if not cells[0] or not cells[1]:
                    column = header[image_col] if not cells[0] else header[score_col]
                    raise PromptFileError(f"{where}: no value in column {column!r}")
                try:
                    score = float(cells[1])
                except ValueError:
                    raise PromptFileError(f"{where}: the score {cells[1]!r} is not a number") from None
                if not math.isfinite(score):
                    raise PromptFileError(f"{where}: the score {cells[1]!r} is not a finite number")
                image = cells[0] if os.path.isabs(cells[0]) else os.path.join(folder, cells[0])
                if not os.path.isfile(image):
                    missing.append(f"{cells[0]} (line {reader.line_num})")
                images.append(os.path.normpath(image))
                scores.append(score)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PromptFileError(f"cannot read the prompt file {name}: {exc}") from None
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PromptFileError(f"{name}: image(s) not found (relative paths are relative to the prompt file's folder "
                              f"{folder}): {', '.join(missing[:5])}{more}")
    return _checked(PromptPairs(tuple(images), tuple(scores), name))


def as_prompt_pairs(prompt: Any) -> PromptPairs:
    """A prompt given as a CSV path, :class:`PromptPairs`, a mapping ``{image: score}`` or a sequence of
    ``(image, score)`` pairs (images: paths, bytes, PIL images, tensors ...), checked.

    Raises:
        PromptFileError: see :func:`read_prompt_file`; a score that is not a finite number; fewer than 2 pairs.
        TypeError: anything else.
    """
    if isinstance(prompt, PromptPairs):
        return _checked(prompt)
    if isinstance(prompt, (str, os.PathLike)):
        return read_prompt_file(prompt)
    if isinstance(prompt, Mapping):
        items = list(prompt.items())
    elif isinstance(prompt, Sequence) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in prompt):
        items = [tuple(p) for p in prompt]
    else:
        raise TypeError(f"a prompt is a CSV file (image,score), a dict {{image: score}} or a list of (image, score) "
                        f"pairs; got {type(prompt).__name__}")
    scores = []
    for i, (_, score) in enumerate(items):
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise PromptFileError(f"prompt pair {i}: the score {score!r} is not a number") from None
        if not math.isfinite(value):
            raise PromptFileError(f"prompt pair {i}: the score {score!r} is not a finite number")
        scores.append(value)
    return _checked(PromptPairs(tuple(image for image, _ in items), tuple(scores)))


def _checked(pairs: PromptPairs) -> PromptPairs:
    if len(pairs.images) != len(pairs.scores):
        raise PromptFileError(f"{pairs.source}: {len(pairs.images)} images but {len(pairs.scores)} scores")
    if len(pairs) < MIN_PROMPT_PAIRS:
        raise PromptFileError(f"{pairs.source}: a prompt needs at least {MIN_PROMPT_PAIRS} image-score pairs, got "
                              f"{len(pairs)}")
    seen: set[str] = set()
    for image in pairs.images:
        if isinstance(image, str):
            if image in seen:
                logger.warning("%s: %s is named more than once", pairs.source, image)
            seen.add(image)
    return pairs


def normalized_prompt_scores(pairs: PromptPairs, mos_range: tuple[float, float] | None = None,
                             lower_better: bool = False, *, model: str = "PromptIQA") -> list[float]:
    """Prompt scores for a model trained on scores in [0, 1] (PromptIQA), checked.

    Without ``mos_range`` the scores must already lie in [0, 1]. With it they are on that scale (``(lo, hi)``, as
    :func:`gamma.scorer.from_mos`), must lie within it, and are normalised to [0, 1] (flipped for ``lower_better``).

    Raises:
        PromptFileError: a score outside the range, naming the first one and saying what to pass.
    """
    values = list(pairs.scores)
    lo, hi = (0.0, 1.0) if mos_range is None else (min(mos_range), max(mos_range))
    for i, v in enumerate(values):
        if not lo <= v <= hi:
            where = f"{pairs.source}: pair {i + 1} ({_image_name(pairs.images[i])})"
            if mos_range is None:
                raise PromptFileError(
                    f"{where} has the score {v:g}, but {model} was trained on scores in [0, 1] (it ends in a sigmoid); "
                    f"the prompt's scores span [{min(values):g}, {max(values):g}]. Normalise them (e.g. MOS / 100), "
                    "or give their scale: mos_range=(LO, HI) / --mos-range LO HI")
            raise PromptFileError(f"{where} has the score {v:g}, outside the MOS range [{lo:g}, {hi:g}] given")
    if mos_range is None:
        return values
    a, b = (float(mos_range[0]), float(mos_range[1]))
    flip = lower_better != (b < a)  # a reversed range reads as the ordered one with the direction flipped
    out = [(v - lo) / (hi - lo) for v in values]
    return [1.0 - v for v in out] if flip else out


def _image_name(image: Any) -> str:
    return os.path.basename(image) if isinstance(image, str) else type(image).__name__


__all__ = ["MIN_PROMPT_PAIRS", "SCORE_COLUMNS", "PromptFileError", "PromptPairs", "as_prompt_pairs",
           "normalized_prompt_scores", "read_prompt_file"]
