"""Datasets: the registry of known IQA/IAA sets, meta-file readers, splits, transforms and the torch Dataset.

Typical use::

    from gamma.data import DatasetEntry, build_dataset, collate
    entry = DatasetEntry.from_dict({"name": "koniq10k", "split_index": 3}, data_root="/data/iqa")
    train = build_dataset(entry, "train")
    test = build_dataset(entry, "test")
"""

from .datasets import (
    DATA_ROOT_ENV,
    PHASES,
    DatasetEntry,
    IQADataset,
    balanced_weights,
    build_dataset,
    collate,
)
from .meta import (
    LIVEC_DROPPED_ROWS,
    MetaRecord,
    MetaTable,
    denormalize_mos,
    normalize_mos,
    read_meta,
    validate_range,
)
from .registry import (
    DATASETS,
    META_KINDS,
    UNIFIED_DATASETS,
    DatasetInfo,
    canonical_dataset,
    get_dataset_info,
    list_datasets,
)
from .splits import all_split, load_split_file, make_splits, save_splits, split_indices
from .transforms import TestTransform, TrainTransform, ensure_min_side, random_crop_offsets, resize_short_side

__all__ = [
    "DATASETS",
    "DATA_ROOT_ENV",
    "LIVEC_DROPPED_ROWS",
    "META_KINDS",
    "PHASES",
    "UNIFIED_DATASETS",
    "DatasetEntry",
    "DatasetInfo",
    "IQADataset",
    "MetaRecord",
    "MetaTable",
    "TestTransform",
    "TrainTransform",
    "all_split",
    "balanced_weights",
    "build_dataset",
    "canonical_dataset",
    "collate",
    "denormalize_mos",
    "ensure_min_side",
    "get_dataset_info",
    "list_datasets",
    "load_split_file",
    "make_splits",
    "normalize_mos",
    "random_crop_offsets",
    "read_meta",
    "resize_short_side",
    "save_splits",
    "split_indices",
    "validate_range",
]
