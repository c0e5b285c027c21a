"""PostgreSQL source: stream rows with a server-side cursor (asyncpg).

``--table`` reads every column but the vector column, only rows whose vector is NULL unless
``--overwrite``, with an optional ``--where`` using ``$1…`` parameters (``--param``); ``--query``
runs a whole SELECT. Ids may be uuid, int or text: ``custom_id`` is their text form. The intake
is synchronous, so the cursor runs on its own event loop in a thread, feeding a bounded queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

from embedbatch.config import SourceConfig, redact_dsn
from embedbatch.errors import DatabaseError, UsageError
from embedbatch.records import RawRow

__all__ = ["build_query", "iter_rows"]

PREFETCH = 2_000
_DONE = object()


async def build_query(conn: Any, src: SourceConfig) -> str:
    """The SELECT for ``src``: ``--query`` as given, else the table's columns minus the vector
    column, filtered by NULL vector (unless overwrite) and ``--where``.

    Raises:
        DatabaseError: the table or a named column does not exist.
    """
    from embedbatch.db.pg import quote_ident, quote_table

    if src.pg_query:
        return src.pg_query
    assert src.pg_table is not None
    table = quote_table(src.pg_table)
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", table)
    if oid is None:
        raise DatabaseError(f"table {src.pg_table!r} does not exist")
    cols = [
        r["attname"]
        for r in await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            oid,
        )
    ]
    for col in filter(None, (src.pg_id_column, src.pg_text_column, src.pg_vector_column)):
        if col not in cols:
            raise DatabaseError(f"column {col!r} does not exist in {src.pg_table!r} (columns: {cols})")
    select = ", ".join(quote_ident(c) for c in cols if c != src.pg_vector_column)
    where = []
    if src.pg_vector_column and not src.pg_overwrite:
        where.append(f"{quote_ident(src.pg_vector_column)} IS NULL")
    if src.pg_where:
        where.append(f"({src.pg_where})")
    sql = f"SELECT {select} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + f" ORDER BY {quote_ident(src.pg_id_column)}"


def _plain(value: Any) -> Any:
    import uuid

    if isinstance(value, uuid.UUID):
        return str(value)
    return value


async def _produce(src: SourceConfig, out: queue.Queue[Any], stop: threading.Event) -> None:
    import asyncpg

    assert src.pg_dsn is not None
    try:
        conn = await asyncpg.connect(src.pg_dsn)
    except Exception as exc:
        raise DatabaseError(f"cannot connect to {redact_dsn(src.pg_dsn)}: {exc}") from exc
    name = f"postgres:{src.pg_table or 'query'}"
    try:
        sql = await build_query(conn, src)
        async with conn.transaction():
            index = 0
            async for rec in conn.cursor(sql, *src.pg_params, prefetch=PREFETCH):
                if stop.is_set():
                    return
                row = {k: _plain(v) for k, v in rec.items()}
                item = RawRow(name, index, row)
                while True:
                    try:
                        out.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        if stop.is_set():
                            return
                index += 1
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"{name}: {exc.__class__.__name__}: {exc}") from exc
    finally:
        await conn.close()


def iter_rows(src: SourceConfig) -> Iterator[RawRow]:
    """Rows of the source as :class:`RawRow` (``line`` is the 0-based row index).

    Raises:
        UsageError: neither a table nor a query.
        DatabaseError: connection or query failure.
    """
    if not src.pg_table and not src.pg_query:
        raise UsageError("the postgres source needs --table or --query")
    out: queue.Queue[Any] = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()
    error: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_produce(src, out, stop))
        except BaseException as exc:
            error.append(exc)
        finally:
            out.put(_DONE)

    thread = threading.Thread(target=run, name="embedbatch-pg-source", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                break
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                out.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
    if error:
        raise error[0]
