"""Expert analysis: routing statistics per group (CSV + figure) and single-expert evaluation (Table 6)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import assert_close, perturb_moae
from PIL import Image

import gamma
from gamma.analysis import image_moae_blocks, read_labels, routing_statistics, single_expert_evaluation, write_routing
from gamma.cli import main


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> dict[str, Path]:
    """Two groups of small real photos, 224 px (one crop window each)."""
    from skimage import data

    root = tmp_path_factory.mktemp("groups")
    out = {}
    for group, names in {"koniq10k": ["astronaut", "coffee"], "aesthetic_set": ["chelsea", "rocket"]}.items():
        (root / group).mkdir()
        for name in names:
            Image.fromarray(getattr(data, name)()).resize((224, 224)).save(root / group / f"{name}.png")
        out[group] = root / group
    return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = gamma.create_model("gamma_test")
    perturb_moae(m)
    m.set_crop_protocol(mode="center")
    return m


def test_routing_rows_are_mean_router_weights(model, groups):
    rows = routing_statistics(model, groups, batch_size=2)
    blocks = [i for i, _ in image_moae_blocks(model)]
    assert blocks == [2, 3]
    assert len(rows) == 2 * len(blocks) * 3  # groups x blocks x experts
    for group in groups:
        for b in blocks:
            w = [r["weight"] for r in rows if r["group"] == group and r["block"] == b]
            assert sum(w) == pytest.approx(1.0, abs=1e-6) and all(0 <= v <= 1 for v in w)
            # 2 images x 50 tokens (224 / 32 = 7x7 patches + CLS)
            assert {r["tokens"] for r in rows if r["group"] == group and r["block"] == b} == {100}
    # by hand for one block: the mean over all tokens of the router softmax
    block = dict(image_moae_blocks(model))[2]
    seen = []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(m.gating(i[0]).reshape(-1, 3)))
    with torch.inference_mode():
        for f in sorted(groups["koniq10k"].iterdir()):
            model(gamma.io.load_image(f)[None])
    handle.remove()
    expected = torch.cat(seen).double().mean(0)
    got = [r["weight"] for r in rows if r["group"] == "koniq10k" and r["block"] == 2]
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the accumulator leaves nothing behind: no hooks, the last block back to the class token alone
    assert all(not m.gating._forward_hooks for _, m in image_moae_blocks(model))
    assert model.clip_model.visual.transformer.resblocks[-1].class_token_only


def test_routing_files(model, groups, tmp_path):
    rows = routing_statistics(model, groups, max_images=1)
    csv_path, png_path = write_routing(rows, tmp_path / "out")
    with open(csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and table[0].keys() >= {"group", "block", "expert", "weight"}
    assert {int(r["images"]) for r in table} == {1} and {int(r["tokens"]) for r in table} == {50}
    assert png_path.stat().st_size > 1000 and Image.open(png_path).format == "PNG"


def test_sdp_models_take_the_scene_from_the_group_name(groups):
    torch.manual_seed(0)
    sdp = gamma.create_model("gamma_test_sdp")
    sdp.set_crop_protocol(mode="center")
    rows = routing_statistics(sdp, {"koniq10k": groups["koniq10k"], "face": groups["aesthetic_set"]}, max_images=1)
    assert {r["scene"] for r in rows} == {"natural", "face"}
    with pytest.raises(ValueError, match="neither a dataset nor a scene"):
        routing_statistics(sdp, {"mine": groups["koniq10k"]})


def test_single_expert_evaluation_restores_all_experts(model, groups):
    files = sorted(groups["koniq10k"].iterdir()) + sorted(groups["aesthetic_set"].iterdir())
    labels = [0.2, 0.9, 0.4, 0.6]
    with torch.inference_mode():
        before = torch.stack([model(gamma.io.load_image(f)[None]) for f in files])
    rows = single_expert_evaluation(model, files, labels)
    assert [r["setting"] for r in rows] == ["all", "only expert 0", "only expert 1", "only expert 2"]
    assert all(-1 <= r["srcc"] <= 1 and -1 <= r["plcc"] <= 1 and r["images"] == 4 for r in rows)
    assert len({round(r["plcc"], 6) for r in rows}) > 1  # keeping one expert changes the predictions
    with torch.inference_mode():
        after = torch.stack([model(gamma.io.load_image(f)[None]) for f in files])
    assert torch.allclose(before, after)


def test_analyze_command(groups, tmp_path, capsys):
    out = tmp_path / "analysis"
    argv = ["analyze", "routing", f"koniq10k={groups['koniq10k']}", f"mine={groups['aesthetic_set']}:aesthetics",
            "--model", "gamma_test", "--crops", "center", "--out-dir", str(out)]
    assert main(argv) == 0
    assert (out / "routing.csv").exists() and (out / "routing.png").exists()
    meta = tmp_path / "meta.csv"
    files = sorted(groups["koniq10k"].iterdir()) + sorted(groups["aesthetic_set"].iterdir())
    meta.write_text("image,mos\n" + "".join(f"{f.name},{m}\n" for f, m in zip(files, [10, 80, 30, 55], strict=True)))
    paths, labels = read_labels(meta, root=tmp_path)
    assert labels == [10, 80, 30, 55] and paths[0] == str(tmp_path / files[0].name)
    meta.write_text("".join(f"{f.relative_to(tmp_path.parent)},{m}\n" for f, m in zip(files, [10, 80, 30, 55],
                                                                                   strict=True)))
    argv = ["analyze", "experts", str(meta), "--root", str(tmp_path.parent), "--model", "gamma_test", "--crops",
            "center", "--out-dir", str(out)]
    assert main(argv) == 0
    assert "only expert 2" in capsys.readouterr().out
    assert (out / "single_expert.csv").read_text().startswith("setting,experts,srcc,plcc,images")
    assert main(["analyze", "routing", "no_equals_sign", "--model", "gamma_test"]) == 2


@pytest.mark.parametrize(("variant", "says"), [("attiqa_test", "AttiqaModel"), ("promptiqa_test", "MoAE")])
def test_analyze_refuses_models_without_experts(groups, tmp_path, capsys, variant, says):
    argv = ["analyze", "routing", f"koniq10k={groups['koniq10k']}", "--model", variant,
            "--out-dir", str(tmp_path / "analysis")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "gamma: error:" in err and says in err, err
    assert not (tmp_path / "analysis").exists()
