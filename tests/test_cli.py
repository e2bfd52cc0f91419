"""The `gamma` command: scoring folders into CSV / JSON Lines / JSON, resuming, failures, exit codes.

Most runs call gamma.cli.main in-process (cheap); one runs the real command as a subprocess, kills it with SIGKILL
while it writes, and resumes it.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_rows
from PIL import Image

import gamma
from gamma.cli import main

NAMES = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Eight small real photos (skimage) in a folder tree, and one unreadable file."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    (root / "more").mkdir()
    for i, name in enumerate(NAMES):
        img = Image.fromarray(getattr(data, name)())
        img.thumbnail((256, 256))
        img.save(root / f"{name}.jpg")
        img.rotate(90, expand=True).save(root / "more" / f"{i}_{name}.png")
    (root / "more" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 40)
    return root


FAST = ["--model", "gamma_test", "--crops", "center", "--no-progress", "--workers", "1"]


def test_score_folder_to_csv(image_dir, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["score", str(image_dir), *FAST, "--out", str(out)]) == 1  # one unreadable file
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "scored 8 image(s)" in err and "1 could not be read" in err
    rows = read_rows(out)
    assert rows[0] == ["name", "score"] and len(rows) == 9
    names = [r[0] for r in rows[1:]]
    assert len(set(names)) == 8 and not any("broken" in n for n in names)
    assert all(0.2 <= float(r[1]) <= 1.0 for r in rows[1:])


def test_all_readable_exits_zero_and_stdout_default(image_dir, capsys):
    assert main(["score", str(image_dir / "astronaut.jpg"), str(image_dir / "coffee.jpg"), *FAST]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "name,score" and len(out) == 3 and out[1].startswith(str(image_dir / "astronaut.jpg"))


def test_resume_drops_a_half_written_row_and_never_duplicates(image_dir, tmp_path, capsys):
    out = tmp_path / "s.csv"
    main(["score", str(image_dir), *FAST, "--out", str(out)])
    full = read_rows(out)
    # As if the run had been killed: keep three rows and half of the fourth.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    capsys.readouterr()
    assert main(["score", str(image_dir), *FAST, "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "skipped 3 already in" in err and "scored 5 image(s)" in err
    resumed = read_rows(out)
    assert sorted(resumed[1:]) == sorted(full[1:])  # same rows, none twice, the half row gone
    assert main(["score", str(image_dir), *FAST, "--out", str(out), "--resume"]) == 1  # broken file still fails
    assert read_rows(out) == resumed


def test_existing_output_is_not_overwritten_by_accident(image_dir, tmp_path, capsys):
    out = tmp_path / "s.csv"
    out.write_text("name,score\nx.jpg,0.5\n")
    assert main(["score", str(image_dir / "coffee.jpg"), *FAST, "--out", str(out)]) == 2
    assert "exists: pass --resume" in capsys.readouterr().err
    assert main(["score", str(image_dir / "coffee.jpg"), *FAST, "--out", str(out), "--overwrite"]) == 0
    assert [r[0] for r in read_rows(out)] == ["name", str(image_dir / "coffee.jpg")]


def test_jsonl_output(image_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    main(["score", str(image_dir), *FAST, "--out", str(out), "--mos-range", "0", "100"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"name", "score", "mos"}
    assert all(r["mos"] == pytest.approx(100 * r["score"], abs=1e-4) for r in rows)


def test_json_output_is_written_atomically_and_resumable(image_dir, tmp_path):
    out = tmp_path / "s.json"
    partial = tmp_path / ".s.json.partial.jsonl"
    # An interrupted run leaves only the side file; the .json does not exist yet.
    partial.write_text(json.dumps({"name": str(image_dir / "coffee.jpg"), "score": 0.5}) + "\n" + '{"name": "x')
    assert main(["score", str(image_dir), *FAST, "--out", str(out), "--resume"]) == 1
    rows = json.loads(out.read_text())
    assert not partial.exists() and len(rows) == 8
    assert rows[[r["name"] for r in rows].index(str(image_dir / "coffee.jpg"))]["score"] == 0.5  # kept, not re-scored
    # Resuming a finished .json adds nothing and keeps every row.
    main(["score", str(image_dir), *FAST, "--out", str(out), "--resume"])
    assert json.loads(out.read_text()) == rows


def test_mos_mapping_options(image_dir, capsys):
    one = str(image_dir / "astronaut.jpg")
    main(["score", one, *FAST, "--mos-range", "1", "5", "--lower-better"])
    name, score, mos = capsys.readouterr().out.splitlines()[1].split(",")
    assert float(mos) == pytest.approx(1 + 4 * (1 - float(score)), abs=1e-5)
    main(["score", one, *FAST, "--dataset", "live"])  # DMOS on 1..100
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header == "name,score,mos"
    assert float(row.split(",")[2]) == pytest.approx(1 + 99 * (1 - float(row.split(",")[1])), abs=1e-4)


def test_setup_errors_exit_two_with_a_message(image_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GAMMA_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("GAMMA_WEIGHTS", raising=False)
    assert main(["score", str(image_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gamma: error: no weight file for 'gamma'" in err and str(tmp_path / "empty" / "Gamma.pth") in err
    assert main(["score", str(image_dir), "--model", "gamma_test_sdp", "--no-progress"]) == 2
    assert "--scene" in capsys.readouterr().err
    assert main(["score", str(image_dir), *FAST, "--out", str(tmp_path / "s.xlsx")]) == 2
    assert main(["score", str(image_dir), *FAST, "--scene", "mars"]) == 2
    assert "unknown scene" in capsys.readouterr().err
    assert main(["score", str(image_dir), *FAST, "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["score", str(image_dir), "--batch-size", "0"])
    assert exit_.value.code == 2


def test_train_is_forwarded(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0 and "gamma-train" in capsys.readouterr().out


def test_sdp_scene_and_weights_file(image_dir, tmp_path, capsys):
    import torch

    from gamma.weights import save_checkpoint

    torch.manual_seed(1)
    ckpt = save_checkpoint(gamma.create_model("gamma_test_sdp"), tmp_path / "sdp.pt")
    args = ["score", str(image_dir / "coffee.jpg"), "--weights", str(ckpt), "--crops", "center", "--no-progress"]
    assert main([*args, "--scene", "underwater"]) == 0
    under = capsys.readouterr().out.splitlines()[1]
    assert main([*args, "--scene", "face"]) == 0
    assert capsys.readouterr().out.splitlines()[1] != under


def test_version_and_list(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"gamma {gamma.__version__}"
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "gamma_test" in out and "Gamma.pth" in out and "underwater" in out and "grid" in out


@pytest.mark.slow
def test_subprocess_killed_mid_run_then_resumed(image_dir, tmp_path, capsys):
    """The real command in a subprocess, SIGKILLed while writing; --resume completes it without duplicates."""
    many = tmp_path / "many"
    many.mkdir()
    src = Image.open(image_dir / "astronaut.jpg").resize((224, 224))  # 224: all ten random crops are one window
    for i in range(24):
        src.rotate(i).save(many / f"img{i:02d}.jpg")
    (many / "zero.jpg").write_bytes(b"")
    out = tmp_path / "run.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "gamma.cli", "score", str(many), "--model", "gamma_test", "--batch-size", "1",
           "--workers", "0", "--num-crops", "10", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 4:  # header + 3 rows on disk
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=120)
    killed = proc.returncode == -signal.SIGKILL
    if not killed:  # finished before we could kill it: it must have reported the empty file and exited 1
        assert proc.returncode == 1 and "zero.jpg" in proc.stderr.read()
    text = out.read_text()
    before = list(csv.reader(text[: text.rfind("\n") + 1].splitlines()))  # complete rows only
    assert main(["score", str(many), "--model", "gamma_test", "--num-crops", "10", "--out", str(out), "--resume",
                 "--no-progress"]) == 1
    assert "zero.jpg: empty file" in capsys.readouterr().err
    rows = read_rows(out)
    names = [r[0] for r in rows[1:]]
    assert len(names) == 24 and len(set(names)) == 24
    assert rows[: len(before)] == before  # the killed run's complete rows are kept as they were
