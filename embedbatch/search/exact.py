"""Nearest-neighbour search over a dataset's shards (NumPy, streamed in chunks with a running
top-k: bounded memory), a pgvector column (``<=>``) or a libSQL table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from embedbatch.config import Settings
from embedbatch.errors import NotFoundError, UsageError
from embedbatch.store.manifest import Manifest
from embedbatch.workspace import Workspace

__all__ = [
    "best_per_parent",
    "embed_query",
    "find_dataset",
    "nearest",
    "search_by_id",
    "search_libsql",
    "search_pg",
    "search_shards",
]


def embed_query(
    settings: Settings,
    text: str,
    *,
    model: str,
    dimensions: int | None = None,
    local_model: str | None = None,
) -> np.ndarray:
    """The query vector, ``(dim,)`` float32: from a local model path, or the API (/v1/embeddings)."""
    if local_model:
        from embedbatch.engines.local.model import LocalBackend

        vec: np.ndarray = LocalBackend(local_model).embed([text], model, None)[0]
        return vec
    import anyio

    from embedbatch.api.openai import BatchClient

    async def go() -> list[list[float]]:
        client = BatchClient(settings)
        try:
            return await client.embed([text], model=model, dimensions=dimensions)
        finally:
            await client.close()

    return np.asarray(anyio.run(go)[0], dtype=np.float32)


def search_shards(
    ws: Workspace,
    settings: Settings,
    text: str,
    *,
    dataset: str,
    model: str | None,
    k: int = 5,
    local_model: str | None = None,
    exact: bool = False,
    rescore_multiplier: int | None = None,
) -> list[dict[str, Any]]:
    """Top-k rows: through the dataset's vector index when one is current, else exact cosine
    similarity over every shard (streamed; compressed shards with rescoring, see
    :func:`nearest`); each hit says which in ``via``.

    ``dataset`` may also name an index merged from several datasets (``index build --merge``).

    Raises:
        UsageError: no such dataset or index.
    """
    from embedbatch.search.index import load_index, search_index

    m, d, merged = _resolve(ws, dataset, model)
    loaded, why = (None, "--exact") if exact else load_index(ws, m, d)
    if merged and loaded is None:
        raise UsageError(f"{d} is a merged index with no current index: {why}")
    sources = loaded.meta["datasets"] if loaded is not None else [d]
    manifest = Manifest.load(ws, m, sources[0])
    if local_model is None:
        local_model = _local_model_of(ws, m, sources[0], manifest)
    dims = manifest.dimensions if manifest.dimensions and m.startswith("text-embedding-3") else None
    q = embed_query(settings, text, model=m, dimensions=dims, local_model=local_model)
    if loaded is not None:
        try:
            return [{**h, "via": loaded.label} for h in search_index(ws, loaded, q, k=k)]
        finally:
            loaded.close()
    hits = nearest(ws, manifest, q, k=k, rescore_multiplier=rescore_multiplier)
    return [{**h, "via": f"exact ({why})"} for h in hits]


def best_per_parent(
    ws: Workspace, model: str, dataset: str, hits: list[dict[str, Any]], k: int
) -> list[dict[str, Any]]:
    """The best chunk of each document among ``hits`` (best first), the first ``k`` documents:
    ``{"id": parent id, "chunk": chunk index, "chunk_id", "score", "text" (the chunk's), ...}``.
    A row that is not a chunk is its own document (chunk None). The parents come from each hit's
    ``metadata.chunk`` (one id-index look-up and one row group per shard)."""
    import orjson

    from embedbatch.store.dataset import DatasetStore

    rows = DatasetStore(ws, model, dataset).get([h["id"] for h in hits], columns=["metadata"])
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for h, row in zip(hits, rows, strict=True):
        chunk = orjson.loads(row["metadata"] or "{}").get("chunk") if row is not None else None
        parent = chunk["parent_id"] if isinstance(chunk, dict) else h["id"]
        if parent in seen:
            continue
        seen.add(parent)
        index = chunk["index"] if isinstance(chunk, dict) else None
        out.append({**h, "id": parent, "chunk": index, "chunk_id": h["id"]})
        if len(out) == k:
            break
    return out


def _resolve(ws: Workspace, name: str, model: str | None) -> tuple[str, str, bool]:
    """(model, dataset or merged-index name, merged?)."""
    try:
        m, d = find_dataset(ws, name, model)
        return m, d, False
    except UsageError:
        merged = [p.parent.name for p in ws.root.glob(f"indexes/*/{name}/faiss") if model in (None, p.parent.name)]
        models = [p.parent.parent.name for p in ws.root.glob(f"indexes/*/{name}/faiss")]
        if len(set(models)) == 1 and merged:
            return models[0], name, True
        raise


def find_dataset(ws: Workspace, dataset: str, model: str | None) -> tuple[str, str]:
    """(model, dataset) of ``dataset`` in the workspace.

    Raises:
        UsageError: no such dataset, or several models have it and ``model`` is None.
    """
    named = [(m, d) for m, d in ws.datasets() if d == dataset]
    pairs = [(m, d) for m, d in named if model is None or m == model]
    if not pairs and named:
        have = ", ".join(sorted(m for m, _ in named))
        raise UsageError(f"dataset {dataset!r} has no model {model!r}; it was embedded with: {have} (give --model)")
    if not pairs:
        raise UsageError(f"no dataset {dataset!r} in the workspace (see `embedbatch list`)")
    if len(pairs) > 1:
        raise UsageError(f"dataset {dataset!r} exists for several models: {[p[0] for p in pairs]}; give --model")
    return pairs[0]


RESCORE_MULTIPLIER = 4  # candidates per result a compressed scan keeps for rescoring (the HF study's default)


def nearest(
    ws: Workspace,
    manifest: Manifest,
    query: np.ndarray,
    *,
    k: int,
    exclude: str | None = None,
    chunk_rows: int = 2048,
    rescore_multiplier: int | None = None,
) -> list[dict[str, Any]]:
    """Exact top-k by cosine similarity over the dataset's current rows, streaming the shards in
    chunks (a matrix product and a running top-k), so peak memory is one chunk
    (``chunk_rows × dim × 4`` bytes) whatever the dataset's size; float16 shards are scored in
    float32.

    Compressed shards (int8, binary; :mod:`embedbatch.store.quant`) are scanned as stored
    (dequantised: for binary, the float query against ±1 signs), keeping
    ``rescore_multiplier × k`` candidates, which are then scored again with their most exact
    vectors (the float16 kept beside them, else the dequantised ones).

    Args:
        query: ``(dim,)`` float32 (longer than a cut dataset's vectors: cut the same way).
        exclude: an id left out of the results (``search --id``).
        rescore_multiplier: candidates per result for compressed shards (default
            :data:`RESCORE_MULTIPLIER`; 1: no rescoring).

    Returns:
        Up to ``k`` ``{"id", "score", "text"}``, best first.
    """
    from embedbatch.store.quant import COMPRESSED, truncate
    from embedbatch.store.shards import read_rows_at

    q = np.asarray(query, np.float32)
    if manifest.dimensions and q.shape[0] > manifest.dimensions and manifest.truncate_dim:
        q = truncate(q[None, :], manifest.dimensions)[0]
    q = q / (np.linalg.norm(q) or 1.0)
    compressed = any(sh.get("dtype") in COMPRESSED for sh in manifest.shards)
    mult = max(1, rescore_multiplier if rescore_multiplier is not None else RESCORE_MULTIPLIER)
    rescore = compressed and mult > 1
    best_s, best_at = _scan(ws, manifest, q, k * mult if rescore else k, exclude, chunk_rows, stored=compressed)
    base = ws.shards_dir(manifest.model, manifest.dataset)
    if rescore:
        vecs: dict[tuple[str, int], np.ndarray] = {}
        for file in {f for f, _, _ in best_at}:
            rows = [r for f, r, _ in best_at if f == file]
            for r, row in zip(rows, read_rows_at(base / file, rows, ["embedding"]), strict=True):
                vecs[(file, r)] = np.asarray(row["embedding"], np.float32)
        exact = np.array([float(vecs[(f, r)] @ q) / (np.linalg.norm(vecs[(f, r)]) or 1.0) for f, r, _ in best_at])
        best_s = exact.astype(np.float32)
        if len(best_s) > k:
            sel = np.argpartition(-best_s, k - 1)[:k]
            best_s, best_at = best_s[sel], [best_at[i] for i in sel]
    order = np.argsort(-best_s, kind="stable")
    hits = [(float(best_s[i]), *best_at[i]) for i in order]
    texts: dict[tuple[str, int], str] = {}
    for file in {h[1] for h in hits}:
        rows = [h[2] for h in hits if h[1] == file]
        for r, row in zip(rows, read_rows_at(base / file, rows, ["text"]), strict=True):
            texts[(file, r)] = row["text"]
    return [{"id": rid, "score": score, "text": texts[(file, r)]} for score, file, r, rid in hits]


def _scored_chunks(ws: Workspace, manifest: Manifest, q: np.ndarray, chunk_rows: int, *, stored: bool) -> Any:
    """``(shard, first row, ids, (n,) float32 scores)`` per chunk, superseded rows at -inf."""
    from embedbatch.store.shards import iter_code_chunks, iter_vector_chunks

    if not stored:
        for file, start, ids, vecs, live in iter_vector_chunks(ws, manifest, chunk_rows=chunk_rows):
            yield file, start, ids, _cosines(vecs, q, live)
        return
    q_bits: dict[int, np.ndarray] = {}
    for file, start, ids, codec, column, live in iter_code_chunks(ws, manifest, chunk_rows=max(chunk_rows, 65_536)):
        if codec.dtype == "binary" and codec.dim % 64 == 0:
            if codec.dim not in q_bits:
                q_bits[codec.dim] = np.packbits(q[: codec.dim] > 0).view(np.uint64)
            words = codec.bits(column).view(np.uint64)  # (n, dim / 64)
            distance = np.bitwise_count(words ^ q_bits[codec.dim]).sum(axis=1, dtype=np.int32)
            scores = (1.0 - 2.0 * distance / codec.dim).astype(np.float32)
            scores[~live] = -np.inf
            yield file, start, ids, scores
        elif codec.dtype == "int8":  # stored vectors are unit length: the dot product ranks them
            scores = codec.int8_dot(column, q)
            scores[~live] = -np.inf
            yield file, start, ids, scores
        else:
            yield file, start, ids, _cosines(codec.decode(column), q, live)


def _cosines(vecs: np.ndarray, q: np.ndarray, live: np.ndarray) -> np.ndarray:
    if not len(vecs):
        return np.empty(0, np.float32)
    norms = np.linalg.norm(vecs, axis=1)
    scores: np.ndarray = (vecs @ q) / np.where(norms == 0, 1.0, norms)
    scores[~live] = -np.inf
    return scores


def _scan(
    ws: Workspace,
    manifest: Manifest,
    q: np.ndarray,
    k: int,
    exclude: str | None,
    chunk_rows: int,
    *,
    stored: bool,
) -> tuple[np.ndarray, list[tuple[str, int, str]]]:
    """The running top-``k`` of a streamed scan: scores and ``(shard, row, id)``. ``stored``:
    score the shards as stored (binary codes by Hamming similarity, ``1 - 2·distance/dim``, on
    64-bit words; int8 dequantised)."""
    best_s = np.empty(0, np.float32)
    best_at: list[tuple[str, int, str]] = []
    for file, start, ids, scores in _scored_chunks(ws, manifest, q, chunk_rows, stored=stored):
        if not len(scores):
            continue
        # One candidate more when a row is excluded: it may be among the top k (a tie).
        want = k + 1 if exclude is not None else k
        top = np.argpartition(-scores, want - 1)[:want] if len(scores) > want else np.arange(len(scores))
        cand_ids = ids.take(pa.array(top, pa.int64())).to_pylist()
        keep = [j for j, rid in enumerate(cand_ids) if np.isfinite(scores[top[j]]) and rid != exclude]
        best_s = np.concatenate([best_s, scores[top[keep]]])
        best_at += [(file, start + int(top[j]), cand_ids[j]) for j in keep]
        if len(best_s) > k:
            sel = np.argpartition(-best_s, k - 1)[:k]
            best_s = best_s[sel]
            best_at = [best_at[i] for i in sel]
    return best_s, best_at


def search_by_id(
    ws: Workspace, record_id: str, *, dataset: str, model: str | None, k: int = 5, exact: bool = False
) -> list[dict[str, Any]]:
    """A stored row and its nearest rows: the row itself first (whatever ties it has: another
    row with the same vector comes after it), then the ``k - 1`` nearest other rows, through
    the dataset's vector index when one is current (each neighbour says which in ``via``),
    else (or with ``exact``) by an exact scan of the shards. The row is found by one id-index
    look-up and one row-group read.

    Raises:
        UsageError: no such dataset.
        NotFoundError: no such id in the dataset.
    """
    from embedbatch.search.index import load_index, search_index
    from embedbatch.store.dataset import DatasetStore

    m, d = find_dataset(ws, dataset, model)
    (row,) = DatasetStore(ws, m, d).get([record_id], columns=["embedding", "text"])
    if row is None:
        raise NotFoundError(f"no id {record_id!r} in dataset {m}/{d}")
    vec = np.asarray(row["embedding"], np.float32)
    self_score = 1.0 if np.linalg.norm(vec) > 0 else 0.0
    first = {"id": record_id, "score": self_score, "text": row["text"]}
    if k <= 1:
        return [first]
    loaded, why = (None, "--exact") if exact else load_index(ws, m, d)
    if loaded is not None:
        try:
            others = [{**h, "via": loaded.label} for h in search_index(ws, loaded, vec, k=k - 1, exclude=record_id)]
        finally:
            loaded.close()
        return [first, *others]
    hits = nearest(ws, Manifest.load(ws, m, d), vec, k=k - 1, exclude=record_id)
    return [first, *({**h, "via": f"exact ({why})"} for h in hits)]


def _local_model_of(ws: Workspace, model: str, dataset: str, manifest: Manifest) -> str | None:
    """The model path a local run of this dataset used (from its run.json), if it still exists."""
    import os

    from embedbatch.runs import Run
    from embedbatch.workspace import RunPaths

    for run_id, info in sorted(manifest.runs.items(), reverse=True):
        if info.get("kind") != "local":
            continue
        rs = Run.read_state(RunPaths(ws.runs_dir(model, dataset) / run_id))
        path = rs.args.get("model") if rs is not None else None
        if isinstance(path, str) and (os.path.isdir(path) or "/" in path):
            return path
    return None


def search_pg(
    settings: Settings,
    text: str,
    *,
    dsn: str | None,
    table: str,
    id_column: str,
    vector_column: str,
    text_column: str | None,
    model: str | None,
    k: int = 5,
    local_model: str | None = None,
    dimensions: int | None = None,
) -> list[dict[str, Any]]:
    """Top-k rows of a pgvector column by cosine distance (``<=>``).

    Raises:
        UsageError: no DSN.
        DatabaseError: the table or column does not fit the query vector.
    """
    if not dsn:
        raise UsageError("--pg-table needs --pg-dsn or DATABASE_URL")
    import anyio

    from embedbatch.search.pg import nearest

    q = embed_query(
        settings, text, model=model or settings.openai_embed_model, dimensions=dimensions, local_model=local_model
    )

    async def go() -> list[dict[str, Any]]:
        return await nearest(
            dsn, table=table, id_column=id_column, vector_column=vector_column, text_column=text_column, query=q, k=k
        )

    return anyio.run(go)


def search_libsql(
    settings: Settings,
    text: str,
    *,
    url: str,
    auth_token: str | None,
    table: str,
    id_column: str,
    vector_column: str,
    text_column: str | None,
    model: str | None,
    k: int = 5,
    local_model: str | None = None,
    dimensions: int | None = None,
) -> list[dict[str, Any]]:
    """Top-k rows of a libSQL F32_BLOB column: ``vector_top_k`` through its vector index when
    there is one, ``vector_distance_cos`` over the table otherwise. Each hit says which.

    Raises:
        DatabaseError: the table or column does not fit the query vector.
    """
    from embedbatch.search.libsql import nearest

    q = embed_query(
        settings, text, model=model or settings.openai_embed_model, dimensions=dimensions, local_model=local_model
    )
    hits, how = nearest(
        url,
        auth_token,
        table=table,
        id_column=id_column,
        vector_column=vector_column,
        text_column=text_column,
        query=q,
        k=k,
    )
    return [{**h, "via": how} for h in hits]
