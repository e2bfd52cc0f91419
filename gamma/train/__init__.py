"""Training and evaluation of Gamma: option files, the mixed-dataset loop, checkpoints, DDP, the split table.

Entry points: ``python train.py -opt options/unified.yml`` / ``gamma-train`` (:func:`gamma.train.main.cli`), and
:func:`main` (an argument list in, a results dict out) for notebooks and tests.
"""

from .config import ConfigError, TrainConfig, load_config
from .evaluate import evaluate, median_table, write_table
from .loop import NonFiniteLossError, TrainingInterrupted, fit, train, train_one_epoch
from .main import main

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainingInterrupted",
    "evaluate",
    "fit",
    "load_config",
    "main",
    "median_table",
    "train",
    "train_one_epoch",
    "write_table",
]
