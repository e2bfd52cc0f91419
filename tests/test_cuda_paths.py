"""The paths a CUDA run takes that a CPU can check: collectives every rank reaches (checkpoints under DDP), one
process group for chained stages, per-rank RNG state without touching CUDA, the device each torchrun rank takes,
device contexts at model creation, evaluation precision. GPU-only variants are marked ``cuda`` (tests/conftest.py
skips them where CUDA is absent; scripts/gpu_check.py runs them on a GPU machine)."""

from __future__ import annotations

import json
import math
import os
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


@pytest.mark.slow
def test_chained_stages_share_one_process_group(tmp_path, monkeypatch):
    """``pretrain.then`` under 2 processes: the process group is created once per process (main joins it and hands it
    to every stage; no stage destroys and re-creates it), the pretraining runs on rank 0 alone, and the follow-up
    stage trains from its backbone on both ranks."""
    import torch.distributed as dist
    from test_demo import REPO, TINY

    inits = tmp_path / "inits.txt"
    real_init, real_destroy = dist.init_process_group, dist.destroy_process_group

    def counting_init(*args, **kwargs):
        with open(inits, "a") as fh:
            fh.write(f"init {os.environ['RANK']}\n")
        return real_init(*args, **kwargs)

    def counting_destroy(*args, **kwargs):
        with open(inits, "a") as fh:
            fh.write(f"destroy {os.environ['RANK']}\n")
        return real_destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", counting_init)  # (inherited by the forked ranks)
    monkeypatch.setattr(dist, "destroy_process_group", counting_destroy)
    monkeypatch.chdir(REPO)
    tiny = [t for t in TINY if not t.startswith(("epochs=", "batch_size="))]
    argv = ["-opt", "options/demo.yml", f"data_root={tmp_path / 'data'}", f"output_dir={tmp_path / 'exp'}", *tiny,
            "epochs=1", "batch_size=16", "max_steps_per_epoch=2", "device=cpu", "pretrain.synthetic.num_contents=24",
            'pretrain.then=["options/demo_gamma.yml epochs=1 max_steps_per_epoch=2 model.overrides.moae_layers=1 '
            'device=cpu eval.crops=1", "options/demo_nomoae.yml epochs=1 max_steps_per_epoch=1 device=cpu '
            'eval.crops=1"]']
    launch_ddp(2, [argv], timeout=240)
    lines = sorted(inits.read_text().split("\n")[:-1])
    assert lines == ["destroy 0", "destroy 1", "init 0", "init 1"]
    first = json.loads((tmp_path / "exp" / "demo_clip" / "split_1" / "results.json").read_text())
    assert first["steps"] == 2 and len(first["summary"]["runs"]) == 2
    follow = json.loads((tmp_path / "exp" / "demo_gamma" / "split_1" / "results.json").read_text())
    log = (tmp_path / "exp" / "demo_gamma" / "split_1" / "train.log").read_text()
    assert follow["finished"] and "2 processes" in log


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize(("requested", "local_rank", "world", "count", "want"), [
    (None, 0, 1, 2, 0), (1, 0, 1, 2, 1),  # one process: the named device
    (None, 1, 2, 2, 1), (None, 3, 4, 4, 3),  # torchrun: cuda:LOCAL_RANK
    (None, 1, 2, 1, 0), (0, 1, 2, 1, 0),  # each task sees one GPU (CUDA_VISIBLE_DEVICES per task)
])
def test_cuda_index_of_each_process(requested, local_rank, world, count, want):
    from gamma.train.distributed import cuda_index

    assert cuda_index(requested, local_rank, world, count) == want


@pytest.mark.parametrize(("requested", "local_rank", "world", "count", "match"), [
    (1, 0, 2, 2, "every process on one GPU"), (0, 1, 2, 2, "every process on one GPU"),
    (None, 2, 4, 2, "LOCAL_RANK 2 but only 2"), (2, 0, 1, 2, "does not exist"), (None, 0, 1, 0, "no CUDA device"),
])
def test_cuda_index_refuses_shared_or_missing_gpus(requested, local_rank, world, count, match):
    from gamma.train.distributed import cuda_index

    with pytest.raises(ValueError, match=match):
        cuda_index(requested, local_rank, world, count)


def test_rng_state_of_a_cpu_run_never_touches_cuda(monkeypatch):
    """A CPU run on a GPU host must not initialise CUDA (memory on GPU 0, and "Cannot re-initialize CUDA in forked
    subprocess" in DDP children): no torch.cuda call at all."""
    from gamma.train import checkpoint

    def forbidden(*args, **kwargs):
        raise AssertionError("CUDA touched in a CPU run")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state_all", "get_rng_state", "set_rng_state", "device_count", "current_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    state = checkpoint.rng_state(torch.device("cpu"))
    assert state["cuda"] == [] and state["cuda_devices"] == []
    checkpoint.set_rng_state({**state, "cuda": [torch.zeros(8, dtype=torch.uint8)], "cuda_devices": [0]}, "cpu")


def test_rank_rng_state_is_each_ranks_own():
    from gamma.train.checkpoint import rank_rng_state

    extra = {"rng": "r0", "rng_per_rank": ["r0", "r1"]}
    assert [rank_rng_state(extra, r, 2) for r in (0, 1)] == ["r0", "r1"]
    assert rank_rng_state(extra, 2, 3) == "r0"  # another world size: rank 0's
    assert rank_rng_state({"rng": "old"}, 1, 2) == "old"  # a checkpoint from before per-rank states


# ------------------------------------------------------------------------------------------------ precision
def test_evaluation_ignores_the_training_autocast(workspace):
    """``amp=bf16`` is for the training forward: evaluation scores in fp32 (bf16 autocast rounded every score)."""
    from gamma.train.main import main

    base = ["-opt", str(workspace / "base.yml"), "eval_only=true"]
    fp32 = main([*base, "name=eval_fp32"])
    bf16 = main([*base, "name=eval_bf16", "amp=bf16"])
    assert bf16["history"][0]["datasets"] == fp32["history"][0]["datasets"]
    run_dir = workspace / "runs"
    assert ((run_dir / "eval_bf16" / "split_1" / "predictions" / "alpha.csv").read_text()
            == (run_dir / "eval_fp32" / "split_1" / "predictions" / "alpha.csv").read_text())


def test_tf32_mode_sets_and_restores_the_flags():
    from gamma.archs import precision

    before = precision._tf32_flags()
    with precision.tf32_mode(True):
        assert all(f in ("tf32", True) for f in precision._tf32_flags())
        with precision.exact_fp32():
            assert all(f in ("ieee", False) for f in precision._tf32_flags())
        assert all(f in ("tf32", True) for f in precision._tf32_flags())
    assert precision._tf32_flags() == before
    assert not torch.cuda.is_initialized()


# ------------------------------------------------------------------------------------------------ model creation
def test_create_model_from_a_file_inside_a_device_context_is_on_one_device(tmp_path):
    """A ``torch.device`` context places a model built from a file entirely on that device (the checkpoint's tensors
    too, not only those the constructor creates). The meta device stands in for CUDA here."""
    import gamma
    from gamma.weights import save_checkpoint

    torch.manual_seed(0)
    path = save_checkpoint(gamma.create_model("gamma_test"), tmp_path / "tiny.pth")
    with torch.device("meta"):
        model = gamma.create_model("gamma_test", pretrained=path)
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    assert devices == {"meta"}


@pytest.mark.cuda
def test_create_model_from_a_file_inside_a_cuda_context(tmp_path):
    import gamma
    from gamma.weights import save_checkpoint

    torch.manual_seed(0)
    ref = gamma.create_model("gamma_test")
    file = save_checkpoint(ref, tmp_path / "tiny.pth")
    with torch.device("cuda"):
        model = gamma.create_model("gamma_test", pretrained=file)
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cuda"}
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x.cuda()).cpu(), ref.eval()(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ GPU variants
# Written for a GPU machine (scripts/gpu_check.py runs them there); skipped here with the reason.
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_on_cuda_agrees_with_cpu_fp32(precision):
    """Scores on the GPU: fp32 is IEEE fp32 (no TF32), so it matches the CPU to float rounding; bf16 / fp16 weights
    stay close."""
    from helpers import perturb_moae

    import gamma
    from gamma.archs.precision import exact_fp32

    torch.manual_seed(0)
    cpu = gamma.create_model("gamma_test").eval()
    perturb_moae(cpu)
    x = torch.rand(4, 3, 224, 224)
    with torch.no_grad():
        want = cpu(x)
        gpu = gamma.create_model("gamma_test").eval()
        gpu.load_state_dict(cpu.state_dict())
        gpu = gpu.to("cuda").to_precision(precision)
        with exact_fp32():
            got = gpu(x.cuda()).float().cpu()
    tol = 1e-4 if precision == "fp32" else 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_on_cuda(workspace, amp):
    """The trainer on the GPU under AMP (fp16 with its GradScaler): finite losses, fp32 evaluation, a resumable
    checkpoint with the device's own RNG state."""
    from gamma.train.main import main

    r = main(["-opt", str(workspace / "base.yml"), f"name=amp_{amp}", "device=cuda", f"amp={amp}", "workers=1"])
    assert r["finished"] and all(math.isfinite(v) for v in r["step_losses"])
    ckpt = load_training_state(workspace / "runs" / f"amp_{amp}" / "split_1" / "last.pth")
    assert ckpt.extra["rng"]["cuda_devices"] == [torch.cuda.current_device()]
    assert (ckpt.extra.get("scaler") is not None) == (amp == "fp16")


@pytest.mark.cuda
def test_nccl_with_one_process(tmp_path):
    """NCCL, DDP and the trainer's collectives in a one-process group on the GPU (a fresh process: CUDA and forks
    do not mix)."""
    import subprocess
    import sys
    import textwrap

    from helpers import free_port

    code = textwrap.dedent("""
        import datetime, torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        import gamma
        from gamma.train.distributed import DistInfo, all_reduce_sum, barrier
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60), device_id=dev)
        model = gamma.create_model("gamma_test").to(dev).train()
        net = DistributedDataParallel(model, device_ids=[0], broadcast_buffers=False)
        loss = net(torch.rand(2, 3, 224, 224, device=dev)).square().sum()
        loss.backward()
        assert all(p.grad is not None for p in model.trainable_parameters())
        t = torch.ones(3, device=dev)
        dist.all_reduce(t)
        info = DistInfo(rank=0, world_size=1, device=dev, backend="nccl")
        assert torch.equal(all_reduce_sum(t, info), t)
        barrier(info)
        dist.destroy_process_group()
        print("nccl ok")
    """)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "nccl ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.cuda
def test_scoring_on_cuda_matches_the_cpu(tmp_path):
    from helpers import perturb_moae
    from PIL import Image

    import gamma
    from gamma.data.photos import distorted_photos
    from gamma.scorer import Scorer
    from gamma.weights import save_checkpoint

    torch.manual_seed(0)
    model = gamma.create_model("gamma_test")
    perturb_moae(model)
    weights = save_checkpoint(model, tmp_path / "w.pth")
    pictures, _ = distorted_photos(6, size=(240, 320), seed=0)
    for i, img in enumerate(pictures):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(tmp_path / f"{i}.png")
    cpu = Scorer(weights, device="cpu", num_workers=0).score(str(tmp_path))
    gpu = Scorer(weights, device="cuda", num_workers=0).score(str(tmp_path))
    assert list(cpu["name"]) == list(gpu["name"])
    torch.testing.assert_close(torch.tensor(gpu["score"].to_numpy()), torch.tensor(cpu["score"].to_numpy()),
                               rtol=0, atol=1e-4)


def test_evaluation_during_training_drops_the_scoring_caches(workspace):
    """After an evaluation inside training, the fused MoAE kernels hold no stacked expert weights (stale after the
    next step, and GPU memory for the whole epoch)."""
    import gamma
    from gamma.train.config import load_config
    from gamma.train.evaluate import evaluate
    from gamma.train.loop import build_datasets

    cfg = load_config(workspace / "base.yml", ["model.name=gamma_test"])
    _, held = build_datasets(cfg)
    model = gamma.create_model("gamma_test").train()
    evaluate(model, held, torch.device("cpu"), eval_cfg=cfg.eval)
    kernels = [m.kernel for m in model.moae_modules() if m.kernel is not None]
    assert kernels and all(k._cache is None for k in kernels) and model.training
    model.eval()
    evaluate(model, held, torch.device("cpu"), eval_cfg=cfg.eval)  # scoring alone keeps them for the next call
    assert any(k._cache is not None for k in kernels)


@pytest.mark.cuda
def test_promptiqa_prompt_cache_on_cuda_needs_no_host_copy():
    """On the GPU the prompt cache is keyed on the images' identity (no copy to the host per call): the same tensors
    hit, an in-place edit misses."""
    import gamma

    torch.manual_seed(0)
    model = gamma.create_model("promptiqa_test").cuda().eval()
    images, scores = torch.rand(4, 3, 224, 224, device="cuda"), torch.rand(4)
    with torch.no_grad():
        first = model.encode_prompt(images, scores)
        assert model.encode_prompt(images, scores) is first
        images[0, 0, 0, 0] += 0.5
        assert model.encode_prompt(images, scores) is not first
