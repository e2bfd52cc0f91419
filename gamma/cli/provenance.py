"""Where the rows of a ``gamma score`` output came from, recorded beside it and checked by ``--resume``.

Every output file of ``gamma score`` gets a *sidecar*, ``<out>.meta.json`` (``scores.csv`` -> ``scores.csv.meta.json``),
so that the output itself stays a plain table (``pandas.read_csv``, ``pandas.read_json(lines=True)``,
``pandas.read_json``). It records what the scores depend on: gamma's version, the weights (path and sha256 of their
content), the model family and variant, the prompt set, the scene, the crop protocol (mode, crops per image, seed), the
precision of the image tower, the image-score pairs of ``--isp`` (path and sha256), the MOS mapping and the columns.
``--resume`` refuses to append to an output whose record differs from this run's, naming each difference; so does a
sharded run for the part files of an interrupted one (one record for all of them, ``.<out>.parts.meta.json``).

The API, for every output format (a writer that stores metadata inside its file, e.g. Parquet's schema metadata,
stores :meth:`Provenance.to_dict` there instead of a sidecar)::

    prov = Provenance.from_scorer(scorer, args)        # this run's record (hashes the weights once per process)
    prov.to_dict() / Provenance.from_dict(d)            # JSON-able form and back
    prov.with_columns(cols)                             # the same record for a file with other fields (part files)
    differences = prov.check_against(existing)          # [] when ``existing`` (a dict or Provenance) may be continued
    write_sidecar(path, prov) / read_sidecar(path)      # the sidecar of an output file (None when there is none)
    refusal(path, differences)                          # the UsageError message of a refused --resume

What counts: the weights by content (a moved or renamed file with the same sha256 continues; the path is recorded for
the reader), everything else by value; ``created`` is informational. Hashing streams the file in 1 MiB blocks: the
release's 1.1 GB ``Gamma.pth`` costs about 2.5 s at the 450 MB/s of a small shared CPU (under a second where sha256
runs in hardware), once per process: the digest is cached by (path, size, modification time).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._files import atomic_write
from .common import UsageError

if TYPE_CHECKING:
    from ..scorer import Scorer

SIDECAR_SUFFIX = ".meta.json"

_HASHES: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, streamed; cached in-process by (path, size, modification time)."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(resolved, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


@dataclass(frozen=True)
class Provenance:
    """What the scores of one output depend on (see the module docstring)."""

    gamma_version: str
    weights: dict[str, Any]  # {"path": str | None, "sha256": str | None}; None, None: random weights (seed 0)
    model: dict[str, Any]  # {"family": "gamma" | "promptiqa", "variant": name given with --model, or None}
    prompt_set: str | None  # Gamma: naive / sdp ...; PromptIQA: None
    scene: str | None  # SDP models: the scene or "auto"; otherwise None (it changes nothing)
    crops: dict[str, Any] | None  # Gamma: {"mode", "num" (crops per image), "seed" (random mode only)}
    precision: str
    isp: dict[str, Any] | None  # --isp: {"path", "sha256", and "outputs" (Gamma) or "backend", "flip" (PromptIQA)}
    mos_range: list[float] | None
    lower_better: bool
    columns: list[str]
    created: str = field(default="", compare=False)  # when the record was made (UTC); not checked

    #: Fields whose difference does not refuse a resume.
    INFORMATIONAL = ("created",)

    @classmethod
    def from_scorer(cls, scorer: Scorer, args: argparse.Namespace) -> Provenance:
        """This run's record: ``scorer`` as built by :func:`gamma.cli.score_setup.make_scorer` from ``args``.

        The Scorer does not keep the path of its weights, so it is found again from ``args.weights`` as the factory
        found it (:func:`gamma.hub.resolve_weights`, no download: the scorer has the file already).
        """
        from ..hub import resolve_weights

        model = scorer.model
        promptiqa = scorer.is_promptiqa
        if args.weights is None and args.model is not None:
            weights: dict[str, Any] = {"path": None, "sha256": None}
        else:
            name = args.weights or ("gamma_sdp" if args.prompt_set == "sdp" else "gamma")
            path = resolve_weights(path=name, download=False)
            weights = {"path": str(Path(path).absolute()), "sha256": file_sha256(path)}
        prompt_set = getattr(model.config, "prompt_set", None)  # None: a family without text prompts
        crops = None
        protocol = getattr(model, "crop_protocol", None)  # None: a family that scores the whole image
        if protocol is not None:
            crops = {"mode": protocol.mode, "num": protocol.crops_per_image,
                     "seed": protocol.seed if protocol.mode == "random" else None}
        isp = None
        if args.isp is not None:
            isp = {"path": str(Path(args.isp).absolute()), "sha256": file_sha256(args.isp)}
            isp.update({"backend": scorer.backend, "flip": scorer.isp_flip} if promptiqa
                       else {"outputs": args.adapt_outputs or "score"})
        return cls(
            gamma_version=__version__,
            weights=weights,
            model={"family": scorer.family.name, "variant": args.model},
            prompt_set=prompt_set,
            scene=scorer.scene if prompt_set == "sdp" else None,
            crops=crops,
            precision=getattr(model, "precision", "fp32"),
            isp=isp,
            mos_range=list(scorer.mos_range) if scorer.mos_range is not None else None,
            lower_better=bool(scorer.lower_better) if scorer.mos_range is not None else False,
            columns=list(scorer.columns()),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """A record read back; missing fields (an older gamma's record) are None, and so differ from any value."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: data.get(name) for name in names if name != "created"}, created=data.get("created", ""))

    def with_columns(self, columns: list[str]) -> Provenance:
        return replace(self, columns=list(columns))

    def check_against(self, existing: Provenance | dict[str, Any]) -> list[str]:
        """What differs between ``existing`` (the record of the file to continue) and this run, one phrase each
        (``"prompt set: naive in the file, sdp in this run"``); empty when the file may be continued."""
        other = existing if isinstance(existing, Provenance) else Provenance.from_dict(existing)
        differences = []
        for f in fields(self):
            if f.name in self.INFORMATIONAL:
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "weights":  # by content: the path is for the reader
                same = (mine or {}).get("sha256") == (theirs or {}).get("sha256")
            elif f.name == "columns":
                same = list(mine or []) == list(theirs or [])
            else:
                same = mine == theirs
            if not same:
                differences.append(f"{_LABELS[f.name]}: {_describe(f.name, theirs)} in the file, "
                                   f"{_describe(f.name, mine)} in this run")
        return differences


_LABELS = {"gamma_version": "gamma version", "weights": "weights", "model": "model", "prompt_set": "prompt set",
           "scene": "scene", "crops": "crop protocol", "precision": "precision", "isp": "--isp",
           "mos_range": "--mos-range", "lower_better": "--lower-better", "columns": "columns"}


def _describe(name: str, value: Any) -> str:
    if value is None:
        return "random weights" if name == "weights" else "none"
    if name == "weights":
        if not value.get("sha256"):
            return "random weights (--model without --weights)"
        return f"{Path(value['path']).name if value.get('path') else '?'} (sha256 {value['sha256'][:12]}…)"
    if name == "isp":
        return f"{Path(value['path']).name} (sha256 {str(value.get('sha256'))[:12]}…)"
    if name == "crops":
        seed = f", seed {value['seed']}" if value.get("seed") is not None else ""
        return f"{value.get('mode')} ({value.get('num')} per image{seed})"
    if name == "model":
        return str(value.get("family")) + (f" ({value['variant']})" if value.get("variant") else "")
    if name == "columns":
        return ",".join(value)
    return str(value)


def sidecar_path(path: str | os.PathLike) -> Path:
    """``scores.csv`` -> ``scores.csv.meta.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, provenance: Provenance) -> Path:
    """Write the record of the output ``path`` beside it (atomically); returns the sidecar's path."""
    target = sidecar_path(path)
    text = json.dumps(provenance.to_dict(), indent=2) + "\n"
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return target


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record beside the output ``path``; None when there is none. A usage error when it is unreadable."""
    target = sidecar_path(path)
    if not target.is_file():
        return None
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {target} ({exc}): score into another --out or pass --overwrite") from None
    if not isinstance(data, dict):
        raise UsageError(f"{target} is not a record written by gamma: score into another --out or pass --overwrite")
    return data


def check_resume(path: str | os.PathLike, provenance: Provenance, what: str | None = None) -> None:
    """Refuse (:class:`UsageError`) to continue ``path`` unless its sidecar records the same as ``provenance``."""
    check_recorded(read_sidecar(path), provenance, what or str(path), f"{sidecar_path(path).name} is missing")


def check_recorded(recorded: dict[str, Any] | None, provenance: Provenance, what: str, missing: str) -> None:
    """Refuse (:class:`UsageError`) to continue ``what`` unless ``recorded`` (its record, wherever it is kept; None:
    it has none, which ``missing`` says where) is the same as ``provenance``."""
    if recorded is None:
        raise UsageError(f"cannot resume {what}: it has no record of how it was scored ({missing}: written by an "
                         "older gamma, or copied without it), so this run may not match it; score into another --out "
                         "or pass --overwrite")
    differences = provenance.check_against(recorded)
    if differences:
        raise UsageError(refusal(what, differences))


def refusal(what: str, differences: list[str]) -> str:
    return (f"cannot resume {what}: it was scored differently — {'; '.join(differences)}. Score into another --out, "
            "or pass --overwrite to replace it")
