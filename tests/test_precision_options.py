"""The precision option through every door: converted files, Scorer, `gamma score`, the pyiqa metric, training's
eval.precision. The model's own reduced-precision arithmetic is tested in test_precision.py.

Where a test needs bf16 to count as fast, the CPU flags are patched (bf16 runs on every x86 CPU, only more slowly
without AVX512-BF16 or AMX), so the tests pass on any CPU; int8 needs no flag.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyiqa
import pytest
import torch
import yaml
from PIL import Image

import gamma
from gamma.archs import precision as prec
from gamma.cli import main
from gamma.data import make_splits, save_splits
from gamma.scorer import Scorer
from gamma.train.config import ConfigError
from gamma.train.main import main as train_main
from gamma.weights import read_checkpoint, release_state_dict, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
NO_FAST_FLOAT = frozenset({"avx2", "fma"})  # a CPU without bf16 / fp16 hardware
BF16_CPU = frozenset({"avx2", "avx512_bf16"})


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(prec, "cpu_flags", lambda: NO_FAST_FLOAT)


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(prec, "cpu_flags", lambda: BF16_CPU)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model saved in the release layout, and its `gamma convert --precision bf16` file."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test")
    release = folder / "Gamma.pth"
    torch.save(release_state_dict(model), release)
    half = folder / "Gamma-bf16.safetensors"
    assert main(["convert", str(release), str(half), "--precision", "bf16"]) == 0
    return release, half


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 224, 256, generator=torch.Generator().manual_seed(5))


def _scores(model: gamma.GammaModel, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(images)


# ------------------------------------------------------------------------------------------------ converted files
def test_a_bf16_file_where_bf16_is_slow_computes_in_fp32_and_says_so(weights, images, cpu_without_bf16, caplog):
    release, half = weights
    with caplog.at_level(logging.WARNING, logger="gamma.factory"):
        model = gamma.create_model(pretrained=half)
    assert model.precision == "fp32"
    assert "would run slower than fp32 here" in caplog.text and "avx512_bf16" in caplog.text
    assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32 = _scores(gamma.create_model(pretrained=release), images)
    got = _scores(model, images)
    assert not torch.equal(got, fp32)  # the stored weights are the rounded ones
    assert torch.allclose(got, fp32, rtol=0, atol=0.05 * float(fp32.abs().max()))
    with pytest.raises(ValueError, match="slower than fp32"):  # asked for explicitly: an error, as to_precision's
        gamma.create_model(pretrained=half, precision="bf16")


def test_a_bf16_file_in_another_precision_starts_from_its_rounded_weights(weights, images, caplog):
    release, half = weights
    with caplog.at_level(logging.WARNING, logger="gamma.factory"):
        model = gamma.create_model(pretrained=half, precision="int8")
    assert model.precision == "int8"
    assert "rounded to bf16" in caplog.text
    fp32 = _scores(gamma.create_model(pretrained=release), images)
    assert torch.allclose(_scores(model, images), fp32, rtol=0, atol=0.05 * float(fp32.abs().max()))


def test_save_safetensors_records_the_model_precision(tmp_path, cpu_with_bf16):
    model = gamma.create_model("gamma_test", precision="bf16")
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    ckpt = read_checkpoint(path)
    assert ckpt.extra["precision"] == "bf16"
    assert gamma.create_model(pretrained=path).precision == "bf16"
    int8 = save_checkpoint(gamma.create_model("gamma_test", precision="int8"), tmp_path / "q.safetensors")
    assert read_checkpoint(int8).extra["precision"] == "fp32"  # its float weights are what is stored
    with pytest.raises(ValueError, match="Gamma models"):
        gamma.create_model("promptiqa_test", precision="bf16")


# ------------------------------------------------------------------------------------------------ Scorer and CLI
def test_scorer_takes_the_precision(images, cpu_with_bf16):
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test")
    fp32 = Scorer(model=model, device="cpu").score(images)["score"].to_numpy()
    quantized = Scorer(model="gamma_test", precision="int8", device="cpu")
    assert quantized.model.precision == "int8"
    torch.manual_seed(0)
    same = Scorer(model=gamma.create_model("gamma_test"), precision="int8", device="cpu")
    got = same.score(images)["score"].to_numpy()
    assert not np.array_equal(got, fp32)
    np.testing.assert_allclose(got, fp32, rtol=0, atol=0.05 * np.abs(fp32).max())
    assert Scorer(model=model, precision="auto", device="cpu").model.precision == "bf16"  # model converted


def test_scorer_refuses_a_precision_the_device_runs_slowly(cpu_without_bf16):
    with pytest.raises(ValueError, match="slower than fp32"):
        Scorer(model="gamma_test", precision="fp16", device="cpu")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee"):
        img = Image.fromarray(getattr(data, name)())
        img.thumbnail((256, 256))
        img.save(root / f"{name}.png")
    return root


def _csv_scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as fh:
        return {row["name"]: float(row["score"]) for row in csv.DictReader(fh)}


def test_gamma_score_precision(photo_dir, tmp_path, capsys, cpu_with_bf16):
    common = ["score", str(photo_dir), "--model", "gamma_test", "--device", "cpu", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "fp32.csv")]) == 0
    assert main([*common, "--precision", "bf16", "--out", str(tmp_path / "bf16.csv")]) == 0
    fp32, bf16 = _csv_scores(tmp_path / "fp32.csv"), _csv_scores(tmp_path / "bf16.csv")
    assert fp32.keys() == bf16.keys() and len(fp32) == 3
    assert fp32 != bf16
    assert all(abs(bf16[k] - v) <= 0.05 * abs(v) for k, v in fp32.items())


def test_gamma_score_precision_errors_are_usage_errors(photo_dir, capsys, cpu_without_bf16):
    common = ["score", str(photo_dir), "--model", "gamma_test", "--device", "cpu", "--no-progress"]
    assert main([*common, "--precision", "bf16"]) == 2
    assert "slower than fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--precision", "fp8"])  # not a choice


@pytest.mark.slow
def test_torchrun_sharded_scoring_applies_the_precision_in_every_process(photo_dir, tmp_path):
    common = ["score", str(photo_dir), "--model", "gamma_test", "--device", "cpu", "--no-progress", "--precision",
              "int8"]
    assert main([*common, "--out", str(tmp_path / "one.csv")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gamma", *common,
           "--out", str(tmp_path / "two.csv")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "in 2 processes" in result.stderr
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()  # int8 in both processes
    assert main(["score", str(photo_dir), "--model", "gamma_test", "--device", "cpu", "--no-progress", "--out",
                 str(tmp_path / "fp32.csv")]) == 0
    assert _csv_scores(tmp_path / "fp32.csv") != _csv_scores(tmp_path / "one.csv")


# ------------------------------------------------------------------------------------------------ pyiqa
def test_pyiqa_metric_option(images, cpu_with_bf16):
    kwargs = {"model_name": "gamma_test", "pretrained": False, "device": "cpu"}
    torch.manual_seed(0)
    fp32 = pyiqa.create_metric("gamma", **kwargs)
    torch.manual_seed(0)
    quantized = pyiqa.create_metric("gamma", precision="int8", **kwargs)
    with torch.inference_mode():
        want, got = fp32(images).squeeze(1), quantized(images).squeeze(1)
    assert quantized.net.net.precision == "int8"  # applied at the first call, on the device pyiqa moved it to
    assert not torch.equal(got, want)
    assert torch.allclose(got, want, rtol=0, atol=0.05 * float(want.abs().max()))
    auto = pyiqa.create_metric("gamma", precision="auto", **kwargs)
    with torch.inference_mode():
        auto(images[:1])
    assert auto.net.net.precision == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        pyiqa.create_metric("gamma", precision="fp8", **kwargs)


def test_pyiqa_metric_on_a_bf16_file(weights, cpu_with_bf16):
    _, half = weights
    metric = pyiqa.create_metric("gamma", pretrained_model_path=str(half), device="cpu")
    assert metric.net.net.precision == "bf16"  # as stored
    # Another precision than the file's: loaded again from the file for it (its fp32 weights are gone).
    metric = pyiqa.create_metric("gamma", pretrained_model_path=str(half), precision="int8", device="cpu")
    with torch.inference_mode():
        metric(torch.rand(1, 3, 224, 224))
    assert metric.net.net.precision == "int8"


# ------------------------------------------------------------------------------------------------ training
def _write_dataset(folder: Path, n: int, seed: int) -> None:
    """n small pictures whose noise sets the MOS (0..100), a CSV meta file and a 10-split pickle."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        quality = i / (n - 1)
        ramp = np.linspace(0.2, 1, 64)[None, :, None] * rng.uniform(0.3, 1, 3)
        img = np.clip(ramp + rng.normal(0, 0.4 * (1 - quality), (48, 64, 3)), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / "img" / f"{i:02d}.png")
        rows.append((f"{i:02d}.png", f"{100 * quality:.3f}"))
    with open(folder / "meta.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "mos"), *rows])
    save_splits(make_splits(n, seed=seed), folder / "split.pkl")


@pytest.fixture(scope="module")
def train_options(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    _write_dataset(root / "data" / "alpha", 16, seed=1)
    options = {
        "output_dir": str(root / "runs"), "epochs": 1, "batch_size": 4, "workers": 0, "device": "cpu",
        "model": {"name": "gamma_test"}, "optim": {"lr": 1e-3}, "data_root": str(root / "data"),
        "data": [{"name": "alpha", "root": "alpha/img", "meta_file": "alpha/meta.csv",
                  "split_file": "alpha/split.pkl", "mos_range": [0, 100]}],
        "eval": {"crops": 2, "at_start": True},
        "log": {"every_steps": 1, "progress": False, "tensorboard": False},
    }
    path = root / "base.yml"
    path.write_text(yaml.safe_dump(options, sort_keys=False))
    return path


def _history(run_dir: Path) -> list[dict]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "eval"]


def test_eval_precision_scores_a_converted_copy_and_leaves_training_alone(train_options, cpu_with_bf16):
    runs = train_options.parent / "runs"
    train_main(["-opt", str(train_options), "name=fp32"])
    train_main(["-opt", str(train_options), "name=bf16", "eval.precision=bf16"])
    a, b = (runs / name / "split_1" for name in ("fp32", "bf16"))
    # Training is untouched: the same fp32 weights, bit for bit, after evaluations at the start and after the epoch.
    wa, wb = read_checkpoint(a / "last.pth").state_dict, read_checkpoint(b / "last.pth").state_dict
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(v.dtype == torch.float32 for v in wb.values() if v.is_floating_point())
    ha, hb = _history(a), _history(b)
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb] == [0, 1]
    for ra, rb in zip(ha, hb, strict=True):
        assert abs(ra["mean"]["plcc"] - rb["mean"]["plcc"]) < 0.05
    assert ha[-1]["mean"] != hb[-1]["mean"]  # the bf16 copy did score: not the identical fp32 figures


def test_eval_precision_is_checked_before_training(train_options, cpu_without_bf16):
    with pytest.raises(ConfigError, match="eval.precision: precision 'bf16' would run slower than fp32"):
        train_main(["-opt", str(train_options), "name=slow", "eval.precision=bf16"])
    assert not (train_options.parent / "runs" / "slow" / "split_1" / "last.pth").exists()
    with pytest.raises(ConfigError, match="eval.precision"):
        train_main(["-opt", str(train_options), "name=bad", "eval.precision=fp8"])
