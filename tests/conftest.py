"""Suite setup: offline, seeded, small. Helpers that several test modules share live in tests/helpers.py."""

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Width-64 test models gain nothing from a second thread, and on a busy 2-core machine each parallel op can stall.
# The suite must also pass with torch's default thread count: GAMMA_TEST_THREADS=0 keeps it (N > 0 sets N threads).
_THREADS = int(os.environ.get("GAMMA_TEST_THREADS", "1"))
if _THREADS > 0:
    torch.set_num_threads(_THREADS)

# Property tests try the same examples on every run (Hypothesis derives them from each test's code) and keep no
# example database in the working tree; HYPOTHESIS_PROFILE=explore draws new examples on each run.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def _seed_global_rngs(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_seed_global_rngs()  # draws made while the test modules are imported (tables of parametrised inputs)


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ARG001 - pytest hook
    """Tests marked ``cuda`` run only where CUDA is available (scripts/gpu_check.py runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); run `pytest -m cuda` or scripts/gpu_check.py "
                                   "on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded_rngs() -> None:
    """Every test starts from the same global random state, whichever tests ran before it."""
    _seed_global_rngs()


@pytest.fixture
def tiny_model():
    """A fresh random-init tiny Gamma model (naive prompts) in eval mode."""
    import gamma

    torch.manual_seed(0)
    return gamma.create_model("gamma_test")


@pytest.fixture
def tiny_sdp_model():
    import gamma

    torch.manual_seed(0)
    return gamma.create_model("gamma_test_sdp")
