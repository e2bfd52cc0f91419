"""gamma.scorer (notebook API) and gamma.hub (finding weight files), with the tiny model and real image files."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close
from PIL import Image

import gamma
from gamma import hub
from gamma.io import ImageDecodeError, load_image
from gamma.scorer import Scorer, from_mos, to_mos
from gamma.weights import release_state_dict


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Four real photographs (skimage) as small JPEG/PNG files, one in a sub-folder, plus an unreadable file."""
    from skimage import data

    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for name, size, rel in [("astronaut", (256, 256), "astronaut.jpg"), ("chelsea", (256, 170), "chelsea.png"),
                            ("coffee", (256, 170), "sub/coffee.jpg"), ("rocket", (170, 256), "rocket.jpg")]:
        Image.fromarray(getattr(data, name)()).resize(size, Image.BICUBIC).save(root / rel)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def release_file(tmp_path_factory) -> Path:
    """A tiny model saved in the authors' release layout ({'params': state_dict})."""
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test")
    path = tmp_path_factory.mktemp("weights") / "Gamma.pth"
    torch.save(release_state_dict(model), path)
    return path


@pytest.fixture
def scorer() -> Scorer:
    torch.manual_seed(0)
    return Scorer(model="gamma_test", device="cpu", batch_size=4, crops="center")


GOOD = ["astronaut.jpg", "chelsea.png", "rocket.jpg", "sub/coffee.jpg"]


# ---------------------------------------------------------------------------------------------------- scorer
def test_folder_gives_a_dataframe_in_file_order(scorer, image_dir):
    df = scorer.score(image_dir, on_error="skip")
    assert list(df.columns) == ["name", "score", "error"]
    assert [Path(n).relative_to(image_dir).as_posix() for n in df["name"]] == [
        "astronaut.jpg", "broken.jpg", "chelsea.png", "rocket.jpg", "sub/coffee.jpg"]
    bad = df[df["name"].str.endswith("broken.jpg")].iloc[0]
    assert np.isnan(bad["score"]) and "broken.jpg" in bad["error"]
    good = df.drop(index=bad.name)
    assert good["error"].isna().all() and good["score"].between(0.2, 1.0).all()


def test_unreadable_file_raises_by_default(scorer, image_dir):
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        scorer.score(image_dir)


def test_inputs_of_every_kind_agree(scorer, image_dir):
    path = image_dir / "astronaut.jpg"
    x = load_image(path)
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    df = scorer.score([str(path), pil, x, x[None].repeat(2, 1, 1, 1), arr, path.read_bytes()])
    assert len(df) == 7 and list(df.columns) == ["name", "score"]
    assert_close(df["score"], [df["score"][0]] * len(df), rtol=1e-5, atol=1e-6)
    assert df["name"][0] == str(path) and df["name"][2] == "<tensor 2>"


def test_scores_match_the_model_and_do_not_depend_on_batching(image_dir):
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test")
    files = [image_dir / f for f in GOOD]
    one = Scorer(model=model, batch_size=1, num_workers=0, device="cpu").score(files)["score"].to_numpy()
    many = Scorer(model=model, batch_size=8, num_workers=2, device="cpu").score(files)["score"].to_numpy()
    assert_close(many, one, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        direct = [float(model(load_image(f)[None])) for f in files]
    assert_close(direct, one, rtol=1e-5, atol=1e-5)


def test_equal_sizes_are_batched_together(scorer, image_dir, monkeypatch):
    shapes = []
    forward = scorer._forward
    monkeypatch.setattr(scorer, "_forward", lambda b, s: shapes.append(tuple(b.shape)) or forward(b, s))
    scorer.score([image_dir / "chelsea.png", image_dir / "rocket.jpg", image_dir / "sub/coffee.jpg"])
    assert sorted(shapes) == [(1, 3, 256, 170), (2, 3, 170, 256)]


def test_mos_mapping(image_dir):
    s = Scorer(model="gamma_test", device="cpu", crops="center", mos_range=(1, 5))
    df = s.score(image_dir / "astronaut.jpg")
    assert list(df.columns) == ["name", "score", "mos"]
    assert df["mos"][0] == pytest.approx(1 + 4 * df["score"][0])
    d = Scorer(model="gamma_test", device="cpu", crops="center", mos_range=(0, 100), lower_better=True)
    row = d.score(image_dir / "astronaut.jpg").iloc[0]
    assert row["mos"] == pytest.approx(100 * (1 - row["score"]))
    y = np.array([0.1, 0.5, 0.9])
    assert np.allclose(from_mos(to_mos(y, 1, 100, True), 1, 100, True), y)
    with pytest.raises(ValueError, match="mos_range"):
        Scorer(model="gamma_test", device="cpu", mos_range=(3, 3))


def test_mos_mapping_follows_gamma_data_meta():
    """to_mos / from_mos are gamma.data.meta's pair with the range as two numbers; hi < lo is a reversed scale."""
    from gamma.data.meta import denormalize_mos

    y = np.array([0.0, 0.25, 0.9])
    np.testing.assert_allclose(to_mos(y, 1, 5), denormalize_mos(y, (1, 5), False))
    np.testing.assert_allclose(to_mos(y, 0, 100, True), 100 * (1 - y))
    np.testing.assert_allclose(to_mos(y, 100, 0), 100 - 100 * y)  # reversed: the same as lower_better on (0, 100)
    np.testing.assert_allclose(from_mos(to_mos(y, 100, 0), 100, 0), y)
    t = to_mos(torch.tensor([0.5, 1.0]), 1, 5)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and torch.allclose(t, torch.tensor([3.0, 5.0]))
    assert isinstance(to_mos(0.5, 1, 5), float) and to_mos(0.5, 1, 5) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="must not be empty"):
        to_mos(y, 3, 3)


def test_sdp_needs_a_scene(image_dir):
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test_sdp")
    with pytest.raises(ValueError, match="scene"):
        Scorer(model=model, device="cpu").score(image_dir / "astronaut.jpg")
    with pytest.raises(ValueError, match="unknown scene"):
        Scorer(model=model, device="cpu", scene="mars")
    s = Scorer(model=model, device="cpu", scene="underwater")
    under = s.score(image_dir / "astronaut.jpg")["score"][0]
    face = s.score(image_dir / "astronaut.jpg", scene="face")["score"][0]
    assert under != face


def test_bad_tensor_is_named_and_others_scored(scorer):
    good = torch.rand(3, 224, 224)
    rows = scorer.score([good, torch.full((3, 224, 224), float("nan")), good], on_error="skip")
    assert rows["error"].notna().tolist() == [False, True, False]
    assert "<tensor 1>" in rows["error"][1] and "NaN" in rows["error"][1]
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        scorer.score(torch.rand(3, 224))


def test_raise_mode_reports_the_first_failing_input_after_the_results_before_it(scorer):
    """Errors surface in input order, whatever the batching: a model-side refusal (input 1, too elongated to crop)
    is reported before a decode-side one (input 3, NaN), although decoding runs ahead of the model."""
    good = torch.rand(3, 224, 224)
    inputs = [good, torch.rand(3, 2, 300), good, torch.full((3, 224, 224), float("nan")), good]
    stream = scorer.iter_scores(inputs)
    first = next(stream)
    assert first.name == "<tensor 0>" and first.error is None
    with pytest.raises(ValueError, match=r"^<tensor 1>: .*aspect"):
        next(stream)
    rows = scorer.score(inputs, on_error="skip")  # skip mode: both named, the rest scored
    assert rows["error"].notna().tolist() == [False, True, False, True, False]


def test_list_of_dicts_without_pandas(scorer, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    rows = scorer.score(torch.rand(2, 3, 224, 224))
    assert isinstance(rows, list) and [sorted(r) for r in rows] == [["name", "score"]] * 2


def test_crop_options_reach_the_model():
    s = Scorer(model="gamma_test", device="cpu", crops="grid", num_crops=4, seed=3)
    assert (s.model.crop_protocol.mode, s.model.test_sample, s.model.crop_protocol.seed) == ("grid", 4, 3)


def test_weights_from_a_release_file(release_file, image_dir, monkeypatch):
    torch.manual_seed(0)
    reference = gamma.create_model("gamma_test")  # the same seed: the same weights as the file
    explicit = Scorer(release_file, device="cpu", crops="center")
    assert explicit.model.config.vision.width == 64  # architecture read from the file
    monkeypatch.setenv("GAMMA_WEIGHTS", str(release_file))
    from_env = Scorer(device="cpu", crops="center")
    files = [image_dir / f for f in GOOD[:2]]
    a = explicit.score(files)["score"].to_numpy()
    assert np.allclose(a, from_env.score(files)["score"].to_numpy())
    reference.set_crop_protocol(mode="center")
    with torch.inference_mode():
        assert_close(a, [float(reference(load_image(f)[None])) for f in files], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- hub
@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for entry in hub.KNOWN_WEIGHTS.values():
        monkeypatch.delenv(entry.env_var, raising=False)
    monkeypatch.setenv("GAMMA_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def test_resolution_order(clean_env, tmp_path, monkeypatch):
    cache = clean_env
    cache.mkdir()
    cached = cache / "Gamma.pth"
    cached.write_bytes(b"cached")
    assert hub.weights_dir() == cache
    assert hub.resolve_weights("gamma") == cached
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"env")
    monkeypatch.setenv("GAMMA_WEIGHTS", str(env_file))
    assert hub.resolve_weights("gamma") == env_file
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"mine")
    assert hub.resolve_weights("gamma", explicit) == explicit
    assert hub.resolve_weights("gamma", "gamma") == env_file  # a known name in place of a path
    monkeypatch.setenv("GAMMA_WEIGHTS", str(tmp_path / "typo.pth"))
    with pytest.raises(hub.WeightsNotFoundError, match="GAMMA_WEIGHTS points to .*typo.pth"):
        hub.resolve_weights("gamma")
    with pytest.raises(hub.WeightsNotFoundError, match="not found: .*nope.pth"):
        hub.resolve_weights("gamma", tmp_path / "nope.pth")


def test_alias_file_names_in_the_cache(clean_env):
    clean_env.mkdir()
    (clean_env / "gamma_weight.pth").write_bytes(b"x")  # the name the authors' demo uses
    assert hub.resolve_weights("gamma").name == "gamma_weight.pth"


def test_nothing_found_says_which_file_to_put_where(clean_env):
    with pytest.raises(hub.WeightsNotFoundError) as err:
        hub.resolve_weights("gamma_sdp")
    msg = str(err.value)
    assert str(clean_env / "Gamma-Prompt.pth") in msg and "GAMMA_SDP_WEIGHTS" in msg
    assert "Assess-Any-Image" in msg and "pretrained_model_path" in msg
    with pytest.raises(ValueError, match="unknown weights"):
        hub.resolve_weights("gamma_xl")


def test_download_checks_sha256_over_a_local_url(clean_env, tmp_path, monkeypatch):
    source = tmp_path / "served.pth"
    source.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    entry = replace(hub.KNOWN_WEIGHTS["gamma"], url=source.as_uri(), sha256=digest)
    monkeypatch.setitem(hub.KNOWN_WEIGHTS, "gamma", entry)
    with pytest.raises(hub.WeightsNotFoundError, match="downloads are disabled"):
        hub.resolve_weights("gamma")  # HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    got = hub.resolve_weights("gamma", progress=False)
    assert got == clean_env / "Gamma.pth" and got.read_bytes() == source.read_bytes()
    bad = replace(entry, sha256="0" * 64)
    with pytest.raises(hub.ChecksumError, match="sha256 mismatch"):
        hub.download_weights(bad, tmp_path / "dl" / "x.pth", progress=False)
    assert not (tmp_path / "dl" / "x.pth").exists() and list((tmp_path / "dl").iterdir()) == []
    with pytest.raises(ValueError, match="without a sha256"):
        hub.download_weights(replace(entry, sha256=None), tmp_path / "y.pth")


def test_verify_sha256(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    hub.verify_sha256(f, "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD")
    with pytest.raises(hub.ChecksumError, match=str(f)):
        hub.verify_sha256(f, "00")


def test_create_model_resolves_known_weight_names(clean_env, tmp_path):
    """create_model(pretrained='gamma_sdp') finds the file itself and implies its prompt set; an explicit one wins."""
    clean_env.mkdir()
    torch.manual_seed(1)
    torch.save(release_state_dict(gamma.create_model("gamma_test_sdp")), clean_env / "Gamma-Prompt.pth")
    model = gamma.create_model(pretrained="gamma_sdp")
    assert model.config.prompt_set == "sdp"
    model.set_crop_protocol(mode="center")
    assert gamma.create_model(pretrained="gamma_sdp", prompt_set="quality").config.prompt_set == "quality"
    scorer = Scorer("gamma_sdp", device="cpu", crops="center", scene="face")  # through create_model
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert scorer.score(x)["score"][0] == pytest.approx(float(model(x, scene="face")[0]), rel=1e-5, abs=1e-6)
    with pytest.raises(hub.WeightsNotFoundError, match="no weight file for 'gamma'"):
        gamma.create_model(pretrained="gamma")
    with pytest.raises(hub.WeightsNotFoundError, match="weight file not found: .*nope.pth"):
        gamma.create_model("gamma_test", pretrained=tmp_path / "nope.pth")


def test_scorer_without_weights_reports_the_hub_message(clean_env):
    with pytest.raises(hub.WeightsNotFoundError, match="Gamma.pth"):
        Scorer(device="cpu")
