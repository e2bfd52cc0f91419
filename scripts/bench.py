"""Benchmark Gamma: scoring, the test-time protocol and a training step, side by side with what bounds it.

Everything that is compared is measured in the same run, interleaved (A B C A B C ...), and summarised by medians:

- **ours**: :class:`gamma.GammaModel` (cached text features, fused experts, class-token-only last block, deduplicated
  crops, ``inference_mode``);
- **reference**: :class:`gamma.testing.reference.ReleaseReference`, the release's forward written literally (text
  tower over 77 tokens on every call, experts in a Python loop, crops one after another) on the *same* weights; the max
  abs score difference is reported (fp32: must be <= 1e-5);
- **matmul**: the machine's own rate for a large square fp32 ``torch.mm``, the ceiling for the model's FLOP rate;
- **floor**: the same CLIP backbone without MoAE (:func:`gamma.archs.clip.build_clip` with ``moae_layers=0``: open_clip
  modules, QuickGELU, the class-token-only last block; random init, image encoding only), which a model with dense MoAE
  experts cannot beat.

It also measures the trade-off of cheaper deterministic test-time modes against the 10-crop protocol: cost per image,
and agreement (SRCC) of their scores with the 10-crop scores on synthetic distorted pictures.

With ``--precision fp32,bf16,int8`` (any of fp32, bf16, fp16, int8) it adds one row per precision
(:meth:`gamma.GammaModel.to_precision`), all in the same interleaved rounds: images/s at each batch, and beside each the
machine's matmul rate *in that precision* (``torch.mm`` in bf16 / fp16, ``torch._int_mm`` for int8): the ceiling of a
model whose FLOPs are matmuls in that precision. Then the 10-crop protocol on one ``--precision-image`` picture per
precision, and the agreement of each precision's scores with fp32 on the photo set of
:func:`gamma.data.photos.distorted_photos` (max and mean |delta score|, SRCC, PLCC) with the same model.

    python scripts/bench.py                      # CPU, gamma_vitb16, about 5 minutes on 2 idle cores
    python scripts/bench.py --quick              # about 2 minutes
    python scripts/bench.py --precision fp32,bf16,int8 --batches 1,8 --skip scoring,protocol,train,agreement
    python scripts/bench.py --device cuda --precision fp32,bf16,fp16 --batches 64 --compile

The weights are random (nothing is downloaded), with the MoAE alphas, routers and experts perturbed so that every part
of the model contributes to the score; speed does not depend on the values. Timings on a shared machine are noisy:
compare the ratios of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gamma  # noqa: E402
from gamma.archs import precision as prec  # noqa: E402
from gamma.archs.clip import build_clip  # noqa: E402
from gamma.config import GammaConfig  # noqa: E402
from gamma.data import synthetic as syn  # noqa: E402
from gamma.data.photos import distorted_photos  # noqa: E402
from gamma.testing.reference import ReleaseReference  # noqa: E402

logger = logging.getLogger("bench")

CHEAP_MODES: tuple[tuple[str, int], ...] = (("center", 1), ("resize", 1), ("grid", 2), ("grid", 4), ("five", 5))


# ------------------------------------------------------------------------------------------------ machine
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "load_average_start": _loadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                peak: str | None = None) -> tuple[dict[str, list[float]], dict[str, Any], PeakMemory | None]:
    """Seconds per call of each function, called in turn (A B C A B C ...) ``rounds`` times.

    Returns the samples, each function's last output, and the peak memory of the first call of ``peak``.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, Any] = {}
    mem = None
    for r in range(rounds):
        for name, fn in fns.items():
            if r == 0 and name == peak:
                with PeakMemory(device) as mem:
                    seconds, outputs[name] = timed(fn, device)
            else:
                seconds, outputs[name] = timed(fn, device)
            samples[name].append(seconds)
    return samples, outputs, mem


def median(values: list[float]) -> float:
    return statistics.median(values)


class MatmulRate:
    """Multiplies two n x n matrices in ``precision``, ``reps`` times per call; :attr:`gflop` is the work of one call.

    fp32 / bf16 / fp16: ``torch.mm`` in that dtype; int8: ``torch._int_mm`` (int8 x int8 -> int32, the kernel of
    :class:`gamma.archs.precision.Int8Linear`), counted as 2 operations per multiply-add like the float ones. One call
    lasts at least ``min_seconds`` (``reps`` is set from a first timing), so that on a shared machine a sample of the
    ceiling averages over the load as long as a sample of the model it is compared with.
    """

    def __init__(self, device: torch.device, n: int, precision: str = "fp32", min_seconds: float = 0.5) -> None:
        self.device, self.precision = device, precision
        if precision == "int8":
            self.a, self.b = (torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device) for _ in range(2))
            self.mm = torch._int_mm
        else:
            dtype = prec.FLOAT_DTYPES[precision]
            self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            self.mm = torch.mm
        self.mm(self.a, self.b)  # warm-up
        seconds, _ = timed(lambda: self.mm(self.a, self.b), device)
        self.reps = max(1, math.ceil(min_seconds / max(seconds, 1e-6)))
        self.gflop = self.reps * 2 * n**3 / 1e9

    def __call__(self) -> None:
        for _ in range(self.reps):
            self.mm(self.a, self.b)

    def rates(self, seconds: list[float]) -> list[float]:
        """GFLOP/s of each timed call."""
        return [self.gflop / t for t in seconds]


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of a block of code: CUDA allocator peak, or on Linux the peak RSS (VmHWM, reset per block).

    The value is the peak minus the memory in use when the block started, in MiB. Without /proc (not Linux) the
    process-lifetime ``ru_maxrss`` is used, which only shows growth beyond every earlier peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None  # peak minus what was in use at the start
        self.peak_mib: float | None = None  # absolute peak (process RSS on CPU, allocated tensors on CUDA)
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_vm_hwm():
            self.start = _proc_status_kib("VmRSS") * 1024
            self.method = "VmHWM (peak RSS, reset per block)"
        else:
            self.start = _maxrss_bytes()
            self.method = "ru_maxrss delta (lower bound)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        self.mib = max(0.0, (peak - self.start) / 2**20)
        self.peak_mib = peak / 2**20


def _reset_vm_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        return _proc_status_kib("VmHWM") >= 0
    except OSError:
        return False


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ------------------------------------------------------------------------------------------------ FLOPs
def _tower_flops(tokens: int, width: int, layers: int, moae_layers: int, experts: int, last_cls_only: bool) -> dict:
    """Multiply-add FLOPs (2 per MAC) of a pre-LN transformer tower; attention counted over all L x L pairs."""
    hidden = 4 * width
    linear = attention = 0
    for i in range(layers):
        moae = i >= layers - moae_layers and experts > 0
        mlps = 1 + experts if moae else 1
        rows = 1 if (last_cls_only and i == layers - 1) else tokens  # rows that need queries, outputs and the MLP
        linear += 2 * tokens * width * 2 * width  # keys and values, every token
        linear += 2 * rows * width * width * 2  # queries and the output projection
        linear += 2 * rows * width * hidden * 2 * mlps
        linear += 2 * rows * width * experts if moae else 0  # router
        attention += 2 * rows * tokens * width * 2  # q k^T and attn v
    return {"linear": linear, "attention": attention}


def flops_per_crop(cfg: GammaConfig, prompts: int) -> dict[str, float]:
    """FLOPs of one 224 crop for our model, the release's forward (one crop per call) and the plain backbone."""
    v, t = cfg.vision, cfg.text
    grid = v.image_size // v.patch_size
    tokens = grid * grid + 1
    patch = 2 * grid * grid * v.width * 3 * v.patch_size**2
    head = 2 * v.width * cfg.embed_dim + 2 * 2 * cfg.embed_dim * (cfg.embed_dim // cfg.adapter_reduction)
    moae = cfg.moae_layers if cfg.has_moae else 0
    ours = _tower_flops(tokens, v.width, v.layers, moae, cfg.num_experts, last_cls_only=True)
    release = _tower_flops(tokens, v.width, v.layers, moae, cfg.num_experts, last_cls_only=False)
    plain = _tower_flops(tokens, v.width, v.layers, 0, 0, last_cls_only=True)
    text = _tower_flops(t.context_length, t.width, t.layers, moae, cfg.num_experts, last_cls_only=False)
    text_total = prompts * (sum(text.values()) + 2 * t.width * cfg.embed_dim)
    return {
        "ours_image": patch + sum(ours.values()) + head,
        "release_image": patch + sum(release.values()) + head,
        "release_text_per_call": text_total,  # the release re-encodes the prompts on every forward
        "plain_clip_image": patch + sum(plain.values()) + 2 * v.width * cfg.embed_dim,
        "ours_attention_core": ours["attention"],
        "release_attention_core": release["attention"] + prompts * text["attention"],
    }


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that torch.utils.flop_counter sees (matmuls and convolutions; CPU attention kernels are not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------ models
def perturb(model: gamma.GammaModel, seed: int = 0) -> None:
    """Non-trivial MoAE values (alpha, routers, experts) and head, so that every part changes the score, and OpenAI
    CLIP's trained logit scale (100; random init has 14): the level softmax is as sharp as with trained weights.

    The draws come from a CPU generator and are copied to the model's device (a CPU generator cannot fill CUDA
    tensors), so a model gets the same values on every device."""
    gen = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen).mul_(std).to(device=p.device, dtype=p.dtype)

    with torch.no_grad():
        for m in model.moae_modules():
            if m.scale is not None:
                m.scale.fill_(0.5)
            m.gating.layer1.weight.copy_(normal(m.gating.layer1.weight, 0.05))
            for expert in m.experts.values():
                for p in expert.parameters():
                    p.add_(normal(p, 0.3 * float(p.std().clamp_min(1e-3))))
        for p in model.adapter.parameters():
            p.copy_(normal(p, 0.05))
        model.clip_model.logit_scale.fill_(math.log(100.0))


def plain_clip(cfg: GammaConfig) -> torch.nn.Module:
    """The CLIP of ``cfg`` as gamma builds it, without MoAE and without our head: the floor of our image tower."""
    return build_clip(cfg.replace(moae_layers=0)).eval()


# ------------------------------------------------------------------------------------------------ sections
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        # Autocast is for the training step only (fp32 master weights, as the trainer's amp=); scoring in reduced
        # precision converts the weights once with to_precision (--precision): autocast casts the fp32 weights again
        # on every call (its cache lasts one autocast region and holds only weights that require grad), which ran at
        # 0.49x of fp32 on a CPU.
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.precisions = precision_list(args.precision, self.device)
        self.results: dict[str, Any] = {"args": vars(args).copy()}
        self.rows: list[tuple[str, ...]] = []

        torch.manual_seed(0)
        self.model = gamma.create_model(args.variant).to(self.device).eval()
        perturb(self.model)
        self.cfg = self.model.config
        self.scene = args.scene if self.cfg.prompt_set == "sdp" else None
        self.reference = ReleaseReference(self.model.state_dict(), prompt_set=self.cfg.prompt_set).to(self.device)
        self.floor = plain_clip(self.cfg).to(self.device)
        # Converted copies of the model for --precision (fp32: the model itself), made before anything is compiled: a
        # copy of a compiled module would still call the original's forward. A precision this device runs slower than
        # fp32 is measured anyway (allow_slow: its warning is logged and its rows marked).
        self.precision_models = {p: self.model if p == "fp32" else
                                 copy.deepcopy(self.model).to_precision(p, allow_slow=True) for p in self.precisions}
        if args.compile:
            self.floor.visual.compile()
            for m in {id(m): m for m in (self.model, *self.precision_models.values())}.values():
                m.clip_model.visual.compile()
        mean = torch.tensor(gamma.archs.OPENAI_CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(gamma.archs.OPENAI_CLIP_STD, device=self.device).view(1, 3, 1, 1)
        self.normalise = lambda x: (x - mean) / std
        self.mm = MatmulRate(self.device, args.matmul_size)

        # Text FLOPs per call are for 5 prompts: the release encodes 5 per image with SDP (see `text_calls`).
        self.flops = flops_per_crop(self.cfg, prompts=5)
        self.results["model"] = {
            "variant": args.variant,
            "prompt_set": self.cfg.prompt_set,
            "params_total": self.model.num_parameters(),
            "params_trainable": self.model.num_parameters(trainable_only=True),
            "params_plain_clip": sum(p.numel() for p in self.floor.parameters()),
            "gflop_per_crop": {k: v / 1e9 for k, v in self.flops.items()},
        }

    # -- helpers
    def autocast(self):
        """The training step's autocast (``--amp``)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def ours_crops(self, x: torch.Tensor, model: gamma.GammaModel | None = None) -> Callable[[], torch.Tensor]:
        model = self.model if model is None else model

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return model.score_crops(x, scene=self.scene)
        return run

    def reference_crops(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return self.reference.score_crops(x, self.scene)
        return run

    def floor_crops(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return self.floor.encode_image(self.normalise(x))
        return run

    def text_calls(self, batch: int) -> int:
        """Sets of 5 prompts the release encodes per forward: one (naive), or one per image (SDP)."""
        return batch if self.cfg.prompt_set == "sdp" else 1

    # -- sections
    def check_flops(self) -> None:
        """Cross-check the analytic FLOP count against torch's counter on the reference (which uses plain ops)."""
        x = torch.rand(1, 3, self.cfg.vision.image_size, self.cfg.vision.image_size, device=self.device)
        counted = counted_flops(self.reference_crops(x))
        analytic = (self.flops["release_image"] + self.flops["release_text_per_call"]
                    - self.flops["release_attention_core"])
        self.results["model"]["flop_check"] = {
            "reference_counted_gflop_without_attention_core": counted / 1e9,
            "analytic_gflop_without_attention_core": analytic / 1e9,
        }

    def scoring(self, batches: list[int], rounds: dict[int, int]) -> None:
        size = self.cfg.vision.image_size
        out = []
        warm = torch.rand(1, 3, size, size, device=self.device)
        for fn in (self.ours_crops(warm), self.reference_crops(warm), self.floor_crops(warm)):
            fn()  # one-time work: text features and stacked experts cached, allocator warmed
        for batch in batches:
            x = torch.rand(batch, 3, size, size, device=self.device, generator=None)
            ours, ref, floor = self.ours_crops(x), self.reference_crops(x), self.floor_crops(x)
            if self.args.compile or self.device.type == "cuda":
                ours(), floor()  # compile / autotune for this shape
            fns = {"matmul": self.mm, "ours": ours, "reference": ref, "floor": floor}
            samples, outputs, mem = interleaved(fns, rounds.get(batch, 2), self.device, peak="ours")
            diff = float((outputs["ours"].float() - outputs["reference"]).abs().max())
            rate = self.mm.rates(samples.pop("matmul"))
            t = {k: median(v) for k, v in samples.items()}
            ours_gflop = batch * self.flops["ours_image"] / 1e9
            ref_gflop = (batch * self.flops["release_image"]
                         + self.flops["release_text_per_call"] * self.text_calls(batch)) / 1e9
            row = {
                "batch": batch,
                "seconds": t,
                "samples": samples,
                "images_per_s": {k: batch / v for k, v in t.items()},
                "latency_ms_per_batch": {k: 1000 * v for k, v in t.items()},
                "speedup_vs_reference": t["reference"] / t["ours"],
                # Each round's reference/ours ratio: the two ran back to back under the same machine load.
                "speedup_per_round": [r / o for r, o in zip(samples["reference"], samples["ours"], strict=True)],
                "ours_vs_floor_time": t["ours"] / t["floor"],
                "max_abs_score_diff_vs_reference": diff,
                "matmul_gflops": median(rate),
                "ours_gflops": ours_gflop / t["ours"],
                "reference_gflops": ref_gflop / t["reference"],
                "floor_gflops": batch * self.flops["plain_clip_image"] / 1e9 / t["floor"],
                "peak_mem_mib_ours": mem.mib,
                "peak_mem_abs_mib": mem.peak_mib,
                "peak_mem_method": mem.method,
            }
            row["ours_pct_of_matmul"] = 100 * row["ours_gflops"] / row["matmul_gflops"]
            row["reference_pct_of_matmul"] = 100 * row["reference_gflops"] / row["matmul_gflops"]
            row["floor_pct_of_matmul"] = 100 * row["floor_gflops"] / row["matmul_gflops"]
            out.append(row)
            logger.info("batch %d: ours %.3fs  reference %.3fs (x%.2f)  floor %.3fs  diff %.1e  %.0f%% of matmul",
                        batch, t["ours"], t["reference"], row["speedup_vs_reference"], t["floor"], diff,
                        row["ours_pct_of_matmul"])
        self.results["scoring"] = out

    def protocol(self, height: int, width: int, images: int, rounds: int) -> None:
        """The full test-time protocol on full-resolution images, and the cheaper deterministic modes."""
        x = torch.rand(images, 3, height, width, device=self.device)
        model = self.model
        default = model.crop_protocol
        offsets = default.offsets(height, width)

        def ours() -> torch.Tensor:
            with torch.inference_mode():
                return model(x, scene=self.scene)

        def ref() -> torch.Tensor:
            with torch.no_grad():
                return self.reference.score_images(x, self.scene, crop_offsets=offsets)

        samples, outputs, mem = interleaved({"ours": ours, "reference": ref}, rounds, self.device, peak="ours")
        diff = float((outputs["ours"].float() - outputs["reference"]).abs().max())
        t = {k: median(v) for k, v in samples.items()}
        modes = {}
        for mode, num in CHEAP_MODES:
            model.set_crop_protocol(mode=mode, num=num)
            name = f"{mode}-{num}" if mode == "grid" else mode
            modes[name] = median(interleaved({"m": ours}, max(1, rounds - 1), self.device)[0]["m"]) / images
        model.crop_protocol = default
        self.results["protocol"] = {
            "image": f"{height}x{width}",
            "images_per_call": images,
            "crops": default.num,
            "distinct_windows": len(set(offsets)),
            "seconds_per_image": {k: v / images for k, v in t.items()},
            "samples": samples,
            "speedup_vs_reference": t["reference"] / t["ours"],
            "max_abs_score_diff_vs_reference": diff,
            "cheap_modes_seconds_per_image": modes,
            "peak_mem_mib_ours": mem.mib,
            "peak_mem_abs_mib": mem.peak_mib,
        }
        logger.info("protocol %dx%d: ours %.2fs/img  reference %.2fs/img  diff %.1e", height, width,
                    t["ours"] / images, t["reference"] / images, diff)

    def train_step(self, batch: int, steps: int) -> None:
        model = self.model
        model.train()
        size = self.cfg.vision.image_size
        opt = torch.optim.Adam(model.trainable_parameters(), lr=2e-5)
        x = torch.rand(batch, 3, size, size, device=self.device)
        y = torch.rand(batch, device=self.device)
        # the parameters the steps change (state_dict() tensors are detached: none of them has requires_grad)
        state = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        scaler_ctx = self.autocast

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            with scaler_ctx():
                loss = F.mse_loss(model(x, scene=self.scene).float(), y)
            loss.backward()
            opt.step()
            return loss.item()

        step()  # warm-up (optimizer state allocated)
        with PeakMemory(self.device) as mem:
            seconds = [timed(step, self.device)[0] for _ in range(steps)]
        with torch.no_grad():  # undo the updates: the other sections score the benchmark weights
            for name, p in model.named_parameters():
                if name in state:
                    p.copy_(state[name])
        if not state:
            raise RuntimeError("train step: the model has no trainable parameters to restore")
        model.eval()
        self.results["train_step"] = {
            "batch": batch,
            "seconds": median(seconds),
            "samples": seconds,
            "images_per_s": batch / median(seconds),
            "peak_mem_mib": mem.mib,
            "peak_mem_abs_mib": mem.peak_mib,
            "peak_mem_method": mem.method,
        }
        logger.info("train step, batch %d: %.2fs", batch, median(seconds))

    def agreement(self, count: int) -> None:
        self.results["agreement"] = mode_agreement(self.args, count)

    # -- reduced precision (--precision)
    def precision_info(self) -> dict[str, Any]:
        flags = sorted(prec.cpu_flags() & {f for need in prec.CPU_FLAGS.values() for f in need})
        fast = list(prec.fast_precisions(self.device))
        return {"precisions": self.precisions, "fast_on_this_device": fast, "cpu_flags": flags,
                "auto": prec.resolve_precision("auto", self.device), "rows": [], "protocol": None, "agreement": None}

    def precision_scoring(self, batches: list[int], rounds: dict[int, int]) -> None:
        """Each precision's scoring rate at each batch, beside the matmul rate of that precision, interleaved."""
        info = self.results.setdefault("precision", self.precision_info())
        size, n = self.cfg.vision.image_size, self.args.matmul_size
        models = self.precision_models
        mms = {p: MatmulRate(self.device, n, p) for p in self.precisions}
        for batch in batches:
            x = torch.rand(batch, 3, size, size, device=self.device, generator=None)
            fns: dict[str, Callable[[], Any]] = {}
            for p in self.precisions:
                fns[f"matmul_{p}"] = mms[p]
                fns[p] = self.ours_crops(x, models[p])
                fns[p]()  # first call at this shape: caches (text features, stacked / int8 weights), kernel choice
            samples, outputs, _ = interleaved(fns, rounds.get(batch, 2), self.device)
            for p in self.precisions:
                seconds = median(samples[p])
                mm_rates = mms[p].rates(samples[f"matmul_{p}"])
                mm = median(mm_rates)
                gflops = batch * self.flops["ours_image"] / 1e9 / seconds
                row = {
                    "batch": batch, "precision": p, "seconds": seconds, "samples": samples[p],
                    "images_per_s": batch / seconds, "matmul_gflops": mm, "matmul_gflops_samples": mm_rates,
                    "model_gflops": gflops, "pct_of_matmul": 100 * gflops / mm,
                    "fast_on_this_device": p in info["fast_on_this_device"],
                    "speedup_vs_fp32": median(samples["fp32"]) / seconds,
                    # Each round's fp32/p ratio: the two ran back to back under the same machine load.
                    "speedup_per_round": [f / t for f, t in zip(samples["fp32"], samples[p], strict=True)],
                    "max_abs_score_diff_vs_fp32": float((outputs[p].float() - outputs["fp32"].float()).abs().max()),
                }
                info["rows"].append(row)
                logger.info("precision %s, batch %d: %.2f img/s (x%.2f vs fp32), %.0f GFLOP/s = %.0f%% of its matmul "
                            "rate %.0f", p, batch, row["images_per_s"], row["speedup_vs_fp32"], gflops,
                            row["pct_of_matmul"], mm)

    def precision_protocol(self, height: int, width: int, images: int, rounds: int) -> None:
        """The 10-crop test-time protocol on ``images`` full-resolution pictures per call, in each precision."""
        info = self.results.setdefault("precision", self.precision_info())
        x = torch.rand(images, 3, height, width, device=self.device)
        fns = {}
        for p in self.precisions:
            model = self.precision_models[p]

            def run(model: gamma.GammaModel = model) -> torch.Tensor:
                with torch.inference_mode():
                    return model(x, scene=self.scene)

            run()  # warm-up at this shape
            fns[p] = run
        samples, _, _ = interleaved(fns, rounds, self.device)
        per_image = {p: median(v) / images for p, v in samples.items()}
        info["protocol"] = {
            "image": f"{height}x{width}", "images_per_call": images, "crops": self.model.crop_protocol.num,
            "seconds_per_image": per_image, "images_per_s": {p: 1 / v for p, v in per_image.items()},
            "speedup_vs_fp32": {p: per_image["fp32"] / v for p, v in per_image.items()},
            "samples": samples,
        }
        logger.info("precision protocol %dx%d: %s", height, width,
                    ", ".join(f"{p} {v:.2f} s/image" for p, v in per_image.items()))

    def precision_agreement(self, count: int) -> None:
        """Each precision's scores against fp32's on ``count`` distorted photographs (max and mean |delta|, SRCC, PLCC).

        The model is the benchmark's (every trainable part perturbed, full size by default), or ``--checkpoint``.
        """
        info = self.results.setdefault("precision", self.precision_info())
        if self.args.checkpoint:
            base = gamma.create_model(pretrained=self.args.checkpoint).to(self.device).eval()
            source = str(self.args.checkpoint)

            def at(p: str) -> gamma.GammaModel:
                return base if p == "fp32" else copy.deepcopy(base).to_precision(p, allow_slow=True)
        else:
            base, at = self.model, self.precision_models.__getitem__
            source = f"{self.args.variant}, random weights with perturbed MoAE, adapter and logit scale"
        scene = self.args.scene if base.config.prompt_set == "sdp" else None
        images, _ = distorted_photos(count, size=base.config.vision.image_size, seed=0)
        images = images.to(self.device)

        def scores(model: gamma.GammaModel) -> torch.Tensor:
            with torch.inference_mode():
                return torch.cat([model(images[i:i + 8], scene=scene) for i in range(0, count, 8)]).float().cpu()

        start = time.perf_counter()
        ref = scores(base)
        out: dict[str, Any] = {"model": source, "images": count, "fp32_std": float(ref.std()),
                               "fp32_range": [float(ref.min()), float(ref.max())],
                               "fp32_seconds": time.perf_counter() - start}
        for p in self.precisions:
            if p == "fp32":
                continue
            start = time.perf_counter()
            s = scores(at(p))
            delta = (s - ref).abs()
            out[p] = {"max_abs_delta": float(delta.max()), "mean_abs_delta": float(delta.mean()),
                      "srcc": float(spearmanr(s.numpy(), ref.numpy())[0]),
                      "plcc": float(pearsonr(s.numpy(), ref.numpy())[0]), "seconds": time.perf_counter() - start}
            logger.info("agreement %s vs fp32 on %d photos: %s", p, count, out[p])
        info["agreement"] = out

    def finish(self) -> dict[str, Any]:
        self.results["machine"]["load_average_end"] = _loadavg()
        return self.results


def precision_list(spec: str | None, device: torch.device) -> list[str]:
    """The precisions of ``--precision`` (fp32 first, always: it is the baseline), ``auto`` resolved for ``device``.

    Raises:
        ValueError: an unknown name, or one the device cannot run at all (int8 on CUDA). One it runs slower than fp32
            is measured (with a logged warning).
    """
    out = ["fp32"]
    for name in filter(None, (spec or "").split(",")):
        p = prec.resolve_precision(name.strip(), device)
        prec.check_precision(p, device, allow_slow=True)
        if p not in out:
            out.append(p)
    return out if spec else []


# ------------------------------------------------------------------------------------------------ agreement
def synthetic_pictures(count: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, list[float]]:
    """Distorted synthetic pictures (count, 3, height, width) in [0, 1] and their noise-free quality."""
    rng = np.random.default_rng(seed)
    pool = syn._photo_pool()
    spec = syn.DEMO_SPECS[0]
    images, quality = [], []
    for i in range(count):
        img = syn.make_content(rng, max(height, width), spec.scene, pool).crop((0, 0, width, height))
        kind = syn.DISTORTIONS[i % len(syn.DISTORTIONS)]
        strength = 0.0 if i % 7 == 0 else float(rng.uniform(0.05, 1.0))
        img = syn.distort(img, kind, strength, rng)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))
        quality.append(syn.normalised_quality(spec, [(kind, strength)]))
    return torch.stack(images), quality


def mode_agreement(args: argparse.Namespace, count: int) -> dict[str, Any]:
    """SRCC between the 10-crop scores and each cheaper mode's, on synthetic distorted 384x512 pictures.

    Agreement only means something for a model whose scores follow quality (``--checkpoint``, e.g. the release's
    weights). Without one, the random tiny variant is used and the figures only say how much the crop choice moves an
    untrained model's scores (its SRCC against the true quality, reported alongside, shows how uninformative it is).
    """
    torch.manual_seed(0)
    if args.checkpoint:
        model = gamma.create_model(pretrained=args.checkpoint).eval()
        source = str(args.checkpoint)
    else:
        model = gamma.create_model("gamma_test").eval()
        source = "gamma_test, random weights (no --checkpoint given)"
    scene = args.scene if model.config.prompt_set == "sdp" else None
    images, quality = synthetic_pictures(count, 384, 512, seed=2)
    scores = {}
    with torch.inference_mode():
        model.set_crop_protocol(mode="random", num=10)
        scores["random-10"] = torch.cat([model(images[i:i + 8], scene=scene) for i in range(0, count, 8)])
        for mode, num in CHEAP_MODES:
            model.set_crop_protocol(mode=mode, num=num)
            name = f"{mode}-{num}" if mode == "grid" else mode
            scores[name] = torch.cat([model(images[i:i + 8], scene=scene) for i in range(0, count, 8)])
    ten = scores["random-10"].numpy()
    return {
        "model": source,
        "images": count,
        "srcc_vs_random10": {k: float(spearmanr(v.numpy(), ten)[0]) for k, v in scores.items() if k != "random-10"},
        "srcc_vs_truth": {k: float(spearmanr(v.numpy(), quality)[0]) for k, v in scores.items()},
    }


# ------------------------------------------------------------------------------------------------ report
def report(res: dict[str, Any]) -> str:
    lines = []
    m, mach = res["model"], res["machine"]
    lines.append(f"machine: {mach['nproc']} cores, {mach['cpu']}, torch {mach['torch']} ({mach['torch_threads']} "
                 f"threads)" + (f", {mach['gpu']}" if "gpu" in mach else "") +
                 f"; load average {mach['load_average_start']} -> {mach.get('load_average_end')}")
    g = m["gflop_per_crop"]
    lines.append(f"model: {m['variant']} ({m['prompt_set']} prompts), {m['params_total'] / 1e6:.1f} M parameters "
                 f"({m['params_trainable'] / 1e6:.1f} M trainable); plain CLIP {m['params_plain_clip'] / 1e6:.1f} M")
    lines.append(f"GFLOP per 224 crop: ours {g['ours_image']:.1f} (text cached) | release {g['release_image']:.1f} "
                 f"+ text {g['release_text_per_call']:.1f} per call | plain CLIP image {g['plain_clip_image']:.1f}")
    if "flop_check" in m:
        fc = m["flop_check"]
        lines.append(f"  FLOP check (reference, batch 1, without attention core): counted "
                     f"{fc['reference_counted_gflop_without_attention_core']:.2f} vs analytic "
                     f"{fc['analytic_gflop_without_attention_core']:.2f} GFLOP")
    if "scoring" in res:
        lines.append("")
        lines.append("scoring 224x224 crops (one pass; medians of interleaved rounds; speedup = ratio of the medians, "
                     "per round = median of each round's ratio)")
        head = (f"{'batch':>5} | {'ours img/s':>10} | {'ref img/s':>9} | {'speedup':>7} | {'per round':>9} | "
                f"{'floor img/s':>11} | "
                f"{'ours ms':>8} | {'max|diff|':>9} | {'matmul GF/s':>11} | {'ours GF/s':>9} | {'% of mm':>7} | "
                f"{'ref %':>5} | {'floor %':>7} | {'+peak MiB':>9}")
        lines.append(head)
        lines.append("-" * len(head))
        for r in res["scoring"]:
            ips = r["images_per_s"]
            lines.append(
                f"{r['batch']:>5} | {ips['ours']:>10.2f} | {ips['reference']:>9.2f} | "
                f"{r['speedup_vs_reference']:>6.2f}x | {median(r['speedup_per_round']):>8.2f}x | "
                f"{ips['floor']:>11.2f} | "
                f"{r['latency_ms_per_batch']['ours']:>8.0f} | {r['max_abs_score_diff_vs_reference']:>9.1e} | "
                f"{r['matmul_gflops']:>11.1f} | {r['ours_gflops']:>9.1f} | {r['ours_pct_of_matmul']:>6.0f}% | "
                f"{r['reference_pct_of_matmul']:>4.0f}% | {r['floor_pct_of_matmul']:>6.0f}% | "
                f"{r['peak_mem_mib_ours'] or 0:>9.0f}")
    if "protocol" in res:
        p = res["protocol"]
        s = p["seconds_per_image"]
        lines.append("")
        lines.append(f"test-time protocol, {p['image']} images ({p['crops']} random crops, {p['distinct_windows']} "
                     f"distinct): ours {s['ours']:.2f} s/image, reference {s['reference']:.2f} s/image "
                     f"({p['speedup_vs_reference']:.2f}x), max|diff| {p['max_abs_score_diff_vs_reference']:.1e}, "
                     f"peak {p['peak_mem_mib_ours'] or 0:.0f} MiB")
        agree = res.get("agreement", {}).get("srcc_vs_random10", {})
        truth = res.get("agreement", {}).get("srcc_vs_truth", {})
        lines.append(f"{'mode':>10} | {'s/image':>7} | {'cost vs 10-crop':>15} | {'SRCC vs 10-crop':>15} | "
                     f"{'SRCC vs truth':>13}")
        lines.append(f"{'random-10':>10} | {s['ours']:>7.2f} | {1:>15.2f} | {1:>15.3f} | "
                     f"{truth.get('random-10', float('nan')):>13.3f}")
        for name, sec in p["cheap_modes_seconds_per_image"].items():
            lines.append(f"{name:>10} | {sec:>7.2f} | {sec / s['ours']:>15.2f} | "
                         f"{agree.get(name, float('nan')):>15.3f} | {truth.get(name, float('nan')):>13.3f}")
        if "agreement" in res:
            lines.append(f"  agreement model: {res['agreement']['model']}; {res['agreement']['images']} images")
    if "precision" in res:
        lines.extend(["", *precision_report(res["precision"], m["gflop_per_crop"]["ours_image"])])
    if "train_step" in res:
        t = res["train_step"]
        lines.append("")
        lines.append(f"training step, batch {t['batch']}: {t['seconds']:.2f} s ({t['images_per_s']:.2f} img/s), "
                     f"peak {t['peak_mem_mib'] or 0:.0f} MiB")
    return "\n".join(lines)


def precision_report(info: dict[str, Any], gflop_per_crop: float) -> list[str]:
    """The --precision rows: images/s beside the same precision's matmul rate (the ceiling), protocol, agreement."""
    lines = [f"reduced precision (to_precision), {gflop_per_crop:.1f} GFLOP per crop; fast on this device: "
             f"{', '.join(info['fast_on_this_device'])} (CPU flags: {', '.join(info['cpu_flags']) or 'none'}); "
             f"auto = {info['auto']}"]
    if info["rows"]:
        head = (f"{'batch':>5} | {'precision':>9} | {'img/s':>7} | {'vs fp32':>7} | {'per round':>9} | "
                f"{'matmul GF/s':>11} | {'model GF/s':>10} | {'% of mm':>7} | {'max|diff|':>9}")
        lines += [head, "-" * len(head)]
        for r in info["rows"]:
            slow = "" if r["fast_on_this_device"] else "  (slow on this device)"
            lines.append(f"{r['batch']:>5} | {r['precision']:>9} | {r['images_per_s']:>7.2f} | "
                         f"{r['speedup_vs_fp32']:>6.2f}x | {median(r['speedup_per_round']):>8.2f}x | "
                         f"{r['matmul_gflops']:>11.1f} | {r['model_gflops']:>10.1f} | {r['pct_of_matmul']:>6.0f}% | "
                         f"{r['max_abs_score_diff_vs_fp32']:>9.1e}{slow}")
    if info["protocol"]:
        p = info["protocol"]
        lines.append(f"{p['crops']}-crop protocol, {p['image']} image: " + ", ".join(
            f"{k} {v:.2f} s/image ({p['speedup_vs_fp32'][k]:.2f}x)" for k, v in p["seconds_per_image"].items()))
    if info["agreement"]:
        a = info["agreement"]
        lines.append(f"agreement with fp32 on {a['images']} distorted photos ({a['model']}; fp32 scores: std "
                     f"{a['fp32_std']:.3f}, range {a['fp32_range'][0]:.3f}..{a['fp32_range'][1]:.3f})")
        for p in info["precisions"]:
            if p in a:
                r = a[p]
                lines.append(f"{p:>9}: max|delta| {r['max_abs_delta']:.2e}, mean|delta| {r['mean_abs_delta']:.2e}, "
                             f"SRCC {r['srcc']:.5f}, PLCC {r['plcc']:.5f}")
    return lines


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", default="gamma_vitb16", help="a name from gamma.list_models()")
    p.add_argument("--quick", action="store_true", help="fewer batches, rounds and pictures (about a minute)")
    p.add_argument("--batches", default=None, help="comma-separated scoring batch sizes (default 1,8,32)")
    p.add_argument("--rounds", default=None, help="interleaved rounds per measurement: N, or per scoring batch "
                                                 "'1:3,8:3,32:1' (protocol and training then take the smallest)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--precision", default=None, help="comma-separated precisions to compare, e.g. fp32,bf16,int8 "
                                                     "(fp32, bf16, fp16, int8, auto; fp32 is always included)")
    p.add_argument("--precision-image", default=None, help="HxW of the --precision protocol row's picture (default "
                                                           "768x1024)")
    p.add_argument("--photos", type=int, default=64, help="photos in the --precision agreement (default 64)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast for the training step "
                   "(mixed-precision training, as the trainer's amp=); scoring precision is --precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the image towers (ours and plain CLIP)")
    p.add_argument("--scene", default="natural", help="scene for SDP variants")
    p.add_argument("--matmul-size", type=int, default=None, help="square matmul size (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--checkpoint", default=None, help="trained weights for the mode-agreement section (default: "
                                                      "random tiny model)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: scoring,protocol,train,agreement, "
                   "and of --precision: precision_scoring,precision_protocol,precision_agreement")
    p.add_argument("--out", default=None, help="JSON file (default runs/bench-<device>.json)")
    args = p.parse_args(argv)
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device.startswith("cuda") else 2048
    if args.batches is None:
        args.batches = "1,8" if args.quick else "1,8,32"
    if args.out is None:
        args.out = f"runs/bench-{torch.device(args.device).type}{'-quick' if args.quick else ''}.json"
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        p.error("--amp fp16 needs a CUDA device (as the trainer's amp=fp16)")
    try:
        height, width = (int(v) for v in (args.precision_image or "768x1024").lower().split("x"))
    except ValueError:
        p.error(f"--precision-image must be HxW, e.g. 768x1024, got {args.precision_image!r}")
    args.precision_image = f"{height}x{width}"
    return args


def plan_rounds(spec: str | None, batches: list[int], quick: bool, cuda: bool) -> tuple[dict[int, int], int]:
    """Rounds per scoring batch, and the rounds of the protocol (= timed training steps), from ``--rounds``."""
    if spec and ":" in spec:
        given = {int(k): int(v) for k, v in (kv.split(":") for kv in spec.split(","))}
        return {b: given.get(b, 1) for b in batches}, min(given.values())
    if spec:
        return dict.fromkeys(batches, int(spec)), int(spec)
    if cuda:
        return dict.fromkeys(batches, 10), 10
    default = {1: 2, 8: 1} if quick else {1: 3, 8: 3, 32: 2}
    return {b: default.get(b, 2) for b in batches}, 1 if quick else 2


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    batches = [int(b) for b in args.batches.split(",")]
    cuda = device.type == "cuda"
    rounds, few = plan_rounds(args.rounds, batches, args.quick, cuda)
    started = time.perf_counter()

    bench = Bench(args)
    bench.results["machine"] = machine_info(device)
    bench.check_flops()
    if "scoring" not in skip:
        bench.scoring(batches, rounds)
    if "protocol" not in skip:
        bench.protocol(384, 512, images=8 if cuda else 1, rounds=few)
    if "train" not in skip:
        bench.train_step(8, steps=few)
    if "agreement" not in skip:
        bench.agreement(count=16 if args.quick else 48)
    if bench.precisions:
        if "precision_scoring" not in skip:
            bench.precision_scoring(batches, rounds)
        if "precision_protocol" not in skip:
            height, width = (int(v) for v in args.precision_image.split("x"))
            bench.precision_protocol(height, width, images=8 if cuda else 1, rounds=few)
        if "precision_agreement" not in skip:
            bench.precision_agreement(args.photos)
    res = bench.finish()
    res["wall_seconds"] = time.perf_counter() - started
    text = report(res)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**res, "table": text}, indent=2, default=float))
    print(f"\nwrote {out} ({res['wall_seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
