"""Stage promptiqa: chunks, the label augmentation as the stage applies it, the test ISPP, requirements, Gamma + ISP,
resume, DDP, the option files and scripts/fr_labels.py (tiny models, synthetic pictures written here)."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import assert_close, interrupt_at, launch_ddp

import gamma
from gamma.adapt import MIN_PAIRS
from gamma.archs.promptiqa import PromptedIQA
from gamma.data import build_dataset
from gamma.data.promptiqa import draw_label_augment, interval_positions, sample_ispp
from gamma.data.requirements import RequirementCfg, distortions_of, requirement_labels, write_requirement
from gamma.data.synthetic import generate
from gamma.factory import list_models, load_vit_weights
from gamma.scorer import ADAPT_OUTPUTS
from gamma.train import promptiqa as stage
from gamma.train.checkpoint import load_training_state
from gamma.train.config import ConfigError, load_config
from gamma.train.evaluate import predict
from gamma.train.loop import TrainingInterrupted
from gamma.train.main import main
from gamma.weights import CheckpointError, read_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
NAMES = ("synth_natural", "synth_underwater", "synth_aigc")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The three synthetic datasets at toy size (24 sources x 4 versions, 32 px) and a base option file."""
    root = tmp_path_factory.mktemp("promptiqa_train")
    generate(root / "data", size=32, num_contents=24, versions=4)
    data = [{"name": n, "root": n, "meta_file": f"{n}/meta_info.csv", "split_file": f"{n}/split.pkl",
             "mos_range": r, "kind": "nr", "crop_size": 32}
            for n, r in zip(NAMES, ([0, 100], [1, 5], [0, 1]), strict=True)]
    base = {"stage": "promptiqa", "device": "cpu", "data_root": str(root / "data"), "output_dir": str(root / "exp"),
            "seed": 7,
            "workers": 0, "epochs": 1, "batch_size": 22, "data": data, "model": {"name": "promptiqa_test"},
            "optim": {"lr": 1e-3, "weight_decay": 1e-5}, "eval": {"every": 0, "batch_size": 16},
            "log": {"progress": False, "tensorboard": False, "every_steps": 1}}
    (root / "base.yml").write_text(yaml.safe_dump(base))
    return root


def run_stage(workspace: Path, name: str, *overrides: str) -> dict:
    return main(["-opt", str(workspace / "base.yml"), f"name={name}", *overrides])


# ------------------------------------------------------------------------------------------------ the test ISPP
def official_picker(length: int, n: int) -> list[int]:
    """The official get_prompt's positions, restated as its loop (n >= 3)."""
    step = (length - 2) // (n - 2)
    picked = [0]
    for i in range(step, length, step):
        picked.append(i)
        if len(picked) == n - 1:
            break
    return [*picked, length - 1]


@pytest.mark.parametrize("n", [3, 5, 7, 8, 10])
def test_interval_positions_follow_the_official_picker(n):
    for length in [n, n + 1, 2 * n - 1, 37, 200, 1279]:
        got = interval_positions(length, n)
        assert got == official_picker(length, n)
        assert len(got) == n == len(set(got)) and got[0] == 0 and got[-1] == length - 1


def test_interval_positions_small_prompts_and_errors():
    assert interval_positions(9, 2) == [0, 8]  # the official code returns one item here (documented bug)
    assert interval_positions(9, 1) == [0]
    with pytest.raises(ValueError, match="cannot choose 10"):
        interval_positions(9, 10)
    with pytest.raises(ValueError, match="at least one"):
        interval_positions(9, 0)


def test_sample_ispp_interval_takes_min_spread_and_max():
    rng = np.random.default_rng(0)
    labels = rng.random(50)
    idx = sample_ispp(labels, 10)
    assert labels[idx[0]] == labels.min() and labels[idx[-1]] == labels.max()
    assert np.all(np.diff(labels[idx]) > 0)
    a = sample_ispp(labels, 10, "random", np.random.default_rng(3))
    b = sample_ispp(labels, 10, "random", np.random.default_rng(3))
    assert np.array_equal(a, b) and len(set(a.tolist())) == 10
    assert not np.array_equal(a, sample_ispp(labels, 10, "random", np.random.default_rng(4)))
    with pytest.raises(ValueError, match="strategy"):
        sample_ispp(labels, 10, "best")


# ------------------------------------------------------------------------------------------------ chunks
def test_chunk_plan_cuts_each_dataset_into_chunks_and_reshuffles():
    sizes = [40, 25, 12]
    plan = stage.ChunkPlan(sizes, chunk=11, chunks_per_step=2, seed=5)
    assert plan.total_chunks == 3 + 2 + 1 and plan.steps_per_epoch == 3
    offsets = np.cumsum([0, *sizes])
    for epoch in range(3):
        chunks = plan.chunks(epoch)
        assert len(chunks) == 6
        seen = np.concatenate(chunks)
        assert len(set(seen.tolist())) == len(seen)  # no image twice in an epoch
        for c in chunks:
            assert len(c) == 11
            d = np.searchsorted(offsets, c, side="right") - 1
            assert len(set(d.tolist())) == 1  # one dataset per chunk
    assert [c.tolist() for c in plan.chunks(0)] == [c.tolist() for c in stage.ChunkPlan(sizes, 11, 2, 5).chunks(0)]
    assert [c.tolist() for c in plan.chunks(0)] != [c.tolist() for c in plan.chunks(1)]
    # Two processes share each step's chunks: together they train what one process trains.
    ranks = [stage.ChunkPlan(sizes, 11, 2, 5, world_size=2, rank=r) for r in range(2)]
    for step in range(plan.steps_per_epoch):
        assert sorted(ranks[0].step_chunks(step) + ranks[1].step_chunks(step)) == plan.step_chunks(step)
    with pytest.raises(ConfigError, match="cannot share"):
        stage.ChunkPlan(sizes, 11, 3, 5, world_size=2)
    with pytest.raises(ConfigError, match="fewer than one step"):
        stage.ChunkPlan([10, 10], 11, 1, 5)


def test_learning_rate_is_the_official_half_cosine(workspace):
    cfg = load_config(workspace / "base.yml", ["epochs=50", "optim.lr=1e-5"])
    for epoch in range(50):
        assert stage.lr_at(cfg, epoch) == pytest.approx(1e-5 * 0.5 * (1 + np.cos(np.pi * epoch / 50)), rel=1e-12)
    cfg = load_config(workspace / "base.yml", ["epochs=100", "optim.lr=1e-5", "promptiqa.cosine_period=50"])
    assert stage.lr_at(cfg, 50) == pytest.approx(1e-5) and stage.lr_at(cfg, 75) == pytest.approx(stage.lr_at(cfg, 25))


def test_cosine_tmax_climbs_back_as_pytorchs_cosine_annealing(workspace):
    """lr_schedule: cosine_tmax is CosineAnnealingLR(T_max=50) stepped once per epoch: down to min_lr over 50 epochs,
    then back up (cosine_restart jumps back to lr at epoch 50)."""
    cfg = load_config(workspace / "base.yml", ["epochs=100", "optim.lr=1e-5", "optim.min_lr=1e-7",
                                               "promptiqa.cosine_period=50", "promptiqa.lr_schedule=cosine_tmax"])
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=1e-7)
    for epoch in range(100):
        assert stage.lr_at(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    assert stage.lr_at(cfg, 50) == pytest.approx(1e-7) and stage.lr_at(cfg, 75) > stage.lr_at(cfg, 60)
    restart = load_config(workspace / "base.yml", ["epochs=100", "optim.lr=1e-5", "optim.min_lr=1e-7",
                                                   "promptiqa.cosine_period=50"])
    assert restart.promptiqa.lr_schedule == "cosine_restart" and stage.lr_at(restart, 50) == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(workspace / "base.yml", ["promptiqa.lr_schedule=cosine"])


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def recorded(workspace):
    """One epoch with every call of the training forward recorded (its images, prompt scores and predictions)."""
    calls = []
    original = PromptedIQA.score_leave_one_out

    def spy(self, images, scores):
        pred = original(self, images, scores)
        calls.append((images.detach().clone(), torch.as_tensor(scores).detach().clone(), pred.detach().clone()))
        return pred

    mp = pytest.MonkeyPatch()
    mp.setattr(PromptedIQA, "score_leave_one_out", spy)
    try:
        result = run_stage(workspace, "aug", "promptiqa.scale_p=0.5", "promptiqa.flip_p=0.5", "epochs=1")
    finally:
        mp.undo()
    return result, calls


def test_stage_applies_label_augmentation_to_prompts_and_targets_together(workspace, recorded):
    """Every chunk's prompt scores are its labels after the chunk's draw of random scaling and flipping, stay in
    [0, 1], and are also the targets: each step's loss is the L1 between the predictions and those same scores."""
    result, calls = recorded
    cfg = load_config(workspace / "base.yml", ["promptiqa.scale_p=0.5", "promptiqa.flip_p=0.5"])
    sets = [build_dataset(e, "train") for e in cfg.data]
    plan = stage.ChunkPlan([len(d) for d in sets], 11, 2, cfg.seed)
    labels = np.concatenate([d.labels for d in sets])
    chunks = plan.chunks(0)
    assert len(calls) == 2 * plan.steps_per_epoch
    kinds = set()
    for pos, (_, scores, _) in enumerate(calls):
        original = torch.as_tensor(labels[chunks[pos]], dtype=torch.float32)
        aug = draw_label_augment(original, 0.5, 0.5, stage.chunk_generator(cfg.seed, 0, pos))
        assert_close(scores, aug.apply(original), rtol=0, atol=1e-7)
        assert float(scores.min()) >= 0 and float(scores.max()) <= 1
        kinds.add((aug.scale != 1.0, aug.flip))
    assert len(kinds) >= 3  # scaled, flipped and untouched chunks all occurred
    for step, loss in enumerate(result["step_losses"]):
        pair = calls[2 * step : 2 * step + 2]
        expected = np.mean([float(F.l1_loss(pred, scores)) for _, scores, pred in pair])
        assert loss == pytest.approx(expected, rel=1e-5)


def test_shared_label_draw_gives_every_chunk_of_a_step_the_same_draw(workspace, monkeypatch):
    """promptiqa.label_draw: step (the official code): every chunk of a step starts from the same random state, so
    each chunk's scale divisor is c = max S + u (1 - max S) with one u per step, and the flips agree."""
    calls = []
    original = PromptedIQA.score_leave_one_out

    def spy(self, images, scores):
        calls.append(torch.as_tensor(scores).detach().clone())
        return original(self, images, scores)

    monkeypatch.setattr(PromptedIQA, "score_leave_one_out", spy)
    run_stage(workspace, "shared_draw", "promptiqa.scale_p=0.5", "promptiqa.flip_p=0.5", "promptiqa.label_draw=step",
              "max_steps_per_epoch=6")
    cfg = load_config(workspace / "base.yml", ["promptiqa.scale_p=0.5", "promptiqa.flip_p=0.5"])
    sets = [build_dataset(e, "train") for e in cfg.data]
    plan = stage.ChunkPlan([len(d) for d in sets], 11, 2, cfg.seed)
    labels, chunks = np.concatenate([d.labels for d in sets]), plan.chunks(0)
    draws = set()
    for step in range(6):
        augs = []
        for pos in (2 * step, 2 * step + 1):
            raw = torch.as_tensor(labels[chunks[pos]], dtype=torch.float32)
            aug = draw_label_augment(raw, 0.5, 0.5, stage.step_generator(cfg.seed, 0, step))
            assert_close(calls[pos], aug.apply(raw), rtol=0, atol=1e-7)
            top = float(raw.max())
            augs.append((aug.flip, aug.scale != 1.0, (aug.scale - top) / (1 - top) if aug.scale != 1.0 else None))
        assert augs[0][:2] == augs[1][:2]  # one draw for the step: scaled and flipped alike
        if augs[0][2] is not None:
            assert augs[0][2] == pytest.approx(augs[1][2], abs=1e-6)  # the same u
        draws.add(augs[0][:2])
    assert len(draws) >= 2


def test_stage_flips_training_images_upside_down(workspace, recorded):
    _, calls = recorded
    cfg = load_config(workspace / "base.yml")
    sets = [stage.WholeImages(build_dataset(e, "train"), 48) for e in cfg.data]
    flat = [img for d in sets for img in (d[i]["img"] for i in range(len(d)))]
    plan = stage.ChunkPlan([len(d) for d in sets], 11, 2, cfg.seed)
    images, _, _ = calls[0]
    loaded = torch.stack([flat[i] for i in plan.chunks(0)[0]])
    same = [bool(torch.equal(images[k], loaded[k])) for k in range(11)]
    flipped = [bool(torch.equal(images[k], loaded[k].flip(-2))) for k in range(11)]
    assert all(s or f for s, f in zip(same, flipped, strict=True)) and any(flipped) and any(same)


def test_stage_results_tables_and_requirements(workspace):
    reqs = ('promptiqa.requirements=[{name: req_inverted, source: synth_natural, invert: true}, '
            '{name: req_only_blur, source: synth_natural, weights: {blur: 1.0}}]')
    r = run_stage(workspace, "full", "epochs=2", "promptiqa.inverted_isps=true", reqs)
    folder = Path(r["run_dir"])
    assert r["finished"] and r["final"]["epoch"] == 2 and r["best"] is not None
    assert set(r["final"]["datasets"]) == {*NAMES, "req_inverted", "req_only_blur"}
    assert r["parameters"]["trainable"] == r["parameters"]["total"] == gamma.create_model(
        "promptiqa_test").num_parameters()
    rows = r["final"]["adaptation"]
    (label,) = rows
    assert label.startswith("PromptIQA") and set(rows[label]) == {"isps", "inverted_isps"}
    assert rows[label]["isps"]["req_inverted"]["srcc"] == pytest.approx(r["final"]["datasets"]["req_inverted"]["srcc"])
    table = (folder / "adaptation.md").read_text()
    assert "req_only_blur" in table and "inverted" in table
    assert (folder / "table.md").is_file() and (folder / "best.pth").is_file()
    written = json.loads((folder / "results.json").read_text())
    assert written["isp"] == {"count": 10, "sampling": "interval", "draws": 1}
    with open(folder / "predictions_final" / "req_inverted.csv") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == r["final"]["datasets"]["req_inverted"]["n"]
    # The prompt of a held-out set comes from its training part: the requirement's labels there, interval-sampled.
    ev = stage.Evaluator.__new__(stage.Evaluator)
    ev.cfg = load_config(workspace / "base.yml")
    s = stage.EvalSet("req_inverted", None, build_dataset(
        {"name": "req_inverted", "root": "synth_natural", "meta_file": str(folder / "requirements/req_inverted.csv"),
         "split_file": "synth_natural/split.pkl", "mos_range": [0, 1], "kind": "custom"}, "train",
        data_root=str(workspace / "data")))
    picked = np.asarray(s.prompt_source.labels)[ev.prompt_rows(s, 0)]
    assert len(picked) == 10 and np.all(np.diff(picked) >= 0)
    assert picked[0] == min(s.prompt_source.labels) and picked[-1] == max(s.prompt_source.labels)


def test_stage_resume_repeats_the_uninterrupted_run(workspace, caplog):
    short = "max_steps_per_epoch=4"
    whole = run_stage(workspace, "whole", "epochs=2", short)
    run_stage(workspace, "split", "epochs=1", short)
    with caplog.at_level(logging.WARNING, logger="gamma.train"):  # a finished 1-epoch run extended: re-planned
        resumed = main(["-opt", str(workspace / "base.yml"), "name=split", "epochs=2", short, "--resume"])
    lr = stage.lr_at(load_config(workspace / "base.yml", ["epochs=2"]), 1)
    assert lr > 0 and "epochs 1 -> 2" in caplog.text and f"epoch 2 of 2 trains at lr {lr:.3g}" in caplog.text
    epochs = [json.loads(line) for line in (Path(resumed["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in epochs if r["kind"] == "epoch"] == pytest.approx([1e-3, lr], rel=1e-12)
    assert_close(resumed["step_losses"], whole["step_losses"][len(whole["step_losses"]) // 2 :], rtol=1e-5, atol=1e-7)
    a = read_checkpoint(Path(whole["run_dir"]) / "last.pth").state_dict
    b = read_checkpoint(Path(resumed["run_dir"]) / "last.pth").state_dict
    assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_sigint_mid_epoch_saves_and_resume_ends_as_the_uninterrupted_run(workspace, monkeypatch):
    """A real SIGINT inside a PromptIQA epoch: the run finishes the step, writes a resumable checkpoint and stops with
    a message naming it; --resume ends with the uninterrupted run's losses, weights and figures."""
    args = ["epochs=2", "max_steps_per_epoch=4", "eval.every=1"]
    whole = run_stage(workspace, "sig_whole", *args)
    with monkeypatch.context() as mp:
        interrupt_at(mp, 2)  # SIGINT while step 2 is logged: the loop stops after step 3, inside epoch 1
        with pytest.raises(TrainingInterrupted, match=r"stopped by SIGINT; resumable checkpoint: .*last\.pth"):
            run_stage(workspace, "sig_cut", *args)
    run_dir = workspace / "exp" / "sig_cut" / "split_1"
    progress = load_training_state(run_dir / "last.pth").extra["progress"]
    assert (progress["epoch"], progress["step_in_epoch"], progress["global_step"]) == (0, 3, 3)
    resumed = main(["-opt", str(workspace / "base.yml"), "name=sig_cut", *args, "--resume"])
    assert_close(resumed["step_losses"], whole["step_losses"][3:], rtol=1e-5, atol=1e-7)
    assert_close(read_checkpoint(run_dir / "last.pth").state_dict,
                 read_checkpoint(Path(whole["run_dir"]) / "last.pth").state_dict, rtol=1e-4, atol=1e-6)
    for kind in ("final", "best"):
        assert resumed[kind]["epoch"] == whole[kind]["epoch"]
        assert_close(resumed[kind]["mean"], whole[kind]["mean"], rtol=1e-4, atol=1e-5)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]  # epoch 1's evaluation is not lost


def test_best_epoch_by_srcc_plus_plcc_as_the_official_code(workspace):
    """eval.select_metric: srcc+plcc keeps the evaluation with the largest sum of SRCC + PLCC over datasets."""
    r = run_stage(workspace, "sel_sum", "epochs=3", "max_steps_per_epoch=3", "eval.every=1",
                  "eval.select_metric=srcc+plcc")
    evals = [h for h in r["history"] if h["kind"] == "eval"]
    sums = [sum(d["srcc"] + d["plcc"] for d in h["datasets"].values()) for h in evals]
    assert r["best"]["epoch"] == evals[int(np.argmax(sums))]["epoch"]
    assert r["selection"]["metric"] == "srcc+plcc"


def test_stage_refuses_bad_settings(workspace):
    with pytest.raises(ConfigError, match="whole number of chunks"):
        run_stage(workspace, "bad", "batch_size=20")
    with pytest.raises(ConfigError, match="no data or eval_data entry named 'nowhere'"):
        run_stage(workspace, "bad", "promptiqa.requirements=[{name: r, source: nowhere, invert: true}]")
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):  # labels outside [0, 1] cannot be prompt scores
        run_stage(workspace, "bad", "data.0.mos_range=[0, 50]", "data.0.range_check=warn")
    with pytest.raises(ConfigError, match="stage: promptiqa"):
        run_stage(workspace, "bad", "stage=gamma")
    with pytest.raises(ConfigError, match="needs a Gamma"):
        run_stage(workspace, "bad", "model.name=gamma_isp_test")


@pytest.mark.parametrize("setting", [["promptiqa.mapping=fit"], ["promptiqa.mapping=fit_all"],
                                     ["promptiqa.baselines=true", "promptiqa.gamma=nowhere.pth"]])
def test_too_few_isps_for_a_mapping_are_refused_before_anything_runs(workspace, setting):
    """A map fitted on fewer than gamma.adapt.MIN_PAIRS ISPs is refused when the options are checked: no run folder
    is made, nothing is trained or scored (the Gamma named is not even looked up)."""
    few = f"promptiqa.isp_count={MIN_PAIRS - 1}"
    with pytest.raises(ConfigError, match=f"promptiqa.isp_count: .*at least {MIN_PAIRS}.* has {MIN_PAIRS - 1}"):
        run_stage(workspace, "too_few_isps", few, *setting)
    assert not (workspace / "exp" / "too_few_isps").exists()
    stage.check_config(load_config(workspace / "base.yml", [f"promptiqa.isp_count={MIN_PAIRS}", *setting]))
    stage.check_config(load_config(workspace / "base.yml", [few]))  # PromptIQA alone takes any prompt size


# ------------------------------------------------------------------------------------------------ Gamma + ISP
@pytest.fixture(scope="module")
def gamma_file(workspace) -> Path:
    torch.manual_seed(3)
    model = gamma.create_model("gamma_test", vision={"image_size": 32, "patch_size": 8})
    return save_checkpoint(model, workspace / "gamma_test.pth")


def test_gamma_isp_is_a_listed_variant_with_a_frozen_gamma(gamma_file):
    assert {"gamma_isp", "gamma_isp_test"} <= set(list_models("gamma_isp")) <= set(list_models("all"))
    model = gamma.create_model("gamma_isp_test", gamma_weights=gamma_file)
    frozen = model.gamma.num_parameters()
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - frozen > 0
    assert all(not p.requires_grad for p in model.gamma.parameters())
    model.train()
    assert not model.gamma.training
    x = torch.rand(11, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.score_leave_one_out(x, torch.linspace(0, 1, 11)).sum().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_gamma_isp_trains_with_the_stage_and_keeps_gamma(workspace, gamma_file):
    reqs = "promptiqa.requirements=[{name: req_inverted, source: synth_natural, invert: true}]"
    r = run_stage(workspace, "isp", "model.name=gamma_isp_test", f"promptiqa.gamma={gamma_file}",
                  "promptiqa.baselines=true", "promptiqa.vflip_p=0", reqs)
    rows = r["final"]["adaptation"]
    baselines = (stage.GAMMA_AS_IS, stage.GAMMA_MAPPED, stage.GAMMA_MAPPED_ALL)
    assert set(rows) == {"Gamma + ISP (isp)", *baselines}
    for label in baselines:
        for variant in stage.PROMPT_VARIANTS:
            assert set(rows[label][variant]) == {*NAMES, "req_inverted"}
            for metrics in rows[label][variant].values():
                assert np.isfinite(metrics["srcc"]) and -1 <= metrics["srcc"] <= 1
    # Gamma as it is ignores the prompt: inverting the ISP scores changes nothing. Both maps follow the ISP scores:
    # fitted on 1 - s, they give 1 - (their map of s), so every SRCC changes sign.
    as_is = rows[stage.GAMMA_AS_IS]
    for name in (*NAMES, "req_inverted"):
        assert as_is["isps"][name]["srcc"] == as_is["inverted_isps"][name]["srcc"]
        for label in (stage.GAMMA_MAPPED, stage.GAMMA_MAPPED_ALL):
            assert rows[label]["inverted_isps"][name]["srcc"] == pytest.approx(-rows[label]["isps"][name]["srcc"],
                                                                               abs=1e-6)
    # The monotone map keeps Gamma's order (or reverses it): on the ISP scores as given (increasing) its SRCC is
    # Gamma's; ridge on all the outputs ranks the images anew.
    for name in (*NAMES, "req_inverted"):
        assert abs(rows[stage.GAMMA_MAPPED]["isps"][name]["srcc"]) == pytest.approx(abs(as_is["isps"][name]["srcc"]),
                                                                                    abs=1e-6)
    assert any(abs(rows[stage.GAMMA_MAPPED_ALL]["isps"][n]["srcc"] - rows[stage.GAMMA_MAPPED]["isps"][n]["srcc"])
               > 1e-3 for n in NAMES)
    saved = read_checkpoint(Path(r["run_dir"]) / "last.pth")
    original = read_checkpoint(gamma_file).state_dict
    assert_close({k: saved.state_dict[f"gamma.{k}"] for k in original}, original, rtol=0, atol=0)
    assert r["parameters"]["trainable"] < r["parameters"]["total"]
    table = (Path(r["run_dir"]) / "adaptation.md").read_text()
    for label in baselines:
        assert table.count(f"| {label} |") == 2


@pytest.mark.parametrize("mapping, label", [("fit", stage.GAMMA_MAPPED), ("fit_all", stage.GAMMA_MAPPED_ALL)])
def test_eval_only_gamma_with_a_fitted_mapping(workspace, gamma_file, mapping, label):
    """The run's own row with ``promptiqa.mapping`` is the baseline row of the same map for the same Gamma."""
    r = run_stage(workspace, f"gmap_{mapping}", "eval_only=true", "model.name=null", f"model.pretrained={gamma_file}",
                  f"promptiqa.mapping={mapping}", "promptiqa.inverted_isps=true", "promptiqa.baselines=true",
                  f"promptiqa.gamma={gamma_file}")
    rows = r["final"]["adaptation"]
    assert set(rows) == {f"{label} (gmap_{mapping})", stage.GAMMA_AS_IS, stage.GAMMA_MAPPED, stage.GAMMA_MAPPED_ALL}
    assert set(r["final"]["datasets"]) == set(NAMES)
    own = rows[f"{label} (gmap_{mapping})"]
    for variant in stage.PROMPT_VARIANTS:
        for name in NAMES:
            assert own[variant][name]["srcc"] == pytest.approx(rows[label][variant][name]["srcc"], rel=1e-12)
    assert r["final"]["datasets"]["synth_natural"]["srcc"] == pytest.approx(own["isps"]["synth_natural"]["srcc"],
                                                                            rel=1e-12)


def test_a_constant_prompt_gives_no_map_and_the_run_finishes(workspace, gamma_file, caplog):
    """ISP scores that are all equal (a requirement no picture fails) have no scale to map onto: each map gives every
    image the prompt's mean (SRCC undefined, '-' in the table) with a warning, and the run goes on."""
    flat = "promptiqa.requirements=[{name: req_flat, source: synth_natural, weights: {blur: 0.0}}]"
    r = run_stage(workspace, "gmap_flat", "eval_only=true", "model.name=null", f"model.pretrained={gamma_file}",
                  "promptiqa.mapping=fit_all", "promptiqa.baselines=true", f"promptiqa.gamma={gamma_file}", flat)
    rows = r["final"]["adaptation"]
    for label in (stage.GAMMA_MAPPED, stage.GAMMA_MAPPED_ALL, f"{stage.GAMMA_MAPPED_ALL} (gmap_flat)"):
        assert np.isnan(rows[label]["isps"]["req_flat"]["srcc"])
        assert np.isfinite(rows[label]["isps"]["synth_natural"]["srcc"])
    with open(Path(r["run_dir"]) / "predictions_final" / "req_flat.csv") as fh:
        assert {float(row["pred"]) for row in csv.DictReader(fh)} == {1.0}
    assert "every image gets the ISP scores' mean" in caplog.text
    table = (Path(r["run_dir"]) / "adaptation.md").read_text().splitlines()
    assert table[4] == "| method | synth_natural | synth_underwater | synth_aigc | req_flat |"
    mapped = [line for line in table if line.startswith(f"| {stage.GAMMA_MAPPED}")]
    assert len(mapped) == 6 and all(line.endswith(" | - |") for line in mapped)


def test_assessed_outputs_stack_gammas_outputs_for_predict(workspace, gamma_file):
    """predict() over AssessedOutputs gives (N, 11) rows in ADAPT_OUTPUTS['all'] order with the test-time crop
    protocol; its score column is predict()'s scores of the model itself, bit for bit (the same computation)."""
    model = gamma.create_model(pretrained=gamma_file).eval()
    model.set_crop_protocol(mode="random", num=3, seed=5)
    ds = build_dataset(load_config(workspace / "base.yml").data[0], "val")
    names = ADAPT_OUTPUTS["all"]
    rows = predict(stage.AssessedOutputs(model, names), ds, torch.device("cpu"), batch_size=5)
    scores = predict(model, ds, torch.device("cpu"), batch_size=5)
    assert rows.shape == (len(ds), len(names)) and scores.shape == (len(ds),)
    assert np.array_equal(rows[:, 0], scores)
    batch = torch.stack([ds[i]["img"] for i in range(3)])
    with torch.no_grad():
        a = model.assess(batch, ds.scenes[:3], attributes=True)
    expected = torch.stack([a.score, *a.distribution.unbind(-1), *(a.attributes[k] for k in names[6:])], dim=-1)
    assert_close(rows[:3], expected.double().numpy(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ requirements
def test_requirement_labels_from_distortions(workspace):
    cfg = load_config(workspace / "base.yml")
    source = cfg.data[0]
    dist = distortions_of(source.meta_path)
    blur = requirement_labels(RequirementCfg("b", "synth_natural", weights={"blur": 1.0}), source)
    for items, y in zip(dist, blur, strict=True):
        strength = sum(s for k, s in items if k == "blur")
        assert y == pytest.approx(1 - strength if strength else 1.0)
    ds = build_dataset(source, "val")
    inverted = write_requirement(RequirementCfg("inv", "synth_natural", invert=True), source, workspace / "req")
    held = build_dataset(inverted, "val")
    assert held.rows == ds.rows  # the source's split indexes the new file the same way
    assert_close(held.labels, 1 - ds.labels, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="weights, invert"):
        RequirementCfg("x", "synth_natural")


# ------------------------------------------------------------------------------------------------ weights
def test_vit_weights_load_timm_layout():
    model = gamma.create_model("promptiqa_test")
    timm_like = {k: torch.randn_like(v) for k, v in model.vit.state_dict().items()}
    timm_like |= {"norm.weight": torch.ones(16), "norm.bias": torch.zeros(16), "head.weight": torch.zeros(5, 16)}
    load_vit_weights(model, timm_like)
    assert torch.equal(model.vit.pos_embed, timm_like["pos_embed"])
    del timm_like["blocks.0.attn.qkv.weight"]
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
        load_vit_weights(model, timm_like)


# ------------------------------------------------------------------------------------------------ option files
def test_option_files_resolve(monkeypatch):
    monkeypatch.setenv("PROMPTIQA_WEIGHTS", "promptiqa_paper_12.pth")
    files = sorted((REPO / "options" / "promptiqa").glob("*.yml"))
    assert len(files) >= 17
    for f in files:
        load_config(f)
    six = load_config(REPO / "options/promptiqa/official_6.yml")
    assert six.stage == "promptiqa" and six.epochs == 50 and six.batch_size == 44 == 4 * six.promptiqa.chunk
    assert (six.optim.lr, six.optim.weight_decay, six.seed) == (1e-5, 1e-5, 2024)
    assert [e.name for e in six.data] == ["spaq", "csiq", "livec", "koniq10k", "kadid10k", "live"]
    scale = {e.name: (tuple(e.mos_range), e.lower_better) for e in six.data}
    assert scale["live"] == ((1.0, 101.0), False) and scale["csiq"] == ((0.0, 1.0), False)  # DMOS not flipped
    assert scale["kadid10k"] == ((1.0, 6.0), False) and scale["livec"] == ((1.0, 101.0), False)
    twelve = load_config(REPO / "options/promptiqa/paper_12.yml")
    assert (len(twelve.data), twelve.epochs, twelve.batch_size) == (12, 100, 66)
    no_flip = load_config(REPO / "options/promptiqa/ablation_no_scale_flip.yml")
    assert (no_flip.promptiqa.scale_p, no_flip.promptiqa.flip_p, len(no_flip.eval_data)) == (0.0, 0.0, 6)
    rand = load_config(REPO / "options/promptiqa/table4_random.yml")
    assert rand.eval_only and rand.promptiqa.isp_sampling == "random" and rand.promptiqa.isp_draws == 10
    assert load_config(REPO / "options/promptiqa/isp_count_3.yml").promptiqa.isp_count == 3


# ------------------------------------------------------------------------------------------------ fr_labels.py
def test_fr_labels_script_writes_ssim_labels(tmp_path):
    import pyiqa
    import skimage.data
    from PIL import Image, ImageFilter

    refs = {"a.png": skimage.data.astronaut(), "c.png": skimage.data.chelsea()}
    rows = []
    (tmp_path / "ref").mkdir()
    (tmp_path / "dist").mkdir()
    for ref, arr in refs.items():
        img = Image.fromarray(arr).resize((64, 64))
        img.save(tmp_path / "ref" / ref)
        for level in (1, 2, 3):
            name = f"{ref[0]}_{level}.png"
            img.filter(ImageFilter.GaussianBlur(level)).save(tmp_path / "dist" / name)
            rows.append((ref, name, 5 - level))
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("ref_name", "dist_name", "mos"), *rows])
    script = REPO / "scripts" / "fr_labels.py"
    done = subprocess.run([sys.executable, str(script), "--dataset", "toy", "--metric", "ssim", "--root", "dist",
                           "--meta", "meta.csv", "--ref_root", "ref", "--out", "ssim.csv", "--data_root",
                           str(tmp_path)], capture_output=True, text=True, env={**os.environ}, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "ssim.csv") as fh:
        out = list(csv.reader(fh))
    assert out[0] == ["ref_name", "dist_name", "ssim", "mos"]
    assert [(r[0], r[1]) for r in out[1:]] == [(a, b) for a, b, _ in rows]
    metric = pyiqa.create_metric("ssim", device="cpu")
    for ref, dist, value, _ in out[1:3]:
        direct = float(metric(str(tmp_path / "dist" / dist), str(tmp_path / "ref" / ref)).item())
        assert float(value) == pytest.approx(direct, abs=2e-6)
    assert float(out[1][2]) > float(out[2][2]) > float(out[3][2])  # more blur, lower SSIM


def test_tiny_run_matches_the_recorded_reference(workspace):
    """A 3-epoch PromptIQA run gives the figures recorded when the stage had its own loop
    (tests/data/loop_reference.json; the shared loop reproduced them bit for bit on the recording machine)."""
    from test_train import check_against_reference

    recorded = json.loads((REPO / "tests" / "data" / "loop_reference.json").read_text())["promptiqa"]
    check_against_reference(run_stage(workspace, "reference_3", "epochs=3", "eval.every=1", "max_steps_per_epoch=4"),
                            recorded)


# ------------------------------------------------------------------------------------------------ Tables 5 and 6
@pytest.fixture(scope="module")
def promptiqa_file(workspace) -> Path:
    torch.manual_seed(4)
    return save_checkpoint(gamma.create_model("promptiqa_test"), workspace / "promptiqa_test.pth")


def _predictions(result: dict) -> dict[str, list[float]]:
    out = {}
    for f in sorted((Path(result["run_dir"]) / "predictions_final").glob("*.csv")):
        with open(f) as fh:
            out[f.stem] = [float(row["pred"]) for row in csv.DictReader(fh)]
    return out


def test_table5_prompt_strategies_at_toy_size(workspace, promptiqa_file, monkeypatch):
    """Each Table 5 option file's prompt strategy, on a tiny model and the synthetic sets: random ISP images, random
    ISP scores, both (each changes every set's scores, reproducibly from promptiqa.isp_seed), and inversion."""
    monkeypatch.setenv("PROMPTIQA_WEIGHTS", str(promptiqa_file))
    toy = ["eval_only=true", "model.name=null", f"model.pretrained={promptiqa_file}"]
    standard = _predictions(run_stage(workspace, "t5_standard", *toy))
    for what in ("images", "scores", "both"):
        shipped = load_config(REPO / "options" / "promptiqa" / f"table5_random_{what}.yml")
        assert shipped.eval_only and shipped.eval.datasets == ["tid2013", "koniq10k", "gfiqa20k", "agiqa3k", "uwiqa"]
        assert shipped.promptiqa.isp_random == what
        setting = f"promptiqa.isp_random={what}"
        r = _predictions(run_stage(workspace, f"t5_{what}", *toy, setting))
        assert set(r) == set(standard) == set(NAMES)
        for name in NAMES:
            assert not np.allclose(r[name], standard[name], rtol=0, atol=1e-7), (what, name)
        again = _predictions(run_stage(workspace, f"t5_{what}_again", *toy, setting))
        assert again == r
    inverted = load_config(REPO / "options" / "promptiqa" / "table5_inverted.yml")
    assert inverted.promptiqa.inverted_isps and inverted.promptiqa.isp_random == "none"
    r = run_stage(workspace, "t5_inverted", *toy, "promptiqa.inverted_isps=true")
    assert set(r["final"]["adaptation"]["PromptIQA (t5_inverted)"]) == set(stage.PROMPT_VARIANTS)


def test_table6_without_mixed_training_at_toy_size(workspace):
    """Table 6, w/o mixed training: one dataset trained and tested (ablation_single_dataset.yml, one data entry and
    the reconstituted requirements); at toy size, chunks come from that dataset only."""
    shipped = load_config(REPO / "options" / "promptiqa" / "ablation_single_dataset.yml")
    assert [e.name for e in shipped.data] == ["koniq10k"] and len(shipped.eval_data) == 6
    assert shipped.stage == "promptiqa" and not shipped.eval_only
    one = load_config(workspace / "base.yml").data[0].to_dict()
    r = run_stage(workspace, "t6_single", f"data=[{json.dumps(one)}]", "max_steps_per_epoch=3")
    assert r["finished"] and set(r["final"]["datasets"]) == {NAMES[0]} and r["global_step"] == 3


def test_table6_without_prompt_at_toy_size(workspace):
    """Table 6, w/o prompt (table6_no_prompt.yml): a PromptIQA without prompt encoder and fusion, the visual feature
    straight into the regression; it trains in the stage, and its scores do not depend on the prompt."""
    shipped = load_config(REPO / "options" / "promptiqa" / "table6_no_prompt.yml")
    assert shipped.model.overrides == {"no_prompt": True} and len(shipped.eval_data) == 6
    assert (shipped.promptiqa.scale_p, shipped.promptiqa.flip_p, len(shipped.data)) == (0.0, 0.0, 12)
    r = run_stage(workspace, "t6_no_prompt", "model.overrides={no_prompt: true}", "max_steps_per_epoch=3")
    assert r["finished"] and r["global_step"] == 3 and set(r["final"]["datasets"]) == set(NAMES)
    run_dir = Path(r["run_dir"])
    keys = read_checkpoint(run_dir / "last.pth").state_dict
    prompt_path = ("i_p_fusion.", "mlp.", "prompt_fusion.", "blocks.")
    assert not [k for k in keys if k.startswith(prompt_path)] and "score_block.0.weight" in keys
    model = gamma.create_model(None, pretrained=run_dir / "last.pth").eval()
    full = gamma.create_model("promptiqa_test").eval()
    assert model.config.no_prompt and model.num_parameters() < full.num_parameters()
    gen = torch.Generator().manual_seed(0)
    x, p = torch.rand(3, 3, 48, 48, generator=gen), torch.rand(4, 3, 48, 48, generator=gen)
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(plain, model.regress(model.image_features(model.preprocess(x))))
        for scores in ([0.1, 0.2, 0.3, 0.9], [0.9, 0.8, 0.0, 1.0]):
            assert torch.equal(model(x, prompt=(p, scores)), plain)
        assert model.encode_prompt(p, [0.1, 0.2, 0.3, 0.9]).shape == (4, 0)
        # the full model does read its prompt (so the comparison above is not vacuous)
        assert not torch.equal(full(x, prompt=(p, [0.1, 0.2, 0.3, 0.9])), full(x, prompt=(p, [0.9, 0.8, 0.0, 1.0])))
        with pytest.raises(ValueError, match="prompt must be"):
            full(x)
    # Evaluated by the stage's test protocol: random ISP scores change nothing.
    toy = ["eval_only=true", "model.name=null", f"model.pretrained={run_dir / 'last.pth'}"]
    standard = _predictions(run_stage(workspace, "t6_no_prompt_eval", *toy))
    assert _predictions(run_stage(workspace, "t6_no_prompt_random", *toy, "promptiqa.isp_random=scores")) == standard


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_two_process_ddp_trains_what_one_process_trains(workspace):
    """Two gloo processes, one chunk each per step, follow the one-process run with two chunks per step: the same
    chunks and augmentation, each chunk its own forward (BatchNorm over one chunk), gradients averaged."""
    args = ["-opt", str(workspace / "base.yml"), "max_steps_per_epoch=4", "model.overrides.drop=0.0"]
    one = main([*args, "name=one_proc"])
    launch_ddp(2, [[*args, "name=two_proc"]])
    two = json.loads((workspace / "exp" / "two_proc" / "split_1" / "results.json").read_text())
    assert_close(two["step_losses"], one["step_losses"], rtol=1e-4, atol=1e-6)
    assert set(two["final"]["datasets"]) == set(NAMES)
