"""The one way every engine checks and runs its database targets (pgvector, libSQL).

- :func:`check_targets`: before anything is paid for, every engine's planning entry point asks
  whether the targets can take the model's vectors (the Batch API's :func:`plan_run`, the
  realtime and local engines), so a Python-API caller is refused as early as the CLI.
- :func:`run_sinks` / :func:`run_sinks_blocking`: write a run's committed shard rows into its
  targets, resumably (every engine, and the dead runs that :mod:`embedbatch.sinks.resume`
  finishes).

Both sinks keep their resumable bookkeeping with :class:`embedbatch.sinks.progress.SinkProgress`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from embedbatch.config import LibsqlTarget, PgTarget
from embedbatch.errors import UsageError
from embedbatch.runs import Run
from embedbatch.workspace import Workspace

__all__ = ["check_targets", "run_sinks", "run_sinks_blocking", "target_dimension"]

T = TypeVar("T")


def _blocking(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function to completion from sync code, also when the caller is itself
    inside an event loop (a notebook): then on a short-lived thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(fn)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = anyio.run(fn)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    t = threading.Thread(target=work, name="embedbatch-sink-check")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def target_dimension(model: str, dimensions: int | None, probe: Callable[[], int] | None = None) -> int:
    """The dimension of the vectors a run will write: ``dimensions`` when asked for, else the
    model's documented one (:data:`embedbatch.tokens.MODEL_DIMENSIONS`), else ``probe()`` (one
    tiny embedding request, for a model we do not know).

    Raises:
        UsageError: unknown model and no probe (pass the dimensions).
    """
    from embedbatch.tokens import MODEL_DIMENSIONS

    dim = dimensions or MODEL_DIMENSIONS.get(model)
    if dim is not None:
        return int(dim)
    if probe is None:
        raise UsageError(
            f"the dimension of {model!r} is not known here; pass dimensions so the database targets can be "
            "checked before anything is paid for"
        )
    return int(probe())


def check_targets(
    *,
    dim: int,
    pg_target: PgTarget | None = None,
    libsql_target: LibsqlTarget | None = None,
    dsn: str | None = None,
    libsql_auth_token: str | None = None,
) -> None:
    """Check that every target can take ``dim``-d vectors, before any upload or request.

    Raises:
        UsageError: a pgvector target without a DSN.
        DatabaseError: a target that does not fit (the message says what to change).
    """
    if pg_target is not None:
        from embedbatch.sinks.pgvector import check_target

        _blocking(lambda: check_target(dsn, pg_target, dim=dim))
    if libsql_target is not None:
        from embedbatch.sinks import libsql

        libsql.check_target(libsql_target.url, libsql_auth_token, libsql_target, dim=dim)


async def run_sinks(ws: Workspace, run: Run, *, dsn: str | None, libsql_auth_token: str | None) -> dict[str, Any]:
    """Write a run's shard rows into each of its targets whose step is not done; the caller
    holds the run. Returns ``{"pg": report, "libsql": report}`` for the targets it has.

    Raises:
        UsageError: a pgvector target and no DSN.
        DatabaseError: a target fails (that step is marked failed in run.json; the next ingest or
            run of the engine resumes it).
    """
    out: dict[str, Any] = {}
    if run.state.pg_target is not None:
        from embedbatch.sinks.pgvector import sink_run

        out["pg"] = await sink_run(ws, run, dsn=dsn)
    if run.state.libsql_target is not None:
        from embedbatch.sinks import libsql

        out["libsql"] = await anyio.to_thread.run_sync(lambda: libsql.sink_run(ws, run, auth_token=libsql_auth_token))
    return out


def run_sinks_blocking(ws: Workspace, run: Run, *, dsn: str | None, libsql_auth_token: str | None) -> dict[str, Any]:
    """:func:`run_sinks` for the synchronous engines (realtime, local)."""
    return _blocking(lambda: run_sinks(ws, run, dsn=dsn, libsql_auth_token=libsql_auth_token))
