"""gamma.metrics: SRCC / PLCC / KRCC against scipy, and degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from gamma.metrics import evaluate_scores, krcc, plcc, srcc


def test_matches_scipy_without_fitting():
    rng = np.random.default_rng(0)
    t = rng.random(50)
    p = t + 0.3 * rng.random(50)
    assert srcc(p, t) == pytest.approx(stats.spearmanr(p, t).statistic)
    assert plcc(p, t) == pytest.approx(stats.pearsonr(p, t).statistic)
    assert krcc(p, t) == pytest.approx(stats.kendalltau(p, t).statistic)
    r = evaluate_scores(p, t)
    assert set(r) == {"srcc", "plcc", "krcc", "n"} and r["n"] == 50
    assert r["srcc"] == pytest.approx(srcc(p, t)) and r["plcc"] == pytest.approx(plcc(p, t))
    # PLCC is not invariant to a monotone non-linear map (no logistic fit); SRCC is
    assert srcc(np.exp(5 * p), t) == pytest.approx(srcc(p, t))
    assert plcc(np.exp(5 * p), t) != pytest.approx(plcc(p, t))


def test_accepts_tensors_lists_and_columns():
    p = torch.tensor([[0.1], [0.4], [0.3], [0.9]])
    t = [1, 3, 2, 4]
    assert srcc(p, t) == pytest.approx(1.0)
    assert evaluate_scores(p.squeeze(1).to(torch.bfloat16), np.array(t))["n"] == 4


def test_constant_prediction_gives_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="pred is constant"):
        assert math.isnan(srcc([0.5, 0.5, 0.5], [1, 2, 3]))
    with pytest.warns(RuntimeWarning, match="target is constant"):
        r = evaluate_scores([1, 2, 3], [2, 2, 2])
    assert math.isnan(r["srcc"]) and math.isnan(r["plcc"]) and math.isnan(r["krcc"]) and r["n"] == 3
    with pytest.warns(RuntimeWarning, match="1 pair"):
        assert math.isnan(plcc([1.0], [2.0]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="different lengths: 3 vs 2"):
        srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"pred holds 1 non-finite value\(s\) \(first at position 1\)"):
        evaluate_scores([1, float("nan"), 3], [1, 2, 3])
    with pytest.raises(ValueError, match="1-D"):
        krcc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="sequence of numbers"):
        plcc(["a", "b"], [1, 2])
