"""The table of known datasets (data only): scene, label type, MOS range, meta format and default file names.

Ranges are the ones the authors' release trains with (docs/datasets.md#the-registered-datasets). Folder, meta and
split names follow the release's option files and meta-info bundle, made relative to a data root; exBeDDE and ECIQAD
are not in the release's options, so their names are ours. BID, AIGCIQA2023 and FLIVE serve the paper's appendix
tables and ATTIQA's (docs/paper-protocols.md): their ranges come from their own papers. Every field can be overridden
per entry (see :class:`gamma.data.DatasetEntry`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..prompts import DATASET_SCENES

#: Meta-file formats, see :mod:`gamma.data.meta`.
META_KINDS: tuple[str, ...] = ("nr", "fr", "ava", "livec", "custom")


@dataclass(frozen=True)
class DatasetInfo:
    """Registry defaults of one dataset."""

    name: str  # registry key, lower case (also the key of gamma.prompts.DATASET_SCENES)
    title: str  # display name, as in the paper's tables
    scene: str  # SDP scene (gamma.prompts.SCENES)
    lower_better: bool  # True for DMOS labels: normalised as 1 - (mos - lo) / (hi - lo)
    mos_range: tuple[float, float]  # (lo, hi) the release normalises with
    kind: str  # meta format: 'nr' | 'fr' | 'ava' | 'livec'
    root: str  # image folder, relative to the data root
    meta_file: str  # meta CSV, relative to the data root
    split_file: str | None  # split pickle, relative to the data root
    eval_key: str = "val"  # key of the split pickle's held-out part ('test' for AVA)
    resize: int | None = None  # resize the short side to this before cropping (train and test)
    num_images: int | None = None  # rows after the format's own filtering (LIVEC: 1,162), for sanity messages


def _info(name: str, title: str, label: str, lo: float, hi: float, kind: str, root: str, meta: str, split: str | None,
          **kw) -> DatasetInfo:
    return DatasetInfo(name=name, title=title, scene=DATASET_SCENES[name], lower_better=(label == "DMOS"),
                       mos_range=(float(lo), float(hi)), kind=kind, root=root, meta_file=meta, split_file=split, **kw)


_M = "meta_info/"  # folder of the release's meta-info bundle inside the data root

#: name -> registry defaults, in the order of the paper's Table 1 (then the two generalisation sets).
DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        _info("live", "LIVE", "DMOS", 1, 100, "fr", "databaserelease2",
              _M + "meta_info_LIVEIQADataset.csv", _M + "live_10split.pkl", num_images=779),
        _info("csiq", "CSIQ", "DMOS", 0, 1, "fr", "CSIQ/dst_imgs",
              _M + "meta_info_CSIQDataset.csv", _M + "csiq_10split.pkl", num_images=866),
        _info("tid2013", "TID2013", "MOS", 0, 9, "fr", "tid2013/distorted_images",
              _M + "meta_info_TID2013Dataset.csv", _M + "tid2013_10split.pkl", num_images=3000),
        _info("kadid10k", "KADID-10k", "MOS", 1, 5, "fr", "kadid10k/images",
              _M + "meta_info_KADID10kDataset.csv", _M + "kadid_10split.pkl", num_images=10125),
        _info("livec", "LIVEC", "MOS", 0, 100, "livec", "ChallengeDB_release/Images",
              _M + "meta_info_LIVEChallengeDataset.csv", _M + "livec_10split.pkl", num_images=1162),
        _info("koniq10k", "KonIQ-10k", "MOS", 0, 100, "nr", "koniq10k/512x384",
              _M + "meta_info_KonIQ10kDataset.csv", _M + "koniq_10split.pkl", num_images=10073),
        _info("spaq", "SPAQ", "MOS", 0, 100, "nr", "spaq/384_oneside",
              _M + "meta_info_SPAQDataset.csv", _M + "spaq_10split.pkl", num_images=11125),
        _info("gfiqa20k", "GFIQA-20k", "MOS", 0, 1, "nr", "GFIQA-20k/image",
              _M + "meta_info_GFIQADataset.csv", _M + "gfiqa_10split.pkl", num_images=19988),
        # AGIQA-3k, UWIQA and AADB: the release reads a two-column CSV kept next to the images.
        _info("agiqa3k", "AGIQA-3k", "MOS", 0, 5, "nr", "agiqa3k/image",
              "agiqa3k/mos.csv", _M + "agiqa3k_10split.pkl", num_images=2982),
        _info("uwiqa", "UWIQA", "MOS", 0, 1, "nr", "UWIQA/Image",
              "UWIQA/uwiqa_mos.csv", _M + "uwiqa_10split.pkl", resize=224, num_images=890),
        _info("ava", "AVA", "MOS", 0, 10, "ava", "AVA_dataset/images",
              _M + "meta_info_AVADataset_revise.csv", _M + "ava_official_ilgnet_traintest_6w_10split.pkl",
              eval_key="test", resize=224),
        _info("aadb", "AADB", "MOS", 0, 1, "nr", "aadb/image",
              "aadb/aadb_mos.csv", _M + "aadb_10split.pkl", num_images=10000),
        # Generalisation sets (paper Table 7); not in the release's options, names are ours.
        _info("exbedde", "exBeDDE", "MOS", 0, 1, "nr", "exBeDDE/images",
              "exBeDDE/exbedde_mos.csv", _M + "exbedde_10split.pkl", num_images=1670),
        _info("eciqad", "ECIQAD", "MOS", 1, 9, "nr", "ECIQAD/images",
              "ECIQAD/eciqad_mos.csv", _M + "eciqad_10split.pkl", num_images=2400),
        # Beyond Table 1 (docs/paper-protocols.md). None is in the release's options, so folder and file names follow
        # pyiqa's naming (meta_info_<Name>Dataset.csv, <name>_10split.pkl); FLIVE's are pyiqa's own.
        # BID (Ciancio et al., TIP 2011): authentic blur, ratings on a 0-5 scale; in LIQE's training set (Table 12).
        _info("bid", "BID", "MOS", 0, 5, "nr", "BID",
              _M + "meta_info_BIDDataset.csv", _M + "bid_10split.pkl", num_images=586),
        # AIGCIQA2023 (Wang et al., CICAI 2023): 2,400 text-to-image pictures (6 models x 100 prompts x 4); the label
        # is the quality MOS (mosz1.mat, z-scores rescaled to 0-100); tested on all images in Table 13.
        _info("aigciqa2023", "AIGCIQA2023", "MOS", 0, 100, "nr", "AIGCIQA2023/Image/allimg",
              _M + "meta_info_AIGCIQA2023Dataset.csv", _M + "aigciqa2023_10split.pkl", num_images=2400),
        # FLIVE / PaQ-2-PiQ (Ying et al., CVPR 2020), for ATTIQA's tables: pyiqa's meta file and its one official
        # split (train / val / test; the held-out part is 'test'). pyiqa's file lists the ~40k whole pictures first,
        # then their patches; the official split indexes both (an entry's exclude_patches leaves the patches out;
        # docs/paper-protocols.md).
        _info("flive", "FLIVE", "MOS", 0, 100, "nr", "FLIVE_Database/database",
              _M + "meta_info_FLIVEDataset.csv", _M + "flive_official.pkl", eval_key="test"),
    )
}

#: The 12 datasets of the paper's unified training (Table 1 order).
UNIFIED_DATASETS: tuple[str, ...] = (
    "live", "csiq", "tid2013", "kadid10k", "livec", "koniq10k", "spaq", "gfiqa20k", "agiqa3k", "uwiqa", "ava", "aadb",
)

# Accepted spellings -> registry key (the release's option names and common variants).
_ALIASES: dict[str, str] = {
    "kadid": "kadid10k", "kadid-10k": "kadid10k", "koniq": "koniq10k", "koniq-10k": "koniq10k",
    "livechallenge": "livec", "clive": "livec", "live_challenge": "livec", "gfiqa": "gfiqa20k",
    "gfiqa-20k": "gfiqa20k", "agiqa": "agiqa3k", "agiqa-3k": "agiqa3k", "tid": "tid2013", "liveiqa": "live",
    "aigc2023": "aigciqa2023", "aigciqa-2023": "aigciqa2023", "paq2piq": "flive", "paq-2-piq": "flive",
}


def canonical_dataset(name: str) -> str | None:
    """The registry key for ``name`` (case-insensitive, a few aliases), or ``None`` when it is not registered."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in DATASETS else None


def get_dataset_info(name: str) -> DatasetInfo:
    """Registry defaults of ``name``.

    Raises:
        ValueError: the dataset is not registered; the message lists the registered names.
    """
    key = canonical_dataset(name)
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(DATASETS)}")
    return DATASETS[key]


def list_datasets() -> list[str]:
    """Registered dataset names, in table order."""
    return list(DATASETS)
