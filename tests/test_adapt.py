"""gamma.adapt: the training-free maps from model outputs to a prompt's scores (pure numpy; no model here)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from gamma.adapt import MIN_PAIRS, RIDGE_STRENGTHS, NotEnoughPairsError, _isotonic_centroids, fit


def _noisy_line(n: int, slope: float, seed: int = 0, noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.3, 0.9, n)
    return x, 3.0 + slope * x + rng.normal(0, noise * abs(slope), n)


# ------------------------------------------------------------------------------------------------ monotone
def test_direction_is_detected_and_a_dmos_like_prompt_flips_it():
    x, mos = _noisy_line(10, slope=4.0)
    dmos = 100 - 20 * mos  # the same judgements on a lower-is-better scale
    up, down = fit(x, mos, ["score"]), fit(x, dmos, ["score"])
    assert up.report.method == down.report.method == "monotone"
    assert (up.report.direction, down.report.direction) == ("increasing", "decreasing")
    new = np.linspace(0.1, 1.1, 23)  # inside and outside the pairs' range
    assert np.all(np.diff(up.predict(new)) > 0) and np.all(np.diff(down.predict(new)) < 0)
    assert up.report.srcc > 0.9 and down.report.srcc > 0.9  # fitted values against targets: same sign as the targets


def test_a_strictly_monotone_relation_is_reproduced_on_the_pairs():
    x = np.array([0.2, 0.35, 0.4, 0.6, 0.7, 0.95])
    y = np.exp(3 * x)  # monotone, not linear
    a = fit(x, y)
    assert_close(a.predict(x), y, rtol=1e-12, atol=1e-12)
    assert a.report.srcc == pytest.approx(1.0) and a.report.rmse == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(-50, 50)), min_size=MIN_PAIRS, max_size=25),
       st.lists(st.integers(-500, 1500), min_size=2, max_size=30))
def test_monotone_map_keeps_or_reverses_the_order_of_any_inputs(pairs, new):
    """Scores on a 1e-3 grid (a model's scores in [0, 1]), targets and new inputs anywhere on or off it."""
    x = np.array([p[0] for p in pairs]) / 1000
    y = np.array([p[1] for p in pairs], dtype=float)
    if np.all(x == x[0]) or np.all(y == y[0]):
        with pytest.raises(ValueError):
            fit(x, y)
        return
    a = fit(x, y)
    new = np.array(sorted(set(new))) / 1000
    pred = a.predict(new)
    steps = np.diff(pred) * (1 if a.report.direction == "increasing" else -1)
    if "flat" in " ".join(a.report.notes):
        assert np.all(steps == 0)
    else:
        assert np.all(steps > 0)  # strictly: distinct inputs never collapse onto one value


def test_pool_adjacent_violators_equals_scipys_isotonic_regression():
    rng = np.random.default_rng(3)
    for _ in range(20):
        u = rng.integers(0, 8, 15).astype(float)  # ties on purpose
        y = rng.normal(size=15)
        knots, values = _isotonic_centroids(u, y, centroids=False)
        uniq, inverse = np.unique(u, return_inverse=True)
        weights = np.bincount(inverse).astype(float)
        means = np.bincount(inverse, weights=y) / weights
        expected = optimize.isotonic_regression(means, weights=weights).x
        assert np.array_equal(knots, uniq)
        assert_close(values, expected, rtol=1e-10, atol=1e-12)


def test_too_few_pairs_are_refused():
    for n in range(MIN_PAIRS):
        with pytest.raises(NotEnoughPairsError, match=f"at least {MIN_PAIRS} .* got {n}"):
            fit(np.linspace(0, 1, n), np.linspace(1, 5, n))
    fit(np.linspace(0, 1, MIN_PAIRS), np.linspace(1, 5, MIN_PAIRS))  # the smallest accepted


def test_degenerate_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="every target is 3"):
        fit([0.1, 0.2, 0.3, 0.4], [3, 3, 3, 3])
    with pytest.raises(ValueError, match="same score"):
        fit([0.5] * 5, [1, 2, 3, 4, 5], ["score"])
    with pytest.raises(ValueError, match="non-finite"):
        fit([0.1, 0.2, np.nan, 0.4], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="4 feature rows for 5 targets"):
        fit([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="one feature"):
        fit(np.zeros((5, 2)) + np.arange(5)[:, None], [1, 2, 3, 4, 5], method="monotone")
    with pytest.raises(ValueError, match="method"):
        fit([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], method="isotonic")


def test_leave_one_out_figures_come_from_refits_on_the_other_pairs():
    x, y = _noisy_line(9, slope=-2.0, seed=5, noise=0.3)
    features = np.c_[x, np.random.default_rng(6).uniform(size=(9, 3))]
    for a, data in ((fit(x, y), x), (fit(features, y), features)):
        loo = [float(fit(np.delete(data, i, axis=0), np.delete(y, i)).predict(data[i : i + 1])[0]) for i in range(9)]
        r = a.report
        assert r.loo_rmse == pytest.approx(float(np.sqrt(np.mean((np.array(loo) - y) ** 2))), rel=1e-9)
        assert r.loo_srcc == pytest.approx(stats.spearmanr(loo, y).statistic, rel=1e-9)
        assert r.loo_rmse > r.rmse  # held-out error above the in-sample one: the figures are not the same number


# ------------------------------------------------------------------------------------------------ ridge
def _brute_force_strength(x: np.ndarray, y: np.ndarray) -> float:
    """The lambda of RIDGE_STRENGTHS with the smallest leave-one-out MSE by explicit refits (standardisation from all
    pairs, intercept unpenalised), ties to the stronger one."""
    n = len(y)
    z = (x - x.mean(0)) / x.std(0)
    design = np.c_[np.ones(n), z]
    best = (np.inf, None)
    for lam in reversed(RIDGE_STRENGTHS):
        penalty = np.diag([0.0] + [lam * n] * z.shape[1])
        errors = []
        for i in range(n):
            keep = np.arange(n) != i
            coef = np.linalg.solve(design[keep].T @ design[keep] + penalty, design[keep].T @ y[keep])
            errors.append(y[i] - design[i] @ coef)
        mse = float(np.mean(np.square(errors)))
        if mse < best[0] * (1 - 1e-9):
            best = (mse, lam)
    return best[1]


@pytest.mark.parametrize("signal", [True, False])
def test_ridge_strength_is_the_leave_one_out_choice(signal):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(12, 6))
    y = (x @ np.array([1.0, -0.5, 0, 0, 0, 0.2]) if signal else 0) + rng.normal(0, 0.5, 12)
    a = fit(x, y, [f"f{i}" for i in range(6)])
    assert a.report.method == "ridge" and a.report.strength == _brute_force_strength(x, y)
    if not signal:  # pure noise: heavy regularisation, predictions near the mean
        assert a.report.strength >= 1.0
        assert np.ptp(a.predict(x)) < 0.5 * np.ptp(y)


def test_ridge_on_named_columns_ignores_constant_ones_and_reads_by_name():
    rng = np.random.default_rng(2)
    table = {"score": rng.uniform(0.3, 0.8, 8), "p_bad": np.full(8, 0.1), "sharpness": rng.uniform(size=8)}
    y = 10 * table["score"] + rng.normal(0, 0.1, 8)
    a = fit(table, y)
    assert a.features == ("score", "p_bad", "sharpness") and a.report.method == "ridge"
    assert any("constant" in note for note in a.report.notes)
    shuffled = {"sharpness": table["sharpness"], "extra": np.zeros(8), "p_bad": table["p_bad"], "score": table["score"]}
    assert_close(a.predict(shuffled), a.predict(np.c_[table["score"], table["p_bad"], table["sharpness"]]),
                 rtol=0, atol=0)
    with pytest.raises(ValueError, match="lack the column"):
        a.predict({"score": table["score"]})


def test_report_fields_and_summary():
    x, y = _noisy_line(7, slope=3.0, seed=1)
    r = fit(x, y, ["score"]).report
    d = r.to_dict()
    assert set(d) == {"method", "features", "pairs", "direction", "strength", "srcc", "plcc", "rmse", "loo_srcc",
                      "loo_plcc", "loo_rmse", "notes"}
    assert d["features"] == ["score"] and d["pairs"] == 7 and d["strength"] is None
    assert "monotone map of score (increasing)" in r.summary() and "leave-one-out" in r.summary()


# ------------------------------------------------------------------------------------------------ degenerate fits
def test_a_degenerate_fit_warns_and_a_good_one_does_not(caplog):
    """Issue: targets the outputs do not predict gave an adapted column without a word of warning."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=12)  # independent: nothing to learn
    with caplog.at_level("WARNING", logger="gamma.adapt"):
        report = fit(x, y, ["a", "b", "c"]).report
    assert report.strength == RIDGE_STRENGTHS[-1] and report.loo_srcc <= 0
    assert any("ridge penalty is the strongest tried" in n for n in report.notes)
    assert any(f"leave-one-out SRCC {report.loo_srcc:.3f}" in n for n in report.notes)
    assert "strongest tried" in caplog.text and "no better than chance" in caplog.text
    assert "no better than chance" in report.summary()
    # A monotone map whose held-out ranking fails: the SRCC warning alone.
    shuffled = np.random.default_rng(0).permutation(np.linspace(0, 1, 10))  # LOO SRCC -0.66
    assert any("no better than chance" in n for n in fit(shuffled, np.linspace(0, 1, 10), ["score"]).report.notes)
    # Real signal: neither warning.
    caplog.clear()
    line_x, line_y = _noisy_line(12, slope=4.0)
    features = np.stack([line_x, rng.normal(size=12)], axis=1)
    with caplog.at_level("WARNING", logger="gamma.adapt"):
        good = fit(features, line_y, ["score", "noise"]).report
    assert good.strength < RIDGE_STRENGTHS[-1] and good.loo_srcc > 0.5 and good.notes == () and not caplog.text
