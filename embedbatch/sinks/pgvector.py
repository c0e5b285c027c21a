"""pgvector sink: write embeddings into a ``vector``/``halfvec`` column of PostgreSQL.

Vectors travel in pgvector's binary format (``pgvector.asyncpg.register_vector``); text literals
measured ~30× slower here. Update mode fills existing rows by id with a binary ``executemany``
``UPDATE`` (measured here faster than COPY into a temp table + ``UPDATE … FROM``), one
transaction per chunk, only where the column is still NULL unless ``overwrite``. Insert mode
loads a fresh table by binary COPY. Identifiers are always quoted, never interpolated raw.

Chunk mode (one row per chunk, stale chunks deleted with the new ones) is
:mod:`embedbatch.sinks.chunks`; vector indexes around a bulk write are
:mod:`embedbatch.sinks.pgindex`.

Connections, quoting and error translation come from :mod:`embedbatch.db.pg`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from embedbatch.config import PgTarget
from embedbatch.db.pg import connect, quote_ident, quote_table, translate_error
from embedbatch.errors import DatabaseError, UsageError
from embedbatch.sinks import chunks as chunk_mode
from embedbatch.sinks.pgindex import (
    INDEXED_ROWS_PER_S,
    REBUILD_WORTH_FRACTION,
    VectorIndex,
    index_schema,
    rebuild,
    recreate_missing_indexes,
)
from embedbatch.sinks.progress import SinkProgress
from embedbatch.workspace import crash_point

__all__ = [
    "TargetInfo",
    "WriteReport",
    "check_target",
    "inspect_target",
    "sink_run",
    "write_vectors",
]

log = structlog.get_logger(__name__)

PG_HINT = "embedbatch db init --chunks-table"


@dataclass(frozen=True)
class TargetInfo:
    """What the target column is: ``vector`` or ``halfvec``, its dimension, the id column's type,
    the table's row count estimate, and vector indexes on the column."""

    table: str
    kind: str
    dim: int
    id_type: str
    rows_estimate: int
    indexes: list[VectorIndex]
    columns: frozenset[str] = frozenset()


async def _table_exists(conn: Any, target: PgTarget) -> bool:
    try:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", quote_table(target.table)))
    except Exception as exc:
        raise translate_error(exc, f"table {target.table!r}") from exc


async def _create_insert_table(conn: Any, target: PgTarget, dim: int) -> None:
    """Insert mode into a missing table: create it as (id text primary key, vector(dim)[, text])."""
    text = f", {quote_ident(target.text_column)} text" if target.text_column else ""
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quote_table(target.table)} ({quote_ident(target.id_column)} "
            f"text PRIMARY KEY, {quote_ident(target.vector_column)} vector({dim}){text})"
        )
    except Exception as exc:
        raise translate_error(exc, f"creating table {target.table!r}") from exc


async def inspect_target(conn: Any, target: PgTarget) -> TargetInfo:
    """Check the table and columns exist and describe them.

    Raises:
        DatabaseError: missing table/column, or the column is not vector/halfvec with a dimension.
    """
    table_sql = quote_table(target.table)
    try:
        oid = await conn.fetchval("SELECT to_regclass($1)::oid", table_sql)
    except Exception as exc:
        raise translate_error(exc, f"table {target.table!r}") from exc
    if oid is None:
        raise DatabaseError(f"table {target.table!r} does not exist")
    cols = {
        r["attname"]: r["type"]
        for r in await conn.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute "
            "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
            oid,
        )
    }
    for col in (target.id_column, target.vector_column):
        if col not in cols:
            raise DatabaseError(f"column {col!r} does not exist in {target.table!r} (columns: {sorted(cols)})")
    m = re.fullmatch(r"(vector|halfvec)\((\d+)\)", cols[target.vector_column])
    if not m:
        raise DatabaseError(
            f"column {target.vector_column!r} is {cols[target.vector_column]}, not vector(dim) or halfvec(dim)"
        )
    rows = await conn.fetchval("SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = $1", oid)
    idx_rows = await conn.fetch(
        "SELECT c.relname AS name, am.amname AS method, pg_get_indexdef(i.indexrelid) AS def "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = $1 AND a.attname = $2 AND am.amname IN ('hnsw', 'ivfflat')",
        oid,
        target.vector_column,
    )
    indexes = [VectorIndex(r["name"], r["method"], r["def"]) for r in idx_rows]
    return TargetInfo(
        target.table, m.group(1), int(m.group(2)), cols[target.id_column], int(rows or 0), indexes, frozenset(cols)
    )


@dataclass
class WriteReport:
    """What a write did (rows), and how long it took (seconds)."""

    written: int = 0
    skipped_has_vector: int = 0
    missing_ids: int = 0
    stale_deleted: int = 0
    chunks: int = 0
    seconds: float = 0.0
    index_rebuilt: list[str] = field(default_factory=list)
    expected_indexed_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _id_param(id_type: str) -> str:
    """The SQL that turns the text-form id parameter back into the column's type."""
    if id_type in ("text", "character varying") or id_type.startswith("character varying"):
        return "$1::text"
    return f"($1::text)::{id_type}"


async def _ready_target(conn: Any, target: PgTarget, dim: int) -> TargetInfo:
    """Create a missing table (insert and chunk modes), then check it takes ``dim``-d vectors.

    Raises:
        DatabaseError: the target does not fit.
    """
    if target.mode != "update" and not await _table_exists(conn, target):
        create = _create_insert_table if target.mode == "insert" else chunk_mode.create_pg_table
        await create(conn, target, dim)
    info = await inspect_target(conn, target)
    _check_fits(target, info, dim)
    return info


def _check_fits(target: PgTarget, info: TargetInfo, dim: int) -> None:
    if target.mode == "chunks":
        chunk_mode.check_chunk_columns(target.table, info.columns, hint=PG_HINT)
    if info.dim != dim:
        raise DatabaseError(
            f"{target.table}.{target.vector_column} is {info.kind}({info.dim}) but the model gives {dim}-d vectors; "
            f"change the column, pick another --pg-vector-column, or set --dimensions (nothing was uploaded)"
        )


async def write_vectors(
    dsn: str,
    target: PgTarget,
    chunks: Iterator[Any],
    *,
    dim: int,
    total_rows: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    on_index_drop: Callable[[list[VectorIndex]], None] | None = None,
) -> WriteReport:
    """Write ``(ids, (n, dim) float32 vectors, texts or None)`` chunks into the target (chunk
    mode: ``(ids, vectors, texts, ChunkColumns)``, see :mod:`embedbatch.store.shards`).

    Each chunk is one transaction, so a crash resumes at the first uncommitted chunk; in the
    default NULL-only mode, repeating a write changes nothing.

    Args:
        dsn: the database (never logged; see :func:`redact_dsn`).
        dim: the embeddings' dimension; must equal the column's.
        total_rows: rows that will be written (for the index-cost estimate).
        on_chunk: called with the rows written after each committed chunk.
        on_index_drop: called with the indexes ``rebuild_index`` is about to drop, before the
            drop (the caller saves them, so a crash before the rebuild can recreate them).

    Raises:
        DatabaseError: the target does not fit, or PostgreSQL fails.
    """
    report = WriteReport()
    started = time.monotonic()
    async with connect(dsn) as conn:
        info = await _ready_target(conn, target, dim)
        dropped = False
        if info.indexes:
            n = total_rows or 0
            report.expected_indexed_s = n / INDEXED_ROWS_PER_S
            names = ", ".join(f"{i.name} ({i.method})" for i in info.indexes)
            worth = info.rows_estimate == 0 or n / max(info.rows_estimate, 1) > REBUILD_WORTH_FRACTION
            log.warning(
                "vector index on the target column: every written row is a graph insert",
                indexes=names,
                rows=n,
                expected_s=round(report.expected_indexed_s, 1),
                advice="--rebuild-index" if worth and not target.rebuild_index else None,
            )
            if target.rebuild_index:
                if on_index_drop is not None:
                    on_index_drop(info.indexes)
                for idx in info.indexes:
                    await conn.execute(f"DROP INDEX IF EXISTS {quote_table(index_schema(idx, target))}")
                dropped = True
                crash_point("pg_after_index_drop")
        table = quote_table(target.table)
        idc, vc = quote_ident(target.id_column), quote_ident(target.vector_column)
        try:
            if target.mode == "insert":
                await _insert(conn, target, info, chunks, report, on_chunk)
            elif target.mode == "chunks":
                await chunk_mode.upsert_pg(conn, target, chunks, report, on_chunk)
            else:
                null_only = "" if target.overwrite else f" AND {vc} IS NULL"
                update = f"UPDATE {table} SET {vc} = $2 WHERE {idc} = {_id_param(info.id_type)}{null_only}"
                probe = (
                    f"SELECT {idc}::text AS id, {vc} IS NULL AS empty FROM {table} "
                    f"WHERE {idc} = ANY(($1::text[])::{info.id_type}[])"
                )
                for ids, vecs, _ in chunks:
                    async with conn.transaction():
                        found = {r["id"]: r["empty"] for r in await conn.fetch(probe, ids)}
                        rows = [
                            (rid, vecs[i])
                            for i, rid in enumerate(ids)
                            if rid in found and (target.overwrite or found[rid])
                        ]
                        report.missing_ids += sum(1 for rid in ids if rid not in found)
                        report.skipped_has_vector += len(found) - len(rows) if not target.overwrite else 0
                        if rows:
                            await conn.executemany(update, rows)
                    report.written += len(rows)
                    report.chunks += 1
                    if on_chunk is not None:
                        on_chunk(report.written)
        except DatabaseError:
            raise
        except Exception as exc:
            raise translate_error(exc, f"writing into {target.table!r}") from exc
        finally:
            if dropped:
                report.index_rebuilt = await rebuild(
                    conn, target, info.indexes, info.dim, max(info.rows_estimate, report.written)
                )
    report.seconds = time.monotonic() - started
    return report


async def check_target(dsn: str | None, target: PgTarget, *, dim: int) -> TargetInfo | None:
    """Check, before anything is paid for, that ``target`` can take ``dim``-dimensional vectors:
    the table, id column and vector column exist, the column is ``vector``/``halfvec`` of that
    dimension, and the id column's type is one we can map ids to. In insert and chunk modes a
    missing table is fine (the write creates it): None.

    Raises:
        UsageError: no DSN.
        DatabaseError: the target does not fit (the message says what to change).
    """
    if not dsn:
        raise UsageError("--pg-table needs a database: set DATABASE_URL or pass --pg-dsn")
    async with connect(dsn) as conn:
        if target.mode != "update" and not await _table_exists(conn, target):
            return None
        info = await inspect_target(conn, target)
    _check_fits(target, info, dim)
    return info


def _convert_ids(ids: list[str], id_type: str) -> list[Any]:
    if id_type in ("bigint", "integer", "smallint"):
        return [int(i) for i in ids]
    if id_type == "uuid":
        import uuid

        return [uuid.UUID(i) for i in ids]
    return ids


async def _insert(
    conn: Any,
    target: PgTarget,
    info: TargetInfo,
    chunks: Iterator[tuple[list[str], np.ndarray, list[str] | None]],
    report: WriteReport,
    on_chunk: Callable[[int], None] | None,
) -> None:
    """Binary COPY into the table (id, vector[, text when the table has that column]); ids
    already present are skipped."""
    with_text = bool(target.text_column) and target.text_column in info.columns
    columns = [target.id_column, target.vector_column] + ([target.text_column] if with_text else [])  # type: ignore[list-item]
    table = quote_table(target.table)
    idc = quote_ident(target.id_column)
    schema, _, name = target.table.rpartition(".")
    for ids, vecs, texts in chunks:
        async with conn.transaction():
            present = {
                r["id"]
                for r in await conn.fetch(
                    f"SELECT {idc}::text AS id FROM {table} WHERE {idc} = ANY(($1::text[])::{info.id_type}[])", ids
                )
            }
            keep = [i for i, rid in enumerate(ids) if rid not in present]
            typed = _convert_ids([ids[i] for i in keep], info.id_type)
            records: list[tuple[Any, ...]]
            if with_text:
                assert texts is not None
                records = [(typed[k], vecs[i], texts[i]) for k, i in enumerate(keep)]
            else:
                records = [(typed[k], vecs[i]) for k, i in enumerate(keep)]
            if records:
                await conn.copy_records_to_table(name, schema_name=schema or None, records=records, columns=columns)
        report.skipped_has_vector += len(present)
        report.written += len(keep)
        report.chunks += 1
        if on_chunk is not None:
            on_chunk(report.written)


async def sink_run(ws: Any, run: Any, *, dsn: str | None) -> dict[str, Any]:
    """Write a run's shard rows into its pgvector target (``run.state.pg_target``).

    The caller holds the run (:meth:`embedbatch.runs.Run.open`). Progress per shard is saved in
    run.json after every committed chunk, so a crash resumes at the first uncommitted chunk and
    a repeated call writes nothing new. The DSN is passed in and never stored.

    Returns:
        The :class:`WriteReport` as JSON (empty when the dataset has no rows yet).

    Raises:
        UsageError: no DSN.
        DatabaseError: the target does not fit or PostgreSQL fails.
    """
    from embedbatch.store.manifest import Manifest

    rs = run.state
    assert rs.pg_target is not None
    if not dsn:
        raise UsageError("the run writes to PostgreSQL: set DATABASE_URL or pass --pg-dsn")
    manifest = Manifest.load(ws, rs.model, rs.dataset)
    if manifest.dimensions is None:
        return {}
    try:
        return await _sink_run(ws, run, dsn, manifest.dimensions)
    except Exception as exc:
        # Only the sink step failed: the shards are committed; the run stays active until a
        # later ingest (with corrected flags, or --no-pg) finishes it.
        SinkProgress(ws, run, "pg", chunk_rows=1).failed(exc)
        raise


async def _sink_run(ws: Any, run: Any, dsn: str, dim: int) -> dict[str, Any]:
    rs = run.state
    assert rs.pg_target is not None
    target = PgTarget(**rs.pg_target)
    book = SinkProgress(ws, run, "pg", chunk_rows=target.update_chunk_size)
    if rs.pg.pending_indexes:  # a process died between dropping and recreating them
        created = await recreate_missing_indexes(dsn, rs.pg.pending_indexes)
        log.info("recreated vector indexes dropped by an interrupted write", indexes=created)
        book.indexes_rebuilt()
        run.save()
    report = await write_vectors(
        dsn,
        target,
        book.chunk_rows_with_parents() if target.mode == "chunks" else book.chunks(),
        dim=dim,
        total_rows=book.remaining_rows(),
        on_chunk=book.committed,
        on_index_drop=lambda indexes: book.dropping([{"name": i.name, "definition": i.definition} for i in indexes]),
    )
    if report.index_rebuilt:
        book.indexes_rebuilt()
    book.done(report, ("missing_ids", "skipped_has_vector"))
    if report.chunks or report.index_rebuilt:  # a pass with nothing new to write logs nothing
        log.info(
            "pgvector",
            run=rs.run_id,
            table=target.table,
            **{k: v for k, v in report.to_json().items() if k != "index_rebuilt"},
        )
    return report.to_json()
