"""The fast paths compute what the plain ones compute (no timing is asserted here; see scripts/bench.py)."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, max_abs, perturb_moae

import gamma
from gamma.archs.clip import ClassTokenBlock
from gamma.testing.reference import ReleaseReference

ROOT = Path(__file__).resolve().parents[1]


def assert_same_function(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Two fp32 evaluations of one function in different orders of operations. Their rounding follows the largest
    values summed, not each output (MoAE outputs here reach ~20; measured differences stay below 1e-6 of the largest
    output), so the absolute tolerance is a fraction of the tensor's largest value."""
    assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max_abs(expected))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = gamma.create_model("gamma_test")
    perturb_moae(m)
    return m


def test_moae_inference_path_matches_autograd_and_literal_paths(model):
    moae = model.moae_modules()[0]
    x = torch.randn(3, 50, 64)
    with torch.no_grad():
        fast = moae(x)  # inference path: shared + stacked experts with QuickGELU's slope folded in
    grad_mode = moae(x).detach()  # autograd path: stacked experts, plain QuickGELU
    moae.kernel = None
    with torch.no_grad():
        literal = moae(x)  # the formula as written: each expert in turn
    assert_same_function(fast, grad_mode)
    assert_same_function(fast, literal)
    with torch.no_grad():
        routed_part = fast - moae.useful_experts(x)
    assert float(routed_part.abs().max()) > 1e-3  # the experts contribute: the comparison is not vacuous


def test_moae_inference_cache_follows_weight_updates(model):
    moae = model.moae_modules()[0]
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        before = moae(x)
        moae.experts.expert_1.c_proj.weight.add_(0.5)  # in place: same storage, new version
        after = moae(x)
    moae.kernel = None
    with torch.no_grad():
        literal = moae(x)
    assert not torch.allclose(before, after)
    assert_same_function(after, literal)


def test_class_token_block_equals_the_full_blocks_class_row(model):
    visual = model.clip_model.visual
    last = visual.transformer.resblocks[-1]
    assert isinstance(last, ClassTokenBlock)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        cls_only = last(x)
        full = super(ClassTokenBlock, last).forward(x)  # open_clip's block on every token
    assert cls_only.shape == (2, 1, 64)
    assert_same_function(cls_only, full[:, :1])
    # Parameters and state_dict keys are those of the block it replaced.
    keys = [k for k in model.state_dict() if k.startswith("clip_model.visual.transformer.resblocks.3.")]
    assert "clip_model.visual.transformer.resblocks.3.attn.in_proj_weight" in keys


def test_class_token_block_gives_the_same_gradients(model):
    model.train()
    x = torch.rand(2, 3, 224, 224)
    fast = model.score_crops(x).sum()
    fast.backward()
    grads = {n: p.grad.clone() for n, p in model.named_trainable_parameters() if p.grad is not None}
    model.zero_grad()
    full = copy.deepcopy(model)
    blocks = full.clip_model.visual.transformer.resblocks
    blocks[-1].forward = super(ClassTokenBlock, blocks[-1]).forward  # every token, as open_clip computes it
    full.score_crops(x).sum().backward()
    for name, p in full.named_trainable_parameters():
        if name in grads:
            assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(".visual.transformer.resblocks.3.mlp.experts" in n for n in grads)


def test_routing_analysis_still_sees_every_token(model):
    last = model.clip_model.visual.transformer.resblocks[-1].mlp
    seen = {}
    with torch.no_grad(), model.watch_routing(seen.__setitem__):
        model.score_crops(torch.rand(2, 3, 224, 224))
    assert seen[last].shape == (2, 50, 3)  # 7 x 7 patches + CLS


def test_bench_flop_count_matches_torch_counter():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    model = gamma.create_model("gamma_test")
    ref = ReleaseReference(model.state_dict())
    flops = bench.flops_per_crop(model.config, prompts=5)
    with torch.no_grad():
        counted = bench.counted_flops(lambda: ref.score_crops(torch.rand(1, 3, 224, 224)))
    analytic = flops["release_image"] + flops["release_text_per_call"] - flops["release_attention_core"]
    assert abs(counted - analytic) / analytic < 0.01  # the rest: the (1, 5) logits matmul
    assert flops["ours_image"] < flops["release_image"]


@pytest.mark.slow
def test_bench_script_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--variant", "gamma_test", "--batches", "2", "--rounds", "1",
                "--skip", "train,agreement", "--threads", "1", "--matmul-size", "256", "--precision", "bf16,int8",
                "--photos", "8",
                "--precision-image", "240x320", "--out", str(out)])
    res = json.loads(out.read_text())
    # The script reports the largest absolute difference; scores lie within the score levels (~0.2 to ~1), where an
    # absolute 1e-5 is at least as loose as a relative 1e-5.
    assert res["scoring"][0]["max_abs_score_diff_vs_reference"] <= 1e-5
    assert res["protocol"]["max_abs_score_diff_vs_reference"] <= 1e-5
    assert "table" in res and res["machine"]["nproc"] >= 1
    # --precision: one row per precision (fp32 always first), each beside its own matmul rate; protocol; agreement.
    precision = res["precision"]
    assert [(r["batch"], r["precision"]) for r in precision["rows"]] == [(2, "fp32"), (2, "bf16"), (2, "int8")]
    assert all(r["matmul_gflops"] > 0 and r["images_per_s"] > 0 for r in precision["rows"])
    assert precision["rows"][0]["max_abs_score_diff_vs_fp32"] == 0
    assert 0 < precision["rows"][2]["max_abs_score_diff_vs_fp32"] < 0.05  # int8 computed, and close
    assert set(precision["protocol"]["seconds_per_image"]) == {"fp32", "bf16", "int8"}
    agreement = precision["agreement"]
    assert agreement["images"] == 8 and {"bf16", "int8"} <= agreement.keys()
    assert all(0 < agreement[p]["max_abs_delta"] < 0.05 for p in ("bf16", "int8"))
    assert "reduced precision" in res["table"]


def test_bench_train_step_restores_the_trained_weights():
    """The benchmark's training step undoes its updates, so the fp32 model still matches the reduced-precision copies
    made before it (it kept state_dict() tensors, which never require grad, and restored nothing)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    args = bench.parse_args(["--device", "cpu", "--variant", "gamma_test", "--threads", "1", "--matmul-size", "64"])
    b = bench.Bench(args)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    b.train_step(2, steps=1)
    after = b.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not b.model.training


def test_bench_perturb_draws_device_independent_values():
    """perturb() draws on the CPU and copies to the model's device (a CPU generator cannot fill CUDA tensors): the
    same values whatever the device or dtype."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    torch.manual_seed(0)
    a = gamma.create_model("gamma_test")
    b = copy.deepcopy(a).to(torch.float64)
    bench.perturb(a)
    bench.perturb(b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.double(), pb, rtol=1e-6, atol=1e-7), name


@pytest.mark.cuda
def test_bench_perturb_on_cuda():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    torch.manual_seed(0)
    cpu = gamma.create_model("gamma_test")
    gpu = copy.deepcopy(cpu).to("cuda")
    bench.perturb(cpu)
    bench.perturb(gpu)
    for pc, pg in zip(cpu.parameters(), gpu.parameters(), strict=True):
        assert torch.equal(pc, pg.cpu())


@pytest.mark.slow
def test_gpu_check_quick_on_cpu_writes_its_report(tmp_path):
    """scripts/gpu_check.py at toy size on the CPU: every step runs (fp16 steps say why they are skipped) and the
    JSON and Markdown reports hold each step's figures."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    report = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--skip", "cuda_tests"])
    assert report["ok"], {k: v.get("error") for k, v in report["steps"].items()}
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(saved["steps"]) == {"training", "scoring", "bench"}
    training = saved["steps"]["training"]["amp"]
    assert training["bf16"]["all_finite"] and training["bf16"]["prediction_dtype"] == "float32"
    assert "needs CUDA" in training["fp16"]["skipped"]
    scoring = saved["steps"]["scoring"]["precisions"]
    assert scoring["fp32"]["images_per_s"] > 0 and 0 < scoring["bf16"]["max_abs_delta"] < 0.05
    assert [r["precision"] for r in saved["steps"]["bench"]["rows"]] == ["fp32", "bf16"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Training" in md and "## Scoring a folder" in md and "## scripts/bench.py" in md


def test_gpu_check_reads_pytest_summaries():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    assert gpu_check._summary_words("3 passed, 2 skipped, 27 deselected in 14.09s") == [
        "3 passed", "2 skipped", "27 deselected"]
    assert gpu_check._summary_words("==== 1 failed, 1 passed in 3s ====") == ["1 failed", "1 passed"]
