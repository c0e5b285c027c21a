"""Finish the database writes of streaming runs (realtime, local) whose process died.

A realtime or local run commits shards as it goes and writes them into its pgvector/libSQL
targets at the end. When its process is killed, the committed rows are in the store (the next
run skips them) but not in the targets. The next run of the same engine, model and dataset
calls :func:`finish_dead_runs` after its own sink step: every earlier run of the dataset whose
sink step is not done and whose lock is free (its process is gone) writes its committed rows
now, resumably, from the stored vectors; no provider call. Such runs are open, so the
open-runs index finds them without reading the dataset's finished runs.
"""

from __future__ import annotations

from typing import Any

import structlog

from embedbatch.errors import LockedError
from embedbatch.runs import OpenRuns, Run
from embedbatch.sinks.runner import run_sinks_blocking
from embedbatch.workspace import RunPaths, Workspace

__all__ = ["finish_dead_runs"]

log = structlog.get_logger(__name__)


def finish_dead_runs(
    ws: Workspace, current: RunPaths, result: Any, *, kind: str, dsn: str | None, libsql_auth_token: str | None
) -> dict[str, dict[str, Any]]:
    """Write the committed rows of dead ``kind`` runs of ``current``'s dataset into their targets.

    Args:
        current: the run now in progress (left alone).
        result: the current run's result; its ``pg``/``libsql`` reports get
            ``written_for_interrupted_runs`` (rows written now for dead runs) when there are any.
        dsn / libsql_auth_token: how to reach the targets (never stored).

    Returns:
        run id → ``{"pg": report, "libsql": report}`` for each run finished now.

    Raises:
        DatabaseError: a target still fails (the run records it and the next run tries again).
    """
    done: dict[str, dict[str, Any]] = {}
    model, dataset = current.root.parent.parent.name, current.root.parent.name
    for entry in OpenRuns.entries(ws, model, dataset):
        if entry.paths.root == current.root or entry.kind != kind:
            continue
        rs = Run.read_state(entry.paths)
        if rs is None or not rs.sinks_pending:
            continue
        try:
            with Run.open(entry.paths, purpose=f"{kind}: finish a dead run's sinks") as run:
                out = run_sinks_blocking(ws, run, dsn=dsn, libsql_auth_token=libsql_auth_token)
                done[rs.run_id] = out
                log.info("finished a dead run's database writes", run=rs.run_id, **out)
        except LockedError:
            continue  # its process is alive (another engine's run): it finishes its own sinks
    for name in ("pg", "libsql"):
        written = sum(int((r.get(name) or {}).get("written", 0)) for r in done.values())
        if written:
            getattr(result, name)["written_for_interrupted_runs"] = written
    return done
