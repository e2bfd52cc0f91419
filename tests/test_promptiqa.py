"""PromptIQA: structure of the official model, the MAL quirks, prompt semantics and caching, checkpoints, preprocessing,
and the label augmentations. Tiny variant (``promptiqa_test``) except the full-size structure check (meta device)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import perturb_promptiqa as perturb
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import gamma
from gamma import hub
from gamma.archs.promptiqa import MAL, AttentionBlock, PromptIQA, leave_one_out_index, resize_like_cv2
from gamma.config import PromptIQAConfig, get_promptiqa_variant
from gamma.data.promptiqa import (
    LabelAugment,
    augment_labels,
    draw_label_augment,
    random_vertical_flip,
)
from gamma.io import ImageDecodeError, load_promptiqa_image
from gamma.weights import CheckpointError, promptiqa_official_checkpoint, save_checkpoint

OFFICIAL_KEYS = Path(__file__).parent / "data" / "promptiqa_official_keys.tsv"
RTOL, ATOL = 1e-5, 1e-6  # scores are in (0, 1); float32 reorderings move them by ~1e-7


@pytest.fixture
def model() -> PromptIQA:
    torch.manual_seed(0)
    return perturb(gamma.create_model("promptiqa_test"))


@pytest.fixture(scope="module")
def pictures() -> torch.Tensor:
    """12 different real pictures (skimage), RGB in [0, 1], 64 x 80 (the model resizes them to 48 x 48)."""
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry"):
        img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
        for box in ((0.0, 0.0), (0.3, 0.2)):  # two crops of each
            h, w = img.shape[1:]
            top, left = int(box[0] * h), int(box[1] * w)
            crop = img[:, top : top + h // 2, left : left + w // 2]
            out.append(torch.nn.functional.interpolate(crop[None], size=(64, 80), mode="area")[0])
    return torch.stack(out)


SCORES = torch.tensor([0.05, 0.93, 0.41, 0.62, 0.18, 0.77, 0.30, 0.55, 0.86, 0.12, 0.70, 0.49])


# ------------------------------------------------------------------------------------------- structure
def test_full_size_matches_the_official_state_dict():
    with torch.device("meta"):  # shapes only: no 1.27 GB allocation, no random init
        full = PromptIQA(get_promptiqa_variant("promptiqa"))
    sd = full.state_dict()
    rows = [line.rstrip("\n").split("\t") for line in OFFICIAL_KEYS.read_text().splitlines() if line[:1] != "#"][1:]
    assert len(rows) == 505 and len(sd) == 505
    assert list(sd) == [r[0] for r in rows]  # same keys, same order
    for key, shape, dtype, _kind in rows:
        assert str(tuple(sd[key].shape)) == shape, key
        assert str(sd[key].dtype).removeprefix("torch.") == dtype, key
    assert full.num_parameters() == 318_159_200
    assert full.num_parameters(trainable_only=True) == 318_159_200  # the official code freezes nothing
    params = dict(full.named_parameters())
    assert {key for key, *_, kind in rows if kind == "param"} == set(params)
    assert sum(b.numel() for b in full.buffers()) == 1_027


def test_registry_and_tiny_variant():
    assert gamma.list_models("promptiqa") == ["promptiqa", "promptiqa_test"]
    assert {"promptiqa", "promptiqa_test", "gamma_test"} <= set(gamma.list_models("all"))
    assert "promptiqa" not in gamma.list_models()  # the default family is what the scorer and trainer take
    torch.manual_seed(0)
    tiny = gamma.create_model("promptiqa_test")
    assert isinstance(tiny, PromptIQA) and not tiny.training
    assert tiny.num_parameters() < 500_000
    assert tiny.config.cnn_sizes()[-1] == 1 and get_promptiqa_variant("promptiqa").cnn_sizes() == [24, 12, 10, 5, 3, 1]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="CNN head must reduce the 8x8 grid to 1x1"):
        PromptIQAConfig(image_size=64)
    with pytest.raises(ValueError, match="taps"):
        PromptIQAConfig(taps=(2, 5, 8, 12))
    with pytest.raises(ValueError, match="unknown PromptIQA option.*'width'"):
        get_promptiqa_variant("promptiqa").replace(width=3)
    with pytest.raises(ValueError, match="unknown model 'promptiqa_huge'"):
        gamma.create_model("promptiqa_huge")
    cfg = get_promptiqa_variant("promptiqa_test")
    assert PromptIQAConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["family"] == "promptiqa"
    with pytest.raises(ValueError, match="not a PromptIQA config"):
        PromptIQAConfig.from_dict({**cfg.to_dict(), "family": "attiqa"})


def test_layer_norm_eps_qkv_bias_and_gelu_per_block():
    with torch.device("meta"):
        full = PromptIQA(get_promptiqa_variant("promptiqa"))
    expected = {"vit.blocks.0": (1e-6, True), "block": (1e-5, False), "i_p_fusion.0": (1e-5, False),
                "prompt_fusion.2": (1e-5, False), "blocks.7": (1e-6, True)}
    modules = dict(full.named_modules())
    for name, (eps, bias) in expected.items():
        block = modules[name]
        assert block.norm1.eps == eps and block.norm2.eps == eps, name
        assert (block.attn.qkv.bias is not None) == bias, name
        assert isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none", name
    assert full.norm.eps == 1e-5 and isinstance(full.mlp[1], torch.nn.GELU)
    assert isinstance(full.score_block[-1], torch.nn.Sigmoid)


# --------------------------------------------------------------------------------------- the MAL quirks
def reference_attention_block(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode AttentionBlock written from its description with index arithmetic instead of reshapes."""
    b, r, n = x.shape
    q, k, v = block.c_q(x), block.c_k(x), block.c_v(x)
    z = torch.softmax(q @ k.transpose(1, 2) / n**0.5, dim=-1) @ v  # (b, r, n)
    # transpose-then-reshape: element (i, j) of the result is element i*n + j of z^T (n x r) read row-major.
    flat = torch.arange(r * n)
    scrambled = z[:, flat % r, flat // r].view(b, r, n)
    return scrambled + x


def reference_mal(mal: MAL, views: torch.Tensor) -> torch.Tensor:
    """Eval-mode MAL from its description: rows of T grouped n at a time for the feature branch."""
    n, b, c, h, w = views.shape
    p = h * w
    ys = [att(v).reshape(b, c, p) for att, v in zip(mal.attention_module, views, strict=True)]
    t = torch.cat(ys, dim=1)  # (b, n*c, p), row i*c + ch
    f_in = torch.stack([torch.cat([t[:, row * n + j] for j in range(n)], dim=-1) for row in range(c)], dim=1)
    f_out = reference_attention_block(mal.feature_attention, f_in)  # (b, c, n*p)
    feature = torch.stack([f_out[:, r // n, (r % n) * p : (r % n + 1) * p] for r in range(n * c)], dim=1)
    channel = reference_attention_block(mal.channel_attention, t.transpose(1, 2)).transpose(1, 2)
    merged = (feature + channel) / 2  # (b, n*c, p)
    return torch.stack([merged[:, i * c : (i + 1) * c] for i in range(n)]).mean(dim=0)


def test_mal_matches_its_description_including_the_reshape_quirks(model):
    gen = torch.Generator().manual_seed(3)
    mal = model.MALs[0]
    views = torch.randn(4, 2, 16, 6, 6, generator=gen)
    with torch.no_grad():
        ours, ref = mal(views), reference_mal(mal, views)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        # Not vacuous: the layout-preserving variant (transpose back instead of reshape) gives other values.
        block = mal.feature_attention
        x = torch.randn(2, 16, 144, generator=gen)
        z = torch.softmax(block.c_q(x) @ block.c_k(x).transpose(1, 2) * block.scale, -1) @ block.c_v(x)
        assert (block(x) - (z + x)).abs().max() > 1e-2


def test_self_attention_gate_starts_closed():
    torch.manual_seed(0)
    fresh = gamma.create_model("promptiqa_test")
    att = fresh.MALs[0].attention_module[0]
    x = torch.randn(2, 16, 6, 6)
    assert float(att.gamma.detach()) == 0.0 and torch.equal(att(x), x)


# ------------------------------------------------------------------------------------- prompt semantics
def test_scores_do_not_depend_on_isp_order(model, pictures):
    targets, prompt_imgs, scores = pictures[10:], pictures[:10], SCORES[:10]
    with torch.no_grad():
        base = model(targets, prompt=(prompt_imgs, scores))
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
        shuffled = model(targets, prompt=(prompt_imgs[perm], scores[perm]))
        as_list = model(targets, prompt=(list(prompt_imgs[perm.flip(0)]), scores[perm.flip(0)].tolist()))
        other = model(targets, prompt=(prompt_imgs, scores.flip(0)))  # same images, scores reassigned
    torch.testing.assert_close(shuffled, base, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(as_list, base, rtol=RTOL, atol=ATOL)
    assert (other - base).abs().max() > 100 * ATOL  # the pairing matters, so the check above is not vacuous


def test_scores_do_not_depend_on_batch_composition(model, pictures):
    prompt = (pictures[:10], SCORES[:10])
    with torch.no_grad():
        together = model(pictures, prompt=prompt)
        alone = torch.cat([model(pictures[i : i + 1], prompt=prompt) for i in range(len(pictures))])
        mixed = model(pictures.flip(0)[3:9], prompt=prompt).flip(0)
    torch.testing.assert_close(alone, together, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(mixed, together[3:9], rtol=RTOL, atol=ATOL)
    assert together.max() - together.min() > 100 * ATOL


def test_different_sizes_in_a_list_are_resized_each(model, pictures):
    prompt = (pictures[:10], SCORES[:10])
    big = torch.nn.functional.interpolate(pictures[10:11], size=(96, 120), mode="bilinear").clamp(0, 1)
    with torch.no_grad():
        listed = model([pictures[10], big[0]], prompt=prompt)
        single = model(big, prompt=prompt)
    torch.testing.assert_close(listed[1:], single, rtol=RTOL, atol=ATOL)


def count_vit_images(model: PromptIQA) -> list[int]:
    seen: list[int] = []
    model.vit.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


def test_prompt_cache_is_keyed_on_content(model, pictures):
    seen = count_vit_images(model)
    prompt_imgs, scores = pictures[:10], SCORES[:10]
    with torch.no_grad():
        first = model(pictures[10:], prompt=(prompt_imgs, scores))
        assert seen == [10, 2]  # the ISPP, then the targets
        again = model(pictures[10:11], prompt=(prompt_imgs.clone(), scores.clone().tolist()))
        assert seen == [10, 2, 1]  # equal content: reused
        edited = prompt_imgs.clone()
        edited[3, 1, 5, 7] += 1e-3
        model(pictures[10:11], prompt=(edited, scores))
        model(pictures[10:11], prompt=(prompt_imgs, scores + torch.tensor([0.0] * 9 + [0.01])))
        assert seen == [10, 2, 1, 10, 1, 10, 1]  # one pixel or one score changed: encoded again
    torch.testing.assert_close(again, first[:1], rtol=RTOL, atol=ATOL)

    with torch.no_grad():  # a weight change invalidates the cache
        model.mlp[0].bias.add_(0.5)
        model(pictures[10:11], prompt=(prompt_imgs, scores))
        assert seen[-2:] == [10, 1]
        model.load_state_dict(model.state_dict())
        model(pictures[10:11], prompt=(prompt_imgs, scores))
        assert seen[-2:] == [10, 1]
    fresh = perturb(gamma.create_model("promptiqa_test"))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(pictures[10:11], prompt=(prompt_imgs, scores)),
                                   model(pictures[10:11], prompt=(prompt_imgs, scores)), rtol=RTOL, atol=ATOL)

    n = len(seen)
    model.train()  # dropout and batch statistics: never cached
    with torch.no_grad():
        model(pictures[10:12], prompt=(prompt_imgs, scores))
        model(pictures[10:12], prompt=(prompt_imgs, scores))
    assert seen[n:] == [10, 2, 10, 2]


def test_encoded_prompt_can_be_passed_directly(model, pictures):
    with torch.no_grad():
        isp = model.encode_prompt(pictures[:10], SCORES[:10])
        assert isp.shape == (10, model.config.dim)
        torch.testing.assert_close(model(pictures[10:], prompt=isp),
                                   model(pictures[10:], prompt=(pictures[:10], SCORES[:10])), rtol=0, atol=0)


def test_leave_one_out_equals_prompt_then_infer(model, pictures):
    images, scores = pictures[:11], SCORES[:11]
    with torch.no_grad():
        loo = model.score_leave_one_out(images, scores)
        one_by_one = []
        for i in range(11):
            rest = [j for j in range(11) if j != i]
            one_by_one.append(model(images[i : i + 1], prompt=(images[rest], scores[rest])))
    torch.testing.assert_close(loo, torch.cat(one_by_one), rtol=RTOL, atol=ATOL)
    assert loo.max() - loo.min() > 100 * ATOL
    index = leave_one_out_index(4)
    assert index.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_training_forward_reaches_every_parameter(model, pictures):
    model.train()
    torch.manual_seed(0)
    labels, aug = augment_labels(SCORES[:11], scale_p=1.0, flip_p=0.0, generator=torch.Generator().manual_seed(0))
    preds = model.score_leave_one_out(pictures[:11], labels)
    assert preds.shape == (11,) and bool(((preds > 0) & (preds < 1)).all())
    torch.nn.functional.l1_loss(preds, labels).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert no_grad == []
    assert aug.scale < 1.0 or float(SCORES[:11].max()) == 1.0


def test_bad_inputs_get_clear_errors(model, pictures):
    prompt = (pictures[:3], SCORES[:3])
    with torch.no_grad():
        with pytest.raises(ValueError, match="x.float\\(\\) / 255"):
            model((pictures[:1] * 255).to(torch.uint8), prompt=prompt)
        with pytest.raises(ValueError, match="unsqueeze"):
            model(pictures[0], prompt=prompt)
        with pytest.raises(ValueError, match="do not normalise"):
            model(pictures[:1] * 2 - 1, prompt=prompt)
        with pytest.raises(ValueError, match="got 2 prompt scores for 3 prompt images"):
            model(pictures[:1], prompt=(pictures[:3], SCORES[:2]))
        with pytest.raises(ValueError, match="in \\[0, 1\\].*MOS / 100"):
            model(pictures[:1], prompt=(pictures[:3], [55.0, 70.0, 12.0]))
        with pytest.raises(ValueError, match="NaN"):
            model(pictures[:1], prompt=(pictures[:3], [0.1, float("nan"), 0.3]))
        with pytest.raises(ValueError, match="pass prompt=\\(prompt_images, prompt_scores\\)"):
            model(pictures[:1], prompt=pictures[:3])
        with pytest.raises(ValueError, match="prompt must be"):
            model(pictures[:1], prompt=[pictures[0]])
        with pytest.raises(ValueError, match="encoded prompt must have shape"):
            model(pictures[:1], prompt=torch.zeros(3, 7))
        with pytest.raises(ValueError, match="at least 2 images"):
            model.score_leave_one_out(pictures[:1], SCORES[:1])


def test_cuda_when_available(pictures):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    cpu = perturb(gamma.create_model("promptiqa_test"))
    gpu = perturb(gamma.create_model("promptiqa_test")).cuda()
    gpu.load_state_dict(cpu.state_dict())
    with torch.no_grad():
        a = cpu(pictures[10:], prompt=(pictures[:10], SCORES[:10]))
        b = gpu(pictures[10:].cuda(), prompt=(pictures[:10].cuda(), SCORES[:10]))
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ checkpoints
def test_official_ddp_layout_round_trip_strict(model, pictures, tmp_path):
    # The official training saves {'state_dict': DDP-wrapped model.state_dict(), 'prompt_num': n}.
    path = tmp_path / "best_model.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "prompt_num": 10}, path)
    ckpt = gamma.read_checkpoint(path)
    assert ckpt.kind == "promptiqa" and ckpt.extra == {"prompt_num": 10}
    loaded = gamma.create_model("promptiqa_test", pretrained=path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pictures[10:], prompt=(pictures[:10], SCORES[:10])),
                                   model(pictures[10:], prompt=(pictures[:10], SCORES[:10])), rtol=0, atol=0)
    exported = promptiqa_official_checkpoint(model)
    assert list(exported["state_dict"]) == [f"module.{k}" for k in model.state_dict()]

    # strict: a missing or an extra key is refused by name
    broken = {f"module.{k}": v for k, v in model.state_dict().items() if k != "score_block.3.bias"}
    torch.save({"state_dict": broken, "prompt_num": 10}, tmp_path / "missing.pth.tar")
    with pytest.raises(CheckpointError, match="missing key.*score_block.3.bias"):
        gamma.create_model("promptiqa_test", pretrained=tmp_path / "missing.pth.tar")
    extra = {**{f"module.{k}": v for k, v in model.state_dict().items()}, "module.head.weight": torch.zeros(1)}
    torch.save({"state_dict": extra, "prompt_num": 10}, tmp_path / "extra.pth.tar")
    with pytest.raises(CheckpointError, match="unexpected key.*head.weight"):
        gamma.create_model("promptiqa_test", pretrained=tmp_path / "extra.pth.tar")
    with pytest.raises(CheckpointError, match="is an official PromptIQA checkpoint, not a gamma_test model"):
        gamma.create_model("gamma_test", pretrained=path)


def test_our_format_round_trip(model, pictures, tmp_path):
    for name in ("ours.pth", "ours.safetensors"):
        save_checkpoint(model, tmp_path / name)
        loaded = gamma.create_model(pretrained=tmp_path / name)
        assert isinstance(loaded, PromptIQA) and loaded.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                      strict=True))
    with pytest.raises(CheckpointError, match="holds a promptiqa model, not a gamma model"):
        gamma.create_model("gamma_test", pretrained=tmp_path / "ours.pth")
    with pytest.raises(CheckpointError, match="different architecture"):
        gamma.create_model("promptiqa", pretrained=tmp_path / "ours.pth")


def test_weight_registry_knows_the_published_file(model, tmp_path, monkeypatch):
    monkeypatch.setenv("GAMMA_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GAMMA_PROMPTIQA_WEIGHTS", raising=False)
    with pytest.raises(hub.WeightsNotFoundError) as err:
        hub.resolve_weights("promptiqa")
    assert "Zevin2023/PromptIQA" in str(err.value) and "best_model.pth.tar" in str(err.value)
    assert "GAMMA_PROMPTIQA_WEIGHTS" in str(err.value)
    alias = tmp_path / "cache" / "best_model_five_22.pth.tar"
    alias.parent.mkdir(parents=True)
    alias.write_bytes(b"x")
    assert hub.resolve_weights("promptiqa") == alias
    # the known name works as create_model's `pretrained` (here a tiny model's file in the official layout)
    official = tmp_path / "tiny_official.pth.tar"
    torch.save(promptiqa_official_checkpoint(model), official)
    monkeypatch.setenv("GAMMA_PROMPTIQA_WEIGHTS", str(official))
    loaded = gamma.create_model("promptiqa_test", pretrained="promptiqa")
    assert torch.equal(loaded.score_block[3].weight, model.score_block[3].weight)


# -------------------------------------------------------------------------------------------- preprocessing
@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    from skimage import data

    folder = tmp_path_factory.mktemp("piqa_images")
    files = []
    for name, fmt in (("astronaut", "png"), ("chelsea", "jpg"), ("camera", "png"), ("coffee", "jpg")):
        path = folder / f"{name}.{fmt}"
        Image.fromarray(getattr(data, name)()).save(path, quality=90)
        files.append(path)
    return files


def official_recipe(path: Path, size: int = 224) -> torch.Tensor:
    """The official demo's preprocessing (cv2 imread, INTER_CUBIC on uint8, BGR->RGB, /255), before (x-0.5)/0.5."""
    cv2 = pytest.importorskip("cv2")
    img = cv2.resize(cv2.imread(str(path), cv2.IMREAD_COLOR), (size, size), interpolation=cv2.INTER_CUBIC)
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype("float32") / 255
    return torch.from_numpy(np.transpose(rgb, (2, 0, 1)).copy())


def test_loader_reproduces_the_official_preprocessing(image_files, model):
    for path in image_files:
        ours = load_promptiqa_image(path)
        assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
        expected = official_recipe(path)
        assert torch.equal(ours, expected), path.name
        assert torch.equal(load_promptiqa_image(path.read_bytes()), expected)
    # what the network sees is exactly (x - 0.5) / 0.5 of it, no resampling when the size already fits
    full_cfg = get_promptiqa_variant("promptiqa")
    with torch.device("meta"):
        shell = PromptIQA(full_cfg)
    shell.norm.to_empty(device="cpu")  # preprocess only reads the model's dtype and device from `norm`
    batch = torch.stack([load_promptiqa_image(p) for p in image_files])
    assert torch.equal(shell.preprocess(batch), (batch - 0.5) / 0.5)


def test_pil_backend_and_tensor_resize_stay_within_one_level(image_files):
    pytest.importorskip("cv2")
    for path in image_files:
        ref = official_recipe(path)
        pil = load_promptiqa_image(path, backend="pil")
        diff = (pil - ref).abs() * 255
        if path.suffix == ".png":  # same decoded pixels: only OpenCV's fixed-point rounding differs
            assert float(diff.max()) <= 1 + 1e-3 and float((diff > 0.5).float().mean()) < 1e-3, path.name
        else:  # JPEG decoders may differ too
            assert float(diff.mean()) < 0.5, path.name


def test_resize_like_cv2_against_opencv():
    cv2 = pytest.importorskip("cv2")
    from skimage import data

    img = data.coffee()  # 400 x 600
    for size, src in ((224, img), (224, np.ascontiguousarray(img[:90, :70]))):  # down- and upscaling
        ref = cv2.resize(src, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.int32)
        t = torch.from_numpy(src).permute(2, 0, 1)[None].float() / 255
        ours = (resize_like_cv2(t, size)[0].permute(1, 2, 0) * 255).round().numpy().astype(np.int32)
        diff = np.abs(ours - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_loader_errors_name_the_file(tmp_path):
    pytest.importorskip("cv2")
    with pytest.raises(ImageDecodeError, match="missing.png: no such file"):
        load_promptiqa_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="bad.jpg: OpenCV cannot decode"):
        load_promptiqa_image(bad)
    with pytest.raises(ValueError, match="RGB uint8"):
        load_promptiqa_image(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="backend must be one of"):
        load_promptiqa_image(bad, backend="skimage")


def test_rgb_array_input_equals_the_file(image_files):
    pytest.importorskip("cv2")
    path = image_files[0]  # PNG: lossless, so the array holds the file's pixels
    array = np.asarray(Image.open(path).convert("RGB"))
    assert torch.equal(load_promptiqa_image(array), load_promptiqa_image(path))


# ------------------------------------------------------------------------------------- label augmentation
def test_label_augment_draws_follow_the_official_rules():
    labels = torch.tensor([0.1, 0.35, 0.6, 0.2])
    assert LabelAugment().apply(labels) is labels
    scaled, aug = augment_labels(labels, scale_p=1.0, flip_p=0.0, generator=torch.Generator().manual_seed(0))
    assert 0.6 <= aug.scale <= 1.0 and not aug.flip
    torch.testing.assert_close(scaled, labels / aug.scale)
    flipped, aug = augment_labels(labels, scale_p=0.0, flip_p=1.0)
    assert aug == LabelAugment(1.0, True)
    torch.testing.assert_close(flipped, 1 - labels)
    same, _ = augment_labels(labels, scale_p=0.0, flip_p=0.0)
    assert torch.equal(same, labels)


def test_label_augment_frequencies_and_seeding():
    labels = torch.tensor([0.2, 0.5, 0.4])
    gen = torch.Generator().manual_seed(7)
    draws = [draw_label_augment(labels, generator=gen) for _ in range(4000)]
    scaled = np.mean([d.scale != 1.0 for d in draws])
    flipped = np.mean([d.flip for d in draws])
    # binomial: 4 standard deviations
    assert abs(scaled - 0.5) < 4 * (0.25 / 4000) ** 0.5 and abs(flipped - 0.1) < 4 * (0.09 / 4000) ** 0.5
    scales = np.array([d.scale for d in draws if d.scale != 1.0])
    assert scales.min() >= 0.5 and scales.max() <= 1.0 and abs(scales.mean() - 0.75) < 0.02  # U(max S, 1)
    again = [draw_label_augment(labels, generator=torch.Generator().manual_seed(7)) for _ in range(1)]
    assert again[0] == draws[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=12), st.integers(0, 2**31 - 1))
def test_augmented_labels_stay_in_unit_interval_and_invert(values, seed):
    labels = torch.tensor(values, dtype=torch.float32)
    out, aug = augment_labels(labels, scale_p=0.7, flip_p=0.5, generator=torch.Generator().manual_seed(seed))
    assert bool(((out >= 0) & (out <= 1)).all())
    torch.testing.assert_close(aug.invert(out), labels, rtol=1e-5, atol=1e-6)


def test_label_augment_rejects_bad_labels():
    for bad, match in ((torch.tensor([0.2, 1.5]), "in \\[0, 1\\]"), (torch.tensor([0.1, float("nan")]), "NaN"),
                       (torch.tensor([1, 0]), "floating-point"), (torch.zeros(2, 2), "shape")):
        with pytest.raises(ValueError, match=match):
            draw_label_augment(bad)
    with pytest.raises(ValueError, match="scale_p"):
        draw_label_augment(torch.tensor([0.5]), scale_p=2.0)
    zeros, aug = augment_labels(torch.zeros(3), scale_p=1.0)
    assert torch.equal(zeros.abs(), torch.zeros(3)) or aug.flip


def test_random_vertical_flip():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    assert torch.equal(random_vertical_flip(x, p=1.0), x.flip(2))  # height axis, as np.fliplr on C x H x W
    assert torch.equal(random_vertical_flip(x, p=0.0), x)
    batch = torch.rand(400, 1, 2, 2)
    flipped = random_vertical_flip(batch, generator=torch.Generator().manual_seed(0))
    changed = (flipped != batch).flatten(1).any(dim=1).float().mean()
    assert abs(float(changed) - 0.5) < 0.1
    assert torch.equal(flipped, random_vertical_flip(batch, generator=torch.Generator().manual_seed(0)))


def test_no_warning_for_plain_use(model, pictures, caplog):
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(pictures[10:], prompt=(pictures[:10], SCORES[:10]))
    assert not caplog.records
