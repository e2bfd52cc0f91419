"""Training-free adaptation: fit a map from a model's outputs to a prompt's scores (docs/usage.md#isp-files).

A prompt is a handful of images with scores on some scale (MOS 1..5, DMOS 0..100, an aesthetic rating ...). Gamma's
outputs for those images (its score, the five level probabilities, the attribute scores) are the features; the
prompt's scores are the targets. :func:`fit` returns an :class:`Adaptation` whose :meth:`~Adaptation.predict` maps the
same outputs of any image onto the prompt's scale, and whose :attr:`~Adaptation.report` says how well it fits.

Two maps, chosen by the number of features (``method="auto"``):

- **one feature** (the score alone): a *monotone* map. The direction is detected (the sign of the Spearman correlation
  between feature and target), so a DMOS-like prompt, where lower is better, flips it. The map is the isotonic
  regression of the targets on the feature (pool adjacent violators), drawn as straight lines through the centroids of
  its blocks and continued beyond the outer centroids with the slope of the line joining them. It is therefore
  strictly monotone: images keep their order (reversed for a decreasing map), and no two different scores collapse
  onto one value, also outside the prompt's range, where the map continues linearly (and may leave the prompt's
  score range). A flat map (one block) only happens when the feature carries no monotone information.
- **several features**: *ridge regression* on standardised features (each centred and divided by its standard
  deviation over the pairs; constant features are dropped), intercept unpenalised. The strength is
  ``alpha = lambda * n`` with ``lambda`` from :data:`RIDGE_STRENGTHS` chosen by exact leave-one-out error (the
  closed form ``e_i / (1 - h_ii)`` of a linear smoother); ties go to the stronger penalty.

With fewer than :data:`MIN_PAIRS` pairs :func:`fit` refuses (:class:`NotEnoughPairsError`): with three points any of
these maps passes through them or nearly so, and the fit says nothing about other images.

The report gives SRCC, PLCC and RMSE of the fitted values on the pairs themselves (optimistic by construction) and of
leave-one-out predictions: each pair predicted by the whole procedure (direction detection, or the choice of the ridge
strength, included) run on the other pairs — the honest estimate of how the map does on new images like these.

This module is pure numpy/scipy: no torch, no model.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .metrics import plcc, srcc
from .prompts import ATTRIBUTES, LEVELS

logger = logging.getLogger(__name__)

#: Columns ``distribution=True`` adds to a score table: the standard deviation of the levels, then one probability
#: per level.
DISTRIBUTION_COLUMNS: tuple[str, ...] = ("std", *(f"p_{level}" for level in LEVELS))

#: Outputs an adaptation can map from, by name (``Scorer.adapt``, ``gamma score --adapt-outputs``); any list of these
#: column names works too.
ADAPT_OUTPUTS: dict[str, tuple[str, ...]] = {
    "score": ("score",),
    "distribution": ("score", *DISTRIBUTION_COLUMNS[1:]),
    "all": ("score", *DISTRIBUTION_COLUMNS[1:], *ATTRIBUTES),
}

#: Fewest image-score pairs :func:`fit` accepts (with three or fewer it refuses rather than overfit).
MIN_PAIRS = 4

#: Ridge strengths tried, as lambda = alpha / n on standardised features (1e-4 ... 1e4, 4 per decade).
RIDGE_STRENGTHS: tuple[float, ...] = tuple(float(v) for v in 10.0 ** np.linspace(-4, 4, 33))

METHODS = ("auto", "monotone", "ridge")


class NotEnoughPairsError(ValueError):
    """Too few image-score pairs to fit a map without memorising them."""


@dataclass(frozen=True)
class FitReport:
    """How a map was fitted and how well it fits.

    Attributes:
        method: ``monotone`` or ``ridge``.
        features: names of the features, in the order :meth:`Adaptation.predict` reads them.
        pairs: number of image-score pairs.
        direction: monotone maps: ``increasing`` or ``decreasing`` (a DMOS-like prompt gives ``decreasing``).
        strength: ridge maps: the lambda chosen (alpha / n on standardised features).
        srcc, plcc, rmse: fitted values against the targets, on the pairs (in-sample: optimistic).
        loo_srcc, loo_plcc, loo_rmse: leave-one-out predictions against the targets (each pair predicted by the whole
            procedure run on the others). Correlations are nan where undefined (a constant prediction).
        notes: anything worth a warning (a flat map, constant features dropped, a degenerate fit: the strongest
            ridge penalty, leave-one-out SRCC <= 0), each also logged as a warning.
    """

    method: str
    features: tuple[str, ...]
    pairs: int
    direction: str | None
    strength: float | None
    srcc: float
    plcc: float
    rmse: float
    loo_srcc: float
    loo_plcc: float
    loo_rmse: float
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for a log or a terminal."""
        if self.method == "monotone":
            how = f"monotone map of {self.features[0]} ({self.direction})"
        else:
            how = f"ridge on {len(self.features)} outputs (lambda {self.strength:.3g}, chosen by leave-one-out)"
        text = (f"{how} fitted on {self.pairs} pairs: on the pairs SRCC {self.srcc:.3f}, PLCC {self.plcc:.3f}, "
                f"RMSE {self.rmse:.4g}; leave-one-out SRCC {self.loo_srcc:.3f}, PLCC {self.loo_plcc:.3f}, "
                f"RMSE {self.loo_rmse:.4g}")
        return text + "".join(f"; {note}" for note in self.notes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (JSON-ready; nan stays nan)."""
        d = asdict(self)
        d["features"], d["notes"] = list(self.features), list(self.notes)
        return d


class MonotoneMap:
    """Strictly monotone piecewise-linear map of one feature (see the module docstring).

    Args:
        knots_x: increasing knot positions (K,) on the direction-adjusted axis ``u = direction * x``.
        knots_y: increasing values (K,) at the knots.
        direction: +1 (increasing in x) or -1 (decreasing).
    """

    def __init__(self, knots_x: np.ndarray, knots_y: np.ndarray, direction: int) -> None:
        self.knots_x = np.asarray(knots_x, dtype=np.float64)
        self.knots_y = np.asarray(knots_y, dtype=np.float64)
        self.direction = int(direction)
        span = self.knots_x[-1] - self.knots_x[0]
        self.tail_slope = float((self.knots_y[-1] - self.knots_y[0]) / span) if span > 0 else 0.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n,) or (n, 1) feature values -> (n,) values on the targets' scale."""
        u = self.direction * np.asarray(x, dtype=np.float64).reshape(-1)
        kx, ky = self.knots_x, self.knots_y
        out = np.interp(u, kx, ky)
        below, above = u < kx[0], u > kx[-1]
        out[below] = ky[0] + self.tail_slope * (u[below] - kx[0])
        out[above] = ky[-1] + self.tail_slope * (u[above] - kx[-1])
        return out


class RidgeMap:
    """``intercept + ((x - mean) / scale)[kept] @ coef``: ridge regression on standardised features."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, kept: np.ndarray, coef: np.ndarray,
                 intercept: float) -> None:
        self.mean, self.scale, self.kept = mean, scale, kept
        self.coef, self.intercept = coef, float(intercept)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, k) features -> (n,) values on the targets' scale."""
        x = np.asarray(x, dtype=np.float64)
        z = (x[:, self.kept] - self.mean[self.kept]) / self.scale[self.kept]
        return self.intercept + z @ self.coef


class Adaptation:
    """A fitted map from named model outputs to a prompt's scale, with its :class:`FitReport`."""

    def __init__(self, mapping: MonotoneMap | RidgeMap, report: FitReport) -> None:
        self.mapping = mapping
        self.report = report

    @property
    def features(self) -> tuple[str, ...]:
        return self.report.features

    def predict(self, features: Any) -> np.ndarray:
        """Map features to the prompt's scale.

        Args:
            features: (n,) (one feature), (n, k) in the order of :attr:`features`, or a mapping / DataFrame holding a
                column (n,) for each name in :attr:`features` (other columns are ignored).

        Returns:
            (n,) float64.
        """
        x = _feature_matrix(features, self.features)
        bad = ~np.isfinite(x)
        if bad.any():
            raise ValueError(f"features hold {int(bad.sum())} non-finite value(s)")
        return self.mapping.predict(x)

    def __repr__(self) -> str:
        return f"Adaptation({self.report.summary()})"


# ------------------------------------------------------------------------------------------------ fitting
def fit(
    features: Any,
    targets: Sequence[float] | np.ndarray,
    names: Sequence[str] | None = None,
    *,
    method: str = "auto",
    min_pairs: int = MIN_PAIRS,
) -> Adaptation:
    """Fit a map from ``features`` to ``targets`` (see the module docstring for the maps).

    Args:
        features: (n,) or (n, k) numbers, or a mapping name -> (n,) (its order is kept).
        targets: (n,) the prompt's scores, any finite numbers.
        names: feature names for an array (default ``x0``, ``x1`` ...); ignored for a mapping.
        method: ``auto`` (``monotone`` for one feature, else ``ridge``), ``monotone`` or ``ridge``.
        min_pairs: fewest pairs accepted (at least 2; the default :data:`MIN_PAIRS` is the library's policy).

    Raises:
        NotEnoughPairsError: fewer than ``min_pairs`` pairs.
        ValueError: mismatched lengths, non-finite values, constant targets, a constant feature (monotone) or only
            constant features (ridge), an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if min_pairs < 2:
        raise ValueError(f"min_pairs must be >= 2, got {min_pairs}")
    if isinstance(features, Mapping) or hasattr(features, "columns"):
        names = tuple(features.keys()) if isinstance(features, Mapping) else tuple(map(str, features.columns))
        x = _feature_matrix(features, names)
    else:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"features must be (n,) or (n, k), got shape {x.shape}")
        names = tuple(names) if names is not None else tuple(f"x{i}" for i in range(x.shape[1]))
        if len(names) != x.shape[1]:
            raise ValueError(f"got {len(names)} names for {x.shape[1]} features")
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"got {x.shape[0]} feature rows for {y.shape[0]} targets")
    n = y.shape[0]
    if n < min_pairs:
        raise NotEnoughPairsError(
            f"adapting needs at least {min_pairs} image-score pairs, got {n}: with so few, any map passes through "
            "them and says nothing about other images; add pairs")
    for what, a in (("features", x), ("targets", y)):
        if not np.isfinite(a).all():
            raise ValueError(f"{what} hold non-finite values (NaN or inf)")
    if np.all(y == y[0]):
        raise ValueError(f"every target is {y[0]:g}: a constant prompt has no scale to map onto")
    if method == "auto":
        method = "monotone" if x.shape[1] == 1 else "ridge"
    if method == "monotone" and x.shape[1] != 1:
        raise ValueError(f"a monotone map takes one feature, got {x.shape[1]} ({', '.join(names)})")
    if method == "monotone" and np.all(x[:, 0] == x[0, 0]):
        raise ValueError(f"every pair has the same {names[0]} ({x[0, 0]:g}): no direction or scale can be fitted")
    if method == "ridge" and not _kept(x).any():
        raise ValueError(f"every feature is constant over the pairs ({', '.join(names)}): nothing to fit")

    mapping, details = _fit_map(x, y, method)
    fitted = mapping.predict(x if method == "ridge" else x[:, 0])
    loo = np.array([_loo_prediction(x, y, i, method) for i in range(n)])
    loo_srcc = _corr(srcc, loo, y)
    notes = [*details.get("notes", ()), *_degenerate(method, details.get("strength"), loo_srcc)]
    report = FitReport(
        method=method, features=names, pairs=n, direction=details.get("direction"), strength=details.get("strength"),
        srcc=_corr(srcc, fitted, y), plcc=_corr(plcc, fitted, y), rmse=_rmse(fitted, y),
        loo_srcc=loo_srcc, loo_plcc=_corr(plcc, loo, y), loo_rmse=_rmse(loo, y), notes=tuple(notes),
    )
    for note in notes:
        logger.warning("adaptation: %s", note)
    return Adaptation(mapping, report)


def _degenerate(method: str, strength: float | None, loo_srcc: float) -> list[str]:
    """Warnings for a fit that says little: the strongest ridge penalty tried (the outputs barely predict the targets:
    the map is close to their mean), or no ranking of held-out pairs better than chance (leave-one-out SRCC <= 0)."""
    notes = []
    if method == "ridge" and strength is not None and strength >= RIDGE_STRENGTHS[-1]:
        notes.append(f"the ridge penalty is the strongest tried (lambda {strength:.3g}): the outputs barely predict "
                     "the targets and the adapted scores stay close to their mean; check the pairs (more, more "
                     "varied), or use outputs='score'")
    if not loo_srcc > 0:  # also NaN: constant leave-one-out predictions rank nothing
        notes.append(f"leave-one-out SRCC {loo_srcc:.3f}: the map ranks images it was not fitted on no better than "
                     "chance; the adapted column is unreliable (check the pairs' scores and direction, add pairs)")
    return notes


def _fit_map(x: np.ndarray, y: np.ndarray, method: str) -> tuple[MonotoneMap | RidgeMap, dict[str, Any]]:
    if method == "monotone":
        return _fit_monotone(x[:, 0], y)
    return _fit_ridge(x, y)


def _loo_prediction(x: np.ndarray, y: np.ndarray, i: int, method: str) -> float:
    """Pair i predicted by the procedure fitted on the other pairs (their mean where those cannot be fitted)."""
    keep = np.arange(y.shape[0]) != i
    xs, ys = x[keep], y[keep]
    degenerate = np.all(ys == ys[0]) or (np.all(xs[:, 0] == xs[0, 0]) if method == "monotone" else not _kept(xs).any())
    if degenerate:
        return float(ys.mean())
    mapping, _ = _fit_map(xs, ys, method)
    return float(mapping.predict(x[i : i + 1] if method == "ridge" else x[i : i + 1, 0])[0])


# ------------------------------------------------------------------------------------------------ monotone
def _fit_monotone(x: np.ndarray, y: np.ndarray) -> tuple[MonotoneMap, dict[str, Any]]:
    direction = _direction(x, y)
    knots_x, knots_y = _isotonic_centroids(direction * x, y)
    notes = []
    if knots_x.shape[0] == 1:
        notes.append("the monotone map is flat (the score carries no monotone information about these pairs): every "
                     "image gets the prompt's mean")
    return MonotoneMap(knots_x, knots_y, direction), {
        "direction": "increasing" if direction > 0 else "decreasing", "notes": notes}


def _direction(x: np.ndarray, y: np.ndarray) -> int:
    """+1 or -1: the sign of the Spearman correlation; where it is 0, the direction whose isotonic fit has the smaller
    squared error; where that ties too, +1 (the model's own direction)."""
    rho = _corr(srcc, x, y)
    if rho > 0:
        return 1
    if rho < 0:
        return -1
    sse = {}
    for d in (1, -1):
        kx, ky = _isotonic_centroids(d * x, y, centroids=False)
        sse[d] = float(np.sum((np.interp(d * x, kx, ky) - y) ** 2))
    return -1 if sse[-1] < sse[1] else 1


def _isotonic_centroids(u: np.ndarray, y: np.ndarray, centroids: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pool adjacent violators on (u, y) for a non-decreasing fit; returns the blocks' (u, y) centroids (K,), both
    strictly increasing (equal neighbours are pooled too). ``centroids=False`` returns every distinct u with its
    block's value instead (the plain isotonic fit, steps included)."""
    uniq, inverse, counts = np.unique(u, return_inverse=True, return_counts=True)
    ysum = np.bincount(inverse, weights=y)
    blocks: list[list[float]] = []  # [weight, sum of y, sum of u, first index into uniq, last index]
    for j, (w, ys) in enumerate(zip(counts.astype(np.float64), ysum, strict=True)):
        blocks.append([w, ys, w * uniq[j], j, j])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][0] >= blocks[-1][1] / blocks[-1][0]:
            w2, y2, u2, _, last = blocks.pop()
            blocks[-1][0] += w2
            blocks[-1][1] += y2
            blocks[-1][2] += u2
            blocks[-1][4] = last
    if centroids:
        return (np.array([b[2] / b[0] for b in blocks]), np.array([b[1] / b[0] for b in blocks]))
    values = np.empty_like(uniq)
    for w, ys, _, first, last in blocks:
        values[int(first) : int(last) + 1] = ys / w
    return uniq, values


# ------------------------------------------------------------------------------------------------ ridge
def _kept(x: np.ndarray) -> np.ndarray:
    """Columns that vary over the pairs (relative to their magnitude), (k,) bool."""
    scale = x.std(axis=0)
    return scale > 1e-12 * np.maximum(1.0, np.abs(x).max(axis=0))


def _fit_ridge(x: np.ndarray, y: np.ndarray) -> tuple[RidgeMap, dict[str, Any]]:
    n = y.shape[0]
    kept = _kept(x)
    mean, scale = x.mean(axis=0), np.where(kept, x.std(axis=0), 1.0)
    z = (x[:, kept] - mean[kept]) / scale[kept]  # (n, k'), each column mean 0, variance 1
    y_mean = float(y.mean())
    u, s, vt = np.linalg.svd(z, full_matrices=False)  # z = u diag(s) vt
    uty = u.T @ (y - y_mean)
    best = (math.inf, RIDGE_STRENGTHS[-1])
    for lam in reversed(RIDGE_STRENGTHS):  # strongest first: a tie keeps the stronger penalty
        shrink = s**2 / (s**2 + lam * n)  # (r,)
        fitted = y_mean + u @ (shrink * uty)
        leverage = 1.0 / n + (u**2) @ shrink  # diagonal of the hat matrix, intercept included
        if np.any(1.0 - leverage < 1e-12):
            continue
        mse = float(np.mean(((y - fitted) / (1.0 - leverage)) ** 2))
        if mse < best[0] * (1 - 1e-12):
            best = (mse, lam)
    lam = best[1]
    coef = vt.T @ (s / (s**2 + lam * n) * uty)  # (k',)
    notes = []
    if not kept.all():
        notes.append(f"{int((~kept).sum())} output(s) constant over the pairs, left out of the fit")
    return RidgeMap(mean, scale, kept, coef, y_mean), {"strength": float(lam), "notes": notes}


# ------------------------------------------------------------------------------------------------ helpers
def _feature_matrix(features: Any, names: Sequence[str]) -> np.ndarray:
    """(n, k) float64 from an array or a mapping / DataFrame of named columns."""
    if isinstance(features, Mapping) or hasattr(features, "columns"):
        missing = [name for name in names if name not in features]
        if missing:
            raise ValueError(f"features lack the column(s) {', '.join(missing)}")
        columns = [np.asarray(features[name], dtype=np.float64).reshape(-1) for name in names]
        if len({c.shape[0] for c in columns}) > 1:
            raise ValueError("feature columns have different lengths")
        return np.stack(columns, axis=1)
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1 and len(names) == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"features must be (n, {len(names)}) for {', '.join(names)}, got shape {x.shape}")
    return x


def _corr(fn: Any, a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():  # a constant input makes a correlation undefined: nan, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(a, b)


def _rmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(target)) ** 2)))


def adapt_features(outputs: str | Sequence[str]) -> tuple[str, ...]:
    """The feature names of an ``outputs`` choice (a name of :data:`ADAPT_OUTPUTS`, or a list of column names)."""
    if isinstance(outputs, str):
        if outputs not in ADAPT_OUTPUTS:
            raise ValueError(f"outputs must be one of {', '.join(ADAPT_OUTPUTS)} or a list of column names, got "
                             f"{outputs!r}")
        return ADAPT_OUTPUTS[outputs]
    known = set(ADAPT_OUTPUTS["all"]) | {"std"}
    names = tuple(outputs)
    unknown = [n for n in names if n not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"outputs must be distinct names among {', '.join(sorted(known))}; got {list(names)}")
    return names


__all__ = ["ADAPT_OUTPUTS", "DISTRIBUTION_COLUMNS", "MIN_PAIRS", "adapt_features",
           "RIDGE_STRENGTHS", "Adaptation", "FitReport", "MonotoneMap", "NotEnoughPairsError",
           "RidgeMap", "fit"]
