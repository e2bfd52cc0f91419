"""Reduced precision (GammaModel.to_precision): agreement with fp32 on real photographs, exact fp32, the device rules.

Agreement is measured on 64 distorted crops of scikit-image's photographs with a tiny model whose every trainable part
matters; tolerances are relative to the spread of the fp32 scores. The full-size figures come from
scripts/bench.py --precision, not from here; no timing is asserted.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, perturbed_gamma
from scipy.stats import spearmanr

import gamma
from gamma.archs import precision as prec
from gamma.archs.crops import crop_mean
from gamma.archs.moae import MoAE
from gamma.data.photos import distorted_photos


def _scores(model: gamma.GammaModel, images: torch.Tensor, scene: str | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(images[i:i + 16], scene=scene) for i in range(0, len(images), 16)])


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    images, infos = distorted_photos(64, size=224, seed=0)
    assert len({i.photo for i in infos}) >= 12 and len({(i.distortion, i.strength) for i in infos}) == 20
    return images


def test_photo_set_is_reproducible_and_varied():
    a, infos = distorted_photos(8, size=(64, 96), seed=3)
    b, _ = distorted_photos(8, size=(64, 96), seed=3)
    assert a.shape == (8, 3, 64, 96) and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.equal(a, distorted_photos(8, size=(64, 96), seed=4)[0])
    assert len({i.photo for i in infos}) == 8
    with pytest.raises(ValueError, match="count"):
        distorted_photos(0)


@pytest.fixture(scope="module")
def fp32_scores(photos) -> torch.Tensor:
    return _scores(perturbed_gamma(), photos)


def test_the_experts_matter_and_the_scores_spread(photos, fp32_scores):
    plain = perturbed_gamma()
    with torch.no_grad():
        for m in plain.moae_modules():
            m.scale.zero_()
    assert float((_scores(plain, photos) - fp32_scores).abs().max()) > 0.1 * float(fp32_scores.std())
    assert float(fp32_scores.std()) > 0.02  # the agreement below is not between near-constant scores


@pytest.mark.parametrize(("precision", "max_rel", "min_srcc"), [
    ("bf16", 0.1, 0.995),  # max |delta| <= 10% of the fp32 scores' standard deviation
    ("fp16", 0.05, 0.999),
    ("int8", 0.25, 0.98),  # int8 agrees loosely
])
def test_agreement_with_fp32(photos, fp32_scores, precision, max_rel, min_srcc):
    # allow_slow: bf16 and fp16 math runs on every CPU, only more slowly without AVX512-BF16/-FP16 or AMX.
    model = perturbed_gamma().to_precision(precision, allow_slow=True)
    assert model.precision == precision
    scores = _scores(model, photos)
    assert scores.dtype == torch.float32
    delta = float((scores - fp32_scores).abs().max())
    assert delta <= max_rel * float(fp32_scores.std()), delta
    assert delta > 0  # it did compute in another precision
    assert spearmanr(scores.numpy(), fp32_scores.numpy())[0] >= min_srcc


def test_sdp_scenes_and_crop_protocol_are_unchanged(photos):
    model = perturbed_gamma("gamma_test_sdp")
    images = photos[:6, :, :200]  # not square: the 10 random crops
    scenes = ["natural", "face", "aigc", "aesthetics", "underwater", "natural"]
    with torch.inference_mode():
        fp32 = model(images, scene=scenes)
        model.to_precision("bf16", allow_slow=True)
        bf16 = model(images, scene=scenes)
    assert model.crop_protocol.num == 10 and model.crop_protocol.mode == "random"
    assert torch.allclose(bf16, fp32, rtol=0, atol=0.1 * float(fp32.std()) + 1e-3)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_assessment_attributes_and_auto_scene_agree(photos, precision):
    model = perturbed_gamma("gamma_test_sdp")
    images = photos[:8]
    with torch.inference_mode():
        fp32 = model.assess(images, scene="auto", attributes=True)
        fp32_scenes = model.scene_probabilities(images)
        model.to_precision(precision, allow_slow=True)
        low = model.assess(images, scene="auto", attributes=True)
        low_scenes = model.scene_probabilities(images)
    assert low.score.dtype == low.distribution.dtype == torch.float32
    assert torch.allclose(low.distribution, fp32.distribution, rtol=0, atol=0.02)
    assert torch.allclose(low_scenes, fp32_scenes, rtol=0, atol=0.02)
    for name, values in fp32.attributes.items():
        assert torch.allclose(low.attributes[name], values, rtol=0, atol=0.02), name


def test_fp32_is_exact_and_int8_goes_back_exactly(photos, fp32_scores):
    model = perturbed_gamma()
    assert model.precision == "fp32"
    assert torch.equal(_scores(model.to_precision("fp32"), photos), fp32_scores)  # a no-op
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    model.to_precision("int8")
    assert model.state_dict().keys() == keys.keys()  # the release layout, the float weights kept
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    model.to_precision("fp32")
    assert torch.equal(_scores(model, photos), fp32_scores)
    fresh = perturbed_gamma()
    assert {n for n, _ in model.named_trainable_parameters()} == {n for n, _ in fresh.named_trainable_parameters()}
    model.train()  # allowed again


def test_bf16_keeps_the_layout_and_refuses_training_and_going_back():
    model = perturbed_gamma().to_precision("bf16", allow_slow=True)
    assert model.state_dict().keys() == perturbed_gamma().state_dict().keys()
    blocks = model.clip_model.visual.transformer.resblocks
    assert blocks[0].attn.in_proj_weight.dtype == torch.bfloat16
    assert blocks[-1].mlp.experts.expert_0.c_fc.weight.dtype == torch.bfloat16
    # The numerically sensitive parts stay fp32: LayerNorms, embedding, output projection, text tower, head.
    assert blocks[0].ln_1.weight.dtype == torch.float32 and model.clip_model.visual.proj.dtype == torch.float32
    assert model.clip_model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float32
    assert model.score_level.dtype == model.adapter.fc[0].weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match="training runs in fp32"):
        model.train()
    with pytest.raises(ValueError, match="fp32 weights are gone"):
        model.to_precision("fp32")
    assert model.precision == "bf16" and not model.training


def test_text_features_are_fp32_and_cached_across_precisions():
    model = perturbed_gamma()
    with torch.inference_mode():
        text = model.text_features()
    for precision in ("int8", "fp32", "bf16"):
        model.to_precision(precision, allow_slow=True)
        with torch.inference_mode():
            again = model.text_features()
        assert again is text and again.dtype == torch.float32, precision  # computed once, in fp32
    with torch.no_grad():
        fresh = gamma.archs.clip.encode_text(model.clip_model, model.prompt_tokens.view(5, -1))
    assert torch.allclose(torch.nn.functional.normalize(fresh, dim=-1), text[0], atol=1e-6)


def test_int8_follows_weight_updates_and_expert_masks(photos):
    model = perturbed_gamma().to_precision("int8")
    x = photos[:4]
    with torch.no_grad():
        before = model.score_crops(x)
        gamma.keep_only_experts(model, [1])
        single = model.score_crops(x)
        gamma.keep_only_experts(model, None)
        for m in model.moae_modules():
            m.experts.expert_1.c_fc.weight.mul_(1.5)  # in place: the int8 copies must be made again
            m.useful_experts.c_proj.weight.mul_(1.1)
        after = model.score_crops(x)
        float_model = perturbed_gamma()
        for m in float_model.moae_modules():
            m.experts.expert_1.c_fc.weight.mul_(1.5)
            m.useful_experts.c_proj.weight.mul_(1.1)
        reference = float_model.score_crops(x)
    assert not torch.allclose(before, single) and not torch.allclose(before, after)
    assert torch.allclose(after, reference, rtol=0, atol=0.05)


def test_routing_hooks_work_in_reduced_precision():
    model = perturbed_gamma().to_precision("bf16", allow_slow=True)
    seen = {}
    with torch.no_grad(), model.watch_routing(seen.__setitem__):
        model.score_crops(torch.rand(2, 3, 224, 224))
    last = model.clip_model.visual.transformer.resblocks[-1].mlp
    assert seen[last].shape == (2, 50, 3)
    assert torch.allclose(seen[last].float().sum(-1), torch.ones(2, 50), atol=1e-2)


# ------------------------------------------------------------------------------------------ autocast (AMP)
# CPU autocast to bf16 shows the rounding a CUDA AMP run has: the head and the routers' softmax must stay out of it.
def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _fp32_head(model: gamma.GammaModel, f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's head written out in fp32 on given adapter-refined features f (N, E) and prompt features t (5, E)."""
    probs = (model.clip_model.logit_scale.exp() * F.normalize(f.float(), dim=-1) @ t.float().t()).softmax(dim=-1)
    return probs, probs @ model.score_level


def test_the_head_runs_in_fp32_under_autocast(photos):
    model = perturbed_gamma(logit_scale=4.6)  # exp(4.6) = 100, the release's scale: logits of tens
    x = photos[:8]
    with torch.no_grad(), _bf16_autocast():
        feats, weights = model.crop_features(x)  # (U, B, E): bf16 image tower, returned in fp32
        f = model.adapter(feats.flatten(0, 1))  # under autocast, as the head computes it
        t = model.text_features()[0]  # computed (and cached) under autocast
        score = model(x)
        crop_scores = model.score_crops(x)
        old = (model.clip_model.logit_scale.exp() * F.normalize(f, dim=-1) @ t.t()).softmax(-1) @ model.score_level
    with torch.no_grad():
        probs, expected = _fp32_head(model, f, t)
    expected = crop_mean(expected.view(len(weights), -1), weights)
    assert score.dtype == crop_scores.dtype == torch.float32
    assert_close(score, expected, rtol=1e-6, atol=1e-6)  # fp32 rounding, not bf16 steps
    assert old.dtype == torch.bfloat16  # what autocast alone gives: a head rounded to bf16 ...
    old = crop_mean(old.float().view(len(weights), -1), weights)
    assert float((old - expected).abs().max()) > 1e-4  # ... which is far from the fp32 head on the same features
    with torch.no_grad(), _bf16_autocast():
        got = model.assess(x)
    assert got.distribution.dtype == got.std.dtype == torch.float32
    assert_close(got.distribution, crop_mean(probs.view(len(weights), len(x), 5), weights), rtol=1e-6, atol=1e-6)
    assert_close(got.score, expected, rtol=1e-6, atol=1e-6)


def test_training_under_autocast_predicts_in_fp32_and_gets_gradients(photos):
    model = perturbed_gamma(logit_scale=4.6).train()
    x = photos[:4]
    with _bf16_autocast():
        f = model.adapter(model.backbone_features(x))
        t = model.text_features()[0]
        pred = model(x)
    assert pred.dtype == torch.float32
    assert_close(pred, _fp32_head(model, f, t)[1], rtol=1e-6, atol=1e-6)
    pred.sum().backward()
    assert all(p.grad is not None for p in (model.score_level, model.adapter.fc[0].weight))


def test_the_router_softmax_is_fp32_under_autocast_and_in_bf16():
    model = perturbed_gamma()
    router = model.clip_model.visual.transformer.resblocks[-1].mlp.gating
    tokens = torch.randn(64, router.layer1.in_features, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad(), _bf16_autocast():
        gate = router(tokens)
    logits = F.linear(tokens.bfloat16(), router.layer1.weight.bfloat16(), router.layer1.bias.bfloat16())
    assert gate.dtype == torch.float32
    assert torch.equal(gate, logits.float().softmax(dim=-1))  # the bf16 logits, their softmax in fp32
    assert not torch.equal(gate, logits.softmax(dim=-1).float())  # a bf16 softmax would differ
    bf16 = perturbed_gamma().to_precision("bf16", allow_slow=True)  # bf16 weights, no autocast
    router = bf16.clip_model.visual.transformer.resblocks[-1].mlp.gating
    assert router.layer1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        gate = router(tokens.bfloat16())
    assert gate.dtype == torch.float32 and torch.equal(gate, router.layer1(tokens.bfloat16()).float().softmax(-1))


@pytest.mark.parametrize("grad", [False, True], ids=["inference_kernel", "autograd_kernel"])
def test_moae_kernels_agree_with_the_formula_in_bf16_and_under_autocast(grad):
    model = perturbed_gamma()
    moae: MoAE = model.clip_model.visual.transformer.resblocks[-2].mlp
    tokens = torch.randn(2, 10, moae.gating.layer1.in_features, generator=torch.Generator().manual_seed(1))

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(grad):
            fused = moae(x)
            kernel, moae.kernel = moae.kernel, None
            try:
                formula = moae(x)
            finally:
                moae.kernel = kernel
        return fused.float(), formula.float()

    with torch.no_grad():
        exact = moae(tokens)
    with _bf16_autocast():
        fused, formula = both(tokens)
    scale = float(exact.abs().max())
    assert_close(fused, formula, rtol=0, atol=0.02 * scale)
    assert_close(fused, exact, rtol=0, atol=0.05 * scale)
    moae.to(torch.bfloat16)  # the weights to_precision('bf16') gives the block
    fused, formula = both(tokens.bfloat16())
    assert_close(fused, formula, rtol=0, atol=0.02 * scale)
    assert_close(fused, exact, rtol=0, atol=0.05 * scale)


def test_the_text_feature_cache_is_keyed_on_the_autocast_state():
    model = perturbed_gamma()
    with torch.no_grad():
        fp32 = model.text_features()
        with _bf16_autocast():
            amp = model.text_features()
            assert model.text_features() is amp  # cached under autocast too
        again = model.text_features()
    assert amp is not fp32 and not torch.equal(amp.float(), fp32)  # computed under autocast: other values
    assert again is not amp and torch.equal(again, fp32)  # never the autocast features in an fp32 pass
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        half = model.text_features()
    assert half is not again and not torch.equal(half.float(), amp.float())  # keyed on the dtype as well


# ------------------------------------------------------------------------------------------ device rules
def test_auto_picks_a_fast_precision_and_says_so(caplog):
    model = perturbed_gamma()
    with caplog.at_level(logging.INFO, logger="gamma.archs.precision"):
        model.to_precision("auto")
    assert model.precision in prec.fast_precisions("cpu")
    assert model.precision != "int8"
    assert any("precision 'auto' on cpu: " + model.precision in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
    ({"avx2", "avx512_vnni"}, "fp32"),  # int8 is never chosen automatically
    (set(), "fp32"),
])
def test_auto_on_cpus_with_and_without_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset(flags))
    assert prec.resolve_precision("auto", "cpu") == expected


def test_slow_or_impossible_combinations_are_refused(monkeypatch, caplog):
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # a CPU without bf16/fp16 hardware
    for precision in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"precision '{precision}' would run slower than fp32"):
            prec.check_precision(precision, "cpu")
        with caplog.at_level(logging.WARNING, logger="gamma.archs.precision"):
            prec.check_precision(precision, "cpu", allow_slow=True)  # runs, and says so
        assert "slower than fp32" in caplog.records[-1].getMessage()
    with pytest.raises(ValueError, match="int8 is dynamic quantization for CPUs"):
        prec.check_precision("int8", "cuda")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        perturbed_gamma().to_precision("fp8")
    model = perturbed_gamma()
    with pytest.raises(ValueError, match="slower than fp32"):
        model.to_precision("fp16")
    assert model.precision == "fp32"  # nothing was converted


def test_create_model_takes_the_precision():
    model = gamma.create_model("gamma_test", precision="int8")
    assert model.precision == "int8" and not model.training
