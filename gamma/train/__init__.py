"""Training and evaluation of Gamma: option files, stages, the mixed-dataset loop, checkpoints, DDP, the split table.

Modules, each importing only those listed before it: ``config`` (option files), ``checkpoint`` / ``distributed`` /
``sampling`` / ``evaluate``, ``run_folder`` (the run folder's files and logs), ``loop`` (stage ``gamma``),
``pretrain`` (stage ``pretrain_clip``), ``stages`` (the table of stages and their chaining), ``main`` (command line).

Entry points: ``python train.py -opt options/unified.yml`` / ``gamma-train`` (:func:`gamma.train.main.cli`), and
:func:`main` (an argument list in, a results dict out) for notebooks and tests.
"""

from .config import ConfigError, TrainConfig, load_config
from .evaluate import evaluate, median_table, write_table
from .loop import NonFiniteLossError, TrainingInterrupted, fit, train, train_one_epoch
from .main import main
from .stages import STAGES, run_stage

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "STAGES",
    "TrainConfig",
    "TrainingInterrupted",
    "evaluate",
    "fit",
    "load_config",
    "main",
    "median_table",
    "run_stage",
    "train",
    "train_one_epoch",
    "write_table",
]
