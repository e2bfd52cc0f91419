"""Property-based tests (hypothesis) for the meta-file reader and the split maker."""

from __future__ import annotations

import csv
import io
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gamma.data import META_KINDS, make_splits, read_meta

_FIELD = st.one_of(
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["", " ", "nan", "image", "mos", "scene", "group", "face", "natural", "a.png", "1e309", "0x10"]),
)
_ROWS = st.lists(st.lists(_FIELD, min_size=0, max_size=14), min_size=0, max_size=12)

_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read(content: bytes, kind: str):
    fd, path = tempfile.mkstemp(suffix=".csv")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        return read_meta(path, kind)
    finally:
        os.remove(path)


def _check_table(t) -> None:
    assert len(t) >= 1
    for r in t.records:
        assert r.path and r.path == r.path.strip()
        assert r.mos == r.mos and abs(r.mos) != float("inf")  # finite
        assert r.line >= 2


@_SETTINGS
@given(rows=_ROWS, kind=st.sampled_from(META_KINDS))
def test_csv_reader_only_raises_value_error(rows, kind):
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    try:
        t = _read(buf.getvalue().encode("utf-8", "surrogatepass"), kind)
    except ValueError as exc:
        assert ".csv" in str(exc)  # every message names the file
        return
    _check_table(t)


@_SETTINGS
@given(content=st.binary(max_size=300), kind=st.sampled_from(META_KINDS))
def test_csv_reader_on_random_bytes(content, kind):
    try:
        t = _read(content, kind)
    except ValueError as exc:
        assert ".csv" in str(exc)
        return
    _check_table(t)


@_SETTINGS
@given(
    groups=st.lists(st.integers(0, 8), min_size=2, max_size=60).filter(lambda g: len(set(g)) >= 2),
    ratio=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
    n_splits=st.integers(1, 4),
)
def test_make_splits_partitions_by_group(groups, ratio, seed, n_splits):
    n = len(groups)
    splits = make_splits(n, groups, n_splits=n_splits, train_ratio=ratio, seed=seed)
    assert splits == make_splits(n, groups, n_splits=n_splits, train_ratio=ratio, seed=seed)
    assert sorted(splits) == list(range(1, n_splits + 1))
    for s in splits.values():
        train, val = s["train"], s["val"]
        assert train and val
        assert sorted(train + val) == list(range(n))  # a partition: every row once
        assert not {groups[i] for i in train} & {groups[i] for i in val}
        assert train == sorted(train) and val == sorted(val)
