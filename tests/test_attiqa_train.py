"""ATTIQA's trainer stages on tiny synthetic data: pretraining on measured teacher labels, fine-tuning, the chain of
options/demo_attiqa.yml, exact resume, DDP, unlabelled folders, configuration errors, the measured teacher."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import interrupt_at, launch_ddp
from PIL import Image, ImageEnhance, ImageFilter
from skimage import data as skdata

import gamma
from gamma.archs import AttiqaModel, attribute_ranking_loss
from gamma.prompts import ATTRIBUTES
from gamma.train import loop
from gamma.train.attiqa import FOLDER_LIST, head_agreement, pretraining_objective
from gamma.train.config import ConfigError, load_config
from gamma.train.distributed import DistInfo
from gamma.train.main import main
from gamma.train.teacher import SETTINGS_FILE, measure_attributes, read_labels
from gamma.weights import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
SYNTH = ["synth_natural", "synth_underwater", "synth_aigc"]

# options/demo_attiqa.yml, shrunk: 16 source pictures per dataset (about 156 training images), 2 epochs of batch 16.
TINY = ["pretrain.synthetic.num_contents=16", "pretrain.synthetic.versions=4", "epochs=2", "batch_size=16",
        "log.progress=false", "log.tensorboard=false", "device=cpu"]
THEN = ('attiqa.then=["options/demo_attiqa_finetune.yml epochs=2 batch_size=16",'
        '"options/demo_attiqa_finetune.yml epochs=2 batch_size=16 name=scratch model.pretrained=null"]')


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, monkeypatch_module) -> Path:
    root = tmp_path_factory.mktemp("attiqa")
    monkeypatch_module.chdir(REPO)  # the option files name each other from the repository root
    return root


def run(root: Path, *overrides: str, resume: bool = False) -> dict:
    argv = ["-opt", "options/demo_attiqa.yml", f"data_root={root / 'data'}", f"output_dir={root / 'exp'}", *TINY,
            *overrides]
    return main([*argv, "--resume"] if resume else argv)


@pytest.fixture(scope="module")
def chain(workspace) -> dict:
    """The demo's chain: synthetic data -> attiqa_pretrain -> fine-tuning from it and from random init."""
    return run(workspace, THEN)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path).state_dict


# ------------------------------------------------------------------------------------------------ end to end
def test_attiqa_stages_run_end_to_end_on_tiny_synthetic_data(chain, workspace):
    exp = workspace / "exp"
    # Teacher labels: one cache per dataset, every training and held-out picture, by the measured teacher.
    for name in SYNTH:
        cache = exp / "teacher_labels" / name
        assert json.loads((cache / SETTINGS_FILE).read_text())["teacher"] == "measured"
        labels = read_labels(cache)
        assert len(labels.paths) == 64 and labels.scores.shape == (64, 5)
        assert ((labels.scores > 0) & (labels.scores <= 1)).all()
    # Pretraining: evaluated per attribute head (pooled held-out pictures), student written for the next stages.
    evals = [h for h in chain["history"] if h["kind"] == "eval"]
    assert list(evals[-1]["datasets"]) == list(ATTRIBUTES)
    assert all(v["n"] == 3 * 12 for v in evals[-1]["datasets"].values())  # 3 of 16 sources held out per dataset
    student = gamma.create_model(None, pretrained=chain["backbone"])
    assert isinstance(student, AttiqaModel) and (student.config.crop_size, student.config.resize) == (32, 34)
    # Pretraining trained the backbone and heads and left the regressor at the run seed's initial values.
    torch.manual_seed(123)
    fresh = gamma.create_model("attiqa_test", crop_size=32, resize=34)
    trained = _state(Path(chain["backbone"]))
    for key, value in fresh.state_dict().items():
        assert torch.equal(trained[key], value) == key.startswith("regressor."), key
    # Fine-tuning from the student and from random init, both evaluated on the held-out parts, side by side.
    stages = chain["stages"]
    assert set(stages) == {"demo_attiqa_finetune", "scratch"}
    for name, res in stages.items():
        assert res["finished"] and set(res["history"][-1]["datasets"]) == set(SYNTH), name
        config = (Path(res["run_dir"]) / "config.yaml").read_text()
        assert "stage: attiqa_finetune" in config and "crop_mode: five" in config
    started = {n: load_config(Path(r["run_dir"]) / "config.yaml").model.pretrained for n, r in stages.items()}
    assert started == {"demo_attiqa_finetune": chain["backbone"], "scratch": None}
    summary = (exp / "demo_attiqa" / "split_1" / "summary.md").read_text()
    assert "| demo_attiqa_finetune |" in summary and "| scratch |" in summary
    # Fine-tuning trains the heads' hidden layers, not their final layers (unused there).
    tuned = _state(Path(stages["demo_attiqa_finetune"]["run_dir"]) / "last.pth")
    for a in ATTRIBUTES:
        assert torch.equal(tuned[f"heads.{a}.out.weight"], trained[f"heads.{a}.out.weight"])
        assert not torch.equal(tuned[f"heads.{a}.hidden.0.weight"], trained[f"heads.{a}.hidden.0.weight"])


def test_pretraining_resumes_exactly_and_reuses_the_cached_labels(chain, workspace, monkeypatch):
    parts = [workspace / "exp" / "teacher_labels" / n / "part-00000.csv" for n in SYNTH]
    stamps = [os.stat(p).st_mtime_ns for p in parts]
    with monkeypatch.context() as m:
        interrupt_at(m, 4)  # a SIGINT while step 4 is logged: the run saves after step 5 and stops
        with pytest.raises(loop.TrainingInterrupted):
            run(workspace, "name=resume", "attiqa.then=[]", "log.every_steps=1")
    resumed = run(workspace, "name=resume", "attiqa.then=[]", "log.every_steps=1", resume=True)
    assert [os.stat(p).st_mtime_ns for p in parts] == stamps  # the labels were read, not computed again
    assert resumed["step_losses"] == chain["step_losses"][5:]
    ref, got = _state(Path(chain["backbone"])), _state(Path(resumed["backbone"]))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(chain, workspace):
    """Pairs are formed within each process's micro-batch: 2 gloo processes see the micro-batches that one process
    with grad_accum=2 sees, so the losses agree. Evaluation scores each process's share with rank 0's BatchNorm
    statistics (those saved), so it equals a one-process evaluation of the saved student."""
    base = ["-opt", "options/demo_attiqa.yml", f"data_root={workspace / 'data'}", f"output_dir={workspace / 'exp'}",
            *TINY, "attiqa.then=[]", "epochs=1"]
    accum = main([*base, "name=accum", "grad_accum=2"])
    launch_ddp(2, [[*base, "name=ddp"]])
    got = json.loads((workspace / "exp" / "ddp" / "split_1" / "results.json").read_text())
    np.testing.assert_allclose(got["step_losses"], accum["step_losses"], rtol=1e-4, atol=1e-6)
    cfg = load_config(REPO / "options" / "demo_attiqa.yml", base[2:])
    objective, _ = pretraining_objective(cfg, DistInfo())
    student = gamma.create_model(None, pretrained=got["backbone"])
    one = head_agreement(SimpleNamespace(model=student, cfg=cfg, eval_sets=objective.eval_sets, dist=DistInfo()))
    for a in ATTRIBUTES:
        assert got["history"][-1]["datasets"][a]["srcc"] == pytest.approx(one["datasets"][a]["srcc"], abs=1e-6), a


# ------------------------------------------------------------------------------------------------ folders
def test_unlabelled_folders_are_listed_labelled_and_evaluated(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "cat"]
    for split, picks in (("train", names), ("val", names[:3])):
        for k, name in enumerate(picks):
            img = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((48 + 8 * k, 40), Image.BICUBIC)
            sub = tmp_path / "pictures" / split / ("deep" if k % 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            for j, factor in enumerate((1.0, 0.5, 1.5)):  # a few brightness versions of each
                ImageEnhance.Brightness(img).enhance(factor).save(sub / f"{name}_{j}.png")
    out = main(["-opt", "options/demo_attiqa.yml", f"data_root={tmp_path / 'pictures'}", f"output_dir={tmp_path}/exp",
                "data=[]", "attiqa.folders=[train]", "attiqa.eval_folders=[val]", "attiqa.resize=40",
                "attiqa.crop_size=32", "attiqa.then=[]", "epochs=1", "batch_size=6", "log.progress=false",
                "log.tensorboard=false", "pretrain.synthetic.enabled=false"])
    listed = (tmp_path / "exp" / "teacher_labels" / "train" / FOLDER_LIST).read_text().splitlines()
    assert listed[0] == "image,mos" and len(listed) == 1 + 18 and "deep/chelsea_0.png,0" in listed
    assert len(read_labels(tmp_path / "exp" / "teacher_labels" / "val").paths) == 9
    evals = [h for h in out["history"] if h["kind"] == "eval"]
    assert evals[-1]["datasets"]["brightness"]["n"] == 9
    assert out["global_step"] == 3  # 18 training pictures, batch 6


# ------------------------------------------------------------------------------------------------ errors
def test_configuration_mistakes_name_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    common = [f"data_root={tmp_path}", f"output_dir={tmp_path}", "pretrain.synthetic.enabled=false"]
    with pytest.raises(ConfigError, match="attiqa.teacher"):
        main(["-opt", "options/demo_attiqa.yml", *common, "attiqa.teacher=null"])
    with pytest.raises(ConfigError, match="model.name: stage attiqa_finetune trains an ATTIQA student"):
        main(["-opt", "options/demo_attiqa_finetune.yml", *common, "model.name=gamma_test", "model.overrides={}",
              "model.pretrained=null"])
    with pytest.raises(ConfigError, match=r"model.overrides.head_hiden: unknown ATTIQA option.*head_hidden"):
        load_config(REPO / "options" / "demo_attiqa.yml", ["model.overrides.head_hiden=8"])
    with pytest.raises(ConfigError, match="attiqa.margin"):
        main(["-opt", "options/demo_attiqa.yml", *common, "attiqa.margin=0"])
    with pytest.raises(ConfigError, match="no images"):
        main(["-opt", "options/demo_attiqa.yml", *common, "data=[]"])


# ------------------------------------------------------------------------------------------------ pieces
def test_ranking_loss_of_a_micro_batch_ignores_padding_slots(chain, workspace):
    cfg = load_config(REPO / "options" / "demo_attiqa.yml",
                      [f"data_root={workspace / 'data'}", f"output_dir={workspace / 'exp'}", *TINY[:2]])
    objective, _ = pretraining_objective(cfg, DistInfo())
    gen = torch.Generator().manual_seed(0)
    pred, teacher = torch.randn(6, 5, generator=gen), torch.rand(6, 5, generator=gen)
    batch = {"teacher": teacher, "weight": torch.tensor([1.0, 1, 1, 1, 0, 0])}
    got = objective.loss_sum(pred, batch)
    torch.testing.assert_close(got, 4 * attribute_ranking_loss(pred[:4], teacher[:4], margin=0.1))
    lone = objective.loss_sum(pred.requires_grad_(), {"teacher": teacher, "weight": torch.tensor([1.0, 0, 0, 0, 0, 0])})
    assert lone.item() == 0 and lone.requires_grad


def test_measured_attributes_follow_the_distortions():
    img = Image.fromarray(skdata.astronaut()).resize((96, 96), Image.BICUBIC)

    def measure(picture: Image.Image) -> np.ndarray:
        x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        return measure_attributes(x)[0].numpy()

    base = measure(img)
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(img, dtype=np.float64) / 255 + rng.normal(0, 0.1, (96, 96, 3)), 0, 1)
    changed = {
        "sharpness": measure(img.filter(ImageFilter.GaussianBlur(2))),
        "contrast": measure(ImageEnhance.Contrast(img).enhance(0.4)),
        "brightness": measure(ImageEnhance.Brightness(img).enhance(0.6)),
        "colorfulness": measure(ImageEnhance.Color(img).enhance(0.2)),
        "noisiness": measure(Image.fromarray((noisy * 255).astype(np.uint8))),
    }
    for k, a in enumerate(ATTRIBUTES):
        assert changed[a][k] < base[k] - 0.02, a  # each distortion lowers its own attribute's (good-pole) score
    assert ((base > 0) & (base <= 1)).all()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        measure_attributes(torch.rand(3, 16, 16))


def test_student_trains_what_its_stage_trains_and_takes_the_trainers_calls():
    student = gamma.create_model("attiqa_test").train()
    x = torch.rand(3, 3, 64, 64)
    student.set_stage("pretrain")
    assert student(x, scene="natural").shape == (3, 5)
    student.set_stage("finetune")
    assert student(x, scene=["aigc"] * 3).shape == (3,)
    student.set_prompt_set(student.config.prompt_set)  # None: what the trainer's evaluation may ask of any model
    with pytest.raises(ValueError, match="no prompts"):
        student.set_prompt_set("sdp")
    student.set_crop_protocol(mode="center")
    assert (student.crop_protocol.mode, student.crop_protocol.size) == ("center", 64)
    student.eval()
    with torch.no_grad():
        big = F.interpolate(x, size=(72, 72), mode="bilinear", align_corners=False).clamp(0, 1)  # short side 72
        torch.testing.assert_close(student(x), student.score_crops(big[:, :, 4:68, 4:68]), rtol=1e-5, atol=1e-6)


def test_paper_option_files_load(monkeypatch):
    monkeypatch.setenv("GAMMA_DATA_ROOT", "/datasets")
    pre = load_config(REPO / "options" / "attiqa" / "pretrain_imagenet.yml")
    assert pre.stage == "attiqa_pretrain" and pre.model.name == "attiqa_resnet50" and pre.attiqa.margin == 0.1
    assert pre.attiqa.folders and not pre.data
    expected = {"livec": 10, "koniq10k": 10, "spaq": 10, "flive": 1, "ava": 1}
    for name, splits in expected.items():
        cfg = load_config(REPO / "options" / "attiqa" / f"{name}.yml")
        assert cfg.stage == "attiqa_finetune" and cfg.epochs == 100 and len(cfg.splits) == splits, name
        assert [e.name for e in cfg.data] == [name]
        assert (cfg.data[0].resize, cfg.data[0].crop_size) == (340, 320)
        assert (cfg.eval.crop_mode, cfg.eval.crops) == ("five", 5)
    for name in ("livec", "koniq10k", "spaq", "flive"):
        cfg = load_config(REPO / "options" / "attiqa" / "cross" / f"{name}.yml")
        others = [n for n in ("livec", "koniq10k", "spaq", "flive") if n != name]
        assert [e.name for e in cfg.data] == [name] and cfg.eval.datasets == others
        assert all(e.split_index == "all" for e in (*cfg.data, *cfg.eval_data))
