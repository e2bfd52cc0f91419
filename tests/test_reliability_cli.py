"""Reliability battery, part 3: the ``gamma score`` command on odd and bad input (in-process, no subprocess).

tests/test_cli.py already kills a real ``gamma score`` with SIGKILL and resumes it, and drops a half-written CSV row;
this adds: every bad and odd image of the battery through the command (bad ones named one per line, the rest scored,
exit status 1, never a traceback), bad weight files (exit 2 with a message naming the file), the bomb guard's option,
and an interrupted ``.json`` run that leaves no half-written ``.json`` behind.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import re
import resource
from pathlib import Path

import pytest
import torch
from helpers import BAD_FILES, ODD_FILES

import gamma
from gamma.cli import main
from gamma.scorer import Scorer
from gamma.weights import release_state_dict, save_checkpoint

FAST = ["--crops", "center", "--no-progress", "--workers", "1"]
# PIL warns about the broken EXIF and TIFF data these files hold on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_battery")
    for name, (build, *_) in {**BAD_FILES, **ODD_FILES}.items():
        (root / name).write_bytes(build())
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(gamma.create_model("gamma_test"), tmp_path_factory.mktemp("w") / "tiny.pth")


def test_every_bad_file_is_named_and_every_odd_file_scored(folder, weights, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["score", str(folder), "--weights", str(weights), "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    failures = [line for line in err.splitlines() if line.startswith("gamma: cannot score ")]
    assert sorted(Path(line.split(": ")[1]).name for line in failures) == sorted(BAD_FILES)
    for name, (_, reason) in BAD_FILES.items():
        line = next(f for f in failures if f.startswith(f"gamma: cannot score {folder / name}: "))
        assert re.search(reason, line), line
    assert f"scored {len(ODD_FILES)} image(s), {len(BAD_FILES)} could not be read" in err
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["name", "score"]
    assert sorted(Path(r[0]).name for r in rows[1:]) == sorted(ODD_FILES)
    assert all(math.isfinite(float(r[1])) for r in rows[1:])


def test_bomb_guard_option(folder, weights, capsys):
    one = str(folder / "one_by_many.png")  # 1 x 40 = 40 pixels
    assert main(["score", one, "--weights", str(weights), "--max-pixels", "39", *FAST]) == 1
    assert "exceeds the limit of 39 pixels" in capsys.readouterr().err
    assert main(["score", one, "--weights", str(weights), "--max-pixels", "40", *FAST]) == 0


class _Foreign:  # not on torch's weights_only allow-list
    pass


@pytest.mark.parametrize("kind", ["truncated", "text", "json", "folder", "foreign_pickle", "other_architecture",
                                  "nan_weights", "truncated_safetensors"])
def test_bad_weight_file_exits_2_naming_it(folder, weights, tmp_path, kind, capsys):
    path = tmp_path / (f"{kind}.safetensors" if kind.endswith("safetensors") else f"{kind}.pth")
    expected = {
        "truncated": "truncated or not a checkpoint",
        "text": "is not a checkpoint (neither a PyTorch zip archive nor a pickle",
        "foreign_pickle": "--allow-unsafe-pickle",
        "other_architecture": "does not match the model",
        "folder": "weight file not found",
        "json": "is not a checkpoint (neither a PyTorch zip archive nor a pickle",
        "nan_weights": "holds NaN or infinite values in 1 tensor(s): adapter.fc.0.weight",
        "truncated_safetensors": "cannot read safetensors file",
    }[kind]
    extra = []
    if kind == "truncated":
        data = weights.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "json":
        path.write_text(json.dumps({"state_dict": {"a": [1, 2]}}))
    elif kind == "foreign_pickle":
        payload = release_state_dict(gamma.create_model("gamma_test"))
        payload["meta"] = _Foreign()
        torch.save(payload, path, pickle_module=pickle)
    elif kind == "other_architecture":
        torch.save(release_state_dict(gamma.create_model("gamma_test", num_experts=2)), path)
        extra = ["--model", "gamma_test"]  # the architecture the user asked for, not the file's
    elif kind == "folder":
        path.mkdir()
    elif kind == "nan_weights":  # as saved by a diverged run
        model = gamma.create_model("gamma_test")
        with torch.no_grad():
            model.adapter.fc[0].weight[0, 0] = float("nan")
        save_checkpoint(model, path)
    elif kind == "truncated_safetensors":
        data = save_checkpoint(gamma.create_model("gamma_test"), path).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    status = main(["score", str(folder / "one_pixel.png"), "--weights", str(path), *extra, *FAST])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("gamma: error: ") and "Traceback" not in err, err
    assert str(path) in err and expected in err, err
    if kind == "foreign_pickle":  # the explicit opt-in loads it
        assert main(["score", str(folder / "one_pixel.png"), "--weights", str(path), "--allow-unsafe-pickle",
                     *FAST]) == 0


def test_interrupted_json_run_leaves_no_half_written_json(folder, weights, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scores.json"
    good = [str(folder / n) for n in ("one_pixel.png", "gray.png", "cmyk.jpg", "windows.bmp")]
    real = Scorer.iter_file_scores

    def interrupted(self, paths, *args, **kwargs):  # Ctrl-C after two images
        for i, result in enumerate(real(self, paths, *args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(Scorer, "iter_file_scores", interrupted)
    assert main(["score", *good, "--weights", str(weights), "--out", str(out), *FAST]) == 130
    assert "--resume" in capsys.readouterr().err
    assert not out.exists(), "a .json output appeared before the run finished"
    # A SIGKILL during a final write leaves its temporary behind (no handler runs): the next run clears it.
    (tmp_path / ".scores.json.k1ll3d.tmp").write_text("[\n  {")
    monkeypatch.setattr(Scorer, "iter_file_scores", real)
    assert main(["score", *good, "--weights", str(weights), "--out", str(out), "--resume", *FAST]) == 0
    assert "scored 2 image(s), skipped 2 already in" in capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert sorted(r["name"] for r in rows) == sorted(good)
    assert not list(tmp_path.glob(".scores.json*")), "side files left behind"


def test_symlink_loops_and_dangling_links_in_a_folder(folder, weights, tmp_path, capsys):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.png").write_bytes((folder / "gray.png").read_bytes())
    (tree / "sub" / "up").symlink_to("..")  # tree/sub/up/sub/up/... would list a.png forty times, then fail
    (tree / "self").symlink_to("self")  # a link to itself
    (tree / "gone.png").symlink_to(tmp_path / "deleted.png")  # a dangling link
    out = tmp_path / "s.csv"
    assert main(["score", str(tree), "--weights", str(weights), "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cannot score {tree / 'gone.png'}: no such file" in err
    with open(out, newline="") as fh:
        assert [row[0] for row in csv.reader(fh)][1:] == [str(tree / "sub" / "a.png")]  # once


def test_full_disk_while_scoring_is_an_error_naming_the_output_and_resume_completes(folder, weights, tmp_path, capsys):
    many = tmp_path / "many"
    many.mkdir()
    for i in range(8):  # long names: a few rows fill the 1000 bytes the output may grow to
        (many / f"{i}_{'x' * 200}.png").write_bytes((folder / "gray.png").read_bytes())
    out = tmp_path / "s.csv"
    args = ["score", str(many), "--weights", str(weights), "--out", str(out), *FAST]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # a real EFBIG from the kernel, as on a full disk
    try:
        status = main(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"gamma: error: cannot write {out} (File too large); the rows written so far are kept" in err
    assert main([*args, "--resume"]) == 0
    with open(out, newline="") as fh:
        names = [row[0] for row in csv.reader(fh)][1:]
    assert sorted(names) == sorted(str(p) for p in many.iterdir())  # each once, the half-written row dropped


# ------------------------------------------------------------------------------------------------ gamma train
def test_train_table_prints_the_table_and_where_and_points_a_split_folder_to_its_parent(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    for k, srcc in ((1, 0.90), (2, 0.94)):
        (run / f"split_{k}").mkdir(parents=True)
        result = {"split_index": k, "finished": True, "best": {"epoch": 1, "mean": {}, "datasets": {
            "koniq10k": {"srcc": srcc, "plcc": srcc + 0.01, "krcc": srcc - 0.1, "n": 10}}}}
        (run / f"split_{k}" / "results.json").write_text(json.dumps(result))
    assert main(["train", "--table", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| run | KonIQ-10k") and ".920/.930" in out  # the medians
    assert f"written to {run / 'table.md'}, {run / 'table.csv'}, {run / 'table.json'}" in out
    # Given one split's folder: an error pointing to the run folder above it.
    assert main(["train", "--table", str(run / "split_1")]) == 2  # the trainer logs its errors
    assert "this is one split's folder" in caplog.text and f"--table {run}" in caplog.text


def test_a_missing_model_file_names_the_option_and_the_resolved_path(tmp_path, monkeypatch):
    from gamma.train.config import ConfigError, load_config
    from gamma.train.loop import build_model

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.name=gamma_test", "model.pretrained=weights/mine.pth"])
    with pytest.raises(ConfigError) as info:
        build_model(cfg)
    message = str(info.value)
    assert message.startswith("model.pretrained: 'weights/mine.pth'")
    assert str(tmp_path / "weights" / "mine.pth") in message
