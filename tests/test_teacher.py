"""Teacher pseudo-labels for ATTIQA: values, cache files, resuming after a kill, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from skimage import data as skdata

import gamma
from gamma.archs.crops import CropProtocol
from gamma.data.transforms import resize_short_side
from gamma.io import ImageDecodeError, load_image
from gamma.prompts import ATTRIBUTES
from gamma.train.teacher import LABELS_FILE, SKIPPED_FILE, label_images, read_labels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A plain CLIP state_dict (random weights, width 64, 64x64 input) on disk."""
    torch.manual_seed(5)
    clip = CLIP(embed_dim=64, vision_cfg=CLIPVisionCfg(width=64, layers=2, head_width=64, patch_size=16, image_size=64),
                text_cfg=CLIPTextCfg(width=64, heads=1, layers=2), quick_gelu=True)
    with torch.no_grad():
        clip.logit_scale.fill_(np.log(100.0))
    path = tmp_path_factory.mktemp("teacher") / "clip.pt"
    torch.save(clip.state_dict(), path)
    return path


@pytest.fixture
def folder(tmp_path):
    """Six photos of different sizes (landscape, portrait, square), in a folder with a subfolder."""
    out = tmp_path / "images"
    (out / "sub").mkdir(parents=True)
    sizes = [(96, 64), (64, 96), (80, 80), (120, 70), (70, 70), (100, 66)]
    for k, (name, (w, h)) in enumerate(zip(["astronaut", "chelsea", "coffee", "rocket", "cat", "camera"], sizes,
                                           strict=True)):
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((w, h), Image.BICUBIC)
        img.save(out / ("sub" if k % 2 else ".") / f"{name}.png")
    return out


def test_labels_are_the_attribute_scores_of_the_resized_picture(clip_file, folder, tmp_path):
    labels = label_images(folder, clip_file, tmp_path / "cache", batch_size=2, chunk_size=4)
    assert sorted(labels.paths) == sorted(["astronaut.png", "sub/chelsea.png", "coffee.png", "sub/rocket.png",
                                           "cat.png", "sub/camera.png"])
    assert labels.scores.shape == (6, 5) and ((labels.scores >= 0) & (labels.scores <= 1)).all()
    model = gamma.create_model(None, pretrained=clip_file)
    for path, row in zip(labels.paths, labels.scores, strict=True):
        img = resize_short_side(load_image(folder / path), 64, mode="bicubic")  # (3, 64, L)
        h, w = img.shape[-2:]
        windows = {(round(i * (h - 64) / 2), round(i * (w - 64) / 2)) for i in range(3)}  # 3 crops over the long side
        with torch.no_grad():
            crops = torch.stack([img[:, t : t + 64, l : l + 64] for t, l in windows])
            manual = torch.stack(list(model.attributes(crops).values()), -1).mean(0)
        np.testing.assert_allclose(row, manual.numpy(), rtol=1e-5, atol=1e-6)
    assert model.crop_protocol == CropProtocol(size=64)  # the teacher's own protocol is left as it was
    # The cache holds the same labels, in input order, and reading it back gives them again.
    again = read_labels(tmp_path / "cache")
    assert again.paths == labels.paths and np.array_equal(again.scores, labels.scores)
    assert len(list((tmp_path / "cache").glob("part-*.csv"))) == 2
    assert labels.scores.std(axis=0).max() > 1e-3  # different pictures, different labels


def test_cached_labels_are_not_recomputed_and_a_different_teacher_is_refused(clip_file, folder, tmp_path):
    model = gamma.create_model(None, pretrained=clip_file)
    calls = []
    original = model.crop_features
    model.crop_features = lambda x: calls.append(x.shape[0]) or original(x)  # count the images scored
    first = label_images(folder, model, tmp_path / "cache", chunk_size=4)
    assert sum(calls) == 6
    second = label_images(folder, model, tmp_path / "cache", chunk_size=4)
    assert sum(calls) == 6 and np.array_equal(first.scores, second.scores)
    with torch.no_grad():
        model.clip_model.logit_scale.fill_(1.0)
    with pytest.raises(ValueError, match="different teacher.*weights_sha1"):
        label_images(folder, model, tmp_path / "cache")


def test_unreadable_image_raise_keeps_finished_chunks_and_skip_lists_it(clip_file, folder, tmp_path):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    files = sorted(str(p) for p in folder.rglob("*.png"))
    files.remove(str(folder / "broken.png"))
    files.insert(3, str(folder / "broken.png"))  # in the second chunk of two
    with pytest.raises(ImageDecodeError, match="broken.png"):
        label_images(files, clip_file, tmp_path / "cache", root=folder, chunk_size=2)
    partial = read_labels(tmp_path / "cache")
    assert len(partial.paths) == 2 and not (tmp_path / "cache" / LABELS_FILE).exists()
    labels = label_images(files, clip_file, tmp_path / "cache", root=folder, chunk_size=2, on_error="skip")
    assert labels.skipped == ["broken.png"] and len(labels.paths) == 6
    assert "broken.png" in (tmp_path / "cache" / SKIPPED_FILE).read_text()
    assert read_labels(tmp_path / "cache").skipped == ["broken.png"]


def test_malformed_cache_file_is_named(clip_file, folder, tmp_path):
    label_images(folder, clip_file, tmp_path / "cache", chunk_size=4)
    (tmp_path / "cache" / LABELS_FILE).unlink()
    part = tmp_path / "cache" / "part-00001.csv"
    header, first, *rest = part.read_text().splitlines()
    part.write_text("\n".join([header, first.split(",")[0] + ",0.5,abc,0.5,0.5,0.5", *rest]) + "\n")
    with pytest.raises(ValueError, match=r"part-00001\.csv, line 2"):
        read_labels(tmp_path / "cache")


@pytest.mark.slow
def test_resumes_after_sigkill(clip_file, folder, tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys, time, gamma, gamma.train.teacher as t\n"
            "m = gamma.create_model(None, pretrained=sys.argv[1])\n"
            "orig = m.crop_features\n"
            "def slow(x):\n"
            "    time.sleep(0.5)\n"
            "    return orig(x)\n"
            "m.crop_features = slow\n"
            "t.label_images(sys.argv[2], m, sys.argv[3], chunk_size=1)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(clip_file), str(folder), str(cache)], env=env)
    deadline = time.monotonic() + 120
    while len(list(cache.glob("part-*.csv"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(cache.glob("part-*.csv")))
    assert 2 <= done < 6, "the labelling process should have been killed mid-run"
    assert len(read_labels(cache).paths) == done  # every finished chunk is a complete, readable file
    model = gamma.create_model(None, pretrained=clip_file)
    calls = []
    original = model.crop_features
    model.crop_features = lambda x: calls.append(x.shape[0]) or original(x)
    resumed = label_images(folder, model, cache)
    assert sum(calls) == 6 - done  # only the images the killed run had not finished
    fresh = label_images(folder, clip_file, tmp_path / "fresh")
    assert resumed.paths == fresh.paths
    np.testing.assert_allclose(resumed.scores, fresh.scores, rtol=1e-6, atol=1e-7)
    assert list(read_labels(cache).paths) == fresh.paths and ATTRIBUTES[0] in (cache / LABELS_FILE).read_text()


def test_other_prompt_pairs_score_those_pairs_and_get_their_own_cache(clip_file, folder, tmp_path):
    """ATTIQA's Table 7 prompt ablations: the teacher scores other pairs for the five attributes."""
    from gamma.prompts import ATTRIBUTE_PROMPTS

    model = gamma.create_model(None, pretrained=clip_file)
    default = label_images(folder, model, tmp_path / "default")
    same = label_images(folder, model, tmp_path / "same", prompts={a: list(p) for a, p in ATTRIBUTE_PROMPTS.items()})
    assert np.array_equal(same.scores, default.scores)  # Table 1's pairs given explicitly: the same labels
    swapped = {a: (neg, pos) for a, (pos, neg) in ATTRIBUTE_PROMPTS.items()}  # P(negative) of Table 1's pairs
    flipped = label_images(folder, model, tmp_path / "swapped", prompts=swapped)
    np.testing.assert_allclose(flipped.scores, 1 - default.scores, rtol=0, atol=1e-5)
    other = {a: ("Good image", "Bad image") for a in ATTRIBUTES}
    labels = label_images(folder, model, tmp_path / "other", prompts=other)
    assert np.ptp(labels.scores, axis=1).max() < 1e-6  # one pair for all five: five equal columns
    assert not np.allclose(labels.scores[:, 0], default.scores[:, 0], atol=1e-3)
    # The model scores Table 1's pairs again afterwards, and a cache of other prompts is refused.
    again = label_images(folder, model, tmp_path / "again")
    assert np.array_equal(again.scores, default.scores)
    with pytest.raises(ValueError, match="prompts"):
        label_images(folder, model, tmp_path / "default", prompts=other)
    # Any named pairs: one label column each, in the mapping's order (Table 7's single pair is one of them).
    four = label_images(folder, model, tmp_path / "four", prompts={a: swapped[a] for a in ATTRIBUTES[:4]})
    assert four.attributes == ATTRIBUTES[:4] and four.scores.shape == (6, 4)
    np.testing.assert_allclose(four.scores, flipped.scores[:, :4], rtol=0, atol=1e-6)
    assert read_labels(tmp_path / "four").attributes == ATTRIBUTES[:4]
    with pytest.raises(ValueError, match="pair of non-empty strings"):
        label_images(folder, model, tmp_path / "bad", prompts={"quality": "Good image"})
    with pytest.raises(ValueError, match="a pair for each of"):
        label_images(folder, model, tmp_path / "bad", prompts={})
    with pytest.raises(ValueError, match="measured teacher has no prompts"):
        label_images(folder, "measured", tmp_path / "measured", prompts=other)
