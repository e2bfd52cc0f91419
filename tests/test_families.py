"""The family table (gamma/families.py): a model family is one module plus one row.

The proof: a toy fifth family, defined and registered in this test alone (no file of gamma's is touched), is built by
``create_model``, saved and read back as a checkpoint, scored by the ``Scorer`` and by ``gamma score``; and the four
built-in families are rows of the same table.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import gamma
from gamma.archs.precision import place
from gamma.cli import main
from gamma.config import ModelConfig
from gamma.families import FAMILIES, Family, Scoring, family_of_model, register_family, unregister_family
from gamma.scorer import Scorer
from gamma.weights import load_into, read_checkpoint, save_checkpoint

RTOL, ATOL = 1e-6, 1e-6  # float32 means of a few thousand pixels, compared with float64 ones


# ------------------------------------------------------------------------------------------------ the toy family
@dataclass
class ToyConfig(ModelConfig):
    """A model that scores an image by its mean brightness times a learnable gain."""

    family = "toy_brightness"
    title = "Toy brightness"

    gain: float = 1.0


class ToyModel(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.gain = nn.Parameter(torch.tensor([config.gain]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) * self.gain


def build_toy(name, ckpt, *, strict=True, allow_unsafe=False, precision=None, device=None, **overrides):  # noqa: ARG001
    config = ToyConfig.variant(name) if name is not None else ckpt.config
    model = ToyModel(config.replace(**overrides) if overrides else config)
    if ckpt is not None:
        load_into(model, ckpt, strict=strict)
    return place(model.eval(), device, precision)


@pytest.fixture
def toy_family():
    ToyConfig.variants = {"toy_test": ToyConfig(gain=2.0)}
    family = register_family(Family("toy_brightness", "Toy brightness", ToyConfig, ToyModel, build_toy,
                                    Scoring(forward=lambda model, batch, context: model(batch))))
    yield family
    unregister_family("toy_brightness")


@pytest.fixture
def pictures(tmp_path):
    from skimage import data

    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((64, 48)).save(folder / f"{name}.png")
    return folder


def _brightness(path) -> float:
    return float(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).mean() / 255)


def test_a_toy_family_is_one_row(toy_family, pictures, tmp_path):
    assert gamma.list_models("toy_brightness") == ["toy_test"]
    assert "toy_test" in gamma.list_models("all")
    model = gamma.create_model("toy_test")
    assert isinstance(model, ToyModel) and family_of_model(model) is toy_family
    with torch.no_grad():
        model.gain.fill_(3.0)
    path = save_checkpoint(model, tmp_path / "toy.pth")
    ckpt = read_checkpoint(path)
    assert ckpt.kind == "native" and isinstance(ckpt.config, ToyConfig)
    loaded = gamma.create_model(pretrained=path)
    assert isinstance(loaded, ToyModel) and float(loaded.gain.detach()) == 3.0

    files = sorted(pictures.glob("*.png"))
    expected = [3.0 * _brightness(p) for p in files]
    table = Scorer(path, device="cpu", num_workers=0).score(str(pictures))
    assert table.attrs["model"] == "toy_brightness"
    by_name = dict(zip(table["name"], table["score"], strict=True))
    got = [by_name[str(p)] for p in files]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert len(set(np.round(got, 6))) == len(got)  # the pictures differ: a score that ignored them would not

    out = tmp_path / "scores.csv"
    assert main(["score", str(pictures), "--weights", str(path), "--device", "cpu", "--no-progress", "--out",
                 str(out)]) == 0
    with open(out, newline="") as fh:
        rows = {r["name"]: float(r["score"]) for r in csv.DictReader(fh)}
    np.testing.assert_allclose([rows[str(p)] for p in files], expected, rtol=1e-5, atol=1e-6)


def test_a_toy_family_refuses_what_it_does_not_have(toy_family, pictures):
    with pytest.raises(ValueError, match="Gamma outputs; Toy brightness gives one score"):
        Scorer(model="toy_test", device="cpu", distribution=True)
    with pytest.raises(ValueError, match="scenes apply to Gamma models.*Toy brightness takes none"):
        Scorer(model="toy_test", device="cpu", scene="face")
    with pytest.raises(ValueError, match="applies to Gamma models"):
        gamma.create_model("toy_test", precision="bf16")
    with pytest.raises(ValueError, match="registered already"):
        register_family(toy_family)


def test_unregistered_family_is_gone(pictures):
    assert "toy_brightness" not in FAMILIES
    with pytest.raises(ValueError, match="unknown model 'toy_test'"):
        gamma.create_model("toy_test")


def test_builtin_families_are_rows():
    assert list(FAMILIES)[:4] == ["gamma", "attiqa", "promptiqa", "gamma_isp"]
    for family in FAMILIES.values():
        assert family.variants, family.name
        assert all(name in gamma.list_models("all") for name in family.variants)
        test_variant = next(v for v in family.variants if v.endswith("_test"))
        torch.manual_seed(0)
        model = gamma.create_model(test_variant)
        assert family_of_model(model) is family and type(model) is family.model_class
        assert type(model.config) is family.config_class
    assert FAMILIES["promptiqa"].scoring.takes_isp and not FAMILIES["gamma"].scoring.takes_isp
    assert FAMILIES["gamma"].scoring.outputs == {"distribution", "attributes", "scene"}


# ------------------------------------------------------------------------------------------------ old names
def test_old_names_warn_once_and_still_work(tmp_path):
    import warnings

    from skimage import data

    from gamma import _deprecation, pyiqa_plugin

    paths = []
    for name in ("astronaut", "coffee", "chelsea"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((60, 50)).save(path)
        paths.append(path)
    isp = {str(paths[0]): 0.8, str(paths[1]): 0.3}
    torch.manual_seed(0)
    model = gamma.create_model("promptiqa_test")
    new = Scorer(model=model, device="cpu", num_workers=0, isp=isp).score(str(paths[2]))["score"][0]
    _deprecation._warned.clear()
    with pytest.warns(FutureWarning, match=r"Scorer\(prompt=...\) is an old name: use isp="):
        old = Scorer(model=model, device="cpu", num_workers=0, prompt=isp).score(str(paths[2]))["score"][0]
    assert old == new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second use is silent
        Scorer(model=model, device="cpu", num_workers=0, prompt=isp)
    with pytest.raises(TypeError, match="pass isp= only"):
        Scorer(model=model, device="cpu", isp=isp, prompt=isp)
    save_checkpoint(model, tmp_path / "p.pth")
    kind = read_checkpoint(tmp_path / "p.pth").kind
    with pytest.warns(DeprecationWarning, match='kind "gamma"'):
        assert kind == "gamma"
    assert kind == "native" and kind != "release"
    assert pyiqa_plugin.GammaIQA is pyiqa_plugin.GammaMetric
    assert pyiqa_plugin.GammaPromptIQA is pyiqa_plugin.PromptIQAMetric
