"""More than one number per image: zero-shot attribute scores, the level distribution and the automatic scene."""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, perturb_moae
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from skimage import data as skdata

import gamma
import gamma.assess
from gamma.archs.crops import prepare, unique_crops
from gamma.prompts import ATTRIBUTE_PROMPTS, ATTRIBUTES, AUTO_SCENES, SCENE_DESCRIPTIONS, SCENES

MEAN = torch.tensor(gamma.archs.OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(gamma.archs.OPENAI_CLIP_STD).view(1, 3, 1, 1)


def _pictures(size: int = 224) -> torch.Tensor:
    """Four real photographs from scikit-image, resized to size x size: (4, 3, size, size) in [0, 1]."""
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = torch.from_numpy(np.ascontiguousarray(getattr(skdata, name)())).permute(2, 0, 1).float() / 255
        out.append(F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).clamp(0, 1)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A plain OpenAI-layout CLIP state_dict on disk (random weights, width 64) and the open_clip model it came from."""
    torch.manual_seed(3)
    clip = CLIP(embed_dim=64,
                vision_cfg=CLIPVisionCfg(width=64, layers=2, head_width=64, patch_size=32, image_size=224),
                text_cfg=CLIPTextCfg(width=64, heads=1, layers=2), quick_gelu=True).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(np.log(100.0))  # OpenAI's trained value: probabilities away from 0.5
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(clip.state_dict(), path)
    return path, clip


def _open_clip_pair_probs(clip: CLIP, images: torch.Tensor, pairs: list[tuple[str, ...]]) -> torch.Tensor:
    """Independent reference: open_clip's own towers and tokenizer, softmax over each prompt group -> P(first)."""
    with torch.no_grad():
        image = F.normalize(clip.encode_image((images - MEAN) / STD), dim=-1)
        out = []
        for pair in pairs:
            text = F.normalize(clip.encode_text(open_clip.tokenize(list(pair))), dim=-1)
            out.append((clip.logit_scale.exp() * image @ text.t()).softmax(dim=-1)[:, 0])
    return torch.stack(out, dim=-1)  # (B, len(pairs))


# ------------------------------------------------------------------------------------------ attributes
def test_attributes_equal_open_clip_towers_and_tokenizer(clip_file):
    path, clip = clip_file
    model = gamma.create_model(None, pretrained=path)
    x = _pictures()
    with torch.no_grad():
        got = model.attributes(x)
    assert list(got) == list(ATTRIBUTES)
    expected = _open_clip_pair_probs(clip, x, [ATTRIBUTE_PROMPTS[a] for a in ATTRIBUTES])
    torch.testing.assert_close(torch.stack([got[a] for a in ATTRIBUTES], dim=-1), expected, rtol=1e-4, atol=1e-5)
    assert expected.std(dim=0).max() > 0.05  # the pictures get different scores: not a vacuous 0.5 everywhere
    assert "backbone" in model.tower_description()  # a plain CLIP file: MoAE present but every alpha is 0


def test_attributes_use_gammas_moae_towers_before_the_adapter(tiny_model):
    perturb_moae(tiny_model)  # trained-looking MoAE: the towers are no longer the backbone's
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = torch.stack(list(tiny_model.attributes(x).values()), dim=-1)
        clip = tiny_model.clip_model  # open_clip's forward through the MoAE modules, full-context text
        image = F.normalize(clip.encode_image((x - MEAN) / STD), dim=-1)
        expected = []
        for a in ATTRIBUTES:
            text = F.normalize(clip.encode_text(open_clip.tokenize(list(ATTRIBUTE_PROMPTS[a]))), dim=-1)
            expected.append((clip.logit_scale.exp() * image @ text.t()).softmax(dim=-1)[:, 0])
        tiny_model.adapter.fc[0].weight.mul_(3.0)  # the adapter belongs to the level head: no effect on attributes
        again = torch.stack(list(tiny_model.attributes(x).values()), dim=-1)
    torch.testing.assert_close(got, torch.stack(expected, dim=-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=1e-6, atol=1e-7)
    assert "Gamma's MoAE towers" in tiny_model.tower_description()


def test_attributes_are_averaged_over_the_crops_like_the_score(tiny_model):
    x = torch.rand(2, 3, 240, 300, generator=torch.Generator().manual_seed(1))
    tiny_model.set_crop_protocol(mode="five")
    with torch.no_grad():
        got = tiny_model.assess(x, attributes=True).attributes
        per_crop = [tiny_model.attributes(x[:, :, t : t + 224, l : l + 224]) for t, l in
                    tiny_model.crop_protocol.offsets(240, 300)]
    for a in ATTRIBUTES:
        torch.testing.assert_close(got[a], torch.stack([c[a] for c in per_crop]).mean(0), rtol=1e-5, atol=1e-6)


def test_attribute_text_features_are_cached(tiny_model):
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        tiny_model.attributes(x)
        first = tiny_model._text_cache.entries["attributes"][2]
        tiny_model.attributes(x)
        assert tiny_model._text_cache.entries["attributes"][2] is first
        tiny_model.moae_modules()[-1].scale.fill_(0.5)  # a text-tower weight changes: recomputed
        tiny_model.attributes(x)
    assert tiny_model._text_cache.entries["attributes"][2] is not first


# ------------------------------------------------------------------------------------------ distribution
def test_distribution_rows_sum_to_one_and_their_mean_is_the_score(tiny_sdp_model):
    perturb_moae(tiny_sdp_model)
    x = torch.rand(3, 3, 250, 300, generator=torch.Generator().manual_seed(2))
    scenes = ["face", "natural", "aigc"]
    with torch.no_grad():
        result = tiny_sdp_model.assess(x, scenes)
        score = tiny_sdp_model.score_images(x, scenes)
        dist = tiny_sdp_model.distribution(x, scenes)
    levels = tiny_sdp_model.score_level
    assert dist.shape == (3, 5) and (dist >= 0).all()
    torch.testing.assert_close(dist.sum(-1), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(dist @ levels, score, rtol=1e-6, atol=1e-6)
    assert torch.equal(result.score, score) and torch.equal(result.distribution, dist)
    std = ((dist * (levels - score[:, None]) ** 2).sum(-1)).sqrt()
    torch.testing.assert_close(result.std, std, rtol=1e-5, atol=1e-6)
    assert (result.std > 0).all() and (result.std <= (levels.max() - levels.min()) / 2 + 1e-6).all()
    assert result.scenes == scenes
    assert list(result.level_columns()) == ["p_bad", "p_poor", "p_fair", "p_good", "p_perfect"]


def test_distribution_is_the_crop_average_of_the_level_softmax(tiny_model):
    perturb_moae(tiny_model)
    x = torch.rand(2, 3, 230, 260, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = tiny_model.distribution(x)
        offsets = tiny_model.crop_protocol.offsets(230, 260)  # 10 seeded random crops
        manual = torch.stack([tiny_model.head(tiny_model.backbone_features(x[:, :, t : t + 224, l : l + 224]), None)[0]
                              for t, l in offsets]).mean(0)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)


def test_scoring_does_not_go_through_assess(tiny_sdp_model, monkeypatch):
    # The eval forward scores the crops and stops: no distribution, std or scene list is built for it.
    perturb_moae(tiny_sdp_model)
    x = torch.rand(2, 3, 250, 240, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = gamma.assess.assess(tiny_sdp_model, x, "auto")

    def refuse(*args, **kwargs):
        raise AssertionError("forward called assess")

    monkeypatch.setattr(gamma.assess, "assess", refuse)
    with torch.no_grad():
        assert torch.equal(tiny_sdp_model(x, "auto"), expected.score)
        assert torch.equal(tiny_sdp_model(x, ["face", "aigc"]), tiny_sdp_model.score_images(x, ["face", "aigc"]))


def test_the_extra_outputs_are_functions_of_the_model(tiny_sdp_model):
    # gamma.assess holds them; the model's methods are thin delegates that return the same tensors.
    perturb_moae(tiny_sdp_model)
    x = torch.rand(2, 3, 230, 240, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(gamma.assess.distribution(tiny_sdp_model, x, "face"), tiny_sdp_model.distribution(x, "face"))
        functional = gamma.assess.attributes(tiny_sdp_model, x)
        for name, value in tiny_sdp_model.attributes(x).items():
            assert torch.equal(functional[name], value)
        assert gamma.assess.detect_scene(tiny_sdp_model, x) == tiny_sdp_model.detect_scene(x)
        assert torch.equal(gamma.assess.scene_probabilities(tiny_sdp_model, x), tiny_sdp_model.scene_probabilities(x))
    assert gamma.archs.Assessment is gamma.assess.Assessment is gamma.Assessment


def test_scores_are_unchanged_by_the_shared_crop_path(tiny_sdp_model):
    # The score path before attributes/distribution existed: per-crop scores of the distinct crops, weighted mean.
    perturb_moae(tiny_sdp_model)
    x = torch.rand(2, 3, 260, 230, generator=torch.Generator().manual_seed(4))
    protocol = tiny_sdp_model.crop_protocol
    with torch.no_grad():
        crops, weights = unique_crops(prepare(x, protocol), protocol)
        index = tiny_sdp_model.scene_index(["underwater", "face"], 2, x.device).repeat(len(weights))
        per_crop = tiny_sdp_model.head(tiny_sdp_model.backbone_features(crops), index)[1].view(len(weights), 2)
        before = (weights.to(per_crop)[:, None] * per_crop).sum(dim=0)
        now = tiny_sdp_model.score_images(x, ["underwater", "face"])
    assert torch.equal(now, before)  # same ops on the same shapes


# ------------------------------------------------------------------------------------------ automatic scene
def test_scene_probabilities_equal_open_clip_zero_shot(clip_file):
    path, clip = clip_file
    model = gamma.create_model(None, pretrained=path, prompt_set="sdp")
    x = _pictures()
    with torch.no_grad():
        got = model.scene_probabilities(x, SCENES)
        image = F.normalize(clip.encode_image((x - MEAN) / STD), dim=-1)
        rows = []
        for s in SCENES:  # prompt ensembling: mean of the normalised description features, normalised again
            feats = F.normalize(clip.encode_text(open_clip.tokenize(list(SCENE_DESCRIPTIONS[s]))), dim=-1)
            rows.append(F.normalize(feats.mean(0), dim=-1))
        expected = (clip.logit_scale.exp() * image @ torch.stack(rows).t()).softmax(-1)
        auto = model.detect_scene(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    sub = expected[:, [SCENES.index(s) for s in AUTO_SCENES]]
    assert auto == [AUTO_SCENES[k] for k in sub.argmax(-1).tolist()]


def test_auto_scene_picks_one_of_the_scenes_and_scores_with_it(tiny_sdp_model):
    perturb_moae(tiny_sdp_model)
    x = torch.rand(4, 3, 240, 240, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        auto = tiny_sdp_model.assess(x, "auto")
        detected = tiny_sdp_model.detect_scene(x)
        named = tiny_sdp_model.score_images(x, detected)
    assert auto.scenes == detected and all(s in SCENES for s in auto.scenes)
    assert torch.equal(auto.score, named)


def test_a_named_scene_wins_over_auto(tiny_sdp_model):
    perturb_moae(tiny_sdp_model)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        detected = tiny_sdp_model.detect_scene(x)
        other = next(s for s in SCENES if s != detected[1])  # a scene auto would not pick for image 1
        mixed = tiny_sdp_model.assess(x, ["auto", other, "AUTO"])
        single = tiny_sdp_model.score_images(x[1:2], other)
    assert mixed.scenes == [detected[0], other, detected[2]]
    torch.testing.assert_close(mixed.score[1:2], single, rtol=1e-6, atol=1e-7)
    tiny_sdp_model.auto_scenes = ("underwater",)  # the candidate set is the model's to set
    with torch.no_grad():
        assert tiny_sdp_model.assess(x, ["auto", "face", "auto"]).scenes == ["underwater", "face", "underwater"]


def test_auto_scene_on_crops_in_training_mode(tiny_sdp_model):
    perturb_moae(tiny_sdp_model)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        detected = tiny_sdp_model.detect_scene(x)
    tiny_sdp_model.train()
    auto = tiny_sdp_model(x, "auto")
    named = tiny_sdp_model(x, detected)
    torch.testing.assert_close(auto, named, rtol=1e-6, atol=1e-7)
    auto.sum().backward()  # the choice is discrete, the score still trains
    assert tiny_sdp_model.adapter.fc[0].weight.grad is not None


def test_auto_on_single_set_prompts_is_accepted_and_changes_nothing(tiny_model):
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        result = tiny_model.assess(x, "auto")
        assert result.scenes is None
        assert torch.equal(result.score, tiny_model.score_images(x))


def test_scene_errors_mention_auto(tiny_sdp_model):
    with pytest.raises(ValueError, match="or 'auto'"):
        tiny_sdp_model.score_images(torch.rand(1, 3, 224, 224))
    with pytest.raises(ValueError, match="unknown scene 'autumn'"):
        tiny_sdp_model.score_images(torch.rand(1, 3, 224, 224), "autumn")
    with pytest.raises(ValueError, match="distinct scenes"):
        tiny_sdp_model.detect_scene(torch.rand(1, 3, 224, 224), candidates=["face", "face"])
    assert tiny_sdp_model.scene_index("auto", 2, torch.device("cpu")).tolist() == [-1, -1]  # validation accepts it


def test_scene_descriptions_cover_every_scene_equally():
    assert set(SCENE_DESCRIPTIONS) == set(SCENES)
    assert len({len(v) for v in SCENE_DESCRIPTIONS.values()}) == 1
    assert set(AUTO_SCENES) <= set(SCENES)


def test_measure_auto_scene_script_counts_every_held_out_image(clip_file, tmp_path):
    import json
    import pickle
    import runpy
    from pathlib import Path

    from PIL import Image

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "measure_auto_scene.py"))
    pictures = (_pictures() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    args = ["--checkpoint", str(clip_file[0]), "--json", str(tmp_path / "out.json")]
    for name, scene in (("a", "natural"), ("b", "underwater")):
        folder = tmp_path / name
        (folder / "images").mkdir(parents=True)
        rows = ["image_name,mos"]
        for k, pic in enumerate(pictures):
            Image.fromarray(pic).save(folder / "images" / f"{k}.png")
            rows.append(f"images/{k}.png,{k}")
        (folder / "meta_info.csv").write_text("\n".join(rows) + "\n")
        if name == "b":  # a split file: only its held-out rows are measured
            (folder / "split.pkl").write_bytes(pickle.dumps({1: {"train": [0, 1], "val": [2, 3]}}))
        args += ["--dataset", f"{folder}={scene}"]
    assert script["main"](args) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["images"] == {"a": 4, "b": 2}
    for method in ("describe", "describe-present", "sdp-fit"):
        acc = result["accuracy"][method]
        assert all(0 <= v <= 1 for v in acc.values())
        assert acc["all"] == pytest.approx((acc["a"] * 4 + acc["b"] * 2) / 6)
    assert sum(result["confusion_describe"].values()) == 6


def test_text_cache_follows_a_swapped_prompt_buffer(tiny_model):
    """Replacing a prompt buffer (as the ATTIQA teacher does for other prompt pairs) is never served stale features."""
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        before = tiny_model.attributes(x)
        saved = tiny_model.attribute_tokens
        tiny_model.attribute_tokens = saved.flip(1)  # positive and negative prompts swapped
        try:
            swapped = tiny_model.attributes(x)
        finally:
            tiny_model.attribute_tokens = saved
        again = tiny_model.attributes(x)
    for a in before:
        assert_close(swapped[a], 1 - before[a], rtol=1e-4, atol=1e-5)  # two-way softmax: p(neg first) = 1 - p
        assert torch.equal(again[a], before[a])
