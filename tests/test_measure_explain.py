"""scripts/measure_explain.py: its figures against the same quantities computed directly from the model."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import gamma
from gamma.data import build_dataset
from gamma.data.synthetic import generate
from gamma.metrics import evaluate_scores
from gamma.train.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    generate(root / "data", size=32, num_contents=10, versions=2)
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test_sdp", vision={"image_size": 32, "patch_size": 8})
    gamma.save_checkpoint(model, root / "sdp.pth")
    return root


def test_figures_match_a_direct_computation(setup):
    root = setup
    overrides = [f"data_root={root / 'data'}", "eval.crops=2"]
    script = runpy.run_path(str(REPO / "scripts" / "measure_explain.py"))
    assert script["main"](["-opt", str(REPO / "options" / "demo_gamma_sdp.yml"), "--checkpoint",
                           str(root / "sdp.pth"), "--json", str(root / "out.json"), *overrides]) == 0
    out = json.loads((root / "out.json").read_text())
    cfg = load_config(REPO / "options" / "demo_gamma_sdp.yml", overrides)
    model = gamma.create_model(None, pretrained=root / "sdp.pth").eval()
    model.set_crop_protocol(mode=cfg.eval.crop_mode, num=cfg.eval.crops, seed=cfg.eval.crop_seed)
    pooled_std, pooled_err = [], []
    for entry in cfg.data:
        ds = build_dataset(entry, "val")
        x = torch.stack([ds[i]["img"] for i in range(len(ds))])
        labels = np.asarray(ds.labels, dtype=np.float64)
        with torch.no_grad():
            named = model.assess(x, scene=entry.scene)
            auto = model.assess(x, scene="auto")
        row = out["datasets"][entry.name]
        score = named.score.double().numpy()
        assert row["n"] == len(ds) == 4  # 2 of 10 sources held out, 2 versions each
        assert row["named"]["srcc"] == pytest.approx(evaluate_scores(score, labels)["srcc"], abs=1e-9)
        assert row["auto"]["srcc"] == pytest.approx(evaluate_scores(auto.score.numpy(), labels)["srcc"], abs=1e-9)
        assert row["scene_accuracy"] == pytest.approx(np.mean([s == entry.scene for s in auto.scenes]))
        err = np.abs(score - labels)
        std = named.std.double().numpy()
        assert row["std_vs_abs_error"]["spearman"] == pytest.approx(stats.spearmanr(std, err).statistic, abs=1e-6)
        pooled_std.extend(std)
        pooled_err.extend(err)
    pooled = out["datasets"]["all (pooled)"]
    assert pooled["n"] == 12
    assert pooled["std_vs_abs_error"]["pearson"] == pytest.approx(stats.pearsonr(pooled_std, pooled_err).statistic,
                                                                  abs=1e-6)
    assert out["scenes_present"] == ["natural", "aigc", "underwater"]
