"""The Gamma model: architecture, initialisation, freezing, heads, input checks, text cache, crop protocol."""

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, max_abs, perturb_moae

import gamma
from gamma.archs.clip import encode_text, tokenize
from gamma.config import GammaConfig, get_variant
from gamma.prompts import SCENES, SDP_PROMPTS, level_prompts


def _backbone_twin(model: gamma.GammaModel) -> gamma.GammaModel:
    """The same weights without MoAE: every MoAE block's shared expert becomes the plain MLP again."""
    plain = gamma.GammaModel(model.config.replace(moae_layers=0, num_experts=0)).eval()
    sd = {}
    for key, value in model.state_dict().items():
        if ".mlp.experts." in key or ".mlp.gating." in key or key.endswith(".mlp.scale"):
            continue
        sd[key.replace(".mlp.useful_experts.", ".mlp.")] = value
    plain.load_state_dict(sd, strict=True)
    return plain


# ------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize(
    ("layers", "millions"), [(0, 149.9), (4, 231.8), (6, 272.7), (8, 313.6), (12, 395.5)]
)
def test_parameter_counts_match_table5(layers, millions):
    # Counting is cheap on the meta device: no 1 GB allocations.
    with torch.device("meta"):
        model = gamma.GammaModel(GammaConfig(moae_layers=layers, num_experts=3 if layers else 0))
    assert round(model.num_parameters() / 1e6, 1) == millions


def test_vitb16_layout_matches_release():
    with torch.device("meta"):
        model = gamma.GammaModel(get_variant("gamma_vitb16"))
    sd = model.state_dict()
    assert len(sd) == 485
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["score_level"] == (5,)
    assert shapes["adapter.fc.0.weight"] == (256, 512)
    assert shapes["adapter.fc.2.weight"] == (512, 256)
    assert shapes["clip_model.visual.proj"] == (768, 512)
    assert shapes["clip_model.text_projection"] == (512, 512)
    assert shapes["clip_model.visual.positional_embedding"] == (197, 768)
    for tower, width in (("visual.transformer", 768), ("transformer", 512)):
        for i in range(12):
            prefix = f"clip_model.{tower}.resblocks.{i}.mlp."
            if i < 6:
                assert f"{prefix}c_fc.weight" in sd
                continue
            assert shapes[f"{prefix}scale"] == ()
            assert shapes[f"{prefix}gating.layer1.weight"] == (3, width)
            assert shapes[f"{prefix}useful_experts.c_fc.weight"] == (4 * width, width)
            for k in range(3):
                assert shapes[f"{prefix}experts.expert_{k}.c_proj.weight"] == (width, 4 * width)
    act = model.clip_model.visual.transformer.resblocks[0].mlp.gelu
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(act(x), x * torch.sigmoid(1.702 * x))  # QuickGELU, not nn.GELU


def test_trainable_parameters_are_exactly_the_papers(tiny_model):
    names = {n for n, _ in tiny_model.named_trainable_parameters()}
    for n, p in tiny_model.named_parameters():
        trainable = (
            ".mlp.experts." in n
            or ".mlp.gating." in n
            or n.endswith(".mlp.scale")
            or n.startswith("adapter.")
            or n == "score_level"
        )
        assert (n in names) == trainable, n
        assert p.requires_grad == trainable, n
    assert "clip_model.logit_scale" not in names
    assert not any("useful_experts" in n for n in names)


def test_only_trainable_parameters_get_gradients(tiny_sdp_model):
    model = tiny_sdp_model.train()
    perturb_moae(model)
    x = torch.rand(4, 3, 224, 224)
    loss = model(x, scene=["natural", "face", "aigc", "aesthetics"]).sub(0.5).pow(2).mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {n}"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


def test_unfrozen_shared_and_no_merge_factor():
    model = gamma.create_model("gamma_test", freeze_shared=False, merge_factor=False)
    names = {n for n, _ in model.named_trainable_parameters()}
    assert any(".useful_experts." in n for n in names)
    assert not any(n.endswith(".mlp.scale") for n in names)
    assert all(m.scale is None for m in model.moae_modules())


def test_experts_start_as_copies_of_the_pretrained_mlp(tiny_model):
    for m in tiny_model.moae_modules():
        shared = m.useful_experts.state_dict()
        for expert in m.experts.values():
            for k, v in expert.state_dict().items():
                assert torch.equal(v, shared[k])
                assert v.data_ptr() != shared[k].data_ptr()  # copies, not shared storage
        assert float(m.scale.detach()) == 0.0


# ------------------------------------------------------------------------------------------ MoAE behaviour
def test_alpha_zero_equals_backbone_exactly(tiny_model):
    torch.manual_seed(1)
    # Routers and experts differ from the shared MLP, but alpha = 0 hides them bit for bit: MoAE computes its shared
    # expert with the plain MLP's operations and adds exact zeros.
    with torch.no_grad():
        for m in tiny_model.moae_modules():
            for p in m.experts.parameters():
                p.add_(torch.randn_like(p))
    plain = _backbone_twin(tiny_model)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(tiny_model.score_crops(x), plain.score_crops(x))
        assert torch.equal(tiny_model.text_features(), plain.text_features())


@pytest.mark.parametrize("part", ["alpha", "router", "expert"])
def test_perturbing_moae_changes_output(tiny_model, part):
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        before = tiny_model.score_crops(x)
        for m in tiny_model.moae_modules():
            m.scale.fill_(0.5)
            for p in m.experts.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        mid = tiny_model.score_crops(x)
        assert not torch.allclose(before, mid)
        if part == "router":
            for m in tiny_model.moae_modules():
                m.gating.layer1.weight.normal_(0, 2.0)
        elif part == "expert":
            for m in tiny_model.moae_modules():
                m.experts["expert_1"].c_fc.weight.mul_(1.5)
        else:
            for m in tiny_model.moae_modules():
                m.scale.fill_(-0.5)
        after = tiny_model.score_crops(x)
    assert not torch.allclose(mid, after)


def test_router_weights_sum_to_one(tiny_model):
    perturb_moae(tiny_model)
    seen = {}
    with torch.no_grad(), tiny_model.watch_routing(seen.__setitem__):
        tiny_model.score_crops(torch.rand(3, 3, 224, 224))
    for m in tiny_model.moae_modules():
        w = seen[m]
        assert w.shape[-1] == 3
        assert_close(w.sum(-1), torch.ones(w.shape[:-1]), rtol=1e-5, atol=1e-6)
        assert (w >= 0).all()


def test_fused_and_literal_experts_agree(tiny_model):
    perturb_moae(tiny_model)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        fused = tiny_model.score_crops(x)
        for m in tiny_model.moae_modules():
            m.kernel = None  # the formula as written
        literal = tiny_model.score_crops(x)
    assert_close(fused, literal, rtol=1e-5, atol=1e-6)


def test_keep_only_experts_zeroes_other_routes(tiny_model):
    perturb_moae(tiny_model)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        full = tiny_model.score_crops(x)
        gamma.keep_only_experts(tiny_model, [1])
        seen = {}
        # Watching runs the last image block for every token: the same values, other rounding.
        with tiny_model.watch_routing(seen.__setitem__):
            single = tiny_model.score_crops(x)
        routing = [seen[m] for m in tiny_model.moae_modules()]
        gamma.keep_only_experts(tiny_model, None)
        restored = tiny_model.score_crops(x)
    assert not torch.allclose(full, single)
    assert torch.equal(full, restored)
    for w in routing:
        assert (w[..., 0] == 0).all() and (w[..., 2] == 0).all() and (w[..., 1] > 0).all()
    with pytest.raises(ValueError, match="out of range"):
        gamma.keep_only_experts(tiny_model, [3])


# ------------------------------------------------------------------------------------------ head
def test_score_is_level_expectation(tiny_model):
    perturb_moae(tiny_model)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        f = tiny_model.clip_model.encode_image((x - tiny_model.pixel_mean) / tiny_model.pixel_std)
        f = f + F.relu(F.relu(f @ tiny_model.adapter.fc[0].weight.t()) @ tiny_model.adapter.fc[2].weight.t())
        tokens = tiny_model.prompt_tokens[0]
        t = tiny_model.clip_model.encode_text(tokens)  # open_clip's own full-context text path
        logits = tiny_model.clip_model.logit_scale.exp() * F.normalize(f, dim=-1) @ F.normalize(t, dim=-1).t()
        expected = logits.softmax(-1) @ tiny_model.score_level
        got = tiny_model.score_crops(x)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert ((got > 0.2 - 1e-6) & (got < 1.0 + 1e-6)).all()


def test_truncated_text_encoding_equals_full_context(tiny_sdp_model):
    perturb_moae(tiny_sdp_model)
    tokens = tiny_sdp_model.prompt_tokens.flatten(0, 1)
    with torch.no_grad():
        short = encode_text(tiny_sdp_model.clip_model, tokens)
        full = tiny_sdp_model.clip_model.encode_text(tokens)
    assert_close(short, full, rtol=1e-5, atol=1e-5 * max_abs(full))  # rounding follows the largest features (~3.5)


def test_text_length_is_read_once_per_prompt_buffer(tiny_sdp_model, monkeypatch):
    """Issue 23: the EOT cut of fixed prompts is read back from the device once per prompt buffer, not per forward
    (training recomputes the text features every step); a new buffer (set_prompt_set) is read again."""
    import gamma.archs.clip as clip_module

    calls = []
    real = clip_module.token_length
    monkeypatch.setattr(clip_module, "token_length", lambda t: calls.append(t.shape) or real(t))
    perturb_moae(tiny_sdp_model)
    tiny_sdp_model.train()
    x = torch.rand(2, 3, 224, 224)
    for _ in range(3):  # the text tower trains: features recomputed with autograd on every call
        tiny_sdp_model(x, scene="natural").sum().backward()
    assert len(calls) == 1
    with torch.no_grad():
        full = tiny_sdp_model.clip_model.encode_text(tiny_sdp_model.prompt_tokens.flatten(0, 1))
        got = tiny_sdp_model.text_features("levels").flatten(0, 1)
    assert_close(got, F.normalize(full, dim=-1), rtol=1e-5, atol=1e-6)
    tiny_sdp_model.set_prompt_set("naive")
    with torch.no_grad():
        tiny_sdp_model.text_features("levels")
    assert len(calls) == 2


def test_scene_index_equals_the_rows_whatever_the_mix(tiny_sdp_model):
    for scene in ("face", ["natural", "face", "auto"], ["aigc"] * 3):
        got = tiny_sdp_model.scene_index(scene, 3, torch.device("cpu"))
        expected = torch.tensor(gamma.prompts.scene_rows(scene, 3), dtype=torch.long)
        assert got.dtype == torch.long and torch.equal(got, expected)


def test_sdp_prompts_are_tokenised_per_scene(tiny_sdp_model):
    assert tiny_sdp_model.prompt_tokens.shape == (len(SCENES), 5, 77)
    eot = 49407
    row = tiny_sdp_model.prompt_tokens[SCENES.index("face")]
    assert (row[:, 0] == 49406).all() and (row == eot).sum() == 5


def test_one_tokeniser_for_every_prompt_group(tiny_model, tiny_sdp_model):
    # Level prompts at construction and after set_prompt_set come from the same helper: open_clip's tokens, grouped.
    expected = open_clip.tokenize([p for s in SCENES for p in SDP_PROMPTS[s]]).view(len(SCENES), 5, -1)
    assert torch.equal(tiny_sdp_model.prompt_tokens, expected)
    tiny_model.set_prompt_set("sdp")
    assert torch.equal(tiny_model.prompt_tokens, expected)
    tiny_sdp_model.set_prompt_set("quality")
    assert torch.equal(tiny_sdp_model.prompt_tokens, tokenize(level_prompts("quality"), 77))
    assert tiny_sdp_model.prompt_tokens.shape == (1, 5, 77)
    with pytest.raises(ValueError, match="equal size"):
        tokenize([("a", "b"), ("c",)], 77)


def test_sdp_mixed_scene_batch_uses_each_images_prompts(tiny_sdp_model):
    perturb_moae(tiny_sdp_model)
    x = torch.rand(3, 3, 224, 224)
    scenes = ["face", "underwater", "aesthetics"]
    with torch.no_grad():
        mixed = tiny_sdp_model.score_crops(x, scene=scenes)
        single = torch.cat([tiny_sdp_model.score_crops(x[i : i + 1], scene=s) for i, s in enumerate(scenes)])
        all_face = tiny_sdp_model.score_crops(x, scene="face")
    assert_close(mixed, single, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed, all_face)


# ------------------------------------------------------------------------------------------ text cache
def test_text_features_cached_and_invalidated(tiny_model):
    with torch.no_grad():
        first = tiny_model.text_features()
        assert tiny_model.text_features() is first  # reused
        # an optimiser step on a text expert invalidates the cache
        m = tiny_model.moae_modules()[-1]
        m.scale.fill_(0.3)
        opt = torch.optim.SGD(tiny_model.trainable_parameters(), lr=1.0)
    tiny_model.train()
    tiny_model(torch.rand(2, 3, 224, 224)).sum().backward()
    opt.step()
    tiny_model.eval()
    with torch.no_grad():
        after_step = tiny_model.text_features()
    assert after_step is not first and not torch.allclose(after_step, first)
    # load_state_dict invalidates it too
    sd = copy.deepcopy(tiny_model.state_dict())
    with torch.no_grad():
        cached = tiny_model.text_features()
        for k in sd:
            if "transformer.resblocks.3.mlp.experts" in k and not k.startswith("clip_model.visual"):
                sd[k] = sd[k] * 2
        tiny_model.load_state_dict(sd)
        reloaded = tiny_model.text_features()
    assert reloaded is not cached and not torch.allclose(reloaded, cached)
    # .to() (a new storage) invalidates it
    with torch.no_grad():
        before = tiny_model.text_features()
        tiny_model.to(torch.float64)
        moved = tiny_model.text_features()
    assert moved.dtype == torch.float64 and moved is not before


def test_text_features_get_gradients_in_training(tiny_model):
    tiny_model.train()
    perturb_moae(tiny_model)
    tiny_model(torch.rand(2, 3, 224, 224)).sum().backward()
    text_expert = tiny_model.clip_model.transformer.resblocks[-1].mlp.experts["expert_0"].c_fc.weight
    assert text_expert.grad is not None and text_expert.grad.abs().sum() > 0


def test_inference_mode_then_grad_mode(tiny_model):
    # A cache filled under inference_mode must not leak inference tensors into autograd (pyiqa as_loss after eval).
    with torch.inference_mode():
        tiny_model(torch.rand(1, 3, 224, 224))
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    tiny_model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------ input checks
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.rand(3, 224, 224), "unsqueeze"),
        (torch.rand(1, 1, 224, 224), "3 \\(RGB\\) channels"),
        (torch.rand(1, 4, 224, 224), "3 \\(RGB\\) channels"),
        ((torch.rand(1, 3, 224, 224) * 255).to(torch.uint8), "x.float\\(\\) / 255"),
        (torch.full((1, 3, 224, 224), float("nan")), "NaN"),
        (torch.full((1, 3, 224, 224), float("inf")), "NaN or infinite"),
        (torch.rand(1, 3, 224, 224) * 255, "divide 0-255 images by 255"),
        (torch.randn(1, 3, 224, 224), "CLIP-normalise"),
        (torch.rand(0, 3, 224, 224), "empty"),
        ([[0.5]], "torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_value_error(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(bad)


def test_scene_errors(tiny_model, tiny_sdp_model):
    x = torch.rand(2, 3, 224, 224)
    with pytest.raises(ValueError, match="scene-based prompts"):
        tiny_sdp_model(x)
    with pytest.raises(ValueError, match="unknown scene 'indoor'"):
        tiny_sdp_model(x, scene="indoor")
    with pytest.raises(ValueError, match="unknown scene"):
        tiny_model(x, scene="indoor")  # a naive model still rejects a misspelt scene
    with pytest.raises(ValueError, match="got 1 scenes for a batch of 2"):
        tiny_sdp_model(x, scene=["face"])
    with torch.no_grad():
        assert torch.equal(tiny_sdp_model(x, scene="AI-Generated"), tiny_sdp_model(x, scene="aigc"))


def test_training_mode_needs_crops(tiny_model):
    tiny_model.train()
    with pytest.raises(ValueError, match="crops must be 224x224"):
        tiny_model(torch.rand(1, 3, 256, 256))


def test_fp16_input_does_not_cast_the_model(tiny_model):
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        a = tiny_model(x)
        b = tiny_model(x.half())
    assert tiny_model.score_level.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    assert_close(b, a, rtol=1e-5, atol=1e-3)  # half-precision pixels: ~5e-4 relative each


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="unknown model option 'num_expert'"):
        gamma.create_model("gamma_test", num_expert=3)
    with pytest.raises(ValueError, match="unknown model 'gamma_vitl14'"):
        gamma.create_model("gamma_vitl14")
    with pytest.raises(ValueError, match="moae_layers must be in"):
        gamma.create_model("gamma_test", moae_layers=5)
