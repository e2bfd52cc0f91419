"""Every family's outputs on fixed inputs and weights are those stored in tests/data/golden_outputs.json (written by
scripts/snapshot_outputs.py before the family table was introduced): a redesign keeps users' numbers.

Numbers are compared with a relative tolerance of 1e-4 and an absolute one of 1e-5 (the scores are of order 0.1-1;
other x86 CPUs round matmuls differently at about 1e-6); names and chosen scenes exactly.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden_outputs.json"
RTOL, ATOL = 1e-4, 1e-5


def _snapshot_module() -> Any:
    spec = importlib.util.spec_from_file_location("snapshot_outputs", REPO / "scripts" / "snapshot_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare(actual: Any, expected: Any, where: str, problems: list[str]) -> None:
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            problems.append(f"{where}: keys {sorted(actual) if isinstance(actual, dict) else actual} != "
                            f"{sorted(expected)}")
            return
        for key in expected:
            _compare(actual[key], expected[key], f"{where}.{key}", problems)
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            problems.append(f"{where}: {actual!r} != {expected!r}")
            return
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _compare(a, e, f"{where}[{i}]", problems)
    elif isinstance(expected, float):
        ok = isinstance(actual, (int, float)) and math.isfinite(actual) and abs(actual - expected) <= ATOL + RTOL * abs(
            expected)
        if not ok:
            problems.append(f"{where}: {actual!r} != {expected!r} (rtol {RTOL}, atol {ATOL})")
    elif actual != expected:
        problems.append(f"{where}: {actual!r} != {expected!r}")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _snapshot_module().compute(tmp_path_factory.mktemp("golden"))


def test_golden_file_covers_every_family() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert {"gamma", "gamma_distribution_attributes", "gamma_sdp", "gamma_isp", "promptiqa", "promptiqa_flip",
            "attiqa"} <= set(golden)
    assert set(golden["gamma_sdp"]) == {"natural", "aigc", "underwater", "face", "aesthetics", "auto"}
    # the stored outputs tell the inputs apart (a model that ignored its input would pass any comparison of them)
    for rows in (golden["gamma"], golden["promptiqa"], golden["gamma_sdp"]["face"]):
        assert len({round(r["score"], 6) for r in rows}) == len(rows)


@pytest.mark.parametrize("key", ["gamma", "gamma_distribution_attributes", "gamma_sdp", "gamma_isp", "promptiqa",
                                 "promptiqa_flip", "attiqa"])
def test_outputs_match_golden(outputs: dict[str, Any], key: str) -> None:
    expected = json.loads(GOLDEN.read_text())[key]
    problems: list[str] = []
    _compare(outputs[key], expected, key, problems)
    assert not problems, f"{len(problems)} output(s) differ from {GOLDEN.name}:\n" + "\n".join(problems[:20])
