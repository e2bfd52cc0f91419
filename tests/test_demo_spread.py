"""scripts/demo_spread.py: its command lines, its table and its resuming, on summaries written by the demo's own
summary writer (no training)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from gamma.train.config import load_config
from gamma.train.stages import write_summary

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_spread", REPO / "scripts" / "demo_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


spread = _load_script()


def fake_run(out: Path, gamma: tuple[float, float], nomoae: tuple[float, float], seconds: float = 600.0) -> None:
    """A finished demo run's summary, written as stage pretrain_clip writes it (figures: mean SRCC, PLCC)."""
    run_dir = out / "demo_clip" / "split_1"
    run_dir.mkdir(parents=True)

    def stage(srcc, plcc):
        return {"final": {"epoch": 6, "datasets": {"synth_natural": {"srcc": srcc, "plcc": plcc}},
                          "mean": {"srcc": srcc, "plcc": plcc}}, "seconds": seconds / 2}

    write_summary(run_dir, {"demo_gamma": stage(*gamma), "demo_nomoae": stage(*nomoae)}, seconds)


def test_the_command_line_carries_the_seed_and_the_folders(tmp_path):
    cmd = spread.demo_command(7, tmp_path / "out", tmp_path / "data", ["epochs=2"], python="python")
    assert cmd[:4] == ["python", "train.py", "-opt", "options/demo.yml"]
    # what train.py makes of it: the run seed 7 (which the chain hands to both follow-up stages), the folders, and
    # the extra override last
    cfg = load_config(REPO / "options" / "demo.yml", cmd[4:])
    assert (cfg.seed, cfg.output_dir, cfg.data_root, cfg.epochs) == (7, str(tmp_path / "out"),
                                                                      str(tmp_path / "data"), 2)
    assert spread.run_folder(tmp_path, 7, 2) != spread.run_folder(tmp_path, 7, 1) != spread.run_folder(tmp_path, 1, 1)


def test_read_result_takes_the_means_and_the_margin(tmp_path):
    fake_run(tmp_path, gamma=(0.82, 0.825), nomoae=(0.72, 0.69), seconds=720)
    res = spread.read_result(tmp_path)
    assert res["gamma"] == {"srcc": 0.82, "plcc": 0.825} and res["nomoae"] == {"srcc": 0.72, "plcc": 0.69}
    assert res["margin"]["srcc"] == pytest.approx(0.10, abs=1e-12)
    assert res["margin"]["plcc"] == pytest.approx(0.135, abs=1e-12)
    assert res["seconds"] == 720


def test_missing_or_incomplete_summaries_count_as_not_done(tmp_path):
    assert spread.read_result(tmp_path) is None
    fake_run(tmp_path, gamma=(0.8, 0.8), nomoae=(0.7, 0.7))
    path = tmp_path / spread.SUMMARY
    summary = json.loads(path.read_text())
    del summary["runs"]["demo_nomoae"]  # the chain stopped after the first follow-up stage
    path.write_text(json.dumps(summary))
    assert spread.read_result(tmp_path) is None
    path.write_text("{not json")
    assert spread.read_result(tmp_path) is None


def test_table_has_one_line_per_run_and_the_range(tmp_path):
    figures = {123: ((0.822, 0.825), (0.721, 0.693)), 1: ((0.806, 0.816), (0.800, 0.758)),
               2: ((0.770, 0.800), (0.800, 0.790))}
    rows = []
    for seed, (g, b) in figures.items():
        fake_run(tmp_path / str(seed), g, b, seconds=60 * seed)
        rows.append({"seed": seed, "threads": 1, "result": spread.read_result(tmp_path / str(seed))})
    rows.append({"seed": 9, "threads": 1, "result": None})
    lines = spread.build_table(rows).splitlines()
    assert lines[2].startswith("| 123 | 1 | 0.822 | 0.825 | 0.721 | 0.693 | +0.101 | +0.132 | 123.0 |")
    assert lines[3].startswith("| 1 | 1 | 0.806 | 0.816 | 0.800 | 0.758 | +0.006 | +0.058 | 1.0 |")
    assert lines[4].startswith("| 2 | 1 | 0.770 | 0.800 | 0.800 | 0.790 | -0.030 | +0.010 |")
    assert lines[5].startswith("| 9 | 1 | not run |")
    # the range is over the finished runs only; SRCC margins from -0.030 (seed 2) to +0.101 (seed 123)
    assert lines[6] == ("| min to max | 3 runs | 0.770 to 0.822 | 0.800 to 0.825 | 0.721 to 0.800 | 0.693 to 0.790 "
                        "| -0.030 to +0.101 | +0.010 to +0.132 | |")
    assert lines[-1].endswith("over 3 runs: ahead by more than 0.01 in 1, within +-0.01 in 1, behind by more than "
                              "0.01 in 1.")
    assert spread.build_table(rows, tie=0.2).splitlines()[-1].endswith("ahead by more than 0.2 in 0, within +-0.2 "
                                                                       "in 3, behind by more than 0.2 in 0.")


def test_finished_runs_are_read_not_run_again(tmp_path, monkeypatch, capsys):
    out = tmp_path / "spread"
    for seed in (123, 1):
        fake_run(spread.run_folder(out, seed, 1), (0.8, 0.81), (0.75, 0.76))
    # a failing command stands in for train.py should anything be launched
    monkeypatch.setattr(spread, "demo_command", lambda *a, **k: [sys.executable, "-c", "raise SystemExit(3)"])
    assert spread.main(["--seeds", "123", "1", "--output-dir", str(out), "--data-root", str(tmp_path / "d")]) == 0
    assert not any(out.rglob("train.log"))  # nothing ran
    assert "| 123 | 1 | 0.800 | 0.810 | 0.750 | 0.760 | +0.050 | +0.050 |" in capsys.readouterr().out
    saved = json.loads((out / "spread.json").read_text())
    assert [(r["seed"], r["threads"]) for r in saved] == [(123, 1), (1, 1)]
    assert "over 2 runs: ahead by more than 0.01 in 2," in (out / "spread.md").read_text()


def test_a_failed_run_is_reported_and_left_out_of_the_range(tmp_path, capsys):
    """A real train.py subprocess that stops at once: an override the configuration does not know."""
    out = tmp_path / "spread"
    fake_run(spread.run_folder(out, 123, 1), (0.8, 0.81), (0.75, 0.76))
    rc = spread.main(["--seeds", "123", "5", "--output-dir", str(out), "--data-root", str(tmp_path / "d"),
                      "no_such_option=1"])
    assert rc == 1
    log = (spread.run_folder(out, 5, 1) / "train.log").read_text()
    assert "no_such_option" in log
    table = capsys.readouterr().out
    assert "| 5 | 1 | not run |" in table and "| min to max | 1 runs |" in table
