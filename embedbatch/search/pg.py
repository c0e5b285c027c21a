"""Nearest rows in a PostgreSQL table by pgvector's cosine distance."""

from __future__ import annotations

from typing import Any

import numpy as np

from embedbatch.config import PgTarget
from embedbatch.db.pg import connect, quote_ident, quote_table
from embedbatch.errors import DatabaseError
from embedbatch.sinks.pgvector import inspect_target

__all__ = ["nearest"]


async def nearest(
    dsn: str, *, table: str, id_column: str, vector_column: str, text_column: str | None, query: np.ndarray, k: int
) -> list[dict[str, Any]]:
    """The k rows nearest to ``query`` by cosine distance (``<=>``); score = 1 − distance."""
    target = PgTarget(table=table, id_column=id_column, vector_column=vector_column)
    async with connect(dsn) as conn:
        info = await inspect_target(conn, target)
        if info.dim != len(query):
            raise DatabaseError(f"column is {info.kind}({info.dim}) but the query has {len(query)} dims")
        cast = "::halfvec" if info.kind == "halfvec" else ""
        text_sql = f", {quote_ident(text_column)}::text AS text" if text_column else ", NULL AS text"
        sql = (
            f"SELECT {quote_ident(id_column)}::text AS id{text_sql}, "
            f"1 - ({quote_ident(vector_column)} <=> $1{cast}) AS score FROM {quote_table(table)} "
            f"WHERE {quote_ident(vector_column)} IS NOT NULL "
            f"ORDER BY {quote_ident(vector_column)} <=> $1{cast} LIMIT $2"
        )
        rows = await conn.fetch(sql, query.astype(np.float32), k)
    return [{"id": r["id"], "text": r["text"], "score": float(r["score"])} for r in rows]
