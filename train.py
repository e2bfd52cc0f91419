"""Train or evaluate Gamma: ``python train.py -opt options/unified.yml [--split_index N] [--resume] [--all_splits]
[key=value ...]`` (see ``python train.py -h`` and options/). Multi-GPU: ``torchrun --nproc_per_node=N train.py ...``."""

import sys

from gamma.train.main import cli

if __name__ == "__main__":
    sys.exit(cli())
