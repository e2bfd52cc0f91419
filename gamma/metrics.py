"""SRCC, PLCC, KRCC as pure functions: the correlations of the paper's evaluation (docs/model.md#evaluation-protocol).

PLCC is computed on the raw predictions, without the logistic fitting some IQA papers apply (the paper and the release
use scipy's ``pearsonr`` directly).

Degenerate inputs:
    - different lengths, NaN/inf values, non-1-D data: ``ValueError`` (a NaN score is a bug upstream, not a result);
    - fewer than 2 pairs, or a constant prediction or target: the correlation is undefined, so the result is
      ``nan`` and a ``RuntimeWarning`` says why. ``nan`` (rather than 0.0) keeps "undefined" distinguishable from
      "uncorrelated"; aggregate with ``np.nanmedian`` / ``np.nanmean`` where that is wanted.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["evaluate_scores", "krcc", "plcc", "srcc"]


def _as_pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Validated float64 (N,) arrays, or None (after a warning) when a correlation is undefined."""
    p, t = _to_1d(pred, "pred"), _to_1d(target, "target")
    if p.shape[0] != t.shape[0]:
        raise ValueError(f"pred and target have different lengths: {p.shape[0]} vs {t.shape[0]}")
    for name, a in (("pred", p), ("target", t)):
        bad = ~np.isfinite(a)
        if bad.any():
            raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (first at position "
                             f"{int(np.flatnonzero(bad)[0])})")
    if p.shape[0] < 2:
        warnings.warn(f"correlation of {p.shape[0]} pair(s) is undefined; returning nan", RuntimeWarning, stacklevel=3)
        return None
    for name, a in (("pred", p), ("target", t)):
        if np.all(a == a[0]):
            warnings.warn(f"{name} is constant ({a[0]:g} for all {a.shape[0]} items): correlation undefined; "
                          "returning nan", RuntimeWarning, stacklevel=3)
            return None
    return p, t


def _to_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers ({exc})") from None
    if a.ndim == 2 and 1 in a.shape:  # (N, 1) or (1, N) score columns
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,) or (N, 1), got shape {a.shape}")
    return a


def _finish(r: float) -> float:
    return float(r) if math.isfinite(r) else math.nan


def srcc(pred: Any, target: Any) -> float:
    """Spearman rank-order correlation (``scipy.stats.spearmanr``); nan when undefined (see module docstring)."""
    pair = _as_pair(pred, target)
    return math.nan if pair is None else _finish(stats.spearmanr(*pair).statistic)


def plcc(pred: Any, target: Any) -> float:
    """Pearson linear correlation (``scipy.stats.pearsonr``, no logistic fitting); nan when undefined."""
    pair = _as_pair(pred, target)
    return math.nan if pair is None else _finish(stats.pearsonr(*pair).statistic)


def krcc(pred: Any, target: Any) -> float:
    """Kendall rank correlation (``scipy.stats.kendalltau``, tau-b); nan when undefined."""
    pair = _as_pair(pred, target)
    return math.nan if pair is None else _finish(stats.kendalltau(*pair).statistic)


def evaluate_scores(pred: Any, target: Any) -> dict[str, float | int]:
    """``{'srcc', 'plcc', 'krcc', 'n'}`` of predictions against labels (any monotone scale; only ranks and linear
    correlation are measured). Warns once and gives nan correlations when they are undefined."""
    pair = _as_pair(pred, target)
    n = int(_to_1d(pred, "pred").shape[0])
    if pair is None:
        return {"srcc": math.nan, "plcc": math.nan, "krcc": math.nan, "n": n}
    p, t = pair
    return {
        "srcc": _finish(stats.spearmanr(p, t).statistic),
        "plcc": _finish(stats.pearsonr(p, t).statistic),
        "krcc": _finish(stats.kendalltau(p, t).statistic),
        "n": n,
    }
