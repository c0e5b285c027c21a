"""The id index: point look-ups from ``ids.sqlite`` against loading every id into memory (the
index before the scale issue, still the overlay for shards the database lacks), same run.

A synthetic dataset of ``--rows`` ids (``doc-000000042``) in 100,000-row shards is written as
the store writes it (per-shard id files and a manifest; no vectors: the index never reads
them), then the database is built (the catch-up a commit does). Each figure comes from a fresh
process: open the index, then look up 1,000 random ids (half absent) one by one, and ask
``has_ids`` for 10,000. Prints seconds and peak RSS for both, and their ratio.

Usage: python bench/idindex.py [--rows 300000 3000000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PEAK_RSS, run_child

from embedbatch.store.index import IdIndex, text_keys, write_shard_index
from embedbatch.store.manifest import Manifest
from embedbatch.workspace import Workspace

SHARD_ROWS = 100_000

PROBE = (
    PEAK_RSS
    + """
import json, sys, time
import numpy as np
from pathlib import Path
from embedbatch.store.index import IdIndex, ShardKeys, id_key
from embedbatch.store.manifest import Manifest
from embedbatch.workspace import Workspace
root, rows, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ws = Workspace(root)
rng = np.random.default_rng(1)
ids = [f"doc-{i:09d}" for i in rng.integers(0, 2 * rows, 1000)]
many = [f"doc-{i:09d}" for i in rng.integers(0, 2 * rows, 10000)]
t = time.perf_counter()
m = Manifest.load(ws, "m", "d")
index = IdIndex.load(ws, m) if how == "sqlite" else ShardKeys.load(ws, m)
opened = time.perf_counter() - t
t = time.perf_counter()
if how == "sqlite":
    hits = sum(index.locate(r) is not None for r in ids)
else:
    hits = sum(index.find(id_key(r)) is not None for r in ids)
one = time.perf_counter() - t
t = time.perf_counter()
n_many = int(index.has_ids(many).sum())
batch = time.perf_counter() - t
print(json.dumps({"open_s": opened, "lookup_1000_s": one, "has_ids_10000_s": batch, "hits": hits,
                  "many": n_many, "rss_mib": _rss()}))
"""
)


def build(root: Path, rows: int) -> tuple[float, int]:
    """Per-shard id files and a manifest for ``rows`` ids; then the database. Returns the
    catch-up seconds and the database's size in bytes."""
    ws = Workspace(root)
    manifest = Manifest(ws.manifest_path("m", "d"), "m", "d", dimensions=8)
    for n, lo in enumerate(range(0, rows, SHARD_ROWS), start=1):
        ids = [f"doc-{i:09d}" for i in range(lo, min(rows, lo + SHARD_ROWS))]
        name = f"shard-{n:05d}.parquet"
        write_shard_index(ws.index_dir("m", "d") / name, ids, text_keys(ids))
        manifest.shards.append({"file": name, "rows": len(ids), "bytes": 0, "sha256": ""})
    manifest.save()
    t = time.perf_counter()
    IdIndex.catch_up(ws, manifest)
    seconds = time.perf_counter() - t
    db = ws.index_dir("m", "d").with_name("ids.sqlite")
    return seconds, sum(p.stat().st_size for p in db.parent.glob("ids.sqlite*"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[300_000, 3_000_000])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-idindex-"))
    try:
        print(f"{'rows':>11} {'index':>9} {'open s':>8} {'1k look-ups s':>14} {'has_ids 10k s':>14} {'RSS MiB':>8}")
        for rows in args.rows:
            root = tmp / str(rows)
            catch_s, size = build(root, rows)
            res = {how: run_child(PROBE, str(root), str(rows), how) for how in ("memory", "sqlite")}
            assert res["memory"]["hits"] == res["sqlite"]["hits"] and res["memory"]["many"] == res["sqlite"]["many"]
            for how, r in res.items():
                print(
                    f"{rows:>11,} {how:>9} {r['open_s']:>8.3f} {r['lookup_1000_s']:>14.4f} "
                    f"{r['has_ids_10000_s']:>14.4f} {r['rss_mib']:>8.0f}"
                )
            m, s = res["memory"], res["sqlite"]
            time_ratio = (s["open_s"] + s["lookup_1000_s"]) / (m["open_s"] + m["lookup_1000_s"])
            print(
                f"{rows:>11,}  sqlite/memory: open+1k look-ups time {time_ratio:.3f}, "
                f"RSS {s['rss_mib'] / m['rss_mib']:.2f}; database {size / 2**20:.0f} MiB "
                f"({size / rows:.0f} bytes/row), built in {catch_s:.1f} s ({rows / catch_s:,.0f} rows/s)"
            )
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
