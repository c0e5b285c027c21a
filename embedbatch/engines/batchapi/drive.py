"""``run``: submit, poll until every batch is terminal, ingest, retry failures, summarise."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog

from embedbatch.config import IngestConfig
from embedbatch.engines.batchapi.ingest import ingest_locked
from embedbatch.engines.batchapi.poll import poll_every, poll_pass
from embedbatch.engines.batchapi.retry import plan_retry_locked
from embedbatch.engines.batchapi.submit import submit_run
from embedbatch.runs import Run
from embedbatch.store.manifest import Manifest
from embedbatch.workspace import RunPaths, Workspace

if TYPE_CHECKING:  # the SDK is imported only by the commands that call the provider
    from embedbatch.api.openai import BatchClient

__all__ = ["RunSummary", "drive_run"]

log = structlog.get_logger(__name__)


@dataclass
class RunSummary:
    """The end of a ``run``: rows embedded, failed, tokens, cost (USD) and wall time (s)."""

    run_dir: str
    embedded: int = 0
    failed: int = 0
    usage_tokens: int = 0
    cost_batch_usd: float | None = None
    estimated_cost_batch_usd: float | None = None
    wall_s: float = 0.0
    retries: int = 0
    passes: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


async def drive_run(
    ws: Workspace,
    client: BatchClient,
    paths: RunPaths,
    *,
    poll_s: float = 10.0,
    max_attempts: int = 3,
    ingest_config: IngestConfig | None = None,
    max_enqueued_tokens: int | None = None,
    on_pass: Callable[[int], None] | None = None,
) -> RunSummary:
    """Take a planned run to the end. Interrupting leaves a resumable run (state is on disk).

    Waits (up to the workspace's ``lock_timeout_s``) when a cron poll holds the workspace or
    the run, instead of failing: both make the same progress.

    Raises:
        ProviderError: a terminal API error.
        LockedError: a lock stayed busy past the timeout.
    """
    started = time.monotonic()
    wait_s = ws.lock_timeout_s
    cfg = ingest_config or IngestConfig()
    summary = RunSummary(str(paths.root))
    await submit_run(ws, client, paths, max_enqueued_tokens=max_enqueued_tokens, wait_s=wait_s)

    async def one_pass() -> Literal["done", "again", "wait"]:
        await poll_pass(
            ws,
            client,
            max_enqueued_tokens=max_enqueued_tokens,
            ingest=True,
            ingest_config=cfg,
            runs=[paths],
            wait_s=wait_s,
            isolate=False,
        )
        summary.passes += 1
        if on_pass is not None:
            on_pass(summary.passes)
        with Run.open(paths, wait_s=wait_s, purpose="run") as run:
            if run.state.status == "active":
                return "wait"
            plan = plan_retry_locked(ws, run, max_attempts=max_attempts)
            if not plan.requeued:
                return "done"
            summary.retries += plan.requeued
            log.info("retrying failed ids", run=run.run_id, ids=plan.requeued, batches=plan.batches)
        await submit_run(ws, client, paths, max_enqueued_tokens=max_enqueued_tokens, wait_s=wait_s)
        return "again"

    await poll_every(poll_s, one_pass)
    with Run.open(paths, wait_s=wait_s, purpose="run") as run:
        await ingest_locked(ws, run, cfg)
        rs = run.state
        manifest = Manifest.load(ws, rs.model, rs.dataset)
        summary.embedded = sum(bs.succeeded or 0 for bs in run.batches if bs.status == "ingested")
        summary.failed = rs.failed_rows
        summary.failed_reasons = dict(rs.failed_reasons)
        summary.usage_tokens = rs.actual.get("usage_tokens", 0)
        summary.cost_batch_usd = rs.actual.get("cost_batch_usd")
        summary.estimated_cost_batch_usd = rs.estimate.get("cost_batch_usd")
        summary.wall_s = round(time.monotonic() - started, 2)
        summary.extra = {"shards": len(manifest.shards), "dataset_rows": manifest.current_rows}
        rs.timings["run_wall_s"] = summary.wall_s
        run.save()
    return summary
