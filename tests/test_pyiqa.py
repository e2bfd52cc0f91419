"""gamma as a pyiqa metric, with a real pyiqa: registration, pyiqa's generic checks, weights, scenes.

Weights are a tiny model saved in the authors' release layout and found through the cache folder ($GAMMA_HOME), so
pyiqa.create_metric('gamma') runs exactly as a user would call it, without arguments.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from PIL import Image

import gamma  # noqa: F401 - `import gamma` is what registers the metrics

pyiqa = pytest.importorskip("pyiqa")

from gamma import pyiqa_plugin  # noqa: E402
from gamma.weights import release_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def weights_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("gamma_home")
    torch.manual_seed(0)
    torch.save(release_state_dict(gamma.create_model("gamma_test")), home / "Gamma.pth")
    torch.manual_seed(1)
    torch.save(release_state_dict(gamma.create_model("gamma_test_sdp")), home / "Gamma-Prompt.pth")
    return home


@pytest.fixture(autouse=True)
def _cache(weights_home, monkeypatch):
    monkeypatch.setenv("GAMMA_HOME", str(weights_home))
    monkeypatch.delenv("GAMMA_WEIGHTS", raising=False)
    monkeypatch.delenv("GAMMA_SDP_WEIGHTS", raising=False)


def test_import_gamma_registers_the_metrics():
    assert pyiqa_plugin.is_registered()
    names = pyiqa.list_models(metric_mode="NR")
    assert "gamma" in names and "gamma_sdp" in names
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.utils.registry import ARCH_REGISTRY

    before = dict(DEFAULT_CONFIGS)
    pyiqa_plugin.register()  # idempotent
    pyiqa_plugin.register()
    assert dict(DEFAULT_CONFIGS) == before
    assert ARCH_REGISTRY.get(pyiqa_plugin.ARCH_NAME) is pyiqa_plugin.GammaIQA


def test_installed_entry_point_is_harmless():
    """What pyiqa does with its plugins: load and call (tests/test_pyiqa_cli.py checks what a new install declares)."""
    eps = [ep for ep in importlib.metadata.entry_points(group="pyiqa.archs") if ep.name == "gamma"]
    if not eps:
        pytest.skip("gamma is not installed as a distribution (pip install -e .)")
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    before = dict(DEFAULT_CONFIGS)
    eps[0].load()()  # also an install that predates the hook module: its target, gamma.pyiqa_plugin:register, stays
    assert dict(DEFAULT_CONFIGS) == before


def test_metric_properties_and_forward():
    metric = pyiqa.create_metric("gamma", device="cpu")
    assert metric.lower_better is False and metric.metric_mode == "NR" and metric.score_range == "~0, ~1"
    assert metric.net.test_sample == 10
    metric.net.test_sample = 1  # pyiqa's generic tests do this
    assert metric.net.net.crop_protocol.num == 1
    x = torch.rand(2, 3, 224, 224)
    score = metric(x)
    assert score.shape == (2, 1) and bool(((score > 0.2) & (score < 1.0)).all())
    # the same as the model itself on the same weights
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test")
    model.test_sample = 1
    with torch.inference_mode():
        assert_close(score[:, 0], model(x), rtol=1e-5, atol=1e-5)


def test_generic_forward_and_backward_checks():
    """pyiqa's test_forward and test_gradient_backward, for gamma's names."""
    for name in ("gamma", "gamma_sdp"):
        metric = pyiqa.create_metric(name, device="cpu")
        metric.eval()
        metric.net.test_sample = 1
        metric(torch.rand(2, 3, 224, 224), torch.rand(2, 3, 224, 224))

        x = torch.randn(2, 3, 224, 224).requires_grad_()
        loss = pyiqa.create_metric(name, as_loss=True, device="cpu")
        loss.eval()
        loss.net.test_sample = 1
        score = loss(x, torch.randn(2, 3, 224, 224))
        score.sum().backward()
        assert x.grad is not None and torch.isnan(x.grad).sum() == 0 and x.grad.abs().sum() > 0, name


def test_file_path_input_and_larger_images(tmp_path):
    from skimage import data

    path = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).resize((300, 200)).save(path)
    metric = pyiqa.create_metric("gamma", device="cpu")
    metric.net.test_sample = 2
    from_path = metric(str(path))
    assert from_path.shape == (1, 1)
    from gamma.io import load_image

    assert_close(from_path, metric(load_image(path)[None]), rtol=1e-5, atol=1e-5)


def test_file_inputs_use_gammas_decoder(tmp_path):
    """An RGBA file whose transparent pixels hide black: gamma composites on white, pyiqa's own reader shows black."""
    import numpy as np

    rgba = np.zeros((224, 224, 4), np.uint8)
    rgba[:112, :, :3] = 200
    rgba[:112, :, 3] = 255  # top half opaque grey, bottom half transparent (black underneath)
    path = tmp_path / "logo.png"
    Image.fromarray(rgba, "RGBA").save(path)
    metric = pyiqa.create_metric("gamma", device="cpu")
    metric.net.test_sample = 1
    from gamma.io import load_image

    assert torch.allclose(metric(str(path)), metric(load_image(path)[None]))
    assert torch.allclose(metric(path.read_bytes()), metric(load_image(path)[None]))
    black = torch.from_numpy(rgba[..., :3]).permute(2, 0, 1)[None].float() / 255
    assert not torch.allclose(metric(str(path)), metric(black))
    with pytest.raises(ValueError, match="broken.png"):
        (tmp_path / "broken.png").write_bytes(b"nope")
        metric(str(tmp_path / "broken.png"))
    from types import SimpleNamespace

    from pyiqa.models.inference_model import InferenceModel

    other = InferenceModel._to_batched_tensor(SimpleNamespace(metric_name="niqe"), str(path))
    assert torch.equal(other, black)  # other metrics keep pyiqa's reader (alpha dropped)


def test_sdp_scene_keyword(weights_home):
    x = torch.rand(1, 3, 224, 224)
    natural = pyiqa.create_metric("gamma_sdp", device="cpu")(x)  # default scene: natural
    face = pyiqa.create_metric("gamma_sdp", device="cpu", scene="face")
    assert not torch.allclose(face(x), natural)
    assert torch.allclose(face(x, scene="natural"), natural)  # per-call override
    with pytest.raises(ValueError, match="unknown scene"):
        pyiqa.create_metric("gamma_sdp", device="cpu", scene="mars")


def test_pretrained_model_path_and_model_name(tmp_path, monkeypatch):
    monkeypatch.setenv("GAMMA_HOME", str(tmp_path / "nothing_here"))
    with pytest.raises(FileNotFoundError, match="Gamma.pth"):  # offline, nothing cached: says what to put where
        pyiqa.create_metric("gamma", device="cpu")
    torch.manual_seed(3)
    file = tmp_path / "mine.pth"
    torch.save(release_state_dict(gamma.create_model("gamma_test")), file)
    metric = pyiqa.create_metric("gamma", device="cpu", pretrained_model_path=str(file))
    named = pyiqa.create_metric("gamma", device="cpu", pretrained_model_path=str(file), model_name="gamma_test")
    x = torch.rand(1, 3, 224, 224)
    assert torch.allclose(metric(x), named(x))
    rand = pyiqa.create_metric("gamma", device="cpu", pretrained=False, model_name="gamma_test")
    assert rand(x).shape == (1, 1)
    rand.load_weights(str(file))  # pyiqa's own loader, release layout {'params': ...}
    assert torch.allclose(rand(x), metric(x))


def test_the_metrics_follow_the_prompt_set_rule(tmp_path, weights_home, monkeypatch):
    """gamma_sdp asks for sdp prompts: the cache's Gamma-Prompt.pth (no record) gives them; a file recording 'naive'
    is refused, naming the way out, and scored with its own prompts with prompt_set=None."""
    from gamma.hub import PromptSetError
    from gamma.weights import save_checkpoint

    assert pyiqa.create_metric("gamma_sdp", device="cpu").net.net.config.prompt_set == "sdp"
    torch.manual_seed(3)
    ours = save_checkpoint(gamma.create_model("gamma_test"), tmp_path / "ours.pth")
    with pytest.raises(PromptSetError, match=r"records prompt set 'naive'.*prompt_set='sdp' contradicts.*"
                       r"prompt_set_override=True.*'gamma_sdp' for 'sdp': pass prompt_set=None"):
        pyiqa.create_metric("gamma_sdp", device="cpu", pretrained_model_path=str(ours))
    own = pyiqa.create_metric("gamma_sdp", device="cpu", pretrained_model_path=str(ours), prompt_set=None)
    deliberate = pyiqa.create_metric("gamma_sdp", device="cpu", pretrained_model_path=str(ours),
                                     prompt_set_override=True)
    assert own.net.net.config.prompt_set == "naive" and deliberate.net.net.config.prompt_set == "sdp"
    x = torch.rand(1, 3, 224, 224)
    assert not torch.allclose(own(x), deliberate(x))


def test_grayscale_input_is_accepted():
    metric = pyiqa.create_metric("gamma", device="cpu")
    metric.net.test_sample = 1
    gray = torch.rand(1, 1, 224, 224)
    assert torch.allclose(metric(gray), metric(gray.expand(-1, 3, -1, -1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU not available")
def test_cpu_gpu_consistency():
    x = torch.rand(1, 3, 224, 224)
    for name in ("gamma", "gamma_sdp"):
        cpu = pyiqa.create_metric(name, device="cpu")
        gpu = pyiqa.create_metric(name, device="cuda")
        cpu.net.test_sample = gpu.net.test_sample = 1
        assert torch.allclose(cpu(x), gpu(x.cuda()).cpu(), atol=1e-2, rtol=1e-2)
