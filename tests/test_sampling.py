"""Sampling: deterministic by id hash, independent of order, stable under appends."""

from __future__ import annotations

import random

import pytest

from embedbatch.config import SampleConfig
from embedbatch.errors import UsageError
from embedbatch.records import Record
from embedbatch.sampling import Sampler


def recs(ids: list[str], strata: list[str] | None = None) -> list[Record]:
    return [
        Record(id=i, source="file", dataset="d", split=None, text=i, n_tokens=1, stratum=strata[k] if strata else None)
        for k, i in enumerate(ids)
    ]


def chosen(cfg: SampleConfig, records: list[Record]) -> list[str]:
    return [r.id for r in Sampler(cfg).select(records)]


IDS = [f"id-{i}" for i in range(2000)]


def test_n_same_whatever_the_order() -> None:
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    a = chosen(SampleConfig(n=100, seed=7), recs(IDS))
    b = chosen(SampleConfig(n=100, seed=7), recs(shuffled))
    assert (100, a) == (len(a), b)
    assert a != chosen(SampleConfig(n=100, seed=8), recs(IDS))


def test_p_stable_under_appended_rows() -> None:
    """Appending rows never changes whether an existing row is chosen."""
    before = set(chosen(SampleConfig(p=0.1), recs(IDS)))
    after = set(chosen(SampleConfig(p=0.1), recs(IDS + [f"new-{i}" for i in range(500)])))
    assert before == {i for i in after if i.startswith("id-")}
    assert 120 < len(before) < 280


def test_n_after_append_keeps_smallest_hashes() -> None:
    """With --n an appended row only enters by displacing a larger hash: old picks stay a subset."""
    before = set(chosen(SampleConfig(n=50), recs(IDS)))
    after = set(chosen(SampleConfig(n=50), recs(IDS + [f"new-{i}" for i in range(100)])))
    assert {i for i in after if i.startswith("id-")} <= before


def test_stratified_proportional() -> None:
    strata = ["a" if i % 4 else "b" for i in range(len(IDS))]
    s = Sampler(SampleConfig(n=100, stratify_by="split"))
    picked = list(s.select(recs(IDS, strata)))
    counts = {"a": 0, "b": 0}
    for r in picked:
        counts[r.stratum or ""] += 1
    assert {"a": 75, "b": 25} == counts
    assert {"a": 1500, "b": 500} == s.describe()["strata"]["population"]


def test_ids_filter_with_ranges() -> None:
    ids = [str(i) for i in range(30)] + ["x"]
    assert ["1", "5", "10", "11", "12", "x"] == chosen(SampleConfig(ids="1,5,10-12,x"), recs(ids))


def test_invalid_configs() -> None:
    with pytest.raises(UsageError):
        SampleConfig(n=5, p=0.1)
    with pytest.raises(UsageError):
        SampleConfig(p=1.5)
