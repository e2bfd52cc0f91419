"""Yardsticks for gamma's own tests and benchmarks, not part of the library's API.

``reference``: the release's forward pass written literally (tests/test_reference.py, tests/test_perf.py,
scripts/bench.py measure :class:`gamma.GammaModel` against it).
"""
