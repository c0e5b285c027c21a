"""``run``: submit, poll until every batch is terminal, ingest, retry failures, summarise."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from embedbatch.config import IngestConfig
from embedbatch.engines.batchapi.client import BatchClient
from embedbatch.engines.batchapi.ingest import ingest_run
from embedbatch.engines.batchapi.poll import poll_pass
from embedbatch.engines.batchapi.retry import plan_retry
from embedbatch.engines.batchapi.submit import submit_run
from embedbatch.runs import RunState, load_batches
from embedbatch.workspace import RunPaths, Workspace

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
    extra: dict[str, Any] = field(default_factory=dict)


async def drive_run(
    ws: Workspace,
    client: BatchClient,
    run: RunPaths,
    *,
    poll_s: float = 10.0,
    max_attempts: int = 3,
    ingest_config: IngestConfig | None = None,
    max_enqueued_tokens: int | None = None,
    on_pass: Callable[[int], None] | None = None,
) -> RunSummary:
    """Take a planned run to the end. Interrupting leaves a resumable run (state is on disk).

    Raises:
        ProviderError: a terminal API error.
    """
    started = time.monotonic()
    summary = RunSummary(str(run.root))
    await submit_run(ws, client, run, max_enqueued_tokens=max_enqueued_tokens)
    while True:
        await poll_pass(
            ws,
            client,
            max_enqueued_tokens=max_enqueued_tokens,
            ingest=True,
            ingest_config=ingest_config,
            runs=[run],
        )
        summary.passes += 1
        if on_pass is not None:
            on_pass(summary.passes)
        rs = RunState.load(run)
        if rs.status != "active":
            plan = plan_retry(ws, run, max_attempts=max_attempts)
            if not plan.requeued:
                break
            summary.retries += plan.requeued
            log.info("retrying failed ids", run=rs.run_id, ids=plan.requeued, batches=plan.batches)
            await submit_run(ws, client, run, max_enqueued_tokens=max_enqueued_tokens)
            continue
        await anyio.sleep(poll_s)
    await ingest_run(ws, run, ingest_config)
    rs = RunState.load(run)
    batches = load_batches(run)
    from embedbatch.store.shards import Manifest

    manifest = Manifest.load(ws, rs.model, rs.dataset)
    keys = {f"{rs.run_id}/{bs.name}" for bs in batches}
    summary.embedded = sum(bs.succeeded or 0 for bs in batches if f"{rs.run_id}/{bs.name}" in keys)
    if run.failed_ids.exists():
        summary.failed = max(0, len(run.failed_ids.read_bytes().splitlines()) - 1)
    summary.usage_tokens = rs.actual.get("usage_tokens", 0)
    summary.cost_batch_usd = rs.actual.get("cost_batch_usd")
    summary.estimated_cost_batch_usd = rs.estimate.get("cost_batch_usd")
    summary.wall_s = round(time.monotonic() - started, 2)
    summary.extra = {"shards": len(manifest.shards), "dataset_rows": sum(s["rows"] for s in manifest.shards)}
    rs.timings["run_wall_s"] = summary.wall_s
    rs.save(run)
    return summary
