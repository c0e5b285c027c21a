"""Vector indexes (HNSW, IVFFlat) on a pgvector target column, around a bulk write.

An index on the target column makes every written row a graph insert (80–100 rows/s measured
here against ~26k without); the pgvector sink detects one before writing and, with
``rebuild_index``, drops it and recreates it with its own definition afterwards
(:func:`rebuild`). The dropped definitions are saved in run.json first, so a process that dies
in between has them recreated by the next pass (:func:`recreate_missing_indexes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from embedbatch.config import PgTarget
from embedbatch.db.pg import connect, quote_ident, quote_table, translate_error

__all__ = [
    "INDEXED_ROWS_PER_S",
    "REBUILD_WORTH_FRACTION",
    "VectorIndex",
    "index_schema",
    "rebuild",
    "recreate_missing_indexes",
]

# Measured on this machine (2 cores, PostgreSQL 18, pgvector 0.8.6, 1536-d): rows/s written
# into a column that carries an HNSW index; used only to print the expected time.
INDEXED_ROWS_PER_S = 90
# Rebuilding is worth it once more than this share of the table's rows is written (pgvector
# build vs. insert cost measured here).
REBUILD_WORTH_FRACTION = 0.15


@dataclass(frozen=True)
class VectorIndex:
    """An HNSW/IVFFlat index on the target column: name, access method, ``CREATE INDEX`` text."""

    name: str
    method: str
    definition: str


def _maintenance_work_mem_kb(rows: int, dim: int) -> int:
    """pgvector's rule of thumb for index builds: rows × (8 + 4·dims) × 1.3 bytes, in kB."""
    return max(65_536, int(rows * (8 + 4 * dim) * 1.3 / 1024))


async def rebuild(conn: Any, target: PgTarget, indexes: list[VectorIndex], dim: int, rows: int) -> list[str]:
    """Recreate dropped indexes with their original definitions (CONCURRENTLY if asked)."""
    done = []
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    await conn.execute(f"SET maintenance_work_mem = '{_maintenance_work_mem_kb(rows, dim)}kB'")
    await conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
    # Postgres plans build workers from the heap size, which stays tiny because vectors are
    # stored out of line (TOAST), so set parallel_workers on the table explicitly.
    await conn.execute(f"ALTER TABLE {quote_table(target.table)} SET (parallel_workers = {workers})")
    for idx in indexes:
        sql = idx.definition
        if target.concurrently:
            sql = sql.replace("CREATE INDEX ", "CREATE INDEX CONCURRENTLY ", 1)
        await conn.execute(sql)
        done.append(idx.name)
    return done


async def recreate_missing_indexes(dsn: str, definitions: list[dict[str, str]]) -> list[str]:
    """Recreate the saved indexes (``name``, ``definition``) that do not exist; returns their names.

    Raises:
        DatabaseError: PostgreSQL fails.
    """
    created = []
    async with connect(dsn) as conn:
        for d in definitions:
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", quote_ident(d["name"]))
            if not exists:
                try:
                    await conn.execute(d["definition"])
                except Exception as exc:
                    raise translate_error(exc, f"recreating index {d['name']!r}") from exc
                created.append(d["name"])
    return created


def index_schema(idx: VectorIndex, target: PgTarget) -> str:
    """The index name, schema-qualified like the table when the table is."""
    parts = target.table.split(".")
    return f"{parts[0]}.{idx.name}" if len(parts) == 2 else idx.name
