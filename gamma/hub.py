"""Finding weight files: an explicit path, an environment variable, a cache folder, or a checked download.

Resolution order for a known weight file (:data:`KNOWN_WEIGHTS`):

1. an explicit path (``Scorer(weights=...)``, ``gamma score --weights``, pyiqa's ``pretrained_model_path=``);
2. the file's environment variable (``GAMMA_WEIGHTS`` for ``gamma``, ``GAMMA_SDP_WEIGHTS`` for ``gamma_sdp`` ...);
3. the cache folder :func:`weights_dir` — ``$GAMMA_HOME`` if set, else ``<torch.hub.get_dir()>/checkpoints/gamma``
   (``~/.cache/torch/hub/checkpoints/gamma``), the same place torch and pyiqa keep their weights;
4. a download into the cache folder, checked against its sha256, where a direct URL is known.

In steps 2 and 3, a file ``X.safetensors`` beside ``X.pth`` that ``gamma convert`` wrote from that very file (same
name, size and modification time, weights stored in fp32) is used instead: the same weights, loaded memory-mapped in
a fraction of the time. A conversion of an older ``X.pth`` is ignored with a warning; a bf16 / fp16 conversion is
used only when named explicitly (its scores differ slightly). In the cache folder, a converted file whose original
has been deleted is found as well.

The authors publish their files on Google Drive and Baidu NetDisk pages, not at direct URLs, so no entry has a URL
or checksum yet and step 4 is skipped: the error then says which file to fetch from which page and where to put it.
The download code is real and tested (with a local ``file://`` URL); filling in ``url`` and ``sha256`` enables it.
Nothing downloads when ``GAMMA_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``.

Which prompt set a Gamma file's weights are used with is decided here, once, by :func:`resolve_prompt_set`: the one
the file records, else the one of a known file (:func:`identify_weights`: a known name, the release's file names, an
entry's environment variable, the sha256), else ``naive`` with a warning; a stated prompt set that contradicts a
recorded one is a :class:`PromptSetError` unless declared deliberate (``prompt_set_override=True``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch.hub

from ._files import atomic_write
from .prompts import PROMPT_SETS
from .weights import Checkpoint, CheckpointError, converted_from, read_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    """A weight file gamma knows by name."""

    name: str  # what users type: gamma.hub.resolve_weights("gamma"), pyiqa.create_metric("gamma")
    filename: str  # name in the cache folder
    env_var: str  # environment variable holding a path to the file
    prompt_set: str | None  # prompts the weights were trained with (None: a backbone, or not a Gamma model)
    description: str
    page: str  # where a person can get the file
    url: str | None = None  # direct download URL (None: none is known)
    sha256: str | None = None  # hex digest checked after a download (required whenever url is set)
    aliases: tuple[str, ...] = ()  # other file names the same file is often saved under


_RELEASE_PAGE = "the 'Weight' section of https://github.com/zht8506/Assess-Any-Image (Google Drive / Baidu NetDisk)"

#: Weight files known by name. url/sha256 stay None until a direct, checksummed URL exists.
KNOWN_WEIGHTS: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile(
            name="gamma",
            filename="Gamma.pth",
            env_var="GAMMA_WEIGHTS",
            prompt_set="naive",
            description="the authors' released Gamma weights (naive prompts, unified training on 12 datasets)",
            page=_RELEASE_PAGE,
            aliases=("gamma_weight.pth",),
        ),
        WeightFile(
            name="gamma_sdp",
            filename="Gamma-Prompt.pth",
            env_var="GAMMA_SDP_WEIGHTS",
            prompt_set="sdp",
            description="the authors' released Gamma-Prompt weights (scene-based differential prompts)",
            page=_RELEASE_PAGE,
            aliases=("gamma_prompt_weight.pth", "Gamma_Prompt.pth"),
        ),
        WeightFile(
            name="uniqa",
            filename="UniQA_weight.pt",
            env_var="GAMMA_UNIQA_WEIGHTS",
            prompt_set=None,
            description="the UniQA CLIP ViT-B/16 backbone that Gamma's training starts from",
            page=_RELEASE_PAGE,
            aliases=("UniQA.pt",),
        ),
        WeightFile(
            name="promptiqa",
            filename="best_model.pth.tar",
            env_var="GAMMA_PROMPTIQA_WEIGHTS",
            prompt_set=None,
            description="the PromptIQA authors' released weights (official layout; docs/promptiqa.md)",
            page="the Hugging Face model repository Zevin2023/PromptIQA (https://huggingface.co/Zevin2023/PromptIQA)",
            # The file has a direct Hugging Face URL, but no checksum could be taken offline: url stays None.
            aliases=("best_model_five_22.pth.tar",),  # the name the authors' online demo loads
        ),
    )
}


def known_file(path: str | os.PathLike) -> WeightFile | None:
    """The :class:`WeightFile` whose file name (or an alias) ``path`` has, if any."""
    name = Path(path).name
    return next((w for w in KNOWN_WEIGHTS.values() if name in (w.filename, *w.aliases)), None)


def identify_weights(path: str | os.PathLike, name: str | None = None) -> tuple[WeightFile, str] | None:
    """Which known weight file ``path`` is, and how that is known, in this order: ``name``, the known name it was
    asked for by (``"name"``); its file name or an alias (``"file name"``); the file an entry's environment variable
    names (``"environment variable"``); its sha256, where the table has the entry's digest (``"sha256"``). None: a
    file gamma does not know."""
    if name is not None and name in KNOWN_WEIGHTS:
        return KNOWN_WEIGHTS[name], "name"
    entry = known_file(path)
    if entry is not None:
        return entry, "file name"
    for entry in KNOWN_WEIGHTS.values():
        env = os.environ.get(entry.env_var)
        if env and os.path.isfile(env) and os.path.samefile(env, path):
            return entry, "environment variable"
    digests = {w.sha256.lower(): w for w in KNOWN_WEIGHTS.values() if w.sha256}
    if digests:  # hashing a 1 GB file costs seconds: only when there is something to compare with
        entry = digests.get(sha256sum(path))
        if entry is not None:
            return entry, "sha256"
    return None


# ------------------------------------------------------------------------------------------------ the prompt set
class PromptSetError(CheckpointError):
    """A prompt set asked for contradicts the one a checkpoint records (and the contradiction was not declared
    deliberate)."""

    def __init__(self, path: str | None, recorded: str, requested: str, hint: str = "") -> None:
        self.path, self.recorded, self.requested = path, recorded, requested
        super().__init__(
            f"{path or 'the checkpoint'} records prompt set {recorded!r} (the prompts its weights were trained with); "
            f"prompt_set={requested!r} contradicts it. Drop prompt_set={requested!r} to use {recorded!r}, or add "
            f"prompt_set_override=True to use {requested!r} prompts with these weights deliberately (a prompt "
            f"ablation){hint}")


def resolve_prompt_set(ckpt: Checkpoint | str | os.PathLike, requested: str | None = None, *,
                       deliberate: bool = False, name: str | None = None) -> tuple[str | None, str]:
    """The prompt set a Gamma checkpoint's weights are used with: the one rule every way of loading one follows
    (``create_model`` and so the ``Scorer``, ``gamma score``, ``gamma convert``, ``gamma demo``, the pyiqa metrics
    and training's ``model.pretrained``).

    1. The file records one (our checkpoints; a ``gamma convert`` output): that one. A ``requested`` set that
       contradicts it is an error (:class:`PromptSetError`) unless ``deliberate`` (e.g. scoring a model with other
       prompts to measure what they change; logged).
    2. Else (the release's files record none) a set ``requested`` is used; where the file is a known one
       (:func:`identify_weights`: the known name it was asked for by, ``Gamma.pth`` / ``Gamma-Prompt.pth`` or an
       alias, its environment variable, its sha256) that says otherwise, with a warning.
    3. Else the known file's set (``Gamma-Prompt.pth``: ``sdp``, ``Gamma.pth``: ``naive``), logged.
    4. Else ``naive``, with a warning (the release's ``Gamma.pth`` is the likelier file; refusing would break the many
       scripts that load a renamed release file of naive prompts).

    A plain CLIP backbone has no prompt set: ``(requested, "backbone")``, the caller's (or the variant's) choice.

    Args:
        ckpt: the checkpoint (:func:`gamma.weights.read_checkpoint`), or its file.
        requested: the prompt set asked for explicitly (``prompt_set=`` / ``--prompt-set``); None: none.
        deliberate: a ``requested`` set that contradicts the recorded one is meant (``prompt_set_override=True``,
            CLI ``--prompt-set-override``, training's ``model.prompt_set_override``).
        name: the known weight name the file was asked for by (``gamma_sdp``), if any.

    Returns:
        ``(prompt_set, how)``, ``how`` one of ``recorded``, ``override`` (requested over the record, deliberately),
        ``requested``, ``name``, ``file name``, ``environment variable``, ``sha256`` (rule 3, by that),
        ``assumed`` (rule 4), ``backbone``.

    Raises:
        PromptSetError: ``requested`` contradicts the recorded set and ``deliberate`` is not set.
        ValueError: ``requested`` is not a prompt set.
    """
    if requested is not None and requested not in PROMPT_SETS:
        raise ValueError(f"prompt_set must be one of {', '.join(PROMPT_SETS)}, got {requested!r}")
    if not isinstance(ckpt, Checkpoint):
        ckpt = read_checkpoint(ckpt)
    where = ckpt.path or "the checkpoint"
    recorded = getattr(ckpt.config, "prompt_set", None) if ckpt.config is not None else None
    if recorded is not None:
        if requested is None or requested == recorded:
            return recorded, "recorded"
        if not deliberate:
            raise PromptSetError(ckpt.path, recorded, requested)
        logger.info("%s records prompt set %r; using %r as asked (prompt_set_override=True)", where, recorded,
                    requested)
        return requested, "override"
    if ckpt.kind != "release":
        return requested, "backbone" if ckpt.kind == "clip" else "requested"
    known = identify_weights(ckpt.path, name) if ckpt.path is not None else None
    if requested is not None:
        if known is not None and known[0].prompt_set not in (None, requested):
            entry, how = known
            logger.warning("%s is the release's %r weights by its %s, trained with %r prompts, but prompt_set=%r "
                           "was asked for: using %r (the file does not record its prompt set)", where, entry.name,
                           how, entry.prompt_set, requested, requested)
        return requested, "requested"
    if known is not None and known[0].prompt_set is not None:
        entry, how = known
        logger.info("%s: prompt set %r, as the release's %r weights (known by its %s; the file does not record "
                    "it)", where, entry.prompt_set, entry.name, how)
        return entry.prompt_set, how
    logger.warning("%s does not record its prompt set and is not a file gamma knows (%s); assuming 'naive' (the "
                   "Gamma weights): pass prompt_set='sdp' for the Gamma-Prompt weights, or prompt_set='naive' to "
                   "say so", where, ", ".join(w.filename for w in KNOWN_WEIGHTS.values() if w.prompt_set))
    return "naive", "assumed"


class WeightsNotFoundError(FileNotFoundError):
    """No weight file could be found or fetched; the message says which file to place where."""


class ChecksumError(OSError):
    """A downloaded file does not have the expected sha256 (it is deleted)."""


def weights_dir() -> Path:
    """The cache folder for weight files: ``$GAMMA_HOME`` or ``<torch.hub.get_dir()>/checkpoints/gamma``."""
    home = os.environ.get("GAMMA_HOME")
    if home:
        return Path(home).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / "gamma"


def is_offline() -> bool:
    """Whether downloads are disabled (``GAMMA_OFFLINE`` or ``HF_HUB_OFFLINE`` set to a true value)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("GAMMA_OFFLINE",
                                                                                             "HF_HUB_OFFLINE"))


def known_weights(name: str) -> WeightFile:
    """The :class:`WeightFile` called ``name``."""
    try:
        return KNOWN_WEIGHTS[name]
    except KeyError:
        raise ValueError(f"unknown weights {name!r}; known: {', '.join(KNOWN_WEIGHTS)}") from None


def resolve_weights(
    name: str = "gamma",
    path: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> Path:
    """Find the weight file ``name`` (see the module docstring for the order).

    Args:
        name: a key of :data:`KNOWN_WEIGHTS`.
        path: an explicit file; used as is (it must exist). A known name instead of a path selects that entry.
        download: allow step 4 (ignored when offline or when no URL is known).
        progress: show a progress bar while downloading.

    Raises:
        WeightsNotFoundError: nothing found; the message lists where it looked and what to do.
    """
    if path is not None:
        text = os.fspath(path)
        if text in KNOWN_WEIGHTS and not os.path.isfile(text):
            return resolve_weights(text, download=download, progress=progress)
        p = Path(text).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"weight file not found: {p}")
        return p
    entry = known_weights(name)
    looked: list[str] = []

    env = os.environ.get(entry.env_var)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return prefer_converted(p)
        raise WeightsNotFoundError(f"${entry.env_var} points to {p}, which is not a file")
    looked.append(f"${entry.env_var} (not set)")

    cache = weights_dir()
    for filename in (entry.filename, *entry.aliases):
        p = cache / filename
        if p.is_file():
            return prefer_converted(p)
    for filename in (entry.filename, *entry.aliases):  # converted, and the original deleted
        p = (cache / filename).with_suffix(".safetensors")
        info = converted_from(p) if p.is_file() else None
        if info is not None and info.get("name") == filename:
            logger.info("using %s (converted from %s, %s weights)", p, filename, info["precision"])
            return p
    looked.append(f"{cache / entry.filename}" + (f" (or {', '.join(entry.aliases)} there)" if entry.aliases else ""))

    if entry.url and download and not is_offline():
        return download_weights(entry, cache / entry.filename, progress=progress)

    if entry.url is None:
        why = "no direct download URL is known for it"
    elif is_offline():
        why = "downloads are disabled (GAMMA_OFFLINE / HF_HUB_OFFLINE)"
    else:
        why = "downloading was not allowed"
    raise WeightsNotFoundError(
        f"no weight file for {entry.name!r}: {entry.description}. Looked in: {'; '.join(looked)}. Since {why}, "
        f"get the file from {entry.page} and save it as {cache / entry.filename}, or set {entry.env_var}=/path/to/it, "
        f"or pass its path explicitly (Scorer(weights=...), gamma score --weights ..., "
        f"pyiqa.create_metric(..., pretrained_model_path=...))."
    )


def prefer_converted(path: str | os.PathLike) -> Path:
    """``X.safetensors`` beside ``path`` (``X.pth``) when ``gamma convert`` wrote it from this very file, unchanged
    since (same name, size and modification time), with fp32 weights; else ``path``. Says which in the log."""
    path = Path(path)
    copy = path.with_suffix(".safetensors")
    if path.suffix == ".safetensors" or not copy.is_file():
        return path
    info = converted_from(copy)
    if info is None or info.get("name") != path.name:
        return path
    st = path.stat()
    if (info.get("size"), info.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
        logger.warning("not using %s: it was converted from an earlier %s (size or modification time differ); run "
                       "`gamma convert %s %s --overwrite` to update it", copy, path.name, path, copy)
        return path
    if info.get("precision") != "fp32":
        logger.info("not using %s in place of %s: it stores %s weights (pass it explicitly to use it)", copy,
                    path.name, info.get("precision"))
        return path
    logger.info("using %s, the converted copy of %s", copy, path)
    return copy


def download_weights(entry: WeightFile, dest: str | os.PathLike, progress: bool = True) -> Path:
    """Download ``entry.url`` to ``dest`` through a temporary file, verify its sha256, then move it into place
    (:func:`gamma._files.atomic_write`).

    Raises:
        ValueError: the entry has no URL or no checksum (unchecked downloads are refused).
        ChecksumError: the downloaded file's digest differs (the file is removed).
    """
    if not entry.url:
        raise ValueError(f"no download URL for {entry.name!r}")
    if not entry.sha256:
        raise ValueError(f"refusing to download {entry.name!r} without a sha256 to check it against")

    def fetch(tmp: str) -> None:
        torch.hub.download_url_to_file(entry.url, tmp, hash_prefix=None, progress=progress)
        verify_sha256(tmp, entry.sha256, what=entry.url)

    logger.info("downloading %s to %s", entry.url, dest)
    return atomic_write(dest, fetch)


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str | None = None) -> None:
    """Raise :class:`ChecksumError` (naming ``what`` or the path) if the file's sha256 differs from ``expected``."""
    actual = sha256sum(path)
    if actual.lower() != expected.strip().lower():
        raise ChecksumError(
            f"sha256 mismatch for {what or path}: expected {expected}, got {actual} (corrupt or changed download)"
        )
