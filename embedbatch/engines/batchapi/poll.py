"""Poll: refresh batches, download results, schedule planned batches under the queue budget.

One :func:`poll_pass` is what cron runs: it holds the workspace lock, skips runs another
process holds, and treats a failed batch as state, not as a crash. A batch that failed with
``token_limit_exceeded`` goes back to ``uploaded`` (its rows are not failed) and is created
again when the model's enqueued tokens leave room.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from embedbatch.config import IngestConfig
from embedbatch.engines.batchapi.client import BatchClient
from embedbatch.engines.batchapi.submit import _submit_locked, adopt_pending
from embedbatch.errors import LockedError
from embedbatch.runs import REMOTE_ACTIVE, REMOTE_TERMINAL, BatchState, RunState, load_batches
from embedbatch.workspace import RunPaths, Workspace, file_lock

__all__ = [
    "PassReport",
    "cancel_run",
    "download_batch",
    "poll_pass",
    "refresh_batch",
    "refresh_run",
    "run_totals",
]

log = structlog.get_logger(__name__)


@dataclass
class PassReport:
    """What one poll pass did."""

    runs: int = 0
    refreshed: int = 0
    downloaded: int = 0
    submitted: int = 0
    requeued: int = 0
    ingested: int = 0
    skipped_locked: list[str] = field(default_factory=list)
    active_runs: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _is_token_limit(batch: dict[str, Any]) -> bool:
    errors = (batch.get("errors") or {}).get("data") or []
    return any((e or {}).get("code") == "token_limit_exceeded" for e in errors)


async def refresh_batch(client: BatchClient, run: RunPaths, rs: RunState, bs: BatchState, *, save: bool = True) -> bool:
    """Fetch the batch object and record its status; re-queue token_limit_exceeded failures.

    Returns:
        True when the batch was re-queued.
    """
    if bs.pending is not None:
        await adopt_pending(client, run, rs, bs)
    if not bs.is_remote_active or bs.batch_id is None:
        return False
    batch = await client.retrieve_batch(bs.batch_id)
    bs.remote = batch
    bs.remote_status = batch["status"]
    counts = batch.get("request_counts") or {}
    bs.succeeded = counts.get("completed")
    bs.failed = counts.get("failed")
    bs.output_file_id = batch.get("output_file_id")
    bs.error_file_id = batch.get("error_file_id")
    requeued = False
    if batch["status"] == "failed" and _is_token_limit(batch):
        log.info("token_limit_exceeded; batch re-queued", run=rs.run_id, batch=bs.name, batch_id=bs.batch_id)
        bs.retry_of.append(bs.batch_id)
        bs.batch_id = None
        bs.attempt += 1
        bs.remote_status = None
        bs.succeeded = bs.failed = None
        bs.output_file_id = bs.error_file_id = None
        bs.set_status("uploaded")
        requeued = True
    elif batch["status"] != bs.status:
        bs.set_status(batch["status"])
        if batch["status"] == "failed":
            bs.error = "; ".join(
                f"{e.get('code')}: {e.get('message')}" for e in (batch.get("errors") or {}).get("data") or []
            )
    if save:
        bs.save(run.batch_dir(bs.name))
    return requeued


async def download_batch(client: BatchClient, run: RunPaths, bs: BatchState, *, redownload: bool = False) -> bool:
    """Stream the output and error files of a finished batch into its folder; mark downloaded."""
    if bs.status not in REMOTE_TERMINAL and not (redownload and bs.status in ("downloaded", "ingested")):
        return False
    d = run.batch_dir(bs.name)
    for file_id, name in ((bs.output_file_id, "output.jsonl"), (bs.error_file_id, "errors.jsonl")):
        if file_id and (redownload or not (d / name).exists()):
            await client.download(file_id, d / name)
    if bs.status in REMOTE_TERMINAL:
        bs.set_status("downloaded")
    bs.save(d)
    return True


def run_totals(rs: RunState, batches: list[BatchState]) -> dict[str, Any]:
    """Per-run totals from its batches (what status prints and --update-json stores)."""
    by_status: dict[str, int] = {}
    for bs in batches:
        by_status[bs.status] = by_status.get(bs.status, 0) + 1
    return {
        "batches": len(batches),
        "by_status": by_status,
        "requests": sum(bs.requests for bs in batches),
        "succeeded": sum(bs.succeeded or 0 for bs in batches),
        "failed": sum(bs.failed or 0 for bs in batches),
        "queue_tokens": sum(bs.tokens for bs in batches),
        "enqueued_tokens": sum(bs.tokens for bs in batches if bs.status in REMOTE_ACTIVE),
    }


async def refresh_run(client: BatchClient, run: RunPaths, *, save: bool) -> tuple[RunState, list[BatchState]]:
    """Refresh every non-terminal batch of a run (``status``); writes only when ``save``."""
    rs = RunState.load(run)
    batches = load_batches(run)
    for bs in batches:
        if bs.pending is not None and save:
            await adopt_pending(client, run, rs, bs)
        if bs.is_remote_active:
            await refresh_batch(client, run, rs, bs, save=save)
    if save:
        totals = run_totals(rs, batches)
        rs.counts.update({"succeeded": totals["succeeded"], "failed_remote": totals["failed"]})
        rs.actual.setdefault("status_totals", {})
        rs.actual["status_totals"] = totals
        rs.save(run)
    return rs, batches


async def poll_run(
    ws: Workspace,
    client: BatchClient,
    run: RunPaths,
    report: PassReport,
    *,
    max_enqueued_tokens: int | None,
    ingest: bool,
    ingest_config: IngestConfig | None,
    concurrency: int = 4,
) -> None:
    """One pass over one run under its lock (see :func:`poll_pass`)."""
    with file_lock(run.lock, what=f"run {run.run_id}"):
        rs = RunState.load(run)
        if rs.status != "active":
            return
        report.runs += 1
        for bs in load_batches(run):
            if bs.pending is not None or bs.is_remote_active:
                report.requeued += await refresh_batch(client, run, rs, bs)
                report.refreshed += 1
            if bs.status in REMOTE_TERMINAL:
                report.downloaded += await download_batch(client, run, bs)
        submitted = await _submit_locked(
            ws, client, run, concurrency=concurrency, max_enqueued_tokens=max_enqueued_tokens, on_batch=None
        )
        report.submitted += len(submitted)
        if ingest:
            from embedbatch.engines.batchapi.ingest import ingest_run_locked

            result = await ingest_run_locked(ws, run, ingest_config or IngestConfig())
            report.ingested += result.batches
        batches = load_batches(run)
        rs = RunState.load(run)
        totals = run_totals(rs, batches)
        rs.actual["status_totals"] = totals
        finished = all(bs.status in ("ingested", "cancelled") for bs in batches)
        if finished:
            rs.status = "finished"
        else:
            report.active_runs += 1
        rs.save(run)


async def poll_pass(
    ws: Workspace,
    client: BatchClient,
    *,
    max_enqueued_tokens: int | None = None,
    ingest: bool = False,
    ingest_config: IngestConfig | None = None,
    runs: list[RunPaths] | None = None,
) -> PassReport:
    """One cron pass over every active run of the workspace.

    Raises:
        LockedError: another poll holds the workspace lock.
    """
    report = PassReport()
    with file_lock(ws.lock, what="workspace"):
        for run in runs if runs is not None else ws.all_runs():
            try:
                await poll_run(
                    ws,
                    client,
                    run,
                    report,
                    max_enqueued_tokens=max_enqueued_tokens,
                    ingest=ingest,
                    ingest_config=ingest_config,
                )
            except LockedError:
                report.skipped_locked.append(run.run_id)
                log.info("run locked by another process; skipped", run=run.run_id)
    return report


async def cancel_run(client: BatchClient, run: RunPaths) -> list[BatchState]:
    """Cancel the run's active batches at the provider; planned ones are cancelled locally."""
    with file_lock(run.lock, what=f"run {run.run_id}"):
        rs = RunState.load(run)
        batches = load_batches(run)
        for bs in batches:
            if bs.pending is not None:
                await adopt_pending(client, run, rs, bs)
            if bs.is_remote_active and bs.batch_id:
                batch = await client.cancel_batch(bs.batch_id)
                bs.remote = batch
                bs.remote_status = batch["status"]
                bs.set_status(batch["status"])
            elif bs.status in ("planned", "uploaded"):
                bs.set_status("cancelled")
                bs.pending = None
            bs.save(run.batch_dir(bs.name))
        return batches
