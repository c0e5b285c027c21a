"""Nearest rows in a libSQL (Turso) table by cosine distance, through its vector index when
there is one."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedbatch.config import LibsqlTarget
from embedbatch.db.sql import quote_ident
from embedbatch.errors import DatabaseError
from embedbatch.sinks.libsql import connect, inspect_table

__all__ = ["nearest"]


def nearest(
    url: str,
    auth_token: str | None,
    *,
    table: str,
    id_column: str,
    vector_column: str,
    text_column: str | None,
    query: np.ndarray,
    k: int,
) -> tuple[list[dict[str, Any]], str]:
    """The k rows nearest to ``query`` by cosine distance; score = 1 − distance.

    Uses the column's ``libsql_vector_idx`` index through ``vector_top_k`` when there is one,
    an exact scan with ``vector_distance_cos`` otherwise.

    Returns:
        ``(hits, how)`` where ``how`` is ``"index NAME"`` or ``"exact scan"``.

    Raises:
        DatabaseError: the table does not fit the query.
    """
    target = LibsqlTarget(url=url, table=table, id_column=id_column, vector_column=vector_column)
    conn = connect(url, auth_token)
    try:
        info = inspect_table(conn, target)
        if info is None:
            raise DatabaseError(f"table {table!r} does not exist in {url}")
        if info.dim != len(query):
            raise DatabaseError(f"{table}.{vector_column} is F32_BLOB({info.dim}) but the query has {len(query)} dims")
        blob = query.astype("<f4").tobytes()
        t, idc, vc = quote_ident(table), quote_ident(id_column), quote_ident(vector_column)
        text = f"t.{quote_ident(text_column)}" if text_column else "NULL"
        if info.indexes:
            name = info.indexes[0][0]
            sql = (
                f"SELECT t.{idc}, {text}, vector_distance_cos(t.{vc}, ?) FROM vector_top_k(?, ?, ?) AS v "
                f"JOIN {t} AS t ON t.rowid = v.id ORDER BY 3"
            )
            rows = conn.execute(sql, (blob, name, blob, k)).fetchall()
            how = f"index {name}"
        else:
            sql = (
                f"SELECT t.{idc}, {text}, vector_distance_cos(t.{vc}, ?) AS d FROM {t} AS t "
                f"WHERE t.{vc} IS NOT NULL ORDER BY d LIMIT ?"
            )
            rows = conn.execute(sql, (blob, k)).fetchall()
            how = "exact scan"
    except DatabaseError:
        raise
    except Exception as exc:
        raise DatabaseError(f"searching libSQL table {table!r}: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    return [{"id": str(r[0]), "text": r[1], "score": 1.0 - float(r[2])} for r in rows], how
