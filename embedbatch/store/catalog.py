"""The SQL catalog: DuckDB over the workspace, for ``embedbatch sql``.

Views:

- ``embeddings``: every current shard row of every dataset (the shard columns: ``id``, ``source``,
  ``dataset``, ``split``, ``text``, ``metadata``, ``embedding``, ``model``, ``created_at``,
  ``run_id``, ``parent_id``, ``chunk_index``, plus ``shard``); rows a later shard superseded are
  left out. Compressed shards (:mod:`embedbatch.store.quant`) give their codes in
  ``embedding_int8`` (``BLOB``, one signed byte a dimension; the ranges are the manifest's
  ``quantization``) or ``embedding_bits`` (``BLOB``, packed sign bits), and in ``embedding`` the float16 vectors kept
  beside them (NULL when none were kept): one query may span datasets of every dtype.
- ``shards``: one row per manifest entry (model, dataset, shard, rows, bytes, dim, dtype,
  min_norm, max_norm, created_at, sha256).
- ``runs``: one row per run.json (run_id, model, dataset, kind, status, created_at,
  updated_at, planned, succeeded, failed, tokens, cost_usd, run_dir).

Nothing is copied: the Parquet shards are read in place, manifests once per query, and every
run.json once per query that names ``runs`` (a query that does not costs no run read).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from embedbatch.errors import StateError, UsageError
from embedbatch.runs import RunState
from embedbatch.store.manifest import Manifest, superseded_ids
from embedbatch.workspace import Workspace

__all__ = ["run_sql"]

_SHARD_COLUMNS = ("rows", "bytes", "dim", "dtype", "min_norm", "max_norm", "created_at", "sha256")


# Shards by how their ``embedding`` column is stored: files, and whether any keeps float16 beside.
Groups = dict[str, tuple[list[str], bool]]


def _embeddings_view(groups: Groups) -> str:
    """``CREATE VIEW embeddings``: one ``read_parquet`` per storage kind, so each keeps its own
    vector type, unioned by name (see the module docstring)."""
    parts = []
    for kind, (paths, kept) in groups.items():
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in paths)
        source = f"read_parquet([{listing}], union_by_name = true, filename = true)"
        if kind == "float":
            cols = "e.* EXCLUDE (filename), NULL::BLOB AS embedding_int8, NULL::BLOB AS embedding_bits"
        else:
            names = ("embedding_int8", "embedding_bits")
            codes, other = names if kind == "int8" else names[::-1]
            floats = "e.embedding_float::FLOAT[]" if kept else "NULL::FLOAT[]"
            drop = "filename, embedding" + (", embedding_float" if kept else "")
            cols = f"e.* EXCLUDE ({drop}), {floats} AS embedding, e.embedding AS {codes}, NULL::BLOB AS {other}"
        parts.append(
            f"SELECT {cols}, regexp_extract(e.filename, '[^/]+$') AS shard FROM {source} e "
            "ANTI JOIN superseded_t g ON g.path = e.filename AND g.id = e.id"
        )
    return "CREATE VIEW embeddings AS " + " UNION ALL BY NAME ".join(parts)


def _tables(ws: Workspace, *, with_runs: bool) -> tuple[Groups, pa.Table, pa.Table, pa.Table]:
    files: Groups = {}
    shards: list[dict[str, Any]] = []
    gone: list[dict[str, str]] = []
    for model, dataset in ws.datasets():
        m = Manifest.load(ws, model, dataset)
        base = ws.shards_dir(model, dataset)
        drop = superseded_ids(m)
        for s in m.shards:
            path = str(base / s["file"])
            dtype = s.get("dtype", "float32")
            kind = dtype if dtype in ("int8", "binary") else "float"
            listed, kept = files.get(kind, ([], False))
            files[kind] = ([*listed, path], kept or bool(s.get("keep_float")))
            shards.append(
                {"model": model, "dataset": dataset, "shard": s["file"], **{k: s.get(k) for k in _SHARD_COLUMNS}}
            )
            gone += [{"path": path, "id": rid} for rid in drop.get(s["file"], ())]
    runs = []
    for paths in ws.all_runs() if with_runs else []:
        try:
            rs = RunState.load(paths)
        except (StateError, OSError):
            continue
        runs.append(
            {
                "run_id": rs.run_id,
                "model": rs.model,
                "dataset": rs.dataset,
                "kind": rs.kind,
                "status": rs.outcome,
                "created_at": rs.created_at,
                "updated_at": rs.updated_at,
                "planned": rs.counts.get("planned"),
                "succeeded": rs.counts.get("succeeded"),
                "failed": rs.counts.get("failed"),
                "tokens": rs.actual.get("usage_tokens"),
                "cost_usd": rs.actual.get("cost_batch_usd", rs.actual.get("cost_standard_usd")),
                "run_dir": str(paths.root),
            }
        )
    shard_schema = pa.schema(
        [("model", pa.string()), ("dataset", pa.string()), ("shard", pa.string()), ("rows", pa.int64()),
         ("bytes", pa.int64()), ("dim", pa.int64()), ("dtype", pa.string()), ("min_norm", pa.float64()),
         ("max_norm", pa.float64()), ("created_at", pa.string()), ("sha256", pa.string())]
    )  # fmt: skip
    run_schema = pa.schema(
        [("run_id", pa.string()), ("model", pa.string()), ("dataset", pa.string()), ("kind", pa.string()),
         ("status", pa.string()), ("created_at", pa.string()), ("updated_at", pa.string()), ("planned", pa.int64()),
         ("succeeded", pa.int64()), ("failed", pa.int64()), ("tokens", pa.int64()), ("cost_usd", pa.float64()),
         ("run_dir", pa.string())]
    )  # fmt: skip
    gone_schema = pa.schema([("path", pa.string()), ("id", pa.string())])
    return (
        files,
        pa.Table.from_pylist(shards, schema=shard_schema),
        pa.Table.from_pylist(runs, schema=run_schema),
        pa.Table.from_pylist(gone, schema=gone_schema),
    )


def run_sql(ws: Workspace, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``query`` with the views of the module doc; returns (column names, rows).

    Raises:
        MissingExtraError: duckdb is not installed.
        UsageError: the query fails (DuckDB's message).
    """
    try:
        import duckdb
    except ImportError as exc:
        from embedbatch.errors import MissingExtraError

        raise MissingExtraError("duckdb", "sql") from exc
    import re

    # The runs view reads every run.json: only for a query that names it.
    files, shards, runs, gone = _tables(ws, with_runs=re.search(r"\bruns\b", query, re.IGNORECASE) is not None)
    con = duckdb.connect()
    try:
        con.register("shards_t", shards)
        con.register("runs_t", runs)
        con.register("superseded_t", gone)
        con.execute("CREATE VIEW shards AS SELECT * FROM shards_t")
        con.execute("CREATE VIEW runs AS SELECT * FROM runs_t")
        if files:
            con.execute(_embeddings_view(files))
        else:
            con.execute(
                "CREATE VIEW embeddings AS SELECT NULL::VARCHAR AS id, NULL::VARCHAR AS text, NULL::VARCHAR AS model, "
                "NULL::VARCHAR AS dataset, NULL::FLOAT[] AS embedding, NULL::VARCHAR AS shard WHERE false"
            )
        try:
            cur = con.execute(query)
        except duckdb.Error as exc:
            raise UsageError(f"sql: {exc}") from exc
        columns = [d[0] for d in cur.description] if cur.description else []
        return columns, cur.fetchall()
    finally:
        con.close()
