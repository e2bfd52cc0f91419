"""``python -m gamma ...`` is the ``gamma`` command; ``torchrun --nproc_per_node=N -m gamma score ...`` runs it in N
processes (sharded scoring, docs/usage.md)."""

import sys

from .cli import main

sys.exit(main())
