"""The one asyncpg boundary: connections with the pgvector codecs, identifier quoting,
translation of driver errors into :class:`~embedbatch.errors.DatabaseError` with context, and
migrations. Sources, sinks and search import PostgreSQL only through here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from embedbatch.config import redact_dsn
from embedbatch.db.sql import quote_ident
from embedbatch.errors import DatabaseError, UsageError

__all__ = ["MIGRATIONS", "apply_migrations", "connect", "quote_ident", "quote_table", "translate_error"]

MIGRATIONS = Path(__file__).with_name("migrations")  # shipped inside the package (a wheel has them)


def quote_table(name: str) -> str:
    """A table name, optionally ``schema.table`` (exactly one dot), quoted part by part."""
    parts = name.split(".")
    if len(parts) == 2 and all(parts):
        return f"{quote_ident(parts[0])}.{quote_ident(parts[1])}"
    return quote_ident(name)


def translate_error(exc: Exception, what: str) -> DatabaseError:
    """A driver error as a :class:`DatabaseError` that says what was being done (most specific first)."""
    import asyncpg

    if isinstance(exc, asyncpg.UndefinedTableError):
        return DatabaseError(f"{what}: table does not exist ({exc})")
    if isinstance(exc, asyncpg.UndefinedColumnError):
        return DatabaseError(f"{what}: column does not exist ({exc})")
    if isinstance(exc, asyncpg.PostgresError):
        return DatabaseError(f"{what}: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, OSError):
        return DatabaseError(f"{what}: cannot connect ({exc})")
    return DatabaseError(f"{what}: {exc}")


@asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[Any]:
    """An asyncpg connection with the pgvector binary codecs registered.

    Raises:
        DatabaseError: cannot connect, or the ``vector`` extension is missing.
    """
    import asyncpg
    from pgvector.asyncpg import register_vector

    try:
        conn = await asyncpg.connect(dsn)
    except Exception as exc:
        raise DatabaseError(f"cannot connect to {redact_dsn(dsn)}: {exc}") from exc
    try:
        try:
            await register_vector(conn)
        except Exception as exc:
            raise DatabaseError(f"the vector extension is not installed in {redact_dsn(dsn)}: {exc}") from exc
        yield conn
    finally:
        await conn.close()


async def apply_migrations(dsn: str, directory: Path) -> list[str]:
    """Run every ``*.sql`` file of ``directory`` in name order, each in one transaction.

    Returns:
        The file names applied.

    Raises:
        DatabaseError: a statement fails (naming the file).
    """
    import asyncpg

    files = sorted(Path(directory).glob("*.sql"))
    if not files:
        raise UsageError(f"no *.sql files in {directory}")
    try:
        conn = await asyncpg.connect(dsn)
    except Exception as exc:
        raise DatabaseError(f"cannot connect to {redact_dsn(dsn)}: {exc}") from exc
    try:
        for f in files:
            try:
                async with conn.transaction():
                    await conn.execute(f.read_text(encoding="utf-8"))
            except asyncpg.PostgresError as exc:
                raise DatabaseError(f"{f.name}: {exc}") from exc
    finally:
        await conn.close()
    return [f.name for f in files]
