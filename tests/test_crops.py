"""Test-time crop protocols: seeded, batch-invariant, deduplicated, small images handled."""

import pytest
import torch
from helpers import assert_close, perturb_moae

from gamma.archs.crops import CropProtocol, prepare, unique_crops


def test_random_offsets_are_seeded_and_cover_both_axes():
    p = CropProtocol(mode="random", num=10, seed=0)
    a = p.offsets(512, 384)
    assert a == p.offsets(512, 384)
    assert len(a) == 10
    assert all(0 <= t <= 512 - 224 and 0 <= l <= 384 - 224 for t, l in a)
    assert len({t for t, _ in a}) > 1 and len({l for _, l in a}) > 1
    assert a != CropProtocol(mode="random", num=10, seed=1).offsets(512, 384)


def test_offsets_do_not_depend_on_global_rng():
    p = CropProtocol()
    torch.manual_seed(0)
    a = p.offsets(400, 300)
    torch.manual_seed(123)
    torch.rand(100)
    assert p.offsets(400, 300) == a


@pytest.mark.parametrize("num", [1, 4, 9, 10])
def test_grid_is_deterministic_and_spread(num):
    offs = CropProtocol(mode="grid", num=num).offsets(600, 300)
    assert len(offs) == num
    assert len(set(offs)) == num
    if num >= 4:
        assert min(t for t, _ in offs) == 0 and max(t for t, _ in offs) == 600 - 224


def test_five_crop_matches_centre_and_corners():
    offs = CropProtocol(mode="five").offsets(300, 400)
    assert offs == [(38, 88), (0, 0), (0, 176), (76, 0), (76, 176)]


def test_unique_crops_deduplicate_identical_windows():
    x = torch.rand(2, 3, 224, 224)
    crops, weights = unique_crops(x, CropProtocol(num=10))
    assert crops.shape == (2, 3, 224, 224)
    assert torch.allclose(weights, torch.ones(1, dtype=torch.float64))
    crops, weights = unique_crops(torch.rand(2, 3, 300, 260), CropProtocol(num=10))
    assert crops.shape[0] == 2 * len(weights)
    assert abs(float(weights.sum()) - 1) < 1e-12


@pytest.mark.parametrize("shape", [(1, 3, 100, 300), (1, 3, 1, 1), (1, 3, 223, 500)])
def test_small_images_are_upscaled_not_rejected(shape):
    out = prepare(torch.rand(shape), CropProtocol())
    assert min(out.shape[-2:]) == 224
    assert out.min() >= 0 and out.max() <= 1


def test_resize_mode_gives_one_full_view():
    out = prepare(torch.rand(1, 3, 500, 300), CropProtocol(mode="resize"))
    assert out.shape[-2:] == (224, 224)


def test_bad_protocols():
    with pytest.raises(ValueError, match="unknown crop mode 'tencrop'"):
        CropProtocol(mode="tencrop")
    with pytest.raises(ValueError, match="number of crops"):
        CropProtocol(num=0)


# ------------------------------------------------------------------------------------------ through the model
def test_scores_are_reproducible_and_batch_invariant(tiny_model):
    perturb_moae(tiny_model)
    torch.manual_seed(0)
    imgs = torch.rand(4, 3, 288, 256)
    with torch.no_grad():
        together = tiny_model(imgs)
        torch.manual_seed(99)  # global RNG state must not matter
        alone = torch.cat([tiny_model(imgs[i : i + 1]) for i in range(4)])
        shuffled = tiny_model(imgs[[2, 0, 3, 1]])
        again = tiny_model(imgs)
    assert torch.equal(together, again)
    assert_close(alone, together, rtol=1e-5, atol=1e-6)
    assert_close(shuffled, together[[2, 0, 3, 1]], rtol=1e-5, atol=1e-6)


def test_ten_crop_average_equals_manual_average(tiny_model):
    perturb_moae(tiny_model)
    img = torch.rand(2, 3, 300, 260)
    offs = tiny_model.crop_protocol.offsets(300, 260)
    with torch.no_grad():
        manual = torch.stack([tiny_model.score_crops(img[:, :, t : t + 224, l : l + 224]) for t, l in offs]).mean(0)
        got = tiny_model(img)
    assert_close(got, manual, rtol=1e-5, atol=1e-6)


def test_test_sample_attribute_sets_crop_count(tiny_model):
    tiny_model.test_sample = 3
    assert tiny_model.crop_protocol.num == 3 and tiny_model.test_sample == 3
    assert len(tiny_model.crop_protocol.offsets(300, 300)) == 3
    tiny_model.set_crop_protocol(mode="grid", num=4)
    with torch.no_grad():
        s = tiny_model(torch.rand(1, 3, 300, 300))
    assert s.shape == (1,)


def test_224_image_costs_one_pass(tiny_model):
    calls = []
    handle = tiny_model.clip_model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        tiny_model(torch.rand(3, 3, 224, 224))
    handle.remove()
    assert calls == [3]
