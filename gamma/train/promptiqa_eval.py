"""PromptIQA's test protocol for stage ``promptiqa`` (:mod:`gamma.train.promptiqa`): score each held-out set against
an ISPP drawn from that set's training part, Gamma models as they are or mapped onto the ISP scores, and the
adaptation table (docs/promptiqa.md#the-test-protocol).

For each held-out set the ISPP is drawn from that dataset's *training* part (interval sampling: minimum,
``isp_count - 2`` evenly spaced, maximum; :func:`gamma.data.promptiqa.sample_ispp`), encoded once, and every test image
is scored against it. The adaptation table (``adaptation.md``) reports the held-out sets with the ISP scores as given
and inverted, next to Gamma as it is and with a map fit on the ISPs by :func:`gamma.adapt.fit`
(``promptiqa.baselines``): a monotone map of its score, and ridge regression on all its outputs (score, level
probabilities, attribute scores: :data:`ADAPT_OUTPUTS` ``["all"]``, the columns of ``Scorer.adapt``'s ``all``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import adapt
from ..archs import GammaModel, PromptedIQA
from ..data import IQADataset, collate
from ..data.promptiqa import random_vertical_flip, sample_ispp
from ..factory import create_model
from ..families import family_of_model, is_family
from ..hub import WeightsNotFoundError, resolve_weights
from ..io import load_promptiqa_image
from ..metrics import evaluate_scores
from ..prompts import ATTRIBUTES, LEVELS
from .checkpoint import LAST
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, all_gather_objects
from .evaluate import METRICS, mean_metrics, predict
from .loop import Run

logger = logging.getLogger(__name__)

#: Row labels of the adaptation table for the Gamma baselines: its score as it is, mapped onto the ISP scores by a
#: monotone map of the score, and by ridge regression on all its outputs (``ADAPT_OUTPUTS["all"]``).
GAMMA_AS_IS = "Gamma as is"
GAMMA_MAPPED = "Gamma + mapping"
GAMMA_MAPPED_ALL = "Gamma + mapping (all outputs)"
#: Gamma's outputs a mapping fits on, by name (the same columns as ``gamma.scorer.ADAPT_OUTPUTS``; kept here so that
#: training does not import the scoring front end).
ADAPT_OUTPUTS: dict[str, tuple[str, ...]] = {"score": ("score",),
                                             "all": ("score", *(f"p_{lv}" for lv in LEVELS), *ATTRIBUTES)}
#: What each ``promptiqa.mapping`` fits on the ISPs: the Gamma outputs mapped (``ADAPT_OUTPUTS``' key) and the map.
MAPPINGS: dict[str, tuple[str, str]] = {"fit": ("score", "monotone"), "fit_all": ("all", "ridge")}
#: The two halves of the adaptation table: the ISP scores as given, and inverted (1 - s).
PROMPT_VARIANTS: tuple[str, ...] = ("isps", "inverted_isps")


def isp_count(cfg: TrainConfig) -> int:
    """ISPs in a test prompt: ``promptiqa.isp_count``, else ``chunk - 1`` (what training prompts with)."""
    return cfg.promptiqa.isp_count or cfg.promptiqa.chunk - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


class WholeImages(Dataset):
    """The rows of an :class:`IQADataset`, each image the whole picture resized to ``size`` x ``size`` the way the
    official PromptIQA code loads it (:func:`gamma.io.load_promptiqa_image`); items as the dataset's."""

    def __init__(self, ds: IQADataset, size: int, backend: str = "cv2") -> None:
        self.ds, self.size, self.backend = ds, size, backend
        self.entry, self.labels, self.paths = ds.entry, ds.labels, ds.paths

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"img": load_promptiqa_image(self.paths[i], self.size, backend=self.backend),
                "mos": torch.tensor(self.labels[i], dtype=torch.float32), "scene": self.ds.scenes[i],
                "dataset": self.entry.name, "path": self.paths[i], "index": self.ds.rows[i]}


def takes_isp(model: nn.Module) -> bool:
    """Whether ``model`` scores relative to a set of image-score pairs (PromptIQA, Gamma + ISP): its family's
    :attr:`gamma.families.Scoring.takes_isp`."""
    scoring = family_of_model(model).scoring
    return scoring is not None and scoring.takes_isp


def model_view(model: nn.Module, ds: IQADataset, backend: str) -> Dataset:
    """How ``model`` reads ``ds``: PromptIQA the whole picture at its input size (train and test); Gamma + ISP and
    Gamma the dataset's own transforms (training crops; full test images through Gamma's crop protocol)."""
    if is_family(model, "promptiqa"):
        return WholeImages(ds, model.config.image_size, backend)
    return ds


def resolve_gamma(cfg: TrainConfig) -> str:
    """The Gamma weights ``promptiqa.gamma`` names: a file or known weight name, else the final weights
    (``last.pth``) of the run of that name in ``output_dir`` (same split)."""
    value = cfg.promptiqa.gamma
    try:
        return os.fspath(resolve_weights(path=value))
    except WeightsNotFoundError:
        run = Path(cfg.output_dir) / value / f"split_{cfg.split_index}" / LAST
        if run.is_file():
            return os.fspath(run)
        raise ConfigError(f"promptiqa.gamma: {value!r} is neither a weights file, a known weight name, nor a finished "
                          f"run in {cfg.output_dir} ({run} does not exist)") from None




@dataclass
class EvalSet:
    """One held-out set: its test images, the training images its ISPP comes from, and the labels of both."""

    name: str
    test: IQADataset
    prompt_source: IQADataset  # the training part (full images, no augmentation)


@torch.no_grad()
def score_with_prompt(model: PromptedIQA, test: Dataset, isp_images: list[torch.Tensor], isp_scores: np.ndarray,
                      cfg: TrainConfig, dist: DistInfo, flip_seed: int) -> np.ndarray:
    """Scores (N,) of every image of ``test`` against the ISPP, gathered over processes (each scores every
    ``world_size``-th image). The prompt is encoded once; with ``promptiqa.ispp_flip`` (the official quirk) its images
    are flipped anew, and it is re-encoded, for every batch."""
    model.eval()
    dev = dist.device
    mine = list(range(dist.rank, len(test), dist.world_size))
    workers = cfg.eval.workers if cfg.eval.workers is not None else cfg.workers
    loader = DataLoader(Subset(test, mine), batch_size=cfg.eval.batch_size, num_workers=workers, collate_fn=collate)
    same_size = len({tuple(x.shape) for x in isp_images}) == 1
    prompt_images: torch.Tensor | list[torch.Tensor] = torch.stack(isp_images) if same_size else isp_images
    scores = torch.as_tensor(isp_scores, dtype=torch.float32)
    isp = None if cfg.promptiqa.ispp_flip else model.encode_prompt(to_device(prompt_images, dev), scores)
    out: list[float] = []
    for b, batch in enumerate(loader):
        if cfg.promptiqa.ispp_flip:
            gen = torch.Generator().manual_seed(mix_seed(flip_seed, dist.rank, b))
            flipped = [random_vertical_flip(x[None], 0.5, gen)[0] for x in isp_images]
            isp = model.encode_prompt(to_device(torch.stack(flipped) if same_size else flipped, dev), scores)
        out.extend(model(to_device(batch["img"], dev), prompt=isp).double().cpu().tolist())
    parts = all_gather_objects(out, dist)
    full = np.empty(len(test), dtype=np.float64)
    for rank, part in enumerate(parts):
        full[rank :: dist.world_size] = part
    return full


def random_images(images: Sequence[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
    """PromptIQA's Table 5 "random" ISPP images: each replaced by uniform random numbers of its shape, spanning the
    value range of the real prompt images (what the model's input normalisation gives)."""
    lo, hi = min(float(x.min()) for x in images), max(float(x.max()) for x in images)
    return [torch.from_numpy(rng.uniform(lo, hi, tuple(x.shape))).to(x.dtype) for x in images]


def to_device(images: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A batch of images (a tensor, or a list of differently sized ones) on ``device``."""
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [x.to(device, non_blocking=True) for x in images]


class AssessedOutputs(nn.Module):
    """``forward(images, scene)``: the outputs ``names`` of a Gamma model's :meth:`~gamma.archs.GammaModel.assess`,
    stacked as columns (B, k) in that order (names as in :data:`gamma.scorer.ADAPT_OUTPUTS`: ``score``, ``std``,
    ``p_<level>``, attribute names), so that :func:`gamma.train.evaluate.predict` scores them with the model's
    test-time crop protocol."""

    def __init__(self, model: GammaModel, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)
        self.attributes = bool(set(self.names) & set(ATTRIBUTES))

    def forward(self, images: torch.Tensor, scene: str | Sequence[str] | None = None) -> torch.Tensor:
        a = self.model.assess(images, scene, attributes=self.attributes)
        columns = {"score": a.score, "std": a.std, **a.level_columns(), **(a.attributes or {})}
        return torch.stack([columns[name] for name in self.names], dim=-1)  # (B, k)


class Evaluator:
    """Scores held-out sets the stage's way for one evaluation: prompted models against ISPPs drawn from each set's
    training part, Gamma models as they are or mapped (docs/promptiqa.md#the-test-protocol).

    ``mapping`` is a ``promptiqa.mapping`` value: ``none`` (Gamma's score as it is), ``fit`` (:func:`gamma.adapt.fit`'s
    monotone map of the score) or ``fit_all`` (its ridge regression on ``ADAPT_OUTPUTS["all"]``), each fitted on the
    ISPs of the draw and applied to the test images' same outputs; prompted models ignore it.
    """

    def __init__(self, run: Run) -> None:
        self.run, self.cfg, self.dist = run, run.cfg, run.dist
        self._gamma_cache: dict[tuple[str, str, str], np.ndarray] = {}

    def prompt_rows(self, s: EvalSet, draw: int) -> np.ndarray:
        """Positions in ``s.prompt_source`` of the ISPP of draw ``draw``."""
        p = self.cfg.promptiqa
        gen = np.random.default_rng(mix_seed(p.isp_seed, zlib.crc32(s.name.encode()), draw))
        return sample_ispp(s.prompt_source.labels, isp_count(self.cfg), p.isp_sampling, gen)

    def scores(self, model: nn.Module, s: EvalSet, draw: int, inverted: bool, mapping: str = "none") -> np.ndarray:
        """Scores of ``s``'s test images by ``model`` with the ISPP of draw ``draw`` (its scores inverted or not)."""
        rows = self.prompt_rows(s, draw)
        isp_scores = np.asarray(s.prompt_source.labels, dtype=np.float64)[rows]
        noise = self.cfg.promptiqa.isp_random
        rng = np.random.default_rng(mix_seed(self.cfg.promptiqa.isp_seed, zlib.crc32(s.name.encode()), draw, 0x5A))
        if noise in ("scores", "both"):
            isp_scores = rng.uniform(0.0, 1.0, len(rows))
        if inverted:
            isp_scores = 1.0 - isp_scores
        if takes_isp(model):
            view = model_view(model, s.prompt_source, self.cfg.promptiqa.decode)
            images = [view[int(i)]["img"] for i in rows]
            if noise in ("images", "both"):
                images = random_images(images, rng)
            test = model_view(model, s.test, self.cfg.promptiqa.decode)
            return score_with_prompt(model, test, images, isp_scores, self.cfg, self.dist,
                                     mix_seed(self.cfg.promptiqa.isp_seed, zlib.crc32(s.name.encode()), draw))
        if mapping == "none":
            return self.gamma_scores(model, s.test, s.name, "test")
        outputs, method = MAPPINGS[mapping]
        names = ADAPT_OUTPUTS[outputs]
        test_x = self.gamma_outputs(model, s.test, s.name, "test", outputs)  # (N,) scores or (N, k) outputs
        isp_x = self.gamma_outputs(model, Subset(s.prompt_source, [int(i) for i in rows]), s.name, f"isp{draw}",
                                   outputs)  # (n,) or (n, k)
        try:
            fitted = adapt.fit(isp_x, isp_scores, names, method=method)
        except adapt.NotEnoughPairsError:
            raise  # (check_config refuses too few ISPs before anything runs)
        except ValueError as exc:  # constant ISP scores or outputs: no map, no ranking (nan SRCC, '-' in the table)
            logger.warning("%s, ISP draw %d: no %s map of Gamma's %s fits the ISPs (%s); every image gets the ISP "
                           "scores' mean", s.name, draw, method, outputs, exc)
            return np.full(len(s.test), float(isp_scores.mean()))
        return fitted.predict(test_x)

    def gamma_scores(self, model: GammaModel, ds: Dataset, name: str, part: str) -> np.ndarray:
        """A Gamma model's scores (N,) of ``ds`` with the run's test-time crop protocol (``eval.crop_mode`` ...)."""
        return self.gamma_outputs(model, ds, name, part)

    def gamma_outputs(self, model: GammaModel, ds: Dataset, name: str, part: str, outputs: str = "score"
                      ) -> np.ndarray:
        """A Gamma model's ``ADAPT_OUTPUTS[outputs]`` of ``ds`` with the run's test-time crop protocol: its scores
        (N,) (the model's forward) for ``score``, else (N, k) columns in that order (:meth:`GammaModel.assess`).
        Cached per (outputs, set, part) for the evaluation."""
        key = (outputs, name, part)
        if key not in self._gamma_cache:
            e = self.cfg.eval
            model.eval()
            own = copy.copy(model.crop_protocol)  # (a Gamma + ISP model's Gamma keeps its own protocol)
            model.set_crop_protocol(mode=e.crop_mode, num=e.crops, seed=e.crop_seed)
            workers = e.workers if e.workers is not None else self.cfg.workers
            net = model if outputs == "score" else AssessedOutputs(model, ADAPT_OUTPUTS[outputs])
            try:
                self._gamma_cache[key] = predict(net, ds, self.dist.device, batch_size=e.batch_size,
                                                 workers=workers, dist_info=self.dist)
            finally:
                model.crop_protocol = own
        return self._gamma_cache[key]

    def metrics(self, model: nn.Module, s: EvalSet, inverted: bool = False, mapping: str = "none"
                ) -> tuple[dict[str, float], np.ndarray]:
        """SRCC / PLCC / KRCC of one set (mean over ``isp_draws`` prompts, with ``<metric>_std`` when several) and the
        first draw's scores."""
        labels = np.asarray(s.test.labels, dtype=np.float64)
        per_draw, first = [], None
        draws = self.cfg.promptiqa.isp_draws if (takes_isp(model) or mapping != "none") else 1
        for d in range(draws):
            scores = self.scores(model, s, d, inverted, mapping)
            first = scores if first is None else first
            per_draw.append(evaluate_scores(scores, labels))
        out: dict[str, float] = {m: float(np.mean([r[m] for r in per_draw])) for m in METRICS}
        out["n"] = per_draw[0]["n"]
        if draws > 1:
            out.update({f"{m}_std": float(np.std([r[m] for r in per_draw])) for m in METRICS})
            out["draws"] = draws
        return out, first

    def evaluate(self, model: nn.Module, sets: Sequence[EvalSet], inverted: bool = False, mapping: str = "none"
                 ) -> dict[str, Any]:
        per, preds = {}, {}
        for s in sets:
            per[s.name], scores = self.metrics(model, s, inverted, mapping)
            preds[s.name] = scores.tolist()
        return {"datasets": per, "mean": mean_metrics(per), "predictions": preds}


def model_label(cfg: TrainConfig, model: nn.Module) -> str:
    """The run's row in the adaptation table."""
    kind = family_of_model(model).title
    if is_family(model, "gamma"):
        kind = {"fit": GAMMA_MAPPED, "fit_all": GAMMA_MAPPED_ALL}.get(cfg.promptiqa.mapping, GAMMA_AS_IS)
    return f"{kind} ({cfg.name})"


def adaptation(run: Run, ev: Evaluator, sets: Sequence[EvalSet]) -> dict[str, dict[str, dict[str, Any]]]:
    """The adaptation table's rows: {method: {isps | inverted_isps: {dataset: metrics}}} for the run's model (and,
    with ``promptiqa.baselines``, Gamma as it is, with a monotone map of its score and with ridge on all its outputs,
    each fitted on the ISPs)."""
    cfg = run.cfg
    mapping = cfg.promptiqa.mapping
    rows = {model_label(cfg, run.model): {v: ev.evaluate(run.model, sets, v == "inverted_isps", mapping)["datasets"]
                                          for v in PROMPT_VARIANTS}}
    if cfg.promptiqa.baselines:
        gamma = run.model.gamma if is_family(run.model, "gamma_isp") else create_model(pretrained=resolve_gamma(cfg))
        gamma = gamma.to(run.dist.device)
        gev = Evaluator(run)
        for label, how in ((GAMMA_AS_IS, "none"), (GAMMA_MAPPED, "fit"), (GAMMA_MAPPED_ALL, "fit_all")):
            rows[label] = {v: gev.evaluate(gamma, sets, v == "inverted_isps", how)["datasets"] for v in PROMPT_VARIANTS}
    return rows



# ------------------------------------------------------------------------------------------------ tables
def adaptation_markdown(rows: dict[str, dict[str, dict[str, Any]]], title: str = "") -> str:
    """The adaptation table: held-out SRCC of each method on each set, with the ISP scores as given and inverted."""
    datasets = list(dict.fromkeys(d for r in rows.values() for v in r.values() for d in v))
    lines = [title] if title else []
    for variant, heading in (("isps", "ISP scores as given"), ("inverted_isps", "ISP scores inverted (1 - s)")):
        lines += ["", f"Held-out SRCC, {heading}:", "", "| method | " + " | ".join(datasets) + " |",
                  "|---" * (len(datasets) + 1) + "|"]
        for method, r in rows.items():
            cells = [_cell(r.get(variant, {}).get(d)) for d in datasets]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip() + "\n"


def _cell(metrics: dict[str, Any] | None) -> str:
    if not metrics or metrics.get("srcc") is None or not math.isfinite(metrics["srcc"]):
        return "-"
    text = f"{metrics['srcc']:.3f}"
    return text + (f" ± {metrics['srcc_std']:.3f}" if "srcc_std" in metrics else "")


def compared_rows(cfg: TrainConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Adaptation rows of the runs named in ``promptiqa.compare_runs`` (their final evaluation)."""
    rows = {}
    for name in cfg.promptiqa.compare_runs:
        path = Path(cfg.output_dir) / name / f"split_{cfg.split_index}" / "results.json"
        try:
            final = json.loads(path.read_text(encoding="utf-8")).get("final") or {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"promptiqa.compare_runs: cannot read {path} ({exc}); has run {name!r} "
                              "finished?") from None
        if not final.get("adaptation"):
            raise ConfigError(f"promptiqa.compare_runs: {path} has no adaptation rows (run {name!r} needs "
                              "promptiqa.inverted_isps or promptiqa.baselines)")
        rows.update(final["adaptation"])
    return rows


