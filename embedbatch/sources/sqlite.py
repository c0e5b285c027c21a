"""SQLite source: rows of a table (or a query) of a SQLite file, opened read-only and streamed.

The file is given as SOURCE (``.db``, ``.sqlite``, ``.sqlite3``, any file that starts with the
SQLite header, or ``sqlite:PATH``) with ``--table T`` (``--where`` with ``$1``.. parameters from
``--param``, as for PostgreSQL) or ``--query SQL``. With ``--vector-column C`` only rows whose
``C IS NULL`` are read (unless ``--overwrite``), and that column is never part of the row.

Ids keep their SQLite type as text: an INTEGER id ``7`` is ``"7"``, a TEXT id is itself, and a
BLOB id is its lowercase hex (sinks turn them back by the id column's declared type).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

from embedbatch.config import SourceConfig
from embedbatch.db.sql import quote_ident
from embedbatch.errors import DatabaseError, UsageError
from embedbatch.records import RawRow
from embedbatch.sources import is_sqlite_source, sqlite_path

__all__ = ["id_text", "is_sqlite_source", "iter_rows", "sqlite_path"]

FETCH_ROWS = 2_000


def id_text(value: Any) -> str:
    """An id value as the record id: bytes as lowercase hex, anything else as ``str``."""
    return value.hex() if isinstance(value, bytes | bytearray | memoryview) else str(value)


def _query(conn: sqlite3.Connection, src: SourceConfig) -> tuple[str, dict[str, str]]:
    params = {str(i + 1): v for i, v in enumerate(src.pg_params)}
    if src.pg_query:
        return src.pg_query, params
    assert src.pg_table is not None
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({quote_ident(src.pg_table)})")]
    if not cols:
        raise DatabaseError(f"table {src.pg_table!r} does not exist in {sqlite_path(src.path)}")
    for col in filter(None, (src.pg_id_column, src.pg_vector_column)):
        if col not in cols:
            raise DatabaseError(f"column {col!r} does not exist in {src.pg_table!r}; it has: {', '.join(cols)}")
    select = ", ".join(quote_ident(c) for c in cols if c != src.pg_vector_column)
    where = [f"({src.pg_where})"] if src.pg_where else []
    if src.pg_vector_column and not src.pg_overwrite:
        where.append(f"{quote_ident(src.pg_vector_column)} IS NULL")
    sql = f"SELECT {select} FROM {quote_ident(src.pg_table)}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql, params


def iter_rows(src: SourceConfig) -> Iterator[RawRow]:
    """Rows of the source as :class:`RawRow` (``line`` is the 0-based row index); the id
    column's value is turned into text (see the module docstring).

    Raises:
        UsageError: neither a table nor a query, or no such file.
        DatabaseError: the file is not a database, or the table, a column or the query is wrong.
    """
    if not src.pg_table and not src.pg_query:
        raise UsageError("the SQLite source needs --table or --query")
    path = sqlite_path(src.path)
    if not path.is_file():
        raise UsageError(f"{path}: no such SQLite file")
    name = f"sqlite:{path}:{src.pg_table or 'query'}"
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise DatabaseError(f"{path}: cannot open read-only ({exc})") from exc
    try:
        sql, params = _query(conn, src)
        cur = conn.execute(sql, params)
        cols = [d[0] for d in cur.description]
        line = 0
        while batch := cur.fetchmany(FETCH_ROWS):
            for values in batch:
                row = dict(zip(cols, values, strict=True))
                if src.id_field in row and row[src.id_field] is not None:
                    row[src.id_field] = id_text(row[src.id_field])
                yield RawRow(name, line, row)
                line += 1
    except sqlite3.Error as exc:
        raise DatabaseError(f"{name}: {exc.__class__.__name__}: {exc}") from exc
    finally:
        conn.close()
