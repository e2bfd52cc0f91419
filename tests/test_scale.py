"""Scale: file lists, sharded scoring under torchrun (gloo, 2 processes), `gamma convert` and fast loading, light
imports.

The torchrun test runs the real launcher with two CPU processes and kills one of them with SIGKILL mid-run.
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
from gamma import factory
from gamma.archs import precision as prec
from gamma.cli import main
from gamma.hub import prefer_converted, resolve_weights
from gamma.weights import converted_from, read_checkpoint, release_state_dict

FAST = ["--model", "gamma_test", "--crops", "center", "--no-progress", "--workers", "1", "--device", "cpu"]
REPO = Path(__file__).resolve().parents[1]


def assert_same_rows(a: list[list[str]], b: list[list[str]]) -> None:
    """Same header, names in the same order, scores equal up to float rounding (thread counts may differ)."""
    assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b]
    for ra, rb in zip(a[1:], b[1:], strict=True):
        assert float(ra[1]) == pytest.approx(float(rb[1]), rel=1e-5, abs=2e-6), ra[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Six small real photos (skimage) and one unreadable file, in input order."""
    from skimage import data

    root = tmp_path_factory.mktemp("scale_photos")
    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.thumbnail((96, 96))
        paths.append(root / f"{name}.png")
        img.save(paths[-1])
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 40)
    paths.insert(3, broken)
    return paths


# ------------------------------------------------------------------------------------------------ --list
def test_list_file_text_and_csv_give_the_rows_of_the_paths(photos, tmp_path, capsys):
    direct = tmp_path / "direct.csv"
    assert main(["score", *map(str, photos), *FAST, "--out", str(direct)]) == 1  # the broken file
    text = tmp_path / "files.txt"
    text.write_text("# photos to score\n\n" + "".join(f"  {p}\n" for p in photos[:4]) + "\n".join(map(str, photos[4:])))
    table = tmp_path / "files.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["MOS", "Image"])  # the path column found by its name, any case
        writer.writerows([[i, p] for i, p in enumerate(photos)])
    for listed in (text, table):
        out = tmp_path / f"{listed.stem}_{listed.suffix[1:]}.csv"
        assert main(["score", "--list", str(listed), *FAST, "--out", str(out)]) == 1
        assert read_rows(out) == read_rows(direct)
    # PATHs and --list together: the paths first, then the list's
    both = tmp_path / "both.csv"
    half = tmp_path / "half.txt"
    half.write_text("\n".join(map(str, photos[3:])))
    assert main(["score", *map(str, photos[:3]), "--list", str(half), *FAST, "--out", str(both)]) == 1
    assert read_rows(both) == read_rows(direct)
    capsys.readouterr()


def test_bad_file_lists_are_usage_errors(photos, tmp_path, capsys):
    assert main(["score", *FAST]) == 2
    assert "--list" in capsys.readouterr().err
    assert main(["score", "--list", str(tmp_path / "missing.txt"), *FAST]) == 2
    assert "missing.txt" in capsys.readouterr().err
    headerless = tmp_path / "bad.csv"
    headerless.write_text("a,b\n1,2\n")
    out = tmp_path / "out.csv"
    assert main(["score", "--list", str(headerless), *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "header" in err


# ------------------------------------------------------------------------------------------------ parts and merge
def test_resume_merges_parts_left_by_a_crashed_sharded_run_in_input_order(photos, tmp_path, capsys):
    """Parts of an interrupted 2-process run (records of both ranks, one of them half-written) are merged by a
    one-process --resume: the final rows equal an uninterrupted run's, each once, in input order."""
    reference = tmp_path / "reference.csv"
    main(["score", *map(str, photos), *FAST, "--out", str(reference)])
    expected = read_rows(reference)
    scores = {name: float(score) for name, score in expected[1:]}
    out = tmp_path / "scores.csv"
    # Input i went to rank i % 2; rank 0 got through inputs 0, 2 and 4 (the broken file, 3, was rank 1's); rank 1
    # only through input 1 before dying in the middle of writing input 3's record.
    rank0 = [{"index": i, "name": str(photos[i]), "score": scores[str(photos[i])], "mos": None, "error": None}
             for i in (0, 2, 4)]
    (tmp_path / ".scores.csv.rank0-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rank0))
    record1 = {"index": 1, "name": str(photos[1]), "score": scores[str(photos[1])], "mos": None, "error": None}
    (tmp_path / ".scores.csv.rank1-of-2.jsonl").write_text(json.dumps(record1) + "\n" + '{"index": 3, "na')
    # What rank 0 recorded before the parts were written: the reference run's record, with the parts' fields.
    record = json.loads((tmp_path / "reference.csv.meta.json").read_text())
    (tmp_path / ".scores.csv.parts.meta.json").write_text(json.dumps({**record, "columns": list(record1)}))
    args = ["score", *map(str, photos), *FAST, "--out", str(out)]
    assert main(args) == 2  # neither --resume nor --overwrite: the parts are not touched
    assert "--resume" in capsys.readouterr().err and len(list(tmp_path.glob(".scores.csv.rank*"))) == 2
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "scored 6 image(s)" in err and "skipped" not in err and "broken.jpg" in err
    assert read_rows(out) == expected
    assert not list(tmp_path.glob(".scores.csv.rank*")) and not list(tmp_path.glob(".scores.csv.parts*"))  # merged
    assert json.loads((tmp_path / "scores.csv.meta.json").read_text())["columns"] == ["name", "score"]


# ------------------------------------------------------------------------------------------------ torchrun
def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gamma", *args]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of the launcher ``parent``)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


def _wait_for_records(part: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{part} never held {count} records (launcher exit status {proc.poll()})")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_torchrun_two_processes_equal_one_also_after_a_killed_rank_and_resume(photos, tmp_path):
    # 180 distinct files (hard links of the photos) and one unreadable one, listed in a file.
    root = tmp_path / "many"
    root.mkdir()
    readable = [p for p in photos if p.suffix == ".png"]
    names = []
    for i in range(180):
        src = readable[i % len(readable)]
        names.append(root / f"{i:03d}_{src.name}")
        os.link(src, names[-1])
    names.insert(77, photos[3])  # the broken file
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, names)) + "\n")
    common = ["score", "--list", str(listing), *FAST, "--batch-size", "1"]

    one = tmp_path / "one.csv"
    assert main([*common, "--out", str(one)]) == 1
    expected = read_rows(one)
    assert len(expected) == 181

    two = tmp_path / "two.csv"
    proc = _torchrun([*common, "--out", str(two)], tmp_path / "two.log")
    assert proc.wait(timeout=600) != 0  # exit status 1 of rank 0 (the unreadable file), reported by torchrun
    log = (tmp_path / "two.log").read_text()
    assert "scored 180 image(s) in 2 processes, 1 could not be read" in log, log[-3000:]
    assert_same_rows(read_rows(two), expected)
    assert not list(tmp_path.glob(".two.csv.rank*"))

    # Kill rank 1 with SIGKILL after its third record: torchrun stops rank 0; the parts stay, --out is not written.
    three = tmp_path / "three.csv"
    proc = _torchrun([*common, "--out", str(three)], tmp_path / "three.log")
    try:
        _wait_for_records(tmp_path / ".three.csv.rank1-of-2.jsonl", 3, proc)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=300) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not three.exists()
    part1 = (tmp_path / ".three.csv.rank1-of-2.jsonl").read_text().count("\n")
    assert 3 <= part1 < 90  # killed mid-share
    proc = _torchrun([*common, "--out", str(three), "--resume"], tmp_path / "resume.log")
    assert proc.wait(timeout=600) != 0
    log = (tmp_path / "resume.log").read_text()
    assert "scored 180 image(s) in 2 processes, 1 could not be read" in log, log[-3000:]
    assert_same_rows(read_rows(three), expected)
    assert not list(tmp_path.glob(".three.csv.rank*"))


# ------------------------------------------------------------------------------------------------ convert
@pytest.fixture(scope="module")
def release_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = gamma.create_model("gamma_test_sdp")
    path = tmp_path_factory.mktemp("weights") / "Gamma-Prompt.pth"  # the release's file name: implies SDP prompts
    torch.save(release_state_dict(model), path)
    return path, model


def _scores(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(images, scene="natural")


def test_convert_round_trips_to_identical_fp32_scores(release_file, tmp_path, capsys):
    path, original = release_file
    images = torch.rand(3, 3, 240, 260, generator=torch.Generator().manual_seed(1))
    dest = tmp_path / "Gamma-Prompt.safetensors"
    assert main(["convert", str(path), str(dest)]) == 0
    assert str(dest) in capsys.readouterr().out
    info = converted_from(dest)
    st = path.stat()
    assert info["name"] == path.name and info["size"] == st.st_size and info["mtime_ns"] == st.st_mtime_ns
    assert info["precision"] == "fp32" and len(info["sha256"]) == 64
    ckpt = read_checkpoint(dest)
    assert ckpt.kind == "native" and ckpt.config.prompt_set == "sdp"  # recorded: no prompt_set needed to load it
    converted = gamma.create_model(pretrained=dest)
    reference = _scores(original, images)
    assert torch.equal(_scores(converted, images), reference)  # the same weights, the same ops
    assert torch.equal(_scores(gamma.create_model(pretrained=path, prompt_set="sdp"), images), reference)
    assert main(["convert", str(path), str(dest)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


def test_convert_bf16_stores_what_to_precision_keeps_and_loads_as_bf16(release_file, tmp_path, monkeypatch):
    """`gamma convert --precision bf16` stores the model as to_precision('bf16') holds it (the image tower's matmul
    weights in bf16, the rest fp32); loading the file gives that model, with the scores of an fp32 file converted
    after loading."""
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # bf16 allowed on any x86 CPU
    path, original = release_file
    dest = tmp_path / "half.safetensors"
    assert main(["convert", str(path), str(dest), "--precision", "bf16"]) == 0
    ckpt = read_checkpoint(dest)
    assert ckpt.extra["precision"] == "bf16"
    fp32 = tmp_path / "full.safetensors"
    main(["convert", str(path), str(fp32)])
    expected = gamma.create_model(pretrained=fp32, precision="bf16")
    want = expected.state_dict()
    assert ckpt.state_dict.keys() == want.keys()
    assert all(ckpt.state_dict[k].dtype == v.dtype and torch.equal(ckpt.state_dict[k], v) for k, v in want.items())
    dtypes = {v.dtype for v in ckpt.state_dict.values() if v.is_floating_point()}
    assert dtypes == {torch.bfloat16, torch.float32}  # not every tensor rounded: LayerNorms, head, text tower stay
    assert ckpt.state_dict["clip_model.visual.ln_post.weight"].dtype == torch.float32
    assert dest.stat().st_size < fp32.stat().st_size
    model = gamma.create_model(pretrained=dest)
    assert model.precision == "bf16" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    got = _scores(model, images)
    assert torch.equal(got, _scores(expected, images))  # the same weights, the same ops
    assert not torch.equal(got, _scores(original, images))  # it did compute in bf16


def test_convert_refuses_a_clip_backbone(tmp_path, capsys):
    model = gamma.create_model("gamma_test")
    backbone = {k.removeprefix("clip_model."): v for k, v in model.state_dict().items()
                if k.startswith("clip_model.") and ".mlp.experts." not in k and ".mlp.gating." not in k
                and not k.endswith(".mlp.scale")}
    backbone = {k.replace(".mlp.useful_experts.", ".mlp."): v for k, v in backbone.items()}
    path = tmp_path / "clip.pt"
    torch.save(backbone, path)
    assert main(["convert", str(path), str(tmp_path / "x.safetensors")]) == 2
    assert "CLIP backbone" in capsys.readouterr().err


def test_weight_lookup_prefers_an_unchanged_converted_copy(release_file, tmp_path, monkeypatch, caplog):
    path, _ = release_file
    home = tmp_path / "cache"
    home.mkdir()
    original = home / "Gamma-Prompt.pth"
    original.write_bytes(path.read_bytes())
    monkeypatch.setenv("GAMMA_HOME", str(home))
    monkeypatch.delenv("GAMMA_SDP_WEIGHTS", raising=False)
    assert resolve_weights("gamma_sdp") == original
    copy = home / "Gamma-Prompt.safetensors"
    factory.convert_checkpoint(original, copy)
    assert resolve_weights("gamma_sdp") == copy
    assert resolve_weights(path=original) == original  # an explicit path is used as given
    monkeypatch.setenv("GAMMA_SDP_WEIGHTS", str(original))
    assert resolve_weights("gamma_sdp") == copy  # found through the variable: the same preference
    # The original changed after the conversion: not used, and said so.
    os.utime(original, ns=(original.stat().st_atime_ns, original.stat().st_mtime_ns + 10**9))
    with caplog.at_level("WARNING", logger="gamma.hub"):
        assert resolve_weights("gamma_sdp") == original
    assert "converted from an earlier" in caplog.text
    # A bf16 conversion is only used when named.
    factory.convert_checkpoint(original, copy, precision="bf16")
    assert prefer_converted(original) == original
    # In the cache folder, a converted file whose original was deleted is still found.
    monkeypatch.delenv("GAMMA_SDP_WEIGHTS")
    factory.convert_checkpoint(original, copy)
    original.unlink()
    assert resolve_weights("gamma_sdp") == copy


def test_fast_build_without_init_equals_the_usual_build(release_file, monkeypatch):
    """With every weight matrix of the tiny model 'large', building for a checkpoint skips their allocation and init
    (meta device) and adopts the checkpoint's tensors: same state, same scores, references to parameters still valid,
    and it trains."""
    path, original = release_file
    from gamma import build  # where loading without init lives (gamma.build.build_loaded)

    monkeypatch.setattr(build, "_LARGE", 6000)  # above the 77 x 77 attention mask
    seen_meta = []
    real_load = build.load_into

    def spy(model, ckpt, strict=True):
        seen_meta.append(sum(p.is_meta for p in model.parameters()))
        return real_load(model, ckpt, strict=strict)

    monkeypatch.setattr(build, "load_into", spy)
    model = gamma.create_model(pretrained=path, prompt_set="sdp")
    assert seen_meta and seen_meta[0] > 10  # the fast path was taken
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    want, got = original.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_scores(model, images), _scores(original, images))
    params = dict(model.named_parameters())
    assert all(p is params[n] for n, p in model.named_parameters())
    model.train()
    model(torch.rand(2, 3, 224, 224), scene="natural").sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


# ------------------------------------------------------------------------------------------------ imports
def test_import_gamma_and_the_parser_leave_the_model_stack_unimported():
    code = (
        "import runpy, sys, gamma, gamma.cli\n"
        "gamma.cli.build_parser()\n"
        "heavy = [m for m in ('open_clip', 'torchvision', 'pandas', 'pyiqa', 'scipy', 'transformers') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "sys.argv = ['gamma', '--help']\n"
        "try:\n"
        "    runpy.run_module('gamma', run_name='__main__')  # python -m gamma --help\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "from gamma import create_model, GammaModel\n"
        "assert 'open_clip' in sys.modules and callable(create_model)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("ok"), result.stderr
    assert "convert" in result.stdout and "score" in result.stdout  # the help text
