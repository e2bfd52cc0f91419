"""ATTIQA's experiments beyond the main tables, at toy size (a tiny student, a few steps, pictures made from skimage's):
the L2-loss pretraining ablation, linear probing, the feature analysis and the data-efficient setup, each run from its
shipped option file (options/attiqa/{ablation,linear_probe,feature_analysis,data_efficient}/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from skimage import data as skdata

import gamma
from gamma.data import build_dataset
from gamma.prompts import ATTRIBUTES
from gamma.train.attiqa import attribute_l2_loss, pretraining_objective
from gamma.train.config import ConfigError, load_config
from gamma.train.distributed import DistInfo
from gamma.train.main import main
from gamma.weights import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
OPT = REPO / "options" / "attiqa"
N = 40  # pictures of the toy dataset
# The tiny student at a tenth of the paper's scale (short side 34, 32 crops), a few steps, quiet.
TINY = ["model.name=attiqa_test", "model.overrides={crop_size: 32, resize: 34}", "batch_size=8", "epochs=2",
        "device=cpu", "workers=0", "log.progress=false", "log.tensorboard=false", "eval.batch_size=16"]


def toy_entry(name: str) -> list[str]:
    """Overrides that point data entry 0 (the option file's, whatever its other keys) at the toy dataset."""
    return ["data.0.root=toy", "data.0.meta_file=toy/meta.csv", "data.0.kind=nr", "data.0.mos_range=[0, 10]",
            "data.0.resize=34", "data.0.crop_size=32", f"data.0.name={name}"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """40 pictures (crops of five skimage photos, blurred by a random amount; MOS = 10 - 2 * blur radius) in pyiqa's
    'path, mos' layout."""
    root = tmp_path_factory.mktemp("attiqa_protocols")
    (root / "toy").mkdir()
    rng = np.random.default_rng(0)
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.immunohistochemistry()]
    rows = []
    for i in range(N):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 120), rng.integers(0, photo.shape[1] - 120)
        radius = float(rng.uniform(0, 4))
        img = Image.fromarray(photo[y : y + 120, x : x + 120]).resize((40, 40), Image.BICUBIC)
        img.filter(ImageFilter.GaussianBlur(radius)).save(root / "toy" / f"p{i:02d}.png")
        rows.append(f"p{i:02d}.png,{10 - 2 * radius:.3f}")
    (root / "toy" / "meta.csv").write_text("path,mos\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def pretrained_l2(root) -> dict:
    """options/attiqa/ablation/pretrain_l2.yml at toy size: the measured teacher on the toy pictures."""
    return main(["-opt", str(OPT / "ablation" / "pretrain_l2.yml"), f"data_root={root}", f"output_dir={root}/exp",
                 *TINY, "data=[{name: toy, root: toy, meta_file: toy/meta.csv, kind: nr, mos_range: [0, 10], "
                 "split_mode: computed, resize: 34, crop_size: 32}]", "attiqa.teacher=measured", "attiqa.folders=[]",
                 "attiqa.eval_folders=[]", "checkpoint.every_steps=0", "eval.every=1"])


def run(root: Path, option: Path, name: str, *more: str) -> dict:
    return main(["-opt", str(option), f"data_root={root}", f"output_dir={root}/exp", *TINY, *toy_entry(name), *more])


# ------------------------------------------------------------------------------------------------ L2 pretraining
def test_l2_loss_is_the_mean_squared_difference_summed_over_attributes():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 5, generator=gen), torch.rand(6, 5, generator=gen)
    expected = sum(float(np.mean((pred[:, a].numpy() - target[:, a].numpy()) ** 2)) for a in range(5))
    assert attribute_l2_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="NaN or infinite"):
        attribute_l2_loss(pred, target.clone().fill_(float("nan")))


def test_l2_pretraining_option_runs_and_trains_on_the_teachers_values(pretrained_l2, root):
    cfg = load_config(Path(pretrained_l2["run_dir"]) / "config.yaml")
    assert cfg.attiqa.loss == "l2" and cfg.stage == "attiqa_pretrain"
    losses = pretrained_l2["step_losses"]
    assert len(losses) == 2 * 4 and all(np.isfinite(losses))  # 32 training pictures, batch 8, 2 epochs
    objective, _ = pretraining_objective(cfg, DistInfo())
    gen = torch.Generator().manual_seed(1)
    pred, teacher = torch.randn(8, 5, generator=gen), torch.rand(8, 5, generator=gen)
    weight = torch.tensor([1.0] * 6 + [0.0] * 2)  # two padding slots
    got = objective.loss_sum(pred, {"teacher": teacher, "weight": weight})
    torch.testing.assert_close(got, 6 * attribute_l2_loss(pred[:6], teacher[:6]))
    # A student whose heads output the teacher's values exactly has zero L2 loss (the ranking loss would not care).
    assert objective.loss_sum(teacher, {"teacher": teacher, "weight": weight}).item() == 0
    student = gamma.create_model(None, pretrained=pretrained_l2["backbone"])
    assert set(student.heads) == set(ATTRIBUTES)


def test_attiqa_options_outside_their_stage_are_errors(root):
    common = [f"data_root={root}", *TINY, "model.pretrained=null"]
    with pytest.raises(ConfigError, match="attiqa.loss"):
        load_config(OPT / "livec.yml", [*common, "attiqa.loss=l2"])
    with pytest.raises(ConfigError, match="attiqa.finetune"):
        load_config(OPT / "pretrain_imagenet.yml", [*common, "attiqa.finetune=linear_probe"])
    with pytest.raises(ConfigError, match="attiqa.feature_similarity"):
        load_config(OPT / "pretrain_imagenet.yml", [*common, "attiqa.feature_similarity=true"])


# ------------------------------------------------------------------------------------------------ other prompts
@pytest.fixture(scope="module")
def clip_teacher(tmp_path_factory) -> Path:
    """A tiny plain CLIP state_dict (random weights, 32x32 input): a CLIP-layout teacher."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(5)
    clip = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(width=32, layers=1, head_width=32, patch_size=16, image_size=32),
                text_cfg=CLIPTextCfg(width=32, heads=1, layers=1), quick_gelu=True)
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(clip.state_dict(), path)
    return path


def test_prompt_ablation_pretrains_on_the_given_pairs(root, clip_teacher, monkeypatch):
    import json

    import yaml

    pairs = {a: [f"fine {a} image", f"poor {a} image"] for a in ATTRIBUTES}
    (root / "median.yml").write_text(yaml.safe_dump(pairs))
    option = OPT / "ablation" / "pretrain_prompts_median.yml"
    common = [f"data_root={root}", f"output_dir={root}/exp", *TINY, "attiqa.folders=[]", "attiqa.eval_folders=[]",
              "data=[{name: toy, root: toy, meta_file: toy/meta.csv, kind: nr, mos_range: [0, 10], split_mode: "
              "computed, resize: 34, crop_size: 32}]", "checkpoint.every_steps=0", "epochs=1"]
    with pytest.raises(ConfigError, match="attiqa.prompts: prompts_median.yml"):  # the default: no such file here
        main(["-opt", str(option), *common, f"attiqa.teacher={clip_teacher}"])
    monkeypatch.setenv("ATTIQA_PROMPTS", str(root / "median.yml"))
    with pytest.raises(ConfigError, match="has no prompts"):
        main(["-opt", str(option), *common, "attiqa.teacher=measured"])
    out = main(["-opt", str(option), *common, f"attiqa.teacher={clip_teacher}"])
    settings = json.loads((root / "exp" / "teacher_labels_prompts_median" / "toy" / "teacher.json").read_text())
    assert settings["prompts"] == pairs
    assert len(out["step_losses"]) == 4 and gamma.create_model(None, pretrained=out["backbone"]) is not None


# ------------------------------------------------------------------------------------------------ single prompt
def test_single_prompt_ablation_pretrains_one_head_on_one_pair(root, clip_teacher):
    """Table 7's single-prompt row (ablation/pretrain_single_prompt.yml): a one-head student ranked on one teacher
    column, P("Good image") against "Bad image"; then fine-tuned from it."""
    import json

    from gamma.train.teacher import label_images, read_labels

    option = OPT / "ablation" / "pretrain_single_prompt.yml"
    shipped = load_config(option)
    assert shipped.model.overrides == {"attributes": ["quality"]} and shipped.stage == "attiqa_pretrain"
    assert shipped.attiqa.prompts == {"quality": ["Good image", "Bad image"]} and shipped.attiqa.loss == "ranking"
    # TINY without its whole-dict model.overrides, so that the option file's attributes stay
    tiny = [t for t in TINY if not t.startswith("model.overrides")] + ["model.overrides.crop_size=32",
                                                                         "model.overrides.resize=34"]
    common = [f"data_root={root}", f"output_dir={root}/exp", *tiny, "attiqa.folders=[]", "attiqa.eval_folders=[]",
              "data=[{name: toy, root: toy, meta_file: toy/meta.csv, kind: nr, mos_range: [0, 10], split_mode: "
              "computed, resize: 34, crop_size: 32}]", "checkpoint.every_steps=0", "epochs=1",
              f"attiqa.teacher={clip_teacher}"]
    with pytest.raises(ConfigError, match="not the five attributes"):  # one head, Table 1's five pairs
        main(["-opt", str(option), *common, "attiqa.prompts=null"])
    with pytest.raises(ConfigError, match="a pair for each of quality"):  # the pairs must name the heads
        main(["-opt", str(option), *common, "attiqa.prompts={sharpness: [Sharp image, Blurry image]}"])
    out = main(["-opt", str(option), *common])
    cache = root / "exp" / "teacher_labels_single_prompt" / "toy"
    settings = json.loads((cache / "teacher.json").read_text())
    assert settings["prompts"] == {"quality": ["Good image", "Bad image"]}
    assert (cache / "labels.csv").read_text().splitlines()[0] == "path,quality"
    labels = read_labels(cache)
    assert labels.attributes == ("quality",) and labels.scores.shape == (N, 1)
    assert np.all((labels.scores > 0) & (labels.scores < 1)) and labels.scores.std() > 0
    # The column is P(positive) of the pair: the swapped pair gives 1 - it.
    files = [str(root / "toy" / p) for p in labels.paths[:4]]
    swapped = label_images(files, clip_teacher, root / "swapped", root=root / "toy",
                           prompts={"quality": ("Bad image", "Good image")})
    np.testing.assert_allclose(swapped.scores, 1 - labels.scores[:4], atol=1e-6)
    assert len(out["step_losses"]) == 4 and all(np.isfinite(out["step_losses"]))
    assert set(out["history"][-1]["datasets"]) == {"quality"}  # the head's agreement with its teacher column
    student = gamma.create_model(None, pretrained=out["backbone"])
    assert list(student.heads) == ["quality"] and student.config.attributes == ("quality",)
    assert student.regressor[0].in_features == student.config.head_hidden
    with torch.no_grad():
        assert student.eval().attribute_scores(torch.rand(2, 3, 32, 32)).shape == (2, 1)
    # Fine-tuning starts from it: the one head travels in the checkpoint's config.
    tuned = run(root, OPT / "livec.yml", "livec", "model.name=null", "model.overrides={}",
                f"model.pretrained={out['backbone']}", "data.0.split_mode=computed", "splits=[1]", "epochs=1",
                "name=single_prompt_livec")
    assert np.isfinite(tuned["history"][-1]["datasets"]["livec"]["srcc"])
    assert list(gamma.create_model(None, pretrained=Path(tuned["run_dir"]) / "last.pth").heads) == ["quality"]


# ------------------------------------------------------------------------------------------------ linear probing
def test_linear_probe_trains_only_the_regressor(pretrained_l2, root):
    start = Path(pretrained_l2["backbone"])
    out = run(root, OPT / "linear_probe" / "livec.yml", "livec", f"model.pretrained={start}",
              "data.0.split_mode=computed", "splits=[1]")
    assert load_config(Path(out["run_dir"]) / "config.yaml").attiqa.finetune == "linear_probe"
    before, after = read_checkpoint(start).state_dict, read_checkpoint(Path(out["run_dir"]) / "last.pth").state_dict
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("regressor.") for k in changed), sorted(changed)[:5]
    # BatchNorm's running statistics are the pretrained ones too (the frozen extractor stays in eval mode).
    assert any(k.endswith("running_mean") for k in before) and "backbone.bn1.running_mean" not in changed
    assert out["history"][-1]["datasets"]["livec"]["n"] == 8


# ------------------------------------------------------------------------------------------------ feature analysis
def test_feature_analysis_compares_backbone_features_before_and_after(pretrained_l2, root):
    start = Path(pretrained_l2["backbone"])
    out = run(root, OPT / "feature_analysis" / "koniq10k.yml", "koniq10k", f"model.pretrained={start}",
              "data.0.split_mode=computed", "optim.lr=1.0e-3")
    sim = out["feature_similarity"]["1"]
    assert sim["datasets"]["koniq10k"]["images"] == 8
    cos = sim["datasets"]["koniq10k"]["cosine"]
    # Recomputed here from the two weight files, one picture at a time.
    cfg = load_config(Path(out["run_dir"]) / "config.yaml")
    held = build_dataset(cfg.data[0], "val")
    a = gamma.create_model(None, pretrained=start).eval()
    b = gamma.create_model(None, pretrained=Path(out["run_dir"]) / "last.pth").eval()
    with torch.no_grad():
        mine = [F.cosine_similarity(a.crop_features(held[i]["img"][None]).double(),
                                    b.crop_features(held[i]["img"][None]).double()).item() for i in range(len(held))]
    assert cos == pytest.approx(float(np.mean(mine)), abs=1e-6)
    assert -1 <= cos < 1 - 1e-6  # fine-tuning moved the features
    assert (Path(out["run_dir"]) / "feature_similarity.json").is_file()
    # With a frozen backbone (linear probing) the features do not move: similarity 1.
    probe = run(root, OPT / "feature_analysis" / "koniq10k.yml", "koniq10k", f"model.pretrained={start}",
                "data.0.split_mode=computed", "attiqa.finetune=linear_probe", "name=probe_similarity", "epochs=1")
    assert probe["feature_similarity"]["1"]["mean"] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ data-efficient
@pytest.mark.parametrize(("dataset", "share"), [("spaq", 10), ("koniq10k", 20)])
def test_data_efficient_trains_on_a_tenth_or_a_fifth(pretrained_l2, root, dataset, share):
    option = OPT / "data_efficient" / f"{dataset}_{share}.yml"
    cfg = load_config(option, [f"data_root={root}", *TINY, *toy_entry(dataset), "model.pretrained=null"])
    assert (cfg.data[0].split_mode, cfg.data[0].split_ratio) == ("computed", share / 100)
    train, held = build_dataset(cfg.data[0], "train"), build_dataset(cfg.data[0], "val")
    assert len(train) == round(N * share / 100) and len(held) == N - len(train)
    assert not set(train.rows) & set(held.rows)
    out = run(root, option, dataset, f"model.pretrained={pretrained_l2['backbone']}", "epochs=1")
    final = out["history"][-1]["datasets"][dataset]
    assert final["n"] == len(held) and np.isfinite(final["srcc"])
