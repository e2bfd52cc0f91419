"""Every model family's outputs on fixed inputs and fixed tiny weights, as JSON: the golden file that a redesign must
reproduce (tests/test_golden_outputs.py recomputes it and compares within tolerances).

Inputs: five pictures that ship with scikit-image (``skimage.data``), cropped and resized by fixed rules and written
as PNG (lossless), so they are read by gamma's real decoder. Weights: the tiny test variants (``gamma_test``,
``gamma_test_sdp``, ``gamma_isp_test``, ``promptiqa_test``, ``attiqa_test``) with weights made by a rule that does not
depend on how a model initialises itself: a tensor that two differently seeded builds agree on (a value derived from
the config: LayerNorm ones, zero biases, the level vector) gets that value plus small noise; any other tensor gets
noise scaled by ``1 / sqrt(fan_in)``; the noise of each tensor comes from a generator seeded by the CRC32 of its name.
So a rewrite that creates its modules in another order (but keeps the checkpoint layout) gets the same weights.
They are saved with :func:`gamma.save_checkpoint` and loaded from disk like any checkpoint.

Outputs (through ``gamma.create_model`` and ``gamma.Scorer``): Gamma with naive prompts (score; distribution and
attributes), Gamma with SDP prompts for every scene and ``auto`` (with the scene probabilities), Gamma + ISP against a
fixed ISP set, PromptIQA with that ISP set (and with ``isp_flip``, seeded), ATTIQA (score and attribute scores).

    python scripts/snapshot_outputs.py tests/data/golden_outputs.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

#: (skimage.data picture, crop box (left, top, right, bottom), output size (width, height)).
PICTURES: tuple[tuple[str, tuple[int, int, int, int], tuple[int, int]], ...] = (
    ("astronaut", (0, 0, 512, 512), (256, 256)),
    ("coffee", (50, 0, 550, 400), (300, 240)),
    ("chelsea", (0, 0, 451, 300), (270, 240)),
    ("camera", (64, 64, 448, 448), (240, 240)),  # grayscale, read as RGB
    ("rocket", (100, 0, 427, 427), (240, 300)),
)
#: The ISP set: (picture, distortion, score in [0, 1]). Blur and noise are the stated rule: stronger, lower score.
ISP_SET: tuple[tuple[str, str, float], ...] = (
    ("astronaut", "none", 0.9),
    ("coffee", "blur", 0.55),
    ("chelsea", "noise", 0.35),
    ("rocket", "blur_noise", 0.15),
)
VARIANTS = {"gamma": "gamma_test", "gamma_sdp": "gamma_test_sdp", "gamma_isp": "gamma_isp_test",
            "promptiqa": "promptiqa_test", "attiqa": "attiqa_test"}
NOISE = 0.02  # spread of the noise added to config-derived values (and of 1-d random tensors)


def make_inputs(folder: Path) -> dict[str, Any]:
    """Write the input pictures and the ISP set's pictures as PNG files into ``folder``; return their paths."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for name, box, size in PICTURES:
        array = getattr(data, name)()
        picture = Image.fromarray(array).convert("RGB").crop(box).resize(size, Image.Resampling.BILINEAR)
        path = folder / f"{name}.png"
        picture.save(path)
        images.append(str(path))
    isp = {}
    for name, distortion, score in ISP_SET:
        picture = Image.open(folder / f"{name}.png").convert("RGB")
        path = folder / f"isp_{name}_{distortion}.png"
        distort(picture, distortion, seed=zlib.crc32(name.encode())).save(path)
        isp[str(path)] = score
    return {"images": images, "isp": isp}


def distort(picture: Image.Image, distortion: str, seed: int) -> Image.Image:
    """``none``, ``blur`` (box blur, radius 3), ``noise`` (Gaussian, sigma 40 of 255, seeded), ``blur_noise``."""
    from PIL import ImageFilter

    if "blur" in distortion:
        picture = picture.filter(ImageFilter.BoxBlur(3))
    if "noise" in distortion:
        rng = np.random.default_rng(seed)
        array = np.asarray(picture, dtype=np.float64) + rng.normal(0.0, 40.0, size=np.asarray(picture).shape)
        picture = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    return picture


def fixed_weights(model: torch.nn.Module, variant: str) -> dict[str, torch.Tensor]:
    """The state_dict of ``model`` with every float parameter replaced by the fixed rule (module docstring)."""
    import gamma

    torch.manual_seed(1)
    other = gamma.create_model(variant).state_dict()
    params = {name for name, _ in model.named_parameters()}
    out = {}
    for key, value in model.state_dict().items():
        if key not in params or not value.is_floating_point():
            out[key] = value.detach().clone()  # buffers: computed from the config
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        noise = torch.randn(value.shape, generator=gen, dtype=torch.float64)
        if torch.equal(value, other[key]):  # config-derived
            new = value.double() + NOISE * noise
        else:
            fan_in = int(np.prod(value.shape[1:])) if value.dim() >= 2 else 0
            new = noise / fan_in**0.5 if fan_in else NOISE * noise
        out[key] = new.to(value.dtype)
    return out


def make_weights(folder: Path) -> dict[str, str]:
    """Save each family's tiny model with fixed weights into ``folder``; return the checkpoint paths."""
    import gamma

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for family, variant in VARIANTS.items():
        torch.manual_seed(0)
        model = gamma.create_model(variant)
        model.load_state_dict(fixed_weights(model, variant))
        path = folder / f"{family}.pt"
        gamma.save_checkpoint(model, path)
        paths[family] = str(path)
    return paths


def _rows(df: Any) -> list[dict[str, Any]]:
    """A scorer's table as a list of rows, names reduced to file names."""
    rows = []
    for row in df.to_dict(orient="records"):
        row["name"] = Path(str(row["name"])).name
        rows.append({k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()})
    return rows


def _isp_tensors(isp: dict[str, float], size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from gamma.io import load_image

    images = [load_image(path) for path in isp]
    if size is not None:
        images = [torch.nn.functional.interpolate(i[None], size=(size, size), mode="bilinear",
                                                  align_corners=False)[0] for i in images]
    return torch.stack(images), torch.tensor(list(isp.values()), dtype=torch.float32)


def compute(workdir: Path) -> dict[str, Any]:
    """Every family's outputs on the fixed inputs and weights (written into ``workdir``)."""
    import gamma
    from gamma.io import load_image
    from gamma.prompts import AUTO_SCENE, SCENES
    from gamma.scorer import Scorer

    torch.set_num_threads(1)
    inputs = make_inputs(workdir / "images")
    weights = make_weights(workdir / "weights")
    images, isp = inputs["images"], inputs["isp"]
    out: dict[str, Any] = {}

    common = {"device": "cpu", "num_workers": 0, "batch_size": 2}
    scorer = Scorer(weights["gamma"], **common)
    out["gamma"] = _rows(scorer.score(images))
    full = Scorer(weights["gamma"], distribution=True, attributes=True, **common)
    out["gamma_distribution_attributes"] = _rows(full.score(images))

    sdp = Scorer(weights["gamma_sdp"], distribution=True, **common)
    out["gamma_sdp"] = {scene: _rows(sdp.score(images, scene=scene)) for scene in (*SCENES, AUTO_SCENE)}

    promptiqa = Scorer(weights["promptiqa"], isp=isp, **common)
    out["promptiqa"] = _rows(promptiqa.score(images))
    flipped = Scorer(weights["promptiqa"], isp=isp, isp_flip=True, seed=3, **common)
    out["promptiqa_flip"] = _rows(flipped.score(images))

    torch.manual_seed(0)
    model = gamma.create_model(pretrained=weights["gamma_isp"]).eval()
    isp_images, isp_scores = _isp_tensors(isp, 224)
    targets = torch.stack([torch.nn.functional.interpolate(load_image(p)[None], size=(224, 224), mode="bilinear",
                                                           align_corners=False)[0] for p in images])
    with torch.inference_mode():
        out["gamma_isp"] = model(targets, prompt=(isp_images, isp_scores)).float().tolist()

    model = gamma.create_model(pretrained=weights["attiqa"]).eval()
    batch = torch.stack([load_image(p)[:, :240, :240] for p in images])
    with torch.inference_mode():
        out["attiqa"] = {"score": model(batch).float().tolist(),
                         "attributes": {k: v.float().tolist() for k, v in model.attributes(batch).items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = compute(Path(tmp))
    args.output.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
