"""The paths a CUDA run takes that a CPU can check: collectives every rank reaches (checkpoints under DDP), one
process group for chained stages, per-rank RNG state without touching CUDA, the device each torchrun rank takes,
device contexts at model creation, evaluation precision. GPU-only variants are marked ``cuda`` (tests/conftest.py
skips them where CUDA is absent; scripts/gpu_check.py runs them on a GPU machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import launch_ddp, write_noise_dataset

from gamma.train.checkpoint import load_training_state


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda_paths")
    write_noise_dataset(root / "data", "alpha", 16, 0, 100, seed=1, size=(64, 64))
    options = {
        "name": "tiny", "output_dir": str(root / "runs"), "epochs": 2, "batch_size": 4, "workers": 0,
        "device": "cpu", "model": {"name": "gamma_test_sdp"}, "optim": {"lr": 1e-3}, "max_steps_per_epoch": 2,
        "data_root": str(root / "data"),
        "data": [{"name": "alpha", "root": "alpha/img", "meta_file": "alpha/meta.csv",
                  "split_file": "alpha/split.pkl", "mos_range": [0, 100]}],
        "eval": {"crops": 2},
        "log": {"every_steps": 1, "progress": False, "tensorboard": False},
    }
    (root / "base.yml").write_text(yaml.safe_dump(options, sort_keys=False))
    return root


@pytest.mark.slow
def test_two_process_keep_epochs_and_every_steps_finish(workspace):
    """Every rank reaches the checkpoints' collectives: with ``checkpoint.keep_epochs`` (saved on rank 0 only, the
    other rank waited at the next collective forever) and with ``checkpoint.every_steps``. Each checkpoint holds
    every rank's RNG state."""
    base = ["-opt", str(workspace / "base.yml")]
    launch_ddp(2, [[*base, "name=keep", "checkpoint.keep_epochs=true", "checkpoint.every_steps=1"]], timeout=150)
    run_dir = workspace / "runs" / "keep" / "split_1"
    assert json.loads((run_dir / "results.json").read_text())["finished"]
    for name in ("epoch_001.pth", "epoch_002.pth", "last.pth"):
        ckpt = load_training_state(run_dir / name)
        per_rank = ckpt.extra["rng_per_rank"]
        assert len(per_rank) == 2 and all(s["cuda"] == [] for s in per_rank)  # CPU run: no CUDA state
