#!/usr/bin/env python
"""Write seeded train/held-out splits of a meta CSV as a pyiqa split pickle (see ``--help``).

    python scripts/make_splits.py meta_info/meta_info_CSIQDataset.csv --dataset csiq -o meta_info/csiq_10split.pkl
    python scripts/make_splits.py meta_info/meta_info_LIVEIQADataset.csv --dataset live --count groups \
        -o meta_info/live_10split_byref.pkl                                     # PromptIQA: 80 % of the references
    python scripts/make_splits.py meta_info/meta_info_LIVEIQADataset.csv --dataset live --check \
        -o meta_info/live_10split.pkl                        # references on both sides, per split of an existing file
    python scripts/make_splits.py my_data/labels.csv -o my_data/splits.pkl          # custom CSV: image,mos[,scene]
"""

import sys

from gamma.data.splits import main

if __name__ == "__main__":
    sys.exit(main())
