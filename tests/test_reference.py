"""GammaModel scores what the release's forward (gamma.testing.reference, written independently) scores on the same
weights."""

import ast
import inspect

import pytest
import torch
from helpers import assert_close, perturbed_gamma

import gamma
import gamma.testing.reference
from gamma.archs import CropProtocol
from gamma.archs.moae_kernels import FusedExperts
from gamma.testing.reference import ReleaseReference, release_forward, release_offsets

# fp32 scores of two implementations, within the levels' range 0.1 to 1.1.
SCORE_TOL = {"rtol": 1e-5, "atol": 5e-6}



@pytest.fixture(scope="module")
def models():
    return {name: perturbed_gamma(name, logit_scale=3.5) for name in ("gamma_test", "gamma_test_sdp")}


@pytest.mark.parametrize("name, scene", [("gamma_test", None), ("gamma_test_sdp", "underwater")])
def test_test_time_protocol_matches_release(models, name, scene):
    model = models[name]
    ref = ReleaseReference(model.state_dict(), prompt_set=model.config.prompt_set)
    images = torch.rand(2, 3, 256, 240, generator=torch.Generator().manual_seed(3))
    offsets = model.crop_protocol.offsets(256, 240)  # the 10 random crops, the same for both
    assert len(set(offsets)) == 10
    with torch.inference_mode():
        ours = model(images, scene=scene)
    with torch.no_grad():
        theirs = ref.score_images(images, scene, crop_offsets=offsets)
    assert ours.shape == theirs.shape == (2,)
    assert_close(ours, theirs, **SCORE_TOL)
    assert float((ours - ours.mean()).abs().max()) > 1e-4  # the images score differently: the check is not vacuous


def test_mixed_scene_batch_matches_release(models):
    model = models["gamma_test_sdp"]
    ref = ReleaseReference(model.state_dict(), prompt_set="sdp")
    crops = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    scenes = ["natural", "face", "aesthetics"]
    with torch.no_grad():
        ours = model.score_crops(crops, scene=scenes)
        theirs = ref.score_crops(crops, scenes)
        same_scene = ref.score_crops(crops, "natural")
    assert_close(ours, theirs, **SCORE_TOL)
    assert float((theirs - same_scene).abs().max()) > 1e-4  # the scene matters


@pytest.mark.parametrize("fused", [True, False])
def test_single_pass_matches_release_in_grad_mode(models, fused):
    model = models["gamma_test"]
    for m in model.moae_modules():
        m.kernel = FusedExperts() if fused else None  # fused kernels, or the formula as written
    try:
        crops = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(5))
        ours = model.score_crops(crops)  # autograd on: no cached text features, no cached stacked experts
        with torch.no_grad():
            theirs = release_forward(model.state_dict(), crops)
        assert_close(ours, theirs, **SCORE_TOL)
    finally:
        for m in model.moae_modules():
            m.kernel = FusedExperts()


def test_release_offsets_follow_the_protocol_draw_order():
    gen = torch.Generator().manual_seed(7)
    assert release_offsets(512, 384, 10, 224, gen) == CropProtocol(seed=7).offsets(512, 384)


def test_reference_infers_the_architecture(models):
    cfg = models["gamma_test"].config
    ref = ReleaseReference(models["gamma_test"].state_dict())
    assert (ref.vision_width, ref.vision_layers, ref.vision_heads, ref.patch_size, ref.image_size) == (
        cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.patch_size, cfg.vision.image_size)
    assert (ref.text_width, ref.text_layers, ref.text_heads, ref.context_length) == (
        cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.text.context_length)


def test_reference_is_independent_of_the_model_code():
    tree = ast.parse(inspect.getsource(gamma.testing.reference))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "archs" in m or m in ("gamma", "factory", "weights")], imported
