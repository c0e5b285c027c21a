"""The sinks' chunk mode (``--pg-chunks-table``, ``--libsql-chunks-table``): one row per chunk.

A chunks table holds ``(id, parent_id, chunk_index, chunk, embedding)``; ``db init
--chunks-table`` creates one, and a write creates it when it is missing. Each transaction
upserts a group of chunk rows by id, then deletes the chunks of the same parents whose
``chunk_index`` is at or past the parent's new chunk count (``metadata.chunk.count``): a parent
that shrank from 5 chunks to 3 loses ``#3`` and ``#4`` in the transaction that writes its new
chunks, and a parent whose chunks span two transactions is still right (each deletes only
indexes past the count). Rows that are not chunks are written as their own parent, chunk 0.

The pgvector and libSQL writers call in here from their ``write_vectors``; this module knows
only the database APIs and quoting, not the writers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from embedbatch.config import CHUNK_COLUMNS, PgTarget
from embedbatch.db.pg import connect, quote_table, translate_error
from embedbatch.db.sql import quote_ident
from embedbatch.errors import DatabaseError

__all__ = [
    "check_chunk_columns",
    "create_libsql_table",
    "create_pg_table",
    "delete_libsql",
    "delete_pg",
    "init_pg_table",
    "upsert_libsql",
    "upsert_pg",
]


def check_chunk_columns(table: str, columns: frozenset[str], *, hint: str) -> None:
    """The table has the chunk columns.

    Raises:
        DatabaseError: a column is missing (the message says how to create a chunks table).
    """
    missing = [c for c in CHUNK_COLUMNS if c not in columns]
    if missing:
        raise DatabaseError(f"{table!r} is not a chunks table: it lacks {', '.join(missing)} (create one with {hint})")


async def create_pg_table(conn: Any, target: PgTarget, dim: int) -> None:
    """A chunks table ``(id text primary key, parent_id, chunk_index, chunk, vector(dim))``
    with an index on ``(parent_id, chunk_index)`` for the stale-chunk delete, if missing.

    Raises:
        DatabaseError: PostgreSQL fails.
    """
    table = quote_table(target.table)
    parent_idx = quote_ident(f"{target.table.rpartition('.')[2]}_parent_idx")
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ({quote_ident(target.id_column)} text PRIMARY KEY, "
            "parent_id text NOT NULL, chunk_index integer NOT NULL, chunk text NOT NULL, "
            f"{quote_ident(target.vector_column)} vector({dim}))"
        )
        await conn.execute(f"CREATE INDEX IF NOT EXISTS {parent_idx} ON {table} (parent_id, chunk_index)")
    except Exception as exc:
        raise translate_error(exc, f"creating chunks table {target.table!r}") from exc


async def init_pg_table(dsn: str, table: str, dim: int) -> None:
    """``db init --chunks-table``: the pgvector extension and a chunks table of ``dim``-d vectors.

    Raises:
        DatabaseError: PostgreSQL fails.
    """
    async with connect(dsn) as conn:
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except Exception as exc:
            raise translate_error(exc, "creating the vector extension") from exc
        await create_pg_table(conn, PgTarget(table=table, mode="chunks"), dim)


async def upsert_pg(
    conn: Any, target: PgTarget, chunks: Iterator[Any], report: Any, on_chunk: Callable[[int], None] | None
) -> None:
    """Write ``(ids, (n, dim) float32, texts, ChunkColumns)`` chunks, one transaction each
    (see the module docstring); counts into ``report.written``, ``.stale_deleted``, ``.chunks``."""
    table = quote_table(target.table)
    idc, vc = quote_ident(target.id_column), quote_ident(target.vector_column)
    upsert = (
        f"INSERT INTO {table} ({idc}, parent_id, chunk_index, chunk, {vc}) VALUES ($1, $2, $3, $4, $5) "
        f"ON CONFLICT ({idc}) DO UPDATE SET parent_id = EXCLUDED.parent_id, chunk_index = EXCLUDED.chunk_index, "
        f"chunk = EXCLUDED.chunk, {vc} = EXCLUDED.{vc}"
    )
    stale = (
        f"DELETE FROM {table} AS t USING unnest($1::text[], $2::int[]) AS s(parent, n) "
        "WHERE t.parent_id = s.parent AND t.chunk_index >= s.n"
    )
    for ids, vecs, texts, cols in chunks:
        counts: dict[str, int] = dict(zip(cols.parents, cols.counts, strict=True))
        async with conn.transaction():
            rows = [(rid, cols.parents[i], cols.index[i], texts[i], vecs[i]) for i, rid in enumerate(ids)]
            await conn.executemany(upsert, rows)
            status = await conn.execute(stale, list(counts), list(counts.values()))
        report.stale_deleted += int(status.split()[-1])
        report.written += len(ids)
        report.chunks += 1
        if on_chunk is not None:
            on_chunk(report.written)


def create_libsql_table(
    conn: Any, table: str, dim: int, *, id_column: str = "id", vector_column: str = "embedding"
) -> None:
    """A chunks table ``(id, parent_id, chunk_index, chunk, F32_BLOB(dim))`` with an index on
    ``(parent_id, chunk_index)``, if missing."""
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {quote_ident(table)} ({quote_ident(id_column)} TEXT PRIMARY KEY, "
        f"parent_id TEXT NOT NULL, chunk_index INTEGER NOT NULL, chunk TEXT NOT NULL, "
        f"{quote_ident(vector_column)} F32_BLOB({dim}))"
    )
    conn.execute(
        f"CREATE INDEX IF NOT EXISTS {quote_ident(table + '_parent_idx')} ON {quote_ident(table)} "
        "(parent_id, chunk_index)"
    )
    conn.commit()


def upsert_libsql(
    conn: Any, target: Any, chunks: Iterator[Any], report: Any, on_chunk: Callable[[int], None] | None
) -> None:
    """:func:`upsert_pg` for libSQL (little-endian float32 blobs). A vector that is not finite
    is refused (``report.refused``), never written."""
    table, idc, vc = quote_ident(target.table), quote_ident(target.id_column), quote_ident(target.vector_column)
    upsert = f"INSERT OR REPLACE INTO {table} ({idc}, parent_id, chunk_index, chunk, {vc}) VALUES (?, ?, ?, ?, ?)"
    stale = f"DELETE FROM {table} WHERE parent_id = ? AND chunk_index >= ?"
    for ids, vecs, texts, cols in chunks:
        good = np.isfinite(vecs).all(axis=1).tolist()
        raw = np.ascontiguousarray(vecs, dtype="<f4").tobytes()
        width = vecs.shape[1] * 4
        rows = [
            (rid, cols.parents[i], cols.index[i], texts[i], raw[i * width : (i + 1) * width])
            for i, rid in enumerate(ids)
            if good[i]
        ]
        report.refused += len(ids) - len(rows)
        counts: dict[str, int] = dict(zip(cols.parents, cols.counts, strict=True))
        if rows:
            conn.executemany(upsert, rows)
        before = conn.execute("SELECT total_changes()").fetchall()[0][0]
        conn.executemany(stale, list(counts.items()))
        report.stale_deleted += conn.execute("SELECT total_changes()").fetchall()[0][0] - before
        conn.commit()
        report.written += len(rows)
        report.chunks += 1
        if on_chunk is not None:
            on_chunk(report.written)


async def delete_pg(dsn: str, target: PgTarget, ids: list[str]) -> int:
    """``delete``: remove rows by id from a pgvector target; in chunk mode also every chunk
    whose ``parent_id`` is one of ``ids`` (deleting a document deletes its chunks). One
    transaction; returns the rows deleted.

    Raises:
        DatabaseError: the table is missing or PostgreSQL fails.
    """
    table, idc = quote_table(target.table), quote_ident(target.id_column)
    parents = " OR parent_id = ANY($1::text[])" if target.mode == "chunks" else ""
    async with connect(dsn) as conn:
        try:
            status = await conn.execute(f"DELETE FROM {table} WHERE {idc}::text = ANY($1::text[]){parents}", ids)
        except Exception as exc:
            raise translate_error(exc, f"deleting from {target.table!r}") from exc
    return int(status.split()[-1])


def delete_libsql(conn: Any, target: Any, ids: list[str]) -> int:
    """:func:`delete_pg` for libSQL (ids matched as text). Returns the rows deleted."""
    table, idc = quote_ident(target.table), quote_ident(target.id_column)
    parents = " OR parent_id = ?" if target.mode == "chunks" else ""
    before = conn.execute("SELECT total_changes()").fetchall()[0][0]
    conn.executemany(
        f"DELETE FROM {table} WHERE CAST({idc} AS TEXT) = ?{parents}", [(i, i) if parents else (i,) for i in ids]
    )
    conn.commit()
    return int(conn.execute("SELECT total_changes()").fetchall()[0][0] - before)
