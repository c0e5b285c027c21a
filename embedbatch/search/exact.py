"""Nearest-neighbour search over a dataset's shards (NumPy) or a pgvector column (``<=>``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedbatch.config import Settings
from embedbatch.errors import UsageError
from embedbatch.store.manifest import Manifest
from embedbatch.store.shards import read_vectors
from embedbatch.workspace import Workspace

__all__ = ["embed_query", "search_libsql", "search_pg", "search_shards"]


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
) -> list[dict[str, Any]]:
    """Top-k rows by cosine similarity over every shard of (model, dataset).

    Raises:
        UsageError: no such dataset.
    """
    pairs = [(m, d) for m, d in ws.datasets() if d == dataset and (model is None or m == model)]
    if not pairs:
        raise UsageError(f"no dataset {dataset!r} in the workspace (see `embedbatch list`)")
    if len(pairs) > 1:
        raise UsageError(f"dataset {dataset!r} exists for several models: {[p[0] for p in pairs]}; give --model")
    m, d = pairs[0]
    manifest = Manifest.load(ws, m, d)
    if local_model is None:
        local_model = _local_model_of(ws, m, d, manifest)
    ids, texts, vecs = read_vectors(ws, m, d)
    dims = manifest.dimensions if manifest.dimensions and m.startswith("text-embedding-3") else None
    q = embed_query(settings, text, model=m, dimensions=dims, local_model=local_model)
    norms = np.linalg.norm(vecs, axis=1) * (np.linalg.norm(q) or 1.0)
    scores = (vecs @ q) / np.where(norms == 0, 1.0, norms)
    top = np.argsort(-scores)[:k]
    return [{"id": ids[i], "score": float(scores[i]), "text": texts[i]} for i in top]


def _local_model_of(ws: Workspace, model: str, dataset: str, manifest: Manifest) -> str | None:
    """The model path a local run of this dataset used (from its run.json), if it still exists."""
    import os

    from embedbatch.workspace import RunPaths, read_json

    for run_id, info in sorted(manifest.runs.items(), reverse=True):
        if info.get("kind") != "local":
            continue
        run = RunPaths(ws.runs_dir(model, dataset) / run_id)
        if run.run_json.exists():
            path = read_json(run.run_json).get("args", {}).get("model")
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
    from embedbatch.sinks.libsql import nearest

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
