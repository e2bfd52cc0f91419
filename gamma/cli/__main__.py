"""``python -m gamma.cli ...`` is the ``gamma`` command (as ``python -m gamma``)."""

import sys

from . import main

sys.exit(main())
