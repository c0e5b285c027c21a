"""libSQL (Turso) sink: embeddings into an ``F32_BLOB(dim)`` column, one transaction per chunk.

Vectors are little-endian float32 blobs (``struct.pack('<{dim}f', …)``), the layout libSQL's
``F32_BLOB`` and its vector functions read, so a plain ``sqlite3`` reader gets the exact values
back with ``struct.unpack``. Update mode fills existing rows by id, only where the column is
still NULL unless ``overwrite``; insert mode writes (id, vector, model, created_at) rows into a
table it creates if missing. Progress per shard is kept in run state, so a crash resumes at the
first uncommitted chunk. Identifiers are always quoted.

This module is the one boundary to the ``libsql`` package (the engine Turso runs, in-process for
files; remote ``libsql://`` URLs use the same calls but are not reachable from this project's
tests).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from embedbatch.config import LibsqlTarget
from embedbatch.db.sql import quote_ident
from embedbatch.errors import DatabaseError, MissingExtraError, UsageError
from embedbatch.sinks import chunks as chunk_mode
from embedbatch.sinks.progress import SinkProgress
from embedbatch.workspace import utc_now

__all__ = [
    "LibsqlInfo",
    "check_target",
    "connect",
    "inspect_table",
    "sink_run",
    "write_vectors",
]

log = structlog.get_logger(__name__)


LIBSQL_HINT = "embedbatch db init --libsql-url … --chunks-table"
# The text column insert mode creates and fills (``search --libsql-text-column`` reads it).
TEXT_COLUMN = "content"
# What the writers take: ids, their (n, dim) float32 vectors and, optionally, their texts.
Chunk = tuple[list[str], np.ndarray] | tuple[list[str], np.ndarray, list[str] | None]


def connect(url: str, auth_token: str | None = None) -> Any:
    """A libSQL connection: a local file (``PATH`` or ``file:PATH``) or a remote URL.

    Raises:
        MissingExtraError: the ``libsql`` package is not installed.
        DatabaseError: the database cannot be opened.
    """
    try:
        import libsql
    except ImportError as exc:
        raise MissingExtraError("libsql", "libsql") from exc
    remote = url.startswith(("libsql://", "https://", "http://", "wss://"))
    try:
        if remote:
            return libsql.connect(url, auth_token=auth_token or "")
        return libsql.connect(url.removeprefix("file:"))
    except Exception as exc:
        raise DatabaseError(f"cannot open libSQL database {url.split('?')[0]}: {exc}") from exc


@dataclass(frozen=True)
class LibsqlInfo:
    """The target table as declared: the vector column's dimension (None: not an F32_BLOB
    column yet, insert mode creates it), the id column's declared type, and vector indexes."""

    dim: int | None
    id_type: str
    indexes: list[tuple[str, str]]
    columns: frozenset[str] = frozenset()


def inspect_table(conn: Any, target: LibsqlTarget) -> LibsqlInfo | None:
    """The table's columns, vector dimension and vector indexes; None when it does not exist."""
    cols = {r[1]: str(r[2] or "") for r in conn.execute(f"PRAGMA table_info({quote_ident(target.table)})").fetchall()}
    if not cols:
        return None
    for col in (target.id_column, target.vector_column):
        if col not in cols:
            raise DatabaseError(f"column {col!r} does not exist in {target.table!r}; it has: {', '.join(cols)}")
    m = re.fullmatch(r"\s*F32_BLOB\s*\(\s*(\d+)\s*\)\s*", cols[target.vector_column], re.IGNORECASE)
    if m is None:
        raise DatabaseError(
            f"{target.table}.{target.vector_column} is declared {cols[target.vector_column] or 'without a type'!r}, "
            "not F32_BLOB(dim)"
        )
    rows = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql LIKE '%libsql_vector_idx%'",
        (target.table,),
    ).fetchall()
    return LibsqlInfo(int(m.group(1)), cols[target.id_column].upper(), [(r[0], r[1]) for r in rows], frozenset(cols))


def check_target(url: str, auth_token: str | None, target: LibsqlTarget, *, dim: int) -> LibsqlInfo | None:
    """Check, before anything is paid for, that the target can take ``dim``-d vectors: the table
    and both columns exist and the vector column is ``F32_BLOB(dim)`` (insert mode may create a
    missing table).

    Raises:
        DatabaseError: the target does not fit (the message says what to change).
    """
    if target.table.lower().startswith("sqlite_"):
        raise DatabaseError(f"{target.table!r} is a name SQLite reserves for itself; choose another --libsql-table")
    conn = connect(url, auth_token)
    try:
        info = inspect_table(conn, target)
    finally:
        conn.close()
    if info is None:
        if target.mode in ("insert", "chunks"):
            return None
        raise DatabaseError(f"table {target.table!r} does not exist in {url}")
    if target.mode == "chunks":
        chunk_mode.check_chunk_columns(target.table, info.columns, hint=LIBSQL_HINT)
    if info.dim != dim:
        raise DatabaseError(
            f"{target.table}.{target.vector_column} is F32_BLOB({info.dim}) but the model gives {dim}-d vectors "
            "(nothing was uploaded)"
        )
    return info


_INT_ID = re.compile(r"-?[0-9]+")
_HEX_ID = re.compile(r"(?:[0-9a-f]{2})+")


def _id_value(rid: str, id_type: str) -> Any:
    """The value to store for ``rid`` in an id column of ``id_type`` (insert mode); None when
    the id cannot be stored there (a non-integer id into an INTEGER column)."""
    if "INT" in id_type:
        return int(rid) if _INT_ID.fullmatch(rid) and -(2**63) <= int(rid) < 2**63 else None
    if "BLOB" in id_type:
        return bytes.fromhex(rid) if _HEX_ID.fullmatch(rid) else None
    return rid


def _id_match(idc: str, id_type: str) -> tuple[str, Callable[[str], tuple[Any, ...]]]:
    """SQL matching one stored id, and the parameters it takes for a record id (see
    :mod:`embedbatch.sources.sqlite`: INTEGER ids are their digits, BLOB ids their hex).

    An INTEGER column is matched with ``CAST(? AS INTEGER)`` of the digits (exact for every
    64-bit value); a column without a declared type (or NUMERIC/REAL) keeps each value's own
    storage class, so the id is matched as text, integer, real or blob, whichever it is.
    """
    if "INT" in id_type:
        return f"{idc} = CAST(? AS INTEGER)", lambda rid: (rid if _INT_ID.fullmatch(rid) else None,)
    if "BLOB" in id_type:
        return f"{idc} = ?", lambda rid: (bytes.fromhex(rid) if _HEX_ID.fullmatch(rid) else None,)
    if any(t in id_type for t in ("CHAR", "CLOB", "TEXT")):
        return f"{idc} = ?", lambda rid: (rid,)

    def candidates(rid: str) -> tuple[Any, ...]:
        as_int = rid if _INT_ID.fullmatch(rid) else None
        try:
            as_real: float | None = float(rid) if as_int is None and repr(float(rid)) == rid else None
        except ValueError:
            as_real = None
        as_blob = bytes.fromhex(rid) if _HEX_ID.fullmatch(rid) else None
        return rid, as_real, as_blob, as_int

    sql = f"({idc} = ? OR {idc} = ? OR {idc} = ? OR ({idc} = CAST(? AS INTEGER) AND typeof({idc}) = 'integer'))"
    return sql, candidates


@dataclass
class LibsqlReport:
    """What a write did: rows written, ids not found, rows that already had a vector, rows
    refused (wrong dimension or not finite), chunks, whether the index was (re)built, seconds."""

    written: int = 0
    missing_ids: int = 0
    skipped_has_vector: int = 0
    refused: int = 0
    stale_deleted: int = 0
    chunks: int = 0
    index_built: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def write_vectors(
    url: str,
    auth_token: str | None,
    target: LibsqlTarget,
    chunks: Iterator[Any],
    *,
    dim: int,
    model: str = "",
    on_chunk: Callable[[int], None] | None = None,
    on_index_drop: Callable[[list[tuple[str, str]]], None] | None = None,
) -> LibsqlReport:
    """Write ``(ids, (n, dim) float32[, texts])`` chunks into the target, one transaction per
    chunk (chunk mode: ``(ids, vectors, texts, ChunkColumns)``, see :mod:`embedbatch.store.shards`).
    Insert mode creates a missing table as (id, vector, ``content`` text, model, created_at)
    and stores each row's text when the table has a ``content`` column.

    A vector of another dimension or with NaN/inf is refused (counted, never written).

    Raises:
        DatabaseError: the target does not fit, or libSQL fails.
    """
    report = LibsqlReport()
    started = time.monotonic()
    conn = connect(url, auth_token)
    try:
        info = inspect_table(conn, target)
        if info is None and target.mode == "insert":
            conn.execute(
                f"CREATE TABLE {quote_ident(target.table)} ({quote_ident(target.id_column)} TEXT PRIMARY KEY, "
                f"{quote_ident(target.vector_column)} F32_BLOB({dim}), {TEXT_COLUMN} TEXT, model TEXT, created_at TEXT)"
            )
            conn.commit()
            info = inspect_table(conn, target)
        elif info is None and target.mode == "chunks":
            chunk_mode.create_libsql_table(
                conn, target.table, dim, id_column=target.id_column, vector_column=target.vector_column
            )
            info = inspect_table(conn, target)
        if info is None:
            raise DatabaseError(f"table {target.table!r} does not exist in {url}")
        if target.mode == "chunks":
            chunk_mode.check_chunk_columns(target.table, info.columns, hint=LIBSQL_HINT)
        if info.dim != dim:
            raise DatabaseError(f"{target.table}.{target.vector_column} is F32_BLOB({info.dim}), vectors are {dim}-d")
        if target.index and info.indexes:
            if on_index_drop is not None:
                on_index_drop(info.indexes)
            for name, _ in info.indexes:
                conn.execute(f"DROP INDEX IF EXISTS {quote_ident(name)}")
            conn.commit()
        if target.mode == "chunks":
            chunk_mode.upsert_libsql(conn, target, chunks, report, on_chunk)
        else:
            _write_chunks(conn, target, info, chunks, dim, model, report, on_chunk)
        if target.index:
            for sql in [s for _, s in info.indexes] or [_index_sql(target)]:
                conn.execute(sql.replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1))
            conn.commit()
            report.index_built = True
    except DatabaseError:
        raise
    except Exception as exc:
        raise DatabaseError(f"writing into libSQL table {target.table!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    report.seconds = time.monotonic() - started
    return report


def _index_sql(target: LibsqlTarget) -> str:
    return (
        f"CREATE INDEX {quote_ident(index_name(target))} ON {quote_ident(target.table)} "
        f"(libsql_vector_idx({quote_ident(target.vector_column)}))"
    )


def index_name(target: LibsqlTarget) -> str:
    """The name :func:`write_vectors` gives the vector index it creates: ``{table}_{column}_idx``
    when both are plain words, else a plain-word form with a short hash (libSQL's vector index
    cannot be initialised under a name with spaces, quotes, dots or brackets)."""
    name = f"{target.table}_{target.vector_column}_idx"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_]", "_", name) + f"_{digest}"


def _write_chunks(
    conn: Any,
    target: LibsqlTarget,
    info: LibsqlInfo,
    chunks: Iterator[Chunk],
    dim: int,
    model: str,
    report: LibsqlReport,
    on_chunk: Callable[[int], None] | None,
) -> None:
    table, idc, vc = quote_ident(target.table), quote_ident(target.id_column), quote_ident(target.vector_column)
    null_only = "" if target.overwrite else f" AND {vc} IS NULL"
    match, match_params = _id_match(idc, info.id_type)
    update = f"UPDATE {table} SET {vc} = ? WHERE {match}{null_only}"
    verb = "INSERT OR REPLACE" if target.overwrite else "INSERT OR IGNORE"
    with_text = TEXT_COLUMN in info.columns
    columns = f"{idc}, {vc}, {TEXT_COLUMN}, model, created_at" if with_text else f"{idc}, {vc}, model, created_at"
    insert = f"{verb} INTO {table} ({columns}) VALUES ({', '.join('?' * (5 if with_text else 4))})"
    for chunk in chunks:
        ids, vecs = chunk[0], chunk[1]
        texts = chunk[2] if len(chunk) > 2 else None
        good = (vecs.shape[1] == dim) & np.isfinite(vecs).all(axis=1)
        report.refused += int((~good).sum())
        # One conversion per chunk, then byte slices: the blob of row i.
        raw = np.ascontiguousarray(vecs, dtype="<f4").tobytes()
        width = vecs.shape[1] * 4
        ok = good.tolist()
        before = conn.execute("SELECT total_changes()").fetchall()[0][0]
        if target.mode == "insert":
            now = utc_now().isoformat()
            new: list[tuple[Any, ...]] = []
            for i, rid in enumerate(ids):
                k = _id_value(rid, info.id_type)
                if not ok[i]:
                    continue
                if k is None:  # e.g. a text id for an INTEGER id column: never stored as something else
                    report.refused += 1
                    continue
                blob = raw[i * width : (i + 1) * width]
                new.append((k, blob, texts[i] if texts else None, model, now) if with_text else (k, blob, model, now))
            if new:
                conn.executemany(insert, new)
            written = conn.execute("SELECT total_changes()").fetchall()[0][0] - before
            report.skipped_has_vector += len(new) - written  # ids already in the table (INSERT OR IGNORE)
        else:
            todo = [i for i in range(len(ids)) if ok[i]]
            if todo:
                conn.executemany(update, [(raw[i * width : (i + 1) * width], *match_params(ids[i])) for i in todo])
            written = conn.execute("SELECT total_changes()").fetchall()[0][0] - before
            if written < len(todo):  # rare on a first write: find out why, row by row, only then
                probe = f"SELECT {vc} IS NULL FROM {table} WHERE {match} LIMIT 1"
                found = sum(1 for i in todo if conn.execute(probe, match_params(ids[i])).fetchall())
                report.missing_ids += len(todo) - found
                report.skipped_has_vector += found - written
        conn.commit()
        report.written += written
        report.chunks += 1
        if on_chunk is not None:
            on_chunk(report.written)


def sink_run(ws: Any, run: Any, *, auth_token: str | None) -> dict[str, Any]:
    """Write a run's shard rows into its libSQL target (``run.state.libsql_target``).

    The caller holds the run. Progress per shard is saved in run.json after each committed
    chunk; a failure marks only this sink step failed (``libsql.status``) and re-raises.

    Raises:
        DatabaseError: the target does not fit or libSQL fails.
    """
    from embedbatch.store.manifest import Manifest

    rs = run.state
    assert rs.libsql_target is not None
    manifest = Manifest.load(ws, rs.model, rs.dataset)
    if manifest.dimensions is None:
        return {}
    target = LibsqlTarget(**rs.libsql_target)
    book = SinkProgress(ws, run, "libsql", chunk_rows=target.update_chunk_size)
    try:
        if rs.libsql.pending_indexes:  # a process died between dropping and recreating
            _recreate(target, auth_token, rs.libsql.pending_indexes)
            book.indexes_rebuilt()
        report = write_vectors(
            target.url,
            auth_token,
            target,
            book.chunk_rows_with_parents() if target.mode == "chunks" else book.chunks(),
            dim=manifest.dimensions,
            model=rs.model,
            on_chunk=book.committed,
            on_index_drop=lambda indexes: book.dropping([{"name": n, "definition": d} for n, d in indexes]),
        )
    except Exception as exc:
        book.failed(exc)
        raise
    book.indexes_rebuilt()
    book.done(report, ("missing_ids", "skipped_has_vector", "refused"))
    if report.missing_ids or report.refused:
        log.warning(
            "libsql: fewer rows written than embedded",
            run=rs.run_id,
            table=target.table,
            ids_not_in_table=report.missing_ids,
            refused=report.refused,
        )
    if report.chunks or report.index_built:  # a pass with nothing new to write logs nothing
        log.info("libsql", run=rs.run_id, table=target.table, written=report.written, missing=report.missing_ids)
    return report.to_json()


def _recreate(target: LibsqlTarget, auth_token: str | None, definitions: list[dict[str, str]]) -> None:
    conn = connect(target.url, auth_token)
    try:
        for d in definitions:
            conn.execute(d["definition"].replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1))
        conn.commit()
    finally:
        conn.close()


def init_example(url: str, auth_token: str | None, *, table: str = "knowledge_chunks", dim: int = 1536) -> str:
    """``db init --libsql-url``: an example table (id, family_id, content, embedding F32_BLOB)."""
    if not table:
        raise UsageError("give a table name")
    conn = connect(url, auth_token)
    try:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quote_ident(table)} (id INTEGER PRIMARY KEY, family_id TEXT NOT NULL, "
            f"content TEXT NOT NULL, embedding F32_BLOB({dim}))"
        )
        conn.commit()
    finally:
        conn.close()
    return table
