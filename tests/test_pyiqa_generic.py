"""pyiqa's generic checks for every metric name gamma registers, as pyiqa's own tests/test_metric_general.py runs them
(IQA-PyTorch): ``create_metric(name)`` with its defaults, a forward pass on a random batch, a backward pass as a loss
on ``randn`` input (no NaN in the gradient), and the ``lower_better`` / ``score_range`` attributes.

Weights are tiny models saved by this test and found through the weight files' environment variables, so every
metric is created exactly as a user (or pyiqa's test) would create it, without arguments; the ``promptiqa`` metric
then scores against its documented default ISP set (gamma.isp.default_isp_set), which needs no download.
"""

from __future__ import annotations

import logging

import pytest
import torch

import gamma
from gamma.weights import release_state_dict, save_checkpoint

pyiqa = pytest.importorskip("pyiqa")

from _gamma_pyiqa_hook import METRICS  # noqa: E402

NAMES = sorted(METRICS)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(release_state_dict(gamma.create_model("gamma_test")), folder / "Gamma.pth")
    torch.manual_seed(1)
    torch.save(release_state_dict(gamma.create_model("gamma_test_sdp")), folder / "Gamma-Prompt.pth")
    torch.manual_seed(2)
    save_checkpoint(gamma.create_model("promptiqa_test"), folder / "promptiqa.pth")
    return {"GAMMA_WEIGHTS": folder / "Gamma.pth", "GAMMA_SDP_WEIGHTS": folder / "Gamma-Prompt.pth",
            "GAMMA_PROMPTIQA_WEIGHTS": folder / "promptiqa.pth"}


@pytest.fixture(autouse=True)
def _weights(weight_files, monkeypatch, tmp_path):
    monkeypatch.setenv("GAMMA_HOME", str(tmp_path / "empty_cache"))
    for var, path in weight_files.items():
        monkeypatch.setenv(var, str(path))


def test_every_name_is_a_pyiqa_metric():
    assert set(NAMES) <= set(pyiqa.list_models(metric_mode="NR"))
    assert NAMES == ["gamma", "gamma_sdp", "promptiqa"]


@pytest.mark.parametrize("name", NAMES)
def test_forward(name, caplog):
    x = torch.rand(2, 3, 224, 224)
    with caplog.at_level(logging.WARNING, logger="gamma"):
        metric = pyiqa.create_metric(name, device="cpu")
    if name == "promptiqa":  # the default ISP set is named in the log whenever it is used
        assert "default ISP set" in caplog.text
    metric.eval()
    if hasattr(metric.net, "test_sample"):
        metric.net.test_sample = 1
    score = metric(x)
    assert score.shape == (2, 1) and torch.isfinite(score).all()
    assert not torch.equal(score[0], score[1])  # two random images, two scores


@pytest.mark.parametrize("name", NAMES)
def test_gradient_backward(name):
    x = torch.randn(2, 3, 224, 224, requires_grad=True)
    metric = pyiqa.create_metric(name, as_loss=True, device="cpu")
    metric.eval()
    if hasattr(metric.net, "test_sample"):
        metric.net.test_sample = 1
    score = metric(x)
    score = score[0] if isinstance(score, tuple) else score
    score.sum().backward()
    assert x.grad is not None and torch.isnan(x.grad).sum() == 0
    assert float(x.grad.abs().sum()) > 0  # the gradient reaches the input


@pytest.mark.parametrize("name", NAMES)
def test_lower_better_and_score_range(name):
    metric = pyiqa.create_metric(name, device="cpu")
    assert metric.lower_better is False
    lo, hi = (float(part.strip().lstrip("~")) for part in metric.score_range.split(","))
    assert (lo, hi) == (0.0, 1.0)
    assert metric.metric_mode == "NR"


def test_promptiqa_default_isp_set_follows_its_rule():
    from gamma.isp import DEFAULT_ISP_PICTURES, default_isp_set

    pairs = default_isp_set()
    assert len(pairs) == 10 and pairs.scores == tuple(round(1 - k / 10, 6) for k in range(10))
    sizes = {image.size for image in pairs.images}
    assert sizes == {(224, 224)} and len(DEFAULT_ISP_PICTURES) == 5
    # stronger distortion, less high-frequency detail at the same picture? noise adds it: check the rule's two parts
    import numpy as np

    clean, strongest = (np.asarray(pairs.images[k], dtype=np.float64) for k in (0, 5))  # both astronaut
    assert np.abs(clean - strongest).mean() > 5  # d = 0.5 changes the picture visibly
