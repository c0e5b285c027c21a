"""libSQL sink throughput: rows/s of ``sinks.libsql.write_vectors`` (update mode, NULL-only,
chunks of 5,000 (the sink's default), one transaction each, validation included) against a
floor measured in the same run: one ``executemany`` of pre-packed blobs in a single transaction
into the same table. Target: >= 0.8x the floor.

Usage: python bench/libsql_sink.py [--rows 50000] [--dim 1536] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from embedbatch.config import LibsqlTarget
from embedbatch.sinks.libsql import connect, write_vectors


def fresh_table(path: Path, rows: int, dim: int) -> None:
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE items (id INTEGER PRIMARY KEY, embedding F32_BLOB({dim}))")
    conn.executemany("INSERT INTO items VALUES (?, NULL)", ((i,) for i in range(rows)))
    conn.commit()
    conn.close()


def floor(path: Path, vecs: np.ndarray) -> float:
    conn = connect(str(path))
    blobs = [(vecs[i].astype("<f4").tobytes(), i) for i in range(len(vecs))]  # packed before timing
    t = time.perf_counter()
    conn.executemany("UPDATE items SET embedding = ? WHERE id = ?", blobs)
    conn.commit()
    elapsed = time.perf_counter() - t
    conn.close()
    return elapsed


def ours(path: Path, vecs: np.ndarray, chunk: int) -> float:
    target = LibsqlTarget(url=str(path), table="items", update_chunk_size=chunk)
    ids = [str(i) for i in range(len(vecs))]
    chunks = ((ids[s : s + chunk], vecs[s : s + chunk]) for s in range(0, len(ids), chunk))
    t = time.perf_counter()
    report = write_vectors(str(path), None, target, chunks, dim=vecs.shape[1])
    elapsed = time.perf_counter() - t
    assert report.written == len(vecs), report
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=LibsqlTarget.update_chunk_size, help="rows per transaction")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    vecs = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32)
    path = Path(tempfile.mkdtemp(prefix="embedbatch-libsql-")) / "bench.db"
    base, mine = [], []
    for _ in range(args.repeat):  # interleaved, so machine noise hits both sides
        fresh_table(path, args.rows, args.dim)
        base.append(floor(path, vecs))
        fresh_table(path, args.rows, args.dim)
        mine.append(ours(path, vecs, args.chunk))
    b, m = statistics.median(base), statistics.median(mine)
    print(f"floor (one executemany, one transaction): {args.rows / b:,.0f} rows/s")
    print(f"sink  (chunks of {args.chunk}, probe + checks): {args.rows / m:,.0f} rows/s")
    print(f"ratio {b / m:.2f}x of the floor (target >= 0.8), {args.rows:,} x {args.dim}-d, median of {args.repeat}")


if __name__ == "__main__":
    main()
