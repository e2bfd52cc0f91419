"""The adaptation demo chain (options/demo_adapt.yml) at toy size: synthetic data -> CLIP pretraining -> Gamma ->
PromptIQA and Gamma + ISP trained with PromptIQA's recipe -> the adaptation table on new requirements."""

from pathlib import Path

import pytest

from gamma.train import promptiqa as stage
from gamma.train.config import load_config
from gamma.train.main import main

REPO = Path(__file__).resolve().parents[1]

# The demo's option files, shrunk as tests/test_demo.py shrinks options/demo.yml.
TINY = [
    "pretrain.synthetic.size=32", "pretrain.synthetic.num_contents=40", "pretrain.synthetic.versions=4",
    "model.overrides.embed_dim=32", "model.overrides.vision.width=32", "model.overrides.vision.layers=2",
    "model.overrides.vision.heads=1", "model.overrides.vision.image_size=32", "model.overrides.vision.patch_size=8",
    "model.overrides.text.width=32", "model.overrides.text.layers=2", "model.overrides.text.heads=1",
    *(f"data.{i}.crop_size=32" for i in range(3)), "epochs=2", "batch_size=32", "log.progress=false",
]
THEN = ('pretrain.then=["options/demo_gamma.yml name=demo_adapt_gamma epochs=2 model.overrides.moae_layers=1",'
        '"options/demo_adapt_promptiqa.yml model.pretrained=null epochs=1",'
        '"options/demo_adapt_isp.yml model.pretrained=null epochs=1"]')


def test_demo_adapt_options_resolve():
    cfg = load_config(REPO / "options" / "demo_adapt.yml")
    assert cfg.stage == "pretrain_clip" and len(cfg.pretrain.then) == 3
    for name in ("demo_adapt_promptiqa", "demo_adapt_isp"):
        run = load_config(REPO / "options" / f"{name}.yml")
        assert run.stage == "promptiqa" and run.promptiqa.inverted_isps
        assert [r.name for r in run.promptiqa.requirements] == ["req_inverted", "req_only_blur", "req_noise_ok"]
    isp = load_config(REPO / "options" / "demo_adapt_isp.yml")
    assert isp.promptiqa.baselines and isp.promptiqa.gamma == "demo_adapt_gamma"
    assert isp.promptiqa.compare_runs == ["demo_adapt_promptiqa"]


@pytest.mark.slow
def test_adaptation_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the option files name each other from the repository root
    result = main(["-opt", "options/demo_adapt.yml", f"data_root={tmp_path / 'data'}",
                   f"output_dir={tmp_path / 'exp'}", *TINY, THEN])
    assert set(result["stages"]) == {"demo_adapt_gamma", "demo_adapt_promptiqa", "demo_adapt_isp"}
    isp = result["stages"]["demo_adapt_isp"]
    rows = isp["final"]["adaptation"]
    assert set(rows) == {"Gamma + ISP (demo_adapt_isp)", stage.GAMMA_AS_IS, stage.GAMMA_MAPPED, stage.GAMMA_MAPPED_ALL}
    sets = {"synth_natural", "synth_underwater", "synth_aigc", "req_inverted", "req_only_blur", "req_noise_ok"}
    for row in rows.values():
        assert set(row["isps"]) == set(row["inverted_isps"]) == sets
    # Gamma as it is ignores the prompt; on the inverted requirement its SRCC is minus that on synth_natural's labels
    # (the same pictures, labels 1 - y).
    as_is = rows[stage.GAMMA_AS_IS]["isps"]
    assert as_is["req_inverted"]["srcc"] == pytest.approx(-as_is["synth_natural"]["srcc"], abs=1e-3)
    table = (Path(isp["run_dir"]) / "adaptation.md").read_text()
    for label in ("PromptIQA (demo_adapt_promptiqa)", "Gamma + ISP (demo_adapt_isp)", stage.GAMMA_AS_IS,
                  stage.GAMMA_MAPPED, stage.GAMMA_MAPPED_ALL):
        assert table.count(f"| {label} |") == 2
