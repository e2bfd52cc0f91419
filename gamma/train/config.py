"""Training configuration: dataclasses with the paper's defaults, YAML files with ``base:`` inheritance, and
``key=value`` command-line overrides.

A run is described by :class:`TrainConfig`. Option files hold only what differs from the defaults in code::

    base: unified.yml            # path relative to this file; bases chain
    model:
      overrides: {prompt_set: sdp}

Command-line overrides use dotted keys, list items by index: ``optim.lr=1e-4 data.0.root=/x epochs=2``. Values are
read as YAML (``amp=bf16``, ``eval.datasets=[live,csiq]``, ``model.pretrained=null``).

Strings may refer to environment variables, ``${GAMMA_DATA_ROOT}`` or ``${GAMMA_DATA_ROOT:-data}`` (a default after
``:-``), so shipped files carry no absolute paths. A variable that is unset and has no default is an error naming the
key, but only if the value is still needed after the overrides (``data_root=/datasets`` on the command line wins).

Every mistake is a :class:`ConfigError` that names the dotted key: an unknown key (with the closest known one
suggested), a value of the wrong type (with the expected type), a missing base file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .._dataclass_dict import ConfigError, from_dict, show, suggest
from .._dataclass_dict import to_dict as config_to_dict
from .._files import atomic_write
from ..config import AttiqaConfig, GammaConfig, TextCfg, VisionCfg, get_gamma_isp_variant, get_promptiqa_variant
from ..data import DatasetEntry
from ..data.requirements import RequirementCfg
from ..data.synthetic import SyntheticCfg
from ..factory import list_models
from ..prompts import PROMPT_SETS

__all__ = [
    "AttiqaCfg",
    "CheckpointCfg",
    "ConfigError",
    "DDPCfg",
    "EvalCfg",
    "LogCfg",
    "ModelCfg",
    "OptimCfg",
    "PretrainCfg",
    "PromptIQACfg",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "config_to_yaml",
    "default_workers",
    "from_dict",
    "load_config",
    "load_yaml_tree",
    "save_config",
]


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class ModelCfg:
    """Which model to train and where its starting weights come from."""

    name: str | None = "gamma_vitb16"  # variant from gamma.list_models(); None = architecture read from `pretrained`
    pretrained: str | None = None  # starting weights: UniQA/OpenAI CLIP file, the release's file or ours
    allow_unsafe: bool = False  # allow a full unpickle of `pretrained` (trusted files only)
    overrides: dict[str, Any] = field(default_factory=dict)  # GammaConfig fields: {prompt_set: sdp, num_experts: 5}
    # overrides.prompt_set may contradict the prompt set `pretrained` records (deliberately: other prompts on the
    # same weights); without this that is an error (gamma.hub.resolve_prompt_set)
    prompt_set_override: bool = False


@dataclass
class OptimCfg:
    """Optimiser and learning-rate schedule (paper: Adam 2e-5, no weight decay, cosine per epoch down to 0)."""

    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["cosine", "constant"] = "cosine"  # cosine: stepped once per epoch, T_max = epochs
    min_lr: float = 0.0  # cosine floor (eta_min)
    grad_clip: float | None = None  # max global grad norm; None = no clipping (the paper does not clip)


@dataclass
class EvalCfg:
    """Held-out evaluation after each epoch (per dataset SRCC / PLCC / KRCC on the split's test part)."""

    every: int = 1  # evaluate every N epochs (and always after the last); 0 = only after the last epoch
    at_start: bool = False  # also evaluate the untrained model (epoch 0)
    batch_size: int = 8  # images per forward; images of different sizes are grouped, scores are batch-invariant
    workers: int | None = None  # DataLoader workers for evaluation (None = same as training)
    crop_mode: Literal["random", "grid", "five", "center", "resize"] = "random"  # test-time protocol (release: random)
    crops: int = 10  # number of crops (release: 10)
    crop_seed: int = 0  # seed of the random crop offsets (the release leaves them unseeded)
    datasets: list[str] | None = None  # evaluate only these entries (by name); None = all entries
    keep_only_experts: list[int] | None = None  # paper Table 6: zero the other experts' router weights at test time
    # Paper Table 15: score the same weights with each of these prompt sets (naive | quality | sdp), one table row each;
    # None = the model's own prompt set only. The model's own set (else the first listed) selects the best epoch.
    prompt_sets: list[str] | None = None
    # best epoch = highest mean of this over datasets; 'srcc+plcc': of SRCC + PLCC (the official PromptIQA 'best')
    select_metric: Literal["srcc", "plcc", "krcc", "srcc+plcc"] = "srcc"
    # Where the best epoch is chosen: 'test' = on the held-out part itself (as the release does; optimistic), or
    # 'train_holdout' = on a seeded holdout carved from each training part (those images are then not trained on).
    select_on: Literal["test", "train_holdout"] = "test"
    holdout_fraction: float = 0.1  # share of each training part held out for select_on: train_holdout
    # How the image tower computes when scoring the held-out sets: fp32 (exact) | bf16 | fp16 | int8 (CPU) | auto. Not
    # fp32: a copy of the model converted with to_precision is scored (no autocast) and dropped; the trained weights
    # stay fp32. Checked against the run's device before training starts.
    precision: Literal["fp32", "bf16", "fp16", "int8", "auto"] = "fp32"


@dataclass
class CheckpointCfg:
    """What is written into the run folder."""

    every_steps: int = 0  # also write a resumable checkpoint every N optimiser steps inside an epoch (0 = off)
    keep_epochs: bool = False  # keep epoch_NNN.pth of every epoch besides last.pth
    save_best: bool = True  # best.pth: weights of the epoch with the best mean metric
    format: Literal["pth", "safetensors"] = "pth"  # of best.pth / final weights (last.pth is always .pth)


@dataclass
class LogCfg:
    """Console, JSONL/CSV metrics log and TensorBoard."""

    every_steps: int = 50  # one 'train' record per N optimiser steps
    tensorboard: bool = True  # when tensorboard is installed
    progress: bool = True  # tqdm bars (rank 0)


@dataclass
class DDPCfg:
    """torchrun / DistributedDataParallel settings (used when WORLD_SIZE > 1)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL on CUDA, gloo on CPU
    find_unused_parameters: bool = False  # only needed when some trainable parameter gets no gradient
    timeout_s: int = 1800


@dataclass
class PromptIQACfg:
    """The ``promptiqa:`` section: stage ``promptiqa`` (:mod:`gamma.train.promptiqa`,
    docs/promptiqa.md#training-stage-promptiqa).

    Defaults are the official code's recipe. ``batch_size`` counts images per optimiser step over all processes: it
    is a whole number of chunks (the official 44 = 4 chunks of 11, one per GPU).
    """

    chunk: int = 11  # images per leave-one-out chunk, all from one dataset; each is scored from the other chunk - 1
    scale_p: float = 0.5  # random scaling: all labels of a chunk divided by c ~ U(max S, 1)
    flip_p: float = 0.1  # random flipping: S -> 1 - S (drawn after the scaling, independently)
    vflip_p: float = 0.5  # each training image flipped upside down (the official "RandHorizontalFlip" flips H)
    cosine_period: int | None = None  # epochs per cosine cycle (the paper's 50); None: one half cosine per run
    # How the learning rate goes on after a cycle: 'cosine_restart' back to optim.lr at once (the paper's "cosine
    # annealing for every 50 epochs" read as restarts), 'cosine_tmax' climbing back up as PyTorch's
    # CosineAnnealingLR(T_max=cosine_period) does (the official code's unused --T_max 50).
    lr_schedule: Literal["cosine_restart", "cosine_tmax"] = "cosine_restart"
    # The label augmentation's draw: 'chunk' one draw per chunk (gamma's default), 'step' one draw per step shared by
    # every chunk of every process (the official code: each process reseeds `random` with the same seed).
    label_draw: Literal["chunk", "step"] = "chunk"
    decode: Literal["cv2", "pil"] = "cv2"  # PromptIQA's image loader: the official OpenCV path, or PIL
    vit_weights: str | None = None  # timm vit_base_patch8_224 state_dict the backbone starts from (no model.pretrained)
    isp_count: int | None = None  # ISPs in a test prompt; None: chunk - 1 (the official 10)
    isp_sampling: Literal["interval", "random"] = "interval"  # how the test ISPP is drawn from the training part
    isp_draws: int = 1  # random sampling: prompts drawn per dataset and evaluation (mean and std reported)
    isp_seed: int = 0  # seed of random sampling and of the ISPP flips
    # PromptIQA's Table 5: the test ISPP's images, scores or both replaced by uniform random numbers (isp_seed)
    isp_random: Literal["none", "images", "scores", "both"] = "none"
    ispp_flip: bool = False  # the official test quirk: ISPP images flipped upside down (p = 0.5) for every test batch
    inverted_isps: bool = False  # also score with every ISP score inverted (1 - s): the adaptation table's second half
    # Models without a prompt input (a Gamma model, eval_only): 'none' scores as they are, 'fit' maps them with a
    # monotone map fit from the model's scores of the ISP images to the ISP scores (gamma.adapt), 'fit_all' with ridge
    # regression on all its outputs (score, level probabilities, attribute scores) of the ISP images.
    mapping: Literal["none", "fit", "fit_all"] = "none"
    # The Gamma that a gamma_isp model puts its prompt path on (when model.overrides has no gamma_weights) and that
    # `baselines` evaluates: a weights file, a known weight name, or the name of a finished run in output_dir (its
    # final weights, same split).
    gamma: str | None = None
    baselines: bool = False  # also report `gamma` as it is and with both fitted maps, in the adaptation table
    compare_runs: list[str] = field(default_factory=list)  # finished stage-promptiqa runs (names in output_dir) whose
    #                                                        adaptation rows join this run's table
    requirements: list[RequirementCfg] = field(default_factory=list)  # new requirements, evaluated like eval_data


CAPTION_COLUMN = "caption"


@dataclass
class PretrainCfg:
    """The ``pretrain:`` section (stage ``pretrain_clip``, :mod:`gamma.train.pretrain`). Batch size, epochs,
    optimiser, seed, data and the model's architecture come from the rest of the run's configuration."""

    output: str = "clip_pretrained.pth"  # backbone file, relative to the run folder
    caption_column: str = CAPTION_COLUMN  # meta-file column (by header name) holding each image's caption
    warmup: float = 0.1  # linear warm-up over this fraction of the steps, then cosine decay to optim.min_lr
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) to this
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)  # write the synthetic datasets first (if missing)
    # Stages run next with this backbone: an option file (path from the working directory), optionally followed by
    # key=value overrides ("options/demo_gamma.yml epochs=2").
    then: list[str] = field(default_factory=list)
    threads: int | None = None  # torch.set_num_threads for the whole chain (None: torch's default)


@dataclass
class AttiqaCfg:
    """The ``attiqa:`` section: ATTIQA's stages (:mod:`gamma.train.attiqa`, docs/attiqa.md#trainer-stages).

    ``attiqa_pretrain`` trains on the training parts of the ``data`` entries (their labels unused) and every image under
    ``folders``; ``attiqa_finetune`` is MOS training of a student and uses none of these fields but ``then``."""

    # Teacher of stage attiqa_pretrain: a CLIP-layout checkpoint (OpenAI ViT-B/16 for the paper; a path or a known
    # weight name) whose zero-shot attribute scores are the pseudo-labels, or 'measured' (pixel statistics; the demo).
    teacher: str | None = None
    labels_dir: str = "teacher_labels"  # label cache, one folder per dataset (relative paths: under output_dir)
    folders: list[str] = field(default_factory=list)  # unlabelled image folders (ImageNet), relative to data_root
    eval_folders: list[str] = field(default_factory=list)  # unlabelled held-out folders: head agreement only
    resize: int = 340  # folder images: short side resized to this first (0 = keep) ...
    crop_size: int = 320  # ... then a random crop of this side (and a random flip)
    margin: float = 0.1  # of the margin-ranking loss (the paper's)
    # The teacher's prompt pairs: {head: [positive, negative]} for each of the student's heads (model attributes; the
    # five by default), inline or a YAML file (ATTIQA's Table 7: the pairs of median or lowest proxy-task score, or
    # the single {quality: [Good image, Bad image]}); None: Table 1's pairs. A CLIP teacher only.
    prompts: str | dict[str, list[str]] | None = None
    # Pretraining loss: 'ranking' (the paper's margin ranking on in-batch pairs) or 'l2' (its Table 7 ablation: the
    # mean squared difference between the student's attribute outputs and the teacher scores, summed over attributes).
    loss: Literal["ranking", "l2"] = "ranking"
    # Stage attiqa_finetune: 'full' (backbone, heads' hidden layers and regressor train) or 'linear_probe' (the
    # paper's linear probing: backbone and heads frozen, one regression MLP, the regressor, trained).
    finetune: Literal["full", "linear_probe"] = "full"
    # Stage attiqa_finetune: after training, the cosine similarity of the pooled backbone features before (the
    # starting weights) and after fine-tuning, on each held-out set (the paper's feature analysis, Table 5).
    feature_similarity: bool = False
    teacher_batch_size: int = 32  # images per teacher forward
    chunk_size: int = 256  # images per cached label file (what a kill can lose)
    output: str = "attiqa_pretrained.pth"  # the pretrained student, relative to the run folder
    # Stages run next from the pretrained student: an option file, optionally followed by key=value overrides
    # ("options/attiqa/koniq10k.yml epochs=2"); as pretrain.then.
    then: list[str] = field(default_factory=list)


def default_workers(most: int = 4) -> int:
    """DataLoader workers when the option file names none: ``most``, or the CPUs this process may use if fewer
    (PyTorch warns about more workers than that, and they only compete for the same cores)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        cpus = os.cpu_count() or 1
    return max(1, min(most, cpus))


@dataclass
class TrainConfig:
    """One training run (or a 10-split series of them). Defaults are the paper's unified training recipe."""

    name: str = "gamma"  # run name: results go to <output_dir>/<name>/split_<k>/
    # what runs: a name of gamma.train.stages.STAGES
    stage: Literal["gamma", "pretrain_clip", "attiqa_pretrain", "attiqa_finetune", "promptiqa"] = "gamma"
    output_dir: str = "experiments"
    seed: int = 123
    epochs: int = 10
    batch_size: int = 8  # images per optimiser step, over all processes and accumulation steps
    grad_accum: int = 1  # micro-batches per optimiser step (per-process micro-batch = batch / world / accum)
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype on CUDA (bf16 also works on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    workers: int = field(default_factory=default_workers)  # DataLoader workers per process (default 4, at most #CPUs)
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on CUDA)
    tf32: bool = False  # training forward/backward with TF32 matmuls and convolutions on CUDA (faster, 10-bit mantissa)
    split_index: int = 1  # which of the 10 splits of every dataset (1-based, as the split pickles)
    splits: list[int] = field(default_factory=lambda: list(range(1, 11)))  # run by --all_splits
    data_root: str | None = None  # relative dataset paths start here (None: $GAMMA_DATA_ROOT, else the working dir)
    data: list[DatasetEntry] = field(default_factory=list)  # training datasets; their held-out parts are evaluated
    eval_data: list[DatasetEntry] = field(default_factory=list)  # extra evaluation-only datasets (cross-dataset tests)
    sampler: Literal["uniform", "balanced"] = "uniform"  # uniform: one shuffle of the concatenation (size-proportional)
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests); None = whole epochs
    drop_last: bool = False  # drop each epoch's last, partial batch (the release's training loader does)
    overwrite: bool = False  # allow a fresh run into a folder that holds a finished run (an unfinished one: restart)
    eval_only: bool = False  # only evaluate model.pretrained on the held-out parts (e.g. paper Table 6)
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    log: LogCfg = field(default_factory=LogCfg)
    ddp: DDPCfg = field(default_factory=DDPCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)  # stage pretrain_clip
    attiqa: AttiqaCfg = field(default_factory=AttiqaCfg)  # stages attiqa_pretrain / attiqa_finetune
    promptiqa: PromptIQACfg = field(default_factory=PromptIQACfg)  # stage promptiqa
    # Not an option (no file can set it): the command line asked to start over (--restart, or overwrite=true given
    # there), which alone may replace an unfinished run. Set by load_config from its overrides.
    restart: bool = field(default=False, init=False, repr=False)

    def validate(self) -> None:
        """Cross-field checks; each error names its key."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval.batch_size": self.eval.batch_size, "eval.crops": self.eval.crops}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in {"workers": self.workers, "eval.every": self.eval.every,
                           "checkpoint.every_steps": self.checkpoint.every_steps,
                           "log.every_steps": self.log.every_steps}.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if self.split_index < 1:
            raise ConfigError(f"split_index must be >= 1 (split pickles count from 1), got {self.split_index}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")
        if self.model.name is None and not self.model.pretrained:
            raise ConfigError("model.name or model.pretrained must be set")
        # the families the trainer's stages train (PromptIQA and Gamma + ISP: stage promptiqa)
        trainable = list_models("gamma") + list_models("attiqa") + list_models("promptiqa") + list_models("gamma_isp")
        if self.model.name is not None and self.model.name not in trainable:
            hint = suggest(self.model.name, trainable)
            raise ConfigError(f"model.name: unknown model {self.model.name!r}{hint}; "
                              f"available: {', '.join(trainable)}")
        if self.model.name in list_models("attiqa"):
            _check_attiqa_overrides(self.model.overrides)
        elif self.model.name in list_models("promptiqa") + list_models("gamma_isp"):
            _check_prompted_model(self.model.name, self.model.overrides, self.stage)
        else:
            _check_model_overrides(self.model.overrides)
        names = [e.name for e in (*self.data, *self.eval_data)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"data: more than one entry named {dup[0]!r}; results are keyed by name, so give each "
                              "entry its own name")
        self._check_eval()
        self._check_attiqa()
        for i, name in enumerate(self.eval.datasets or []):
            if name not in names:
                raise ConfigError(f"eval.datasets.{i}: no dataset entry named {name!r}{suggest(name, names)}; "
                                  f"entries: {', '.join(names) or '(none)'}")


    def _check_attiqa(self) -> None:
        """ATTIQA options that only one stage reads are an error elsewhere (a silently ignored ablation)."""
        a = self.attiqa
        if a.prompts is not None and self.stage != "attiqa_pretrain":
            raise ConfigError(f"attiqa.prompts: the teacher's prompts apply to stage attiqa_pretrain, not {self.stage}")
        if a.loss != "ranking" and self.stage != "attiqa_pretrain":
            raise ConfigError(f"attiqa.loss: {a.loss!r} is a pretraining loss; it applies to stage attiqa_pretrain, "
                              f"not {self.stage}")
        for key, value, default in (("finetune", a.finetune, "full"), ("feature_similarity", a.feature_similarity,
                                                                           False)):
            if value != default and self.stage != "attiqa_finetune":
                raise ConfigError(f"attiqa.{key}: applies to stage attiqa_finetune, not {self.stage}")

    def _check_eval(self) -> None:
        sets = self.eval.prompt_sets
        if sets is not None:
            if not sets:
                raise ConfigError("eval.prompt_sets: an empty list; leave it null for the model's own prompt set")
            for i, name in enumerate(sets):
                if name not in PROMPT_SETS:
                    hint = suggest(str(name), PROMPT_SETS)
                    raise ConfigError(f"eval.prompt_sets.{i}: unknown prompt set {name!r}{hint}; "
                                      f"known: {', '.join(PROMPT_SETS)}")
            dup = sorted({n for n in sets if sets.count(n) > 1})
            if dup:
                raise ConfigError(f"eval.prompt_sets: {dup[0]!r} is listed twice")
        if not 0 < self.eval.holdout_fraction < 1:
            raise ConfigError(f"eval.holdout_fraction must be between 0 and 1 (exclusive), got "
                              f"{self.eval.holdout_fraction}")


def _check_attiqa_overrides(overrides: dict[str, Any]) -> None:
    """An ATTIQA student's overrides: AttiqaConfig fields, and ``backbone`` (a torchvision ImageNet ResNet file)."""
    known = [f.name for f in fields(AttiqaConfig)]
    for key in overrides:
        if key not in (*known, "backbone"):
            raise ConfigError(f"model.overrides.{key}: unknown ATTIQA option{suggest(key, known)}; "
                              f"known: {', '.join(known)}, backbone")
    try:
        AttiqaConfig().replace(**{k: v for k, v in overrides.items() if k != "backbone"})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from exc


def _check_prompted_model(name: str, overrides: dict[str, Any], stage: str) -> None:
    """A PromptIQA or Gamma + ISP model: trained by stage promptiqa; its overrides are its config's fields (and
    ``vit_weights`` for PromptIQA, ``gamma_weights`` for Gamma + ISP: see gamma.create_model)."""
    if stage != "promptiqa":
        raise ConfigError(f"model.name: {name} is scored with a prompt; train or evaluate it with stage: promptiqa")
    own = {k: v for k, v in overrides.items() if k not in ("gamma_weights", "vit_weights")}
    if "gamma_weights" in overrides and name not in list_models("gamma_isp"):
        raise ConfigError("model.overrides.gamma_weights: only Gamma + ISP models "
                          f"({', '.join(list_models('gamma_isp'))}) take a Gamma")
    if "vit_weights" in overrides and name not in list_models("promptiqa"):
        raise ConfigError("model.overrides.vit_weights: only PromptIQA models take ViT weights")
    config = get_promptiqa_variant(name) if name in list_models("promptiqa") else get_gamma_isp_variant(name)
    try:
        config.replace(**own)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from exc


def _check_model_overrides(overrides: dict[str, Any]) -> None:
    nested = {"vision": VisionCfg, "text": TextCfg}
    known = [f.name for f in fields(GammaConfig)]
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"model.overrides.{key}: unknown model option{suggest(key, known)}; "
                              f"known: {', '.join(known)}")
        if key in nested and isinstance(value, dict):
            sub = [f.name for f in fields(nested[key])]
            for k in value:
                if k not in sub:
                    raise ConfigError(f"model.overrides.{key}.{k}: unknown option{suggest(k, sub)}; "
                                      f"known: {', '.join(sub)}")
    try:
        GammaConfig().replace(**overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from exc


# ---------------------------------------------------------------------------------------------- YAML files
def load_yaml_tree(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read an option file and the chain of ``base:`` files under it, merged (later files win).

    Mappings merge key by key; lists and scalars are replaced whole. ``base`` may be one path or a list of paths,
    relative to the file that names them.
    """
    path = Path(path)
    if not path.is_file():
        where = f" (base of {_seen[-1]})" if _seen else ""
        raise ConfigError(f"option file not found: {path}{where}")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"circular base: chain: {' -> '.join(str(p) for p in (*_seen, resolved))}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an option file must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a path or a list of paths, got {show(bases)}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, load_yaml_tree(path.parent / base, (*_seen, resolved)))
    return _merge(merged, data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (dotted keys, list items by index) to a raw config mapping (in place, returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command-line override {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {text!r}: {exc}") from exc
        _set_dotted(data, key, value)
    return data


def _set_dotted(data: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not re.fullmatch(r"-?\d+", part):
                parent = ".".join(parts[:i]) or "value"
                raise ConfigError(f"{key}: {parent} is a list; index it by number, got {part!r}")
            index = int(part)
            if not -len(node) <= index < len(node):
                raise ConfigError(f"{key}: index {index} out of range ({'.'.join(parts[:i])} has {len(node)} entries)")
            if last:
                node[index] = value
            else:
                if node[index] is None:
                    node[index] = {}
                elif isinstance(node[index], str):  # a bare dataset name: data.0.root=... on `data: [koniq10k]`
                    node[index] = {"name": node[index]}
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    if re.fullmatch(r"-?\d+", parts[i + 1]):
                        raise ConfigError(f"{key}: {where} is not set, so it has no item {parts[i + 1]}")
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"{key}: {where.rsplit('.', 1)[0]} is a {type(node).__name__}, not a mapping or list")


# ------------------------------------------------------------------------------------------- env variables
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, key: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{key}: environment variable {name} is not set (set it, or override {key}=...)")

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------- top level
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The resolved configuration of a run: code defaults <- option file (with its bases) <- ``overrides``.

    ``${VAR}`` / ``${VAR:-default}`` in strings are replaced from the environment after the overrides are applied.
    The run's ``split_index`` is given to every dataset entry (an entry may only say ``split_index: all``), and
    ``data_root`` to every entry without its own. ``overwrite=true`` among ``overrides`` sets ``restart`` (the
    command line's own request to start over, which may replace an unfinished run).

    Args:
        path: an option YAML, or None for the defaults.
        overrides: ``key=value`` strings.

    Raises:
        ConfigError: naming the file or dotted key at fault.
    """
    data = load_yaml_tree(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    data = _expand(data, "")
    for section in ("data", "eval_data"):  # a bare name is a registered dataset with its defaults
        if isinstance(data.get(section), list):
            data[section] = [{"name": e} if isinstance(e, str) else e for e in data[section]]
    cfg = from_dict(TrainConfig, data)
    for section in ("data", "eval_data"):
        for i, entry in enumerate(getattr(cfg, section)):
            given = data[section][i].get("split_index")
            if given is not None and entry.split_index not in ("all", cfg.split_index):
                raise ConfigError(f"{section}.{i}.split_index: the split is chosen for the whole run (split_index / "
                                  "--split_index); an entry may only say split_index: all (every row, no split file)")
    cfg.validate()
    # overwrite=true among the overrides (the command line) may replace an unfinished run; from a file it may not
    cfg.restart = cfg.overwrite and any(item.split("=", 1)[0].strip() == "overwrite" for item in overrides or [])
    return resolve_entries(cfg)


def resolve_entries(cfg: TrainConfig) -> TrainConfig:
    """Give every dataset entry the run's split index (unless it uses all rows) and the run's data root."""
    for entries in (cfg.data, cfg.eval_data):
        for i, entry in enumerate(entries):
            changes: dict[str, Any] = {}
            if entry.split_index != "all" and entry.split_index != cfg.split_index:
                changes["split_index"] = cfg.split_index
            if entry.data_root is None and cfg.data_root is not None:
                changes["data_root"] = cfg.data_root
            if changes:
                entries[i] = entry.replace(**changes)
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    """The configuration as YAML text (what ``config.yaml`` holds and ``--print_config`` shows)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (loadable again with :func:`load_config`)."""
    text = config_to_yaml(cfg)

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(Path(path), write)
