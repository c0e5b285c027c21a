"""Vector indexes (Faiss) built beside a dataset's shards, for fast approximate search.

Layout: ``indexes/{model}/{name}/faiss/{kind}-{metric}/`` holds ``index.json`` (its manifest:
kind, metric, parameters, dimension, count, the shards it covers with their sha256, the
generation and the sha256 of both files) and one generation folder ``gen-…/`` with
``index.faiss`` and ``rows.parquet`` (index row → dataset, shard, row in shard, id). ``name`` is
the dataset, or the name given to ``--merge D1,D2 --into NAME``.

- ``flat``: exact inner product / L2 (Faiss ``IndexFlat``); ``hnsw``: ``IndexHNSWFlat``
  (M=32, efConstruction=200, efSearch=128); ``ivfpq``: ``IndexIVFPQ`` (nlist ≈ 4·√n,
  8-bit codes, m sub-quantizers of 4-16 dimensions), trained on up to 100,000 rows.
- ``cosine`` normalizes vectors and uses inner product; ``ip`` and ``l2`` use the raw vectors.
- A second build adds only the rows of shards the index does not cover yet (flat and hnsw;
  ivfpq keeps its training). Rows that a later shard superseded stay in the index and are
  dropped from results at query time (more candidates are asked for); ``--rebuild`` starts over.
- An index is *current* when it covers every shard of its datasets; search uses it then, and
  exact search otherwise (saying why).

One lock per index folder (``index.lock``) serializes builds. A build writes a new generation
folder and then switches ``index.json`` to it (one atomic rename): the index, its row map and
the list of shards they cover change together, so a build killed at any point leaves the
previous generation current and the next build starts from it. Superseded generations are
deleted after the switch (or by the next build).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.errors import MissingExtraError, StateError, UsageError
from embedbatch.search.files import FlatFile, RowMap, read_header
from embedbatch.store.index import IdIndex
from embedbatch.store.manifest import Manifest, file_sha256
from embedbatch.store.shards import best_vectors, read_rows_at, vector_columns
from embedbatch.workspace import Workspace, atomic_write_json, crash_point, file_lock, fsync_dir

__all__ = ["KINDS", "METRICS", "IndexInfo", "build_index", "index_dir", "load_index", "search_index"]

KINDS = ("flat", "hnsw", "ivfpq")
METRICS = ("cosine", "ip", "l2")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_TRAIN_ROWS = 100_000
ROW_MAP_GROUP_ROWS = 1 << 16  # a search reads the row groups of its hits; verify reads them all, one at a time
ROWS_SCHEMA = pa.schema([("dataset", pa.string()), ("shard", pa.string()), ("row", pa.int32()), ("id", pa.string())])


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise MissingExtraError("faiss-cpu", "index") from exc
    return faiss


def index_dir(ws: Workspace, model: str, name: str, kind: str, metric: str) -> Path:
    """``indexes/{model}/{name}/faiss/{kind}-{metric}``."""
    return ws.manifest_path(model, name).parent / "faiss" / f"{kind}-{metric}"


@dataclass
class IndexInfo:
    """What ``index build`` did (also index.json's main fields)."""

    path: str
    kind: str
    metric: str
    datasets: list[str]
    count: int
    added: int
    dimensions: int
    build_s: float
    unchanged: bool


def _new_index(faiss: Any, kind: str, metric: str, dim: int, n: int) -> Any:
    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlat(dim, mt)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, mt)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
    m = next(m for m in range(dim // 4, 0, -1) if dim % m == 0 and dim // m <= 16) if dim >= 4 else 1
    quantizer = faiss.IndexFlat(dim, mt)
    return faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, mt)


def _prepared(vecs: np.ndarray, metric: str) -> np.ndarray:
    v: np.ndarray = np.ascontiguousarray(vecs, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = np.ascontiguousarray(v / np.where(norms == 0, 1.0, norms), dtype=np.float32)
    return v


def _shard_chunks(
    ws: Workspace, manifest: Manifest, shards: list[dict[str, Any]]
) -> list[tuple[str, list[str], np.ndarray]]:
    """(shard file, ids, (n, dim) float32) of each given shard (every row: superseded rows are
    filtered at query time)."""
    base = ws.shards_dir(manifest.model, manifest.dataset)
    out = []
    for s in shards:
        schema = pq.read_schema(base / s["file"])
        table = pq.read_table(base / s["file"], columns=["id", *vector_columns(schema)])
        out.append((s["file"], table.column("id").to_pylist(), best_vectors(table, schema)))
    return out


def build_index(
    ws: Workspace,
    model: str,
    datasets: list[str],
    *,
    into: str | None = None,
    kind: str = "hnsw",
    metric: str = "cosine",
    rebuild: bool = False,
) -> IndexInfo:
    """Build (or bring up to date) the index of ``datasets`` (one, or several merged ``into``
    a name); see the module doc.

    Raises:
        UsageError: unknown kind or metric; a dataset that does not exist; datasets of different
            dimensions; too few rows to train ivfpq.
        MissingExtraError: faiss-cpu is not installed.
    """
    if kind not in KINDS or metric not in METRICS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)} and --metric one of {', '.join(METRICS)}")
    faiss = _faiss()
    name = into or datasets[0]
    manifests = []
    for d in datasets:
        m = Manifest.load(ws, model, d)
        if not m.shards:
            raise UsageError(f"no dataset {model}/{d} with rows (see `embedbatch list`)")
        manifests.append(m)
    dims = {m.dimensions for m in manifests}
    if len(dims) != 1:
        raise UsageError(f"datasets of different dimensions cannot share an index: {sorted(map(str, dims))}")
    dim = int(dims.pop() or 0)
    folder = index_dir(ws, model, name, kind, metric)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with file_lock(folder / "index.lock", what=f"index {folder}", timeout_s=ws.lock_timeout_s, purpose="index build"):
        old = _read_meta(folder) if not rebuild else None
        if old is not None and (old["datasets"] != datasets or old["dimensions"] != dim):
            old = None
        covered = {(c["dataset"], c["file"]): c["sha256"] for c in (old or {}).get("shards", [])}
        todo = [
            (m.dataset, s) for m in manifests for s in m.shards if covered.get((m.dataset, s["file"])) != s["sha256"]
        ]
        if old is not None and not todo:
            if old.get("generation"):  # a killed build's leftovers (an index from before generations has none)
                _drop_other_generations(folder, old["generation"])
            return IndexInfo(str(folder), kind, metric, datasets, old["count"], 0, dim, 0.0, True)
        listed = {(m.dataset, s["file"]) for m in manifests for s in m.shards}
        if old is not None and (kind == "ivfpq" or any(key not in listed for key in covered)):
            old = None  # shards went away, or ivfpq (trained on what it saw first): start over
            todo = [(m.dataset, s) for m in manifests for s in m.shards]
        if old is not None:
            index_path, rows_path = _files(folder, old)
            index = faiss.read_index(str(index_path))
            rows = pq.read_table(rows_path)
        else:
            n_total = sum(int(s["rows"]) for m in manifests for s in m.shards)
            index = _new_index(faiss, kind, metric, dim, n_total)
            rows = ROWS_SCHEMA.empty_table()
        by_dataset = {m.dataset: m for m in manifests}
        chunks = []
        for d, s in todo:
            chunks += [(d, *c) for c in _shard_chunks(ws, by_dataset[d], [s])]
        if kind == "ivfpq" and not index.is_trained:
            sample = np.concatenate([c[3] for c in chunks if c[2]])[:IVF_TRAIN_ROWS]
            if len(sample) < 39 * index.nlist:
                raise UsageError(f"ivfpq needs at least {39 * index.nlist} rows to train; use flat or hnsw")
            index.train(_prepared(sample, metric))
        new_rows, added = _add(index, chunks, metric)
        rows = pa.concat_tables([rows, *new_rows])
        if len(rows) != int(index.ntotal):
            raise StateError(f"{folder}: the index holds {int(index.ntotal)} vectors for {len(rows)} rows")
        generation = f"gen-{time.time_ns()}"
        gen_dir = folder / generation
        gen_dir.mkdir()
        faiss.write_index(index, str(gen_dir / "index.faiss"))
        pq.write_table(rows, gen_dir / "rows.parquet", compression="zstd", row_group_size=ROW_MAP_GROUP_ROWS)
        for f in (gen_dir / "index.faiss", gen_dir / "rows.parquet"):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(gen_dir)
        crash_point("index_before_switch")
        meta = {
            "kind": kind,
            "metric": metric,
            "datasets": datasets,
            "model": model,
            "dimensions": dim,
            "count": int(index.ntotal),
            "params": _params(index, kind),
            "shards": [
                {"dataset": m.dataset, "file": s["file"], "sha256": s["sha256"], "rows": s["rows"]}
                for m in manifests
                for s in m.shards
            ],
            "generation": generation,
            "files": {
                f"{generation}/index.faiss": file_sha256(gen_dir / "index.faiss"),
                f"{generation}/rows.parquet": file_sha256(gen_dir / "rows.parquet"),
            },
            "faiss_version": faiss.__version__,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(folder / "index.json", meta)  # the switch: this generation is current
        crash_point("index_after_switch")
        _drop_other_generations(folder, generation)
    return IndexInfo(str(folder), kind, metric, datasets, meta["count"], added, dim, time.monotonic() - started, False)


def _add(index: Any, chunks: list[tuple[str, str, list[str], np.ndarray]], metric: str) -> tuple[list[pa.Table], int]:
    """Add each shard's vectors to ``index``; their row-map tables and the rows added. A
    zero-row shard (deletions alone) adds nothing."""
    tables = []
    added = 0
    for d, file, ids, vecs in chunks:
        if not ids:
            continue
        index.add(_prepared(vecs, metric))
        tables.append(
            pa.table(
                [
                    pa.array([d] * len(ids), pa.string()),
                    pa.array([file] * len(ids), pa.string()),
                    pa.array(np.arange(len(ids), dtype=np.int32)),
                    pa.array(ids, pa.string()),
                ],
                schema=ROWS_SCHEMA,
            )
        )
        added += len(ids)
    return tables, added


def _files(folder: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """The index and row-map files index.json names (its generation folder; an index built
    before generations keeps them beside index.json)."""
    base = folder / meta["generation"] if meta.get("generation") else folder
    return base / "index.faiss", base / "rows.parquet"


def _drop_other_generations(folder: Path, current: str) -> None:
    """Delete generation folders other than ``current`` (a killed build's, the superseded one)
    and the files of an index built before generations."""
    for p in folder.glob("gen-*"):
        if p.name != current and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for name in ("index.faiss", "rows.parquet", ".index.faiss.tmp", ".rows.parquet.tmp"):
        (folder / name).unlink(missing_ok=True)


def _params(index: Any, kind: str) -> dict[str, Any]:
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    if kind == "ivfpq":
        return {"nlist": int(index.nlist), "m": int(index.pq.M), "nbits": 8, "nprobe": _nprobe(index)}
    return {}


def _nprobe(index: Any) -> int:
    return max(1, min(int(index.nlist), int(index.nlist) // 8 or 1))


def _read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / "index.json"
    return orjson.loads(path.read_bytes()) if path.is_file() else None


@dataclass
class LoadedIndex:
    """An index ready to query: the Faiss object (or a :class:`FlatFile`), its row map, its
    manifest, and each dataset's id index (a hit whose id's current row is elsewhere was
    superseded after the build and is skipped)."""

    folder: Path
    meta: dict[str, Any]
    index: Any
    rows: RowMap
    ids: dict[str, IdIndex]

    @property
    def label(self) -> str:
        return f"{self.meta['kind']}-{self.meta['metric']} index ({self.meta['count']:,} rows)"

    def close(self) -> None:
        for idx in self.ids.values():
            idx.close()


def load_index(ws: Workspace, model: str, name: str, *, kind: str | None = None) -> tuple[LoadedIndex | None, str]:
    """The current index of ``name`` (the best kind when several: hnsw, ivfpq, flat), or None
    and why not (none built; stale: shards it does not cover). A flat index is not loaded: it
    is scanned from its file (:class:`FlatFile`), so it needs neither faiss nor its size in memory."""
    base = ws.manifest_path(model, name).parent / "faiss"
    found = sorted(base.glob("*/index.json")) if base.is_dir() else []
    if kind is not None:
        found = [p for p in found if p.parent.name.startswith(f"{kind}-")]
    if not found:
        return None, "no index built (embedbatch index build)"
    order = {"hnsw": 0, "ivfpq": 1, "flat": 2}
    found.sort(key=lambda p: order.get(p.parent.name.split("-")[0], 9))
    reasons = []
    for path in found:
        meta = orjson.loads(path.read_bytes())
        manifests = {d: Manifest.load(ws, model, d) for d in meta["datasets"]}
        have = {(c["dataset"], c["file"]): c["sha256"] for c in meta["shards"]}
        now = {(d, s["file"]): s["sha256"] for d, m in manifests.items() for s in m.shards}
        if have != now:
            reasons.append(f"{path.parent.name} is stale ({len(set(now) - set(have))} new shards; index build)")
            continue
        index_path, rows_path = _files(path.parent, meta)
        index = FlatFile.open(index_path) if meta["kind"] == "flat" else None
        if index is None:
            index = _faiss().read_index(str(index_path))
            if meta["kind"] == "hnsw":
                index.hnsw.efSearch = HNSW_EF_SEARCH
            elif meta["kind"] == "ivfpq":
                index.nprobe = meta["params"]["nprobe"]
        ids = {d: IdIndex.load(ws, m) for d, m in manifests.items()}
        return LoadedIndex(path.parent, meta, index, RowMap(rows_path), ids), ""
    return None, "; ".join(reasons)


def search_index(
    ws: Workspace, loaded: LoadedIndex, query: np.ndarray, *, k: int, exclude: str | None = None
) -> list[dict[str, Any]]:
    """Top-k through the index; rows superseded since the build are skipped (more candidates
    are asked for until k remain). Reads the row-map groups and shard row groups of the hits
    and looks each candidate up in the id index: work grows with k, not with the dataset.

    Returns:
        ``{"id", "score", "text", "dataset"}`` best first; the score is the cosine or inner
        product (higher is nearer), or minus the squared L2 distance.
    """
    meta = loaded.meta
    model = meta["model"]
    q = _prepared(np.asarray(query, np.float32)[None, :], meta["metric"])
    ntotal = int(loaded.index.ntotal)
    ask = min(ntotal, max(2 * (k + 1), 10))
    while True:
        dist, pos = loaded.index.search(q, ask)
        hits = []
        seen: set[str] = set()
        for score, p in zip(dist[0].tolist(), pos[0].tolist(), strict=True):
            if p < 0:
                continue
            d, file, row, rid = loaded.rows.at(p)
            if rid == exclude or rid in seen or loaded.ids[d].locate(rid) != (file, row):
                continue  # the query row, an id twice, or a row superseded after the build
            seen.add(rid)
            hits.append((-score if meta["metric"] == "l2" else score, d, file, row, rid))
            if len(hits) == k:
                break
        if len(hits) == k or ask >= ntotal:
            break
        ask = min(ntotal, ask * 4)
    texts: dict[tuple[str, str, int], str] = {}
    for d, file in {(h[1], h[2]) for h in hits}:
        rows = [h[3] for h in hits if (h[1], h[2]) == (d, file)]
        for r, got in zip(rows, read_rows_at(ws.shards_dir(model, d) / file, rows, ["text"]), strict=True):
            texts[(d, file, r)] = got["text"]
    return [
        {"id": rid, "score": float(score), "text": texts[(d, file, row)], "dataset": d}
        for score, d, file, row, rid in hits
    ]


def check_index_files(folder: Path) -> list[str]:
    """Problems with an index folder's files (verify): checksums against index.json; the
    vectors in the index, the rows of its row map and index.json's count all equal; and no
    shard row is in the index twice."""
    meta = _read_meta(folder)
    if meta is None:
        return [f"{folder}: no index.json"]
    problems = [
        f"{folder / name}: checksum differs from index.json"
        for name, digest in meta.get("files", {}).items()
        if not (folder / name).is_file() or file_sha256(folder / name) != digest
    ]
    if problems:
        return problems
    index_path, rows_path = _files(folder, meta)
    # 8 bytes a row map row (dataset and shard as codes, row), read in batches: never the
    # strings of every row at once.
    codes: dict[str, dict[str, int]] = {"dataset": {}, "shard": {}}
    source = pq.ParquetFile(rows_path)
    keys = np.empty(source.metadata.num_rows, np.uint64)  # filled in place, one row group at a time
    at = 0
    for g in range(source.metadata.num_row_groups):
        batch = source.read_row_group(g, columns=["dataset", "shard", "row"], use_threads=False)
        key = batch.column("row").to_numpy().astype(np.uint64)
        for name, shift in (("dataset", 48), ("shard", 32)):
            col = batch.column(name).combine_chunks().dictionary_encode()
            known = codes[name]
            mapping = np.array([known.setdefault(v, len(known)) for v in col.dictionary.to_pylist()], np.uint64)
            key |= mapping[col.indices.to_numpy(zero_copy_only=False)] << np.uint64(shift)
        keys[at : at + len(key)] = key
        at += len(key)
        del batch, key
    keys.sort()
    n_rows = len(keys)
    distinct = int(np.count_nonzero(keys[1:] != keys[:-1])) + 1 if n_rows else 0
    del keys
    header = read_header(index_path)  # the count without loading the index (30M 8-d flat: ~1 GB)
    vectors = header[2] if header is not None else None
    counts = {"index.json count": int(meta["count"]), "row map rows": n_rows}
    if vectors is not None:
        counts["index vectors"] = vectors
    if len(set(counts.values())) != 1:
        problems.append(f"{folder}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + " differ")
    if distinct != n_rows:
        problems.append(f"{folder}: {n_rows - distinct:,} shard rows are in the index twice")
    return problems
