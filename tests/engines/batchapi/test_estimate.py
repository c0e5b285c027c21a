"""Estimate on the real datasets, against independent counts."""

from __future__ import annotations

import gzip

import orjson
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from embedbatch.config import BatchLimits, PrepareConfig, SampleConfig, SourceConfig
from embedbatch.engines.batchapi.estimate import estimate
from tests.conftest import DATA

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")


def test_arxiv_counts_and_cost() -> None:
    path = DATA / "arxiv_cs_daily_2025.jsonl.gz"
    with gzip.open(path, "rb") as fh:
        n_rows = sum(1 for line in fh if line.strip())
    est = estimate(
        source=SourceConfig(path=str(path)),
        prepare=PrepareConfig(fields=("title", "summary")),
        sample=SampleConfig(n=5000),
        model="text-embedding-3-small",
        limits=BatchLimits(max_requests=2000),
    )
    assert (n_rows, 0, 5000, 3) == (est.stats.rows_read, est.stats.rejected, est.stats.sampled, est.batches)
    assert est.cost_batch_usd == pytest.approx(est.stats.tokens_total * 0.01 / 1e6)
    assert est.cost_batch_usd is not None
    assert est.cost_standard_usd == pytest.approx(2 * est.cost_batch_usd)


def test_pypi_parquet_counts_empty_summaries() -> None:
    path = DATA / "pypi_package_summaries.parquet"
    table = pq.read_table(path, columns=["summary"])
    empty = pc.sum(pc.equal(pc.utf8_trim_whitespace(table["summary"]), "")).as_py()
    est = estimate(
        source=SourceConfig(path=str(path), id_field="name"),
        prepare=PrepareConfig(fields=("summary",)),
        sample=SampleConfig(p=0.01),
        model="text-embedding-3-small",
    )
    assert (len(table), empty) == (est.stats.rows_read, est.stats.rejected_empty)
    assert 0.008 * (len(table) - empty) < est.stats.sampled < 0.012 * (len(table) - empty)


def test_debian_truncates_the_long_description() -> None:
    path = DATA / "debian_bookworm_packages.jsonl.gz"
    with gzip.open(path, "rb") as fh:
        rows = [orjson.loads(line) for line in fh]
    est = estimate(
        source=SourceConfig(path=str(path), id_field="package"),
        prepare=PrepareConfig(fields=("description",)),
        sample=SampleConfig(ids="texlive-latex-extra,0ad"),
        model="text-embedding-3-small",
    )
    assert (len(rows), 2, 1, 8191) == (
        est.stats.rows_read,
        est.stats.sampled,
        est.stats.truncated,
        est.stats.tokens_max,
    )
