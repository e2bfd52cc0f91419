"""Reliability battery, part 2: faults during training, and bad option files.

- ``kill -9`` at a (seeded) random step, then ``--resume``: at most one epoch of work is lost and the run ends exactly
  where an uninterrupted run ends (same per-step losses, evaluations and weights); a half-written checkpoint temp file
  left by the kill is ignored; while the killed run was alive a second run into its folder was refused.
- a full disk when saving (a real ``EFBIG`` from ``RLIMIT_FSIZE``, not a mock) is a one-line error naming the file,
  and the previous checkpoint stays loadable;
- a truncated checkpoint, a finished run started again without ``--resume``: clear errors;
- malformed YAML, unknown keys, wrong types, missing files: a ``ConfigError`` naming the file or dotted key
  (also as a hypothesis property: arbitrary option mappings raise nothing else).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import interrupt_at
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gamma.train.checkpoint import RunLockedError, load_training_state, write_json
from gamma.train.config import ConfigError, load_config
from gamma.train.loop import TrainingInterrupted
from gamma.train.main import cli, main
from gamma.train.run_folder import MetricsLog
from gamma.weights import CheckpointError

N_IMAGES, BATCH, EPOCHS = 4, 2, 3
STEPS_PER_EPOCH = N_IMAGES // BATCH


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Four tiny labelled images (custom CSV) and an option file training gamma_test on them."""
    root = tmp_path_factory.mktemp("train")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    rows = ["image,mos"]
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        rows.append(f"{i}.png,{rng.uniform(1, 5):.3f}")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    options = {
        "output_dir": str(root / "runs"), "seed": 7, "epochs": EPOCHS, "batch_size": BATCH, "workers": 0,
        "device": "cpu", "model": {"name": "gamma_test"}, "optim": {"lr": 1e-3},
        "data": [{"name": "mine", "root": str(root / "imgs"), "meta_file": str(root / "meta.csv"),
                  "mos_range": [1, 5], "split_index": "all"}],
        "eval": {"crop_mode": "center", "crops": 1, "batch_size": 8},
        "log": {"progress": False, "tensorboard": False, "every_steps": 1},
    }
    (root / "run.yml").write_text(yaml.safe_dump(options))
    return root


def run_dir(workspace: Path, name: str) -> Path:
    return workspace / "runs" / name / "split_1"


@pytest.fixture(scope="module")
def reference(workspace) -> Path:
    """An uninterrupted run."""
    result = main(["-opt", str(workspace / "run.yml"), "name=ref"])
    assert result["finished"] and result["global_step"] == EPOCHS * STEPS_PER_EPOCH
    return run_dir(workspace, "ref")


def train_losses(folder: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl (lines cut short by a kill are skipped)."""
    out = {}
    path = folder / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def evaluations(folder: Path) -> list[tuple[int, dict]]:
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["mean"]) for r in recs if r.get("kind") == "eval"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- kill -9 and resume
@pytest.mark.slow
def test_kill9_at_a_random_step_then_resume_matches_an_uninterrupted_run(workspace, reference):
    opt = str(workspace / "run.yml")
    folder = run_dir(workspace, "killed")
    kill_at = random.Random(0).randint(1, EPOCHS * STEPS_PER_EPOCH - 1)  # any step must do; seeded: repeatable
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = workspace / "killed.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gamma.train.main", "-opt", opt, "name=killed"], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not train_losses(folder) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert train_losses(folder) and proc.poll() is None, f"training did not run: {log.read_text()[-2000:]}"
        # While it runs, nobody else may write into its folder: neither a resume nor a fresh run.
        for extra in (["--resume"], []):
            with pytest.raises(RunLockedError, match=rf"{folder} is in use by another run \(pid {proc.pid} "):
                main(["-opt", opt, "name=killed", *extra])
        while max(train_losses(folder)) < kill_at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, f"the run finished before step {kill_at}"

    reached = max(train_losses(folder))
    saved = 0
    if (folder / "last.pth").exists():
        torch.load(folder / "last.pth", weights_only=True)  # our checkpoint needs no unsafe unpickling
        saved = load_training_state(folder / "last.pth").extra["progress"]["global_step"]
    assert reached - saved <= STEPS_PER_EPOCH, f"killed at step {reached}, last checkpoint at step {saved}"

    # What a kill in the middle of a checkpoint write leaves: a partial temp file beside the real checkpoint.
    partial = folder / ".last.pth.k9dead.tmp"
    source = folder / "last.pth" if (folder / "last.pth").exists() else reference / "last.pth"
    partial.write_bytes(source.read_bytes()[: source.stat().st_size // 3])

    result = main(["-opt", opt, "name=killed", "--resume"])
    assert result["finished"] and result["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert not partial.exists(), "the resumed run left the dead run's partial checkpoint behind"
    assert result["step_losses"] == pytest.approx(
        [train_losses(reference)[s] for s in range(saved + 1, EPOCHS * STEPS_PER_EPOCH + 1)], rel=1e-5)
    # The whole log reads as one run: every step once, the same losses and evaluations as the uninterrupted run.
    assert sorted(train_losses(folder)) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert train_losses(folder) == pytest.approx(train_losses(reference), rel=1e-5)
    ref_evals, evals = evaluations(reference), evaluations(folder)
    assert [s for s, _ in evals] == [s for s, _ in ref_evals]
    for (_, got), (_, want) in zip(evals, ref_evals, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    for name in ("last.pth", "best.pth"):
        got, want = weights(folder / name), weights(reference / name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


_WRITER = """
import sys, torch, gamma
from gamma.train.checkpoint import save_training_state
model = gamma.create_model("gamma_test")
optimizer = torch.optim.Adam(model.trainable_parameters())
for i in range(1, 10**6):
    with torch.no_grad():
        model.score_level.fill_(i)
    save_training_state(sys.argv[1], model, optimizer=optimizer, scheduler=None, scaler=None, progress={"i": i},
                        train_config={})
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill9_while_a_checkpoint_is_being_written_keeps_the_previous_one(tmp_path):
    last = tmp_path / "last.pth"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(last)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1", "the writer did not start"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the next write is under way: its temp file has data
            if any(p.stat().st_size > 0 for p in tmp_path.glob(".last.pth.*.tmp")):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Typically left now: last.pth and a partial .last.pth.<random>.tmp that no loader looks at.
    torch.load(last, weights_only=True)
    ckpt = load_training_state(last)
    i = ckpt.extra["progress"]["i"]
    assert i >= 1 and torch.equal(ckpt.state_dict["score_level"], torch.full((5,), float(i)))  # one whole version


# ----------------------------------------------------------------------------------------------- full disk
def test_full_disk_at_checkpoint_is_a_clear_error_and_keeps_the_previous_checkpoint(workspace, reference, caplog):
    folder = run_dir(workspace, "full")
    shutil.copytree(reference, folder)
    before = sha(folder / "last.pth")
    # A real write failure: the kernel refuses to grow any file past half a checkpoint (EFBIG; CPython ignores
    # SIGXFSZ, so the write returns an error instead of killing the process). The run resumes and trains one more
    # epoch, then its checkpoint write fails.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, ((folder / "last.pth").stat().st_size // 2, hard))
    try:
        with caplog.at_level(logging.ERROR, logger="gamma.train.main"):
            status = cli(["-opt", str(workspace / "run.yml"), "name=full", "--resume", f"epochs={EPOCHS + 1}"])
        # Every other file of the run folder is written the same way: the error names it, the old one stays.
        results = (folder / "results.json").read_text()
        with pytest.raises(OSError, match=rf"File too large: '{folder / 'results.json'}'"):
            write_json(folder / "results.json", {"padding": "x" * (folder / "last.pth").stat().st_size})
        assert (folder / "results.json").read_text() == results
        log = MetricsLog(folder, tensorboard=False)
        with pytest.raises(OSError, match=rf"cannot append to the metrics log: File too large: '{log.jsonl}'"):
            log.write({"kind": "train", "step": 0, "padding": "x" * (folder / "last.pth").stat().st_size})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert status == 1
    assert f"cannot write checkpoint {folder / 'last.pth'} (File too large)" in caplog.text
    assert "previous checkpoint" in caplog.text and "unchanged" in caplog.text
    assert sha(folder / "last.pth") == before
    assert not list(folder.glob("*.tmp")), "a temp file was left behind"
    assert load_training_state(folder / "last.pth").extra["progress"]["epoch"] == EPOCHS


def test_damaged_checkpoint_and_unintended_restart_are_refused(workspace, reference, caplog):
    opt = str(workspace / "run.yml")
    with pytest.raises(ConfigError, match=rf"{reference} holds a finished run; extend it with --resume epochs=N"):
        main(["-opt", opt, "name=ref"])
    folder = run_dir(workspace, "damaged")
    shutil.copytree(reference, folder)
    data = (folder / "last.pth").read_bytes()
    (folder / "last.pth").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.ERROR, logger="gamma.train.main"):
        assert cli(["-opt", opt, "name=damaged", "--resume", f"epochs={EPOCHS + 1}"]) == 2  # (extending reads it)
    assert f"cannot read checkpoint {folder / 'last.pth'} (truncated or not a checkpoint?)" in caplog.text
    (folder / "last.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="checkpoint file is empty"):
        main(["-opt", opt, "name=damaged", "--resume", f"epochs={EPOCHS + 1}"])


def test_image_that_goes_bad_during_training_stops_with_its_name_and_keeps_the_checkpoint(workspace, reference,
                                                                                          caplog):
    # The dataset was checked when the run started; then an image is overwritten (a full disk, a sync tool ...).
    root = workspace / "broken"
    shutil.copytree(workspace / "imgs", root / "imgs")
    (root / "meta.csv").write_text((workspace / "meta.csv").read_text())
    shutil.copytree(reference, run_dir(workspace, "broken"))
    before = sha(run_dir(workspace, "broken") / "last.pth")
    (root / "imgs" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with caplog.at_level(logging.ERROR, logger="gamma.train.main"):
        status = cli(["-opt", str(workspace / "run.yml"), "name=broken", "--resume", f"epochs={EPOCHS + 1}",
                      f"data.0.root={root / 'imgs'}", f"data.0.meta_file={root / 'meta.csv'}"])
    assert status == 2
    assert f"{root / 'imgs' / '1.png'}: corrupt or truncated" in caplog.text and "meta.csv, line 3" in caplog.text
    assert sha(run_dir(workspace, "broken") / "last.pth") == before


def test_damaged_results_json_is_named_or_resumed_from_the_checkpoint(workspace, reference):
    folder = run_dir(workspace, "splits")
    shutil.copytree(reference, folder)
    (folder / "results.json").write_text('{"finished": tr')  # cut short by a copy, a sync tool ...
    with pytest.raises(ConfigError, match=rf"{folder / 'results.json'} is unreadable"):
        main(["--table", str(folder.parent)])
    out = main(["-opt", str(workspace / "run.yml"), "name=splits", "--all_splits", "--resume", "splits=[1]"])
    assert out["splits"][0]["finished"] and out["splits"][0]["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert json.loads((folder / "results.json").read_text())["finished"]


# ------------------------------------------------------------------------------- resume with another schedule
def records(folder: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def cosine(epoch: int, epochs: int, lr: float = 1e-3) -> float:
    return lr * 0.5 * (1 + np.cos(np.pi * epoch / epochs))


def test_extending_a_finished_run_replans_the_schedule_instead_of_training_at_lr_0(workspace, reference, caplog):
    # The reproduction: a finished run resumed with more epochs trained its extra epoch at lr 0 (the old
    # cosine's floor), with the same scores as before. Now the schedule is that of the longer run from the start.
    folder = run_dir(workspace, "extended")
    shutil.copytree(reference, folder)
    with caplog.at_level(logging.INFO, logger="gamma"):
        out = main(["-opt", str(workspace / "run.yml"), "name=extended", "--resume", f"epochs={EPOCHS + 1}"])
    assert out["finished"] and out["epochs"] == EPOCHS + 1
    new_lr = cosine(EPOCHS, EPOCHS + 1)
    assert new_lr > 0
    assert (f"re-planned as if the run had been planned with these settings from the start; epoch {EPOCHS + 1} of "
            f"{EPOCHS + 1} trains at lr {new_lr:.3g}") in caplog.text
    assert f"epochs {EPOCHS} -> {EPOCHS + 1}" in caplog.text
    extra = [r for r in records(folder, "train") if r["epoch"] == EPOCHS + 1]
    assert len(extra) == STEPS_PER_EPOCH and all(r["lr"] == pytest.approx(new_lr, rel=1e-12) for r in extra)
    assert records(folder, "epoch")[-1]["lr"] == pytest.approx(new_lr, rel=1e-12)
    before, after = weights(reference / "last.pth"), weights(folder / "last.pth")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the extra epoch trained
    evals = evaluations(folder)
    assert len(evals) == EPOCHS + 1 and evals[-1][1] != evals[-2][1]


def test_resuming_a_finished_run_says_so_and_leaves_its_folder_untouched(workspace, reference, caplog):
    folder = run_dir(workspace, "done")
    shutil.copytree(reference, folder)
    before = {f: sha(f) for f in folder.rglob("*") if f.is_file()}
    with caplog.at_level(logging.INFO, logger="gamma"):
        assert cli(["-opt", str(workspace / "run.yml"), "name=done", "--resume"]) == 0
    assert f"{folder} holds a finished run of {EPOCHS} epochs; nothing to resume" in caplog.text
    assert f"--resume epochs=N with N > {EPOCHS}" in caplog.text and "resumed from" not in caplog.text
    assert {f: sha(f) for f in folder.rglob("*") if f.is_file()} == before
    # a length below what it trained cannot be resumed: the message names the option
    with pytest.raises(ConfigError, match=rf"epochs=2: {folder} holds a finished run of {EPOCHS} epochs"):
        main(["-opt", str(workspace / "run.yml"), "name=done", "--resume", "epochs=2"])


def test_schedule_settings_changed_mid_run_are_replanned_or_refused(workspace, caplog):
    opt = str(workspace / "run.yml")
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 1 of 3 (a real SIGINT, saved and stopped)
        interrupted(opt, "name=mid", at_step=STEPS_PER_EPOCH - 1)
    folder = run_dir(workspace, "mid")
    kept = sha(folder / "last.pth")
    with pytest.raises(ConfigError, match=r"epochs=1: the run in .* has already trained 1 of its 3 planned epochs"):
        main(["-opt", opt, "name=mid", "--resume", "epochs=1"])
    assert sha(folder / "last.pth") == kept
    with caplog.at_level(logging.INFO, logger="gamma"):
        main(["-opt", opt, "name=mid", "--resume", "optim.lr=5e-4", "optim.min_lr=1e-4"])
    lr = 1e-4 + cosine(1, EPOCHS, 4e-4)  # the new curve at epoch 2, not the old one's
    assert "optim.lr 0.001 -> 0.0005" in caplog.text and f"epoch 2 of {EPOCHS} trains at lr {lr:.3g}" in caplog.text
    assert [r["lr"] for r in records(folder, "epoch")] == pytest.approx([1e-3, lr, 1e-4 + cosine(2, EPOCHS, 4e-4)])


# ---------------------------------------------------------------------------- nothing resumable thrown away
def interrupted(*argv: str, at_step: int) -> None:
    """Run ``main(-opt ...)`` and send it a real SIGINT while step ``at_step`` is logged (it saves and stops after the
    next step); the run's TrainingInterrupted comes out as KeyboardInterrupt."""
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, at_step)
        try:
            main(["-opt", *argv])
        except TrainingInterrupted as exc:
            raise KeyboardInterrupt from exc


def test_inherited_overwrite_does_not_replace_an_unfinished_run(workspace, caplog):
    # demo_base.yml sets overwrite: true; an option file built on such a base must not throw a resumable run away
    (workspace / "child.yml").write_text("base: run.yml\noverwrite: true\nname: child\n")
    opt = str(workspace / "child.yml")
    with pytest.raises(KeyboardInterrupt):
        interrupted(opt, at_step=STEPS_PER_EPOCH + 1)  # stops mid-epoch 2
    folder = run_dir(workspace, "child")
    kept, kept_metrics = sha(folder / "last.pth"), sha(folder / "metrics.jsonl")
    with caplog.at_level(logging.ERROR, logger="gamma.train.main"):
        assert cli(["-opt", opt]) == 2  # the same command again, without --resume
    assert (f"{folder} holds an unfinished run (last.pth); continue it with --resume, start over with --restart (or "
            "overwrite=true on the command line)") in caplog.text
    assert "overwrite: true from an option file does not replace an unfinished run" in caplog.text
    assert sha(folder / "last.pth") == kept and sha(folder / "metrics.jsonl") == kept_metrics
    with pytest.raises(ConfigError, match="contradict"):
        main(["-opt", opt, "--restart", "--resume"])
    out = main(["-opt", opt, "--restart"])  # starts over: every step of every epoch in this call, one log
    assert out["finished"] and len(out["step_losses"]) == EPOCHS * STEPS_PER_EPOCH
    assert sorted(train_losses(folder)) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    # a finished run is still replaced by the inherited overwrite: the demo's command re-runs
    again = main(["-opt", opt])
    assert again["finished"] and again["step_losses"] == out["step_losses"]


def test_overwrite_on_the_command_line_restarts_an_unfinished_run(workspace):
    opt = str(workspace / "run.yml")
    with pytest.raises(KeyboardInterrupt):
        interrupted(opt, "name=cmdline", at_step=1)
    assert load_config(opt, ["overwrite=true"]).restart and not load_config(opt, ["overwrite=false"]).restart
    out = main(["-opt", opt, "name=cmdline", "overwrite=true"])
    assert out["finished"] and len(out["step_losses"]) == EPOCHS * STEPS_PER_EPOCH


# ---------------------------------------------------------------------------------------------- option files
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# Cases that tests/test_train_config.py (unknown keys, wrong types, bases, environment variables) does not try.
@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("epochs: [1\n", [], r"bad\.yml: malformed YAML"),
        ("epochs: 2\n  batch_size: 3\n", [], r"bad\.yml: malformed YAML"),
        ("\tepochs: 2\n", [], r"bad\.yml: malformed YAML"),
        ("amp: yes\n", [], r"amp: expected one of 'none', 'bf16', 'fp16', got bool True"),  # YAML 1.1's yes
        ("optim: {lr: -1}\n", [], r"optim\.lr must be > 0"),
        ("optim: 3\n", [], r"optim: expected a mapping"),
        ("data: [{name: mine, root: x}]\n", [], r"'mine' is not registered .* needs meta_file, mos_range"),
        ("data: [{name: mine, root: x, meta_file: m.csv, mos_range: [5, 1]}]\n", [],
         r"mos_range must be finite with lo < hi"),
        ("epochs: 2\n", ["epochs=[1"], r"epochs: cannot parse value"),
        ("epochs: 2\n", ["epochs.x=1"], r"epochs\.x: epochs is a int, not a mapping or list"),
    ],
)
def test_bad_option_file_or_override_is_a_config_error_naming_it(tmp_path, text, overrides, message):
    path = _write(tmp_path / "bad.yml", text)
    with pytest.raises(ConfigError, match=message) as excinfo:
        load_config(path, overrides)
    assert "Traceback" not in str(excinfo.value)


def test_missing_option_file_and_missing_meta_file_name_the_file(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"option file not found: .*absent\.yml"):
        load_config(tmp_path / "absent.yml")
    path = _write(tmp_path / "ghost.yml", yaml.safe_dump({
        "output_dir": str(tmp_path / "runs"), "device": "cpu", "workers": 0, "model": {"name": "gamma_test"},
        "data": [{"name": "ghost", "root": str(tmp_path), "meta_file": str(tmp_path / "ghost.csv"),
                  "mos_range": [0, 1], "split_index": "all"}]}))
    with caplog.at_level(logging.ERROR, logger="gamma.train.main"):
        assert cli(["-opt", path]) == 2
    assert f"meta file not found: {tmp_path / 'ghost.csv'}" in caplog.text


_KEYS = st.sampled_from(["epochs", "epoch", "seed", "optim", "lr", "betas", "model", "name", "overrides", "data",
                         "eval", "crops", "amp", "base", "split_index", "log", "batch_size", "x"])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                     st.text(max_size=8), st.sampled_from(["bf16", "gamma_test", "all", "${HOME}", "1e-4"]))
def _nested(inner):
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=3))


_VALUES = st.recursive(_SCALARS, _nested, max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(data=st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_property_any_option_mapping_loads_or_raises_config_error(tmp_path, data):
    data.pop("base", None)  # base files are exercised above
    path = tmp_path / "prop.yml"
    path.write_text(yaml.safe_dump(data))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert cfg.epochs >= 1 and cfg.batch_size % cfg.grad_accum == 0
