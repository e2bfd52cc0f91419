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
import torch
from helpers import read_rows
from PIL import Image

import gamma
from gamma.cli import main
from gamma.hub import sha256sum

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
    # An interrupted run leaves only the side file and its record; the .json does not exist yet.
    assert main(["score", str(image_dir / "coffee.jpg"), *FAST, "--out", str(tmp_path / "ref.json")]) == 0
    (tmp_path / "s.json.meta.json").write_text((tmp_path / "ref.json.meta.json").read_text())
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
    err = capsys.readouterr().err
    assert "pass --scene" in err and "auto" in err  # the missing-scene message names every choice
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


@pytest.fixture
def release_files(tmp_path) -> Path:
    """One tiny model in the release layout (no prompt set recorded) under the release's names and an unknown one,
    and the same weights in our format, which records 'naive'."""
    from gamma.weights import release_state_dict, save_checkpoint

    torch.manual_seed(0)
    model = gamma.create_model("gamma_test")
    for name in ("Gamma.pth", "Gamma-Prompt.pth", "renamed.pth"):
        torch.save(release_state_dict(model), tmp_path / name)
    save_checkpoint(model, tmp_path / "ours_naive.pth")
    return tmp_path


def test_gamma_prompt_pth_scores_with_sdp_prompts_without_prompt_set(image_dir, release_files, capsys):
    one = str(image_dir / "coffee.jpg")
    common = ["--crops", "center", "--no-progress", "--workers", "1"]
    prompt = str(release_files / "Gamma-Prompt.pth")
    assert main(["score", one, "--weights", prompt, "--scene", "natural", *common]) == 0
    implied = capsys.readouterr().out
    assert main(["score", one, "--weights", prompt, "--prompt-set", "sdp", "--scene", "natural", *common]) == 0
    assert capsys.readouterr().out == implied
    assert main(["score", one, "--weights", prompt, "--prompt-set", "naive", *common]) == 0  # what it did before
    assert capsys.readouterr().out != implied
    # Without --scene it is an SDP model asking for its scene, not a naive one scored silently.
    assert main(["score", one, "--weights", prompt, *common]) == 2
    assert "pass --scene" in capsys.readouterr().err


def test_a_prompt_set_against_the_files_record_is_refused_unless_overridden(image_dir, release_files, tmp_path,
                                                                             caplog, capsys):
    one = str(image_dir / "coffee.jpg")
    common = ["--crops", "center", "--no-progress", "--workers", "1"]
    ours = str(release_files / "ours_naive.pth")
    out = tmp_path / "s.csv"
    assert main(["score", one, "--weights", ours, *common]) == 0
    recorded = capsys.readouterr().out
    assert main(["score", one, "--weights", ours, "--prompt-set", "sdp", "--scene", "natural", "--out", str(out),
                 *common]) == 2
    err = capsys.readouterr().err
    assert "records prompt set 'naive'" in err and "--prompt-set sdp contradicts it" in err
    assert "--prompt-set-override" in err and "prompt_set=" not in err and "prompt_set_override" not in err
    assert not out.exists()
    assert main(["score", one, "--weights", ours, "--prompt-set", "sdp", "--prompt-set-override", "--scene",
                 "natural", *common]) == 0
    overridden = capsys.readouterr().out
    assert overridden != recorded
    # The same weights in the release layout, named as the sdp release: scored the same way (sdp, from the name).
    assert main(["score", one, "--weights", str(release_files / "Gamma-Prompt.pth"), "--scene", "natural",
                 *common]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == overridden.splitlines()[1:]
    # The library's warnings are said in CLI words on the command line.
    caplog.clear()
    assert main(["score", one, "--weights", str(release_files / "renamed.pth"), *common]) == 0
    warned = [r.getMessage() for r in caplog.records if "does not record its prompt set" in r.getMessage()]
    assert len(warned) == 1 and "--prompt-set sdp" in warned[0] and "prompt_set=" not in warned[0], warned
    # gamma convert writes the prompt set it resolved, and refuses a contradiction the same way.
    conv = tmp_path / "Gamma-Prompt.safetensors"
    assert main(["convert", str(release_files / "Gamma-Prompt.pth"), str(conv)]) == 0
    from gamma.weights import read_checkpoint

    assert read_checkpoint(conv).config.prompt_set == "sdp"
    capsys.readouterr()
    assert main(["convert", str(conv), str(tmp_path / "b.safetensors"), "--prompt-set", "naive"]) == 2
    assert "--prompt-set-override" in capsys.readouterr().err and not (tmp_path / "b.safetensors").exists()
    assert main(["convert", str(conv), str(tmp_path / "b.safetensors"), "--prompt-set", "naive",
                 "--prompt-set-override"]) == 0
    assert read_checkpoint(tmp_path / "b.safetensors").config.prompt_set == "naive"


def test_version_and_list(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"gamma {gamma.__version__}"
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "gamma_test" in out and "Gamma.pth" in out and "underwater" in out and "grid" in out


def _renamed_warnings(caplog, old: str) -> int:
    return sum(r.getMessage().startswith(f"{old} is now called") for r in caplog.records)


def test_renamed_options_give_the_same_result_and_warn_once(image_dir, tmp_path, caplog, capsys):
    one = str(image_dir / "coffee.jpg")
    assert main(["score", one, *FAST, "--prompt-set", "quality"]) == 0
    new = capsys.readouterr().out
    assert _renamed_warnings(caplog, "--prompt") == 0
    assert main(["score", one, *FAST, "--prompt", "naive", "--prompt", "quality"]) == 0  # the last one counts
    assert capsys.readouterr().out == new
    assert _renamed_warnings(caplog, "--prompt") == 1
    assert main(["score", one, *FAST]) == 0
    assert capsys.readouterr().out != new  # the option reached the model (naive prompts score otherwise)
    # --prompt-flip is --isp-flip: refused the same way without --isp, naming the new options.
    caplog.clear()
    assert main(["score", one, *FAST, "--prompt-flip"]) == 2
    assert "--isp-flip applies together with --isp" in capsys.readouterr().err
    assert _renamed_warnings(caplog, "--prompt-flip") == 1
    # gamma convert and gamma analyze take --prompt-set, and --prompt as before (a release-layout file: it records no
    # prompt set to contradict).
    weights = tmp_path / "weights.pt"
    from gamma.weights import read_checkpoint, release_state_dict

    torch.save(release_state_dict(gamma.create_model("gamma_test")), weights)
    for flag, dest in (("--prompt-set", "a.safetensors"), ("--prompt", "b.safetensors")):
        assert main(["convert", str(weights), str(tmp_path / dest), flag, "sdp"]) == 0
        assert read_checkpoint(tmp_path / dest).config.prompt_set == "sdp"
    args = gamma.cli.build_parser().parse_args(["analyze", "routing", "a=b", "--prompt", "sdp"])
    assert args.prompt_set == "sdp" and args.renamed_options == {"--prompt": "--prompt-set"}
    for command in (["score", "--help"], ["convert", "--help"]):  # --help shows only the new names
        with pytest.raises(SystemExit):
            main(command)
        text = capsys.readouterr().out
        assert "--prompt-set" in text and "--prompt " not in text and "--prompt-file" not in text


def test_verbose_before_or_after_the_command(image_dir, tmp_path, capsys):
    one = str(image_dir / "coffee.jpg")
    for argv in (["-v", "score", one], ["score", one, "-v"], ["score", "-v", one], ["score", one]):
        assert main([*argv, *FAST, "--out", str(tmp_path / "v.csv"), "--overwrite"]) == 0
        assert ("rate:" in capsys.readouterr().err) == ("-v" in argv), argv
    parse = gamma.cli.build_parser().parse_args
    assert parse(["analyze", "routing", "a=b", "-v"]).verbose and parse(["-v", "analyze", "routing", "a=b"]).verbose
    assert not parse(["analyze", "routing", "a=b"]).verbose and not parse(["list"]).verbose


def test_a_command_is_one_module_and_one_name(monkeypatch, capsys):
    """What `gamma demo` / `gamma report` will do: a module with NAME, add_parser and run, and its name in COMMANDS."""
    import argparse
    import types

    from gamma import cli
    from gamma.cli.common import UsageError

    hello = types.ModuleType("gamma.cli.hello")
    hello.NAME = "hello"
    hello.add_parser = lambda sub: _hello_parser(sub)

    def run(args: argparse.Namespace) -> int:
        if args.who == "nobody":
            raise UsageError("--who nobody: say hello to someone")
        print(f"hello {args.who}{' (verbose)' if args.verbose else ''}")
        return 0

    hello.run = run
    monkeypatch.setitem(sys.modules, "gamma.cli.hello", hello)
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "hello"))
    assert main(["hello", "--who", "you", "-v"]) == 0
    assert capsys.readouterr().out == "hello you (verbose)\n"
    assert main(["hello", "--who", "nobody"]) == 2
    assert capsys.readouterr().err == "gamma: error: --who nobody: say hello to someone\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert listed.index("score") < listed.index("train") < listed.index("hello  ") and "greets" in listed


def _hello_parser(subparsers):
    parser = subparsers.add_parser("hello", help="greets")
    parser.add_argument("--who", required=True)
    return parser


def test_allow_slow_runs_a_precision_this_cpu_runs_slowly(image_dir, monkeypatch, caplog, capsys):
    from gamma.archs import precision

    one = str(image_dir / "coffee.jpg")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # a CPU that runs bf16 well
    assert main(["score", one, *FAST, "--precision", "bf16"]) == 0
    fast_row = capsys.readouterr().out.splitlines()[1]
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())  # one without AVX512-BF16 or AMX
    assert main(["score", one, *FAST, "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "slower than fp32" in err and "--allow-slow" in err and "allow_slow=True" not in err
    assert main(["score", one, *FAST, "--precision", "bf16", "--allow-slow"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == fast_row  # the same bf16 model, built the other way
    assert any("slower than fp32" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


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


# ------------------------------------------------------------------------------------------------ provenance
def _weights(tmp_path: Path, name: str, seed: int, variant: str = "gamma_test") -> Path:
    from gamma.weights import save_checkpoint

    torch.manual_seed(seed)
    return save_checkpoint(gamma.create_model(variant), tmp_path / name)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_resume_refuses_other_weights_or_crops_or_columns_naming_them(image_dir, tmp_path, capsys, suffix):
    """Issue: --resume appended rows of other weights (any format) and other columns (.jsonl/.json) silently."""
    import pandas as pd

    first, other = _weights(tmp_path, "first.pth", 0), _weights(tmp_path, "other.pth", 1)
    photos = [str(image_dir / f"{n}.jpg") for n in NAMES]
    opts = ["--crops", "center", "--no-progress", "--workers", "1"]
    out = tmp_path / f"s{suffix}"
    assert main(["score", *photos[:2], "--weights", str(first), *opts, "--out", str(out)]) == 0
    before = out.read_bytes()
    record = json.loads((tmp_path / f"s{suffix}.meta.json").read_text())
    assert record["weights"]["sha256"] == sha256sum(first) and record["weights"]["path"] == str(first.absolute())
    assert record["crops"] == {"mode": "center", "num": 1, "seed": None} and record["columns"] == ["name", "score"]
    assert record["prompt_set"] == "naive" and record["precision"] == "fp32"
    assert record["gamma_version"] == gamma.__version__ and record["model"]["family"] == "gamma"
    # The output stays a plain table for pandas.
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_json(out, lines=suffix == ".jsonl")
    assert list(df.columns) == ["name", "score"] and len(df) == 2
    capsys.readouterr()
    refusals = [
        (["--weights", str(other), *opts], ["weights: first.pth (sha256", "other.pth (sha256"]),
        (["--weights", str(first), "--crops", "five", *opts[2:]], ["crop protocol: center (1 per image) in the file",
                                                                  "five (5 per image) in this run"]),
        (["--weights", str(first), *opts, "--distribution"], ["columns: name,score in the file"]),
        (["--weights", str(first), *opts, "--mos-range", "1", "5"], ["--mos-range: none in the file"]),
    ]
    for options, expected in refusals:
        assert main(["score", *photos, *options, "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"cannot resume {out}" in err and "Score into another --out, or pass --overwrite" in err, err
        assert all(e in err for e in expected), (expected, err)
        assert out.read_bytes() == before  # the earlier file intact
    # The same settings continue it; a renamed copy of the same weights too (weights count by content).
    same = tmp_path / "renamed.pth"
    same.write_bytes(first.read_bytes())
    assert main(["score", *photos, "--weights", str(same), *opts, "--out", str(out), "--resume"]) == 0
    assert "skipped 2 already in" in capsys.readouterr().err
    # An output without a record (an older gamma's, or copied alone) is not continued blindly.
    (tmp_path / f"s{suffix}.meta.json").unlink()
    assert main(["score", *photos, "--weights", str(first), *opts, "--out", str(out), "--resume"]) == 2
    assert "has no record of how it was scored" in capsys.readouterr().err


def test_jsonl_rows_with_other_columns_are_refused_without_a_record_mismatch(image_dir, tmp_path, capsys):
    """The rows themselves are checked too: a .jsonl whose rows hold other fields than its record says."""
    out = tmp_path / "s.jsonl"
    photo = str(image_dir / "coffee.jpg")
    assert main(["score", photo, *FAST, "--out", str(out)]) == 0
    out.write_text(json.dumps({"name": "x.jpg", "score": 0.5, "std": 0.1}) + "\n")
    capsys.readouterr()
    assert main(["score", str(image_dir), *FAST, "--out", str(out), "--resume"]) == 2
    assert "its rows hold the columns ['name', 'score', 'std']" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"name": "x.jpg", "score": 0.5, "std": 0.1}


def test_errors_file_lists_failures_and_resume_retries_them(image_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(image_dir / "coffee.jpg").save(folder / "coffee.jpg")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    out, errors = tmp_path / "s.csv", tmp_path / "errors.csv"
    assert main(["score", str(folder), *FAST, "--out", str(out), "--errors", str(errors)]) == 1
    assert f"1 could not be read (named above and listed in {errors})" in capsys.readouterr().err
    listed = read_rows(errors)
    assert listed[0] == ["name", "error"] and [r[0] for r in listed[1:]] == [str(folder / "bad.png")]
    assert listed[1][1] and not listed[1][1].startswith(str(folder))  # the reason, without the name again
    # --resume tries failed files again: still broken, it is listed again; repaired, it is scored.
    assert main(["score", str(folder), *FAST, "--out", str(out), "--errors", str(errors), "--resume"]) == 1
    assert [r[0] for r in read_rows(errors)[1:]] == [str(folder / "bad.png")]
    Image.open(image_dir / "rocket.jpg").save(folder / "bad.png")
    assert main(["score", str(folder), *FAST, "--out", str(out), "--errors", str(errors), "--resume"]) == 0
    assert read_rows(errors) == [["name", "error"]]
    assert sorted(r[0] for r in read_rows(out)[1:]) == sorted(str(p) for p in folder.iterdir())


def test_an_empty_folder_warns_and_exits_nonzero_and_non_images_are_named(image_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "s.csv"
    assert main(["score", str(empty), *FAST, "--out", str(out)]) == 1
    assert f"nothing to score: no images in {empty}" in capsys.readouterr().err
    assert not out.exists()
    for i in range(7):
        (empty / f"notes{i}.txt").write_text("not an image")
    assert main(["score", str(empty), *FAST, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "skipped 7 file(s) without an image extension" in err and "notes0.txt" in err and "and 2 more" in err
    # Beside images: scored as usual, the others counted and the first named.
    Image.open(image_dir / "coffee.jpg").save(empty / "coffee.jpg")
    assert main(["score", str(empty), *FAST, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "scored 1 image(s)" in err and "warning: skipped 7 file(s) without an image extension" in err


def test_weights_are_hashed_once_per_content_and_again_when_the_file_changes(tmp_path, monkeypatch):
    import hashlib

    from gamma.cli import provenance

    path = tmp_path / "w.bin"
    contents = (b"a" * 3_000_000, b"b" * 3_000_001)  # more than one 1 MiB block each
    expected = [hashlib.sha256(c).hexdigest() for c in contents]
    path.write_bytes(contents[0])
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(provenance.hashlib, "sha256", lambda: calls.append(1) or real())
    assert provenance.file_sha256(path) == expected[0] and provenance.file_sha256(path) == expected[0]
    assert len(calls) == 1  # the second call was answered from the cache
    path.write_bytes(contents[1])  # another size (and time): hashed again
    assert provenance.file_sha256(path) == expected[1] and len(calls) == 2
