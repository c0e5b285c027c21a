"""Poll: refresh batches, download results, schedule planned batches under the queue budget.

One :func:`poll_pass` is what cron runs: it holds the workspace lock, skips runs another
process holds, and treats a failed batch as state, not as a crash. Poll is the only stage that
downloads output and error files (``ingest --redownload`` asks it to, through
:func:`download_run`). A batch that failed with
``token_limit_exceeded`` goes back to ``uploaded`` (its rows are not failed) and is created
again when the model's enqueued tokens leave room.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import anyio
import structlog

from embedbatch.config import IngestConfig
from embedbatch.engines.batchapi.ingest import ingest_locked
from embedbatch.engines.batchapi.submit import adopt_pending, submit_locked
from embedbatch.errors import EmbedbatchError, LockedError, ProviderError
from embedbatch.runs import REMOTE_TERMINAL, BatchState, OpenRuns, Run
from embedbatch.workspace import RunPaths, Workspace, crash_point, file_lock, utc_now

if TYPE_CHECKING:  # the SDK is imported only by the commands that call the provider
    from embedbatch.api.openai import BatchClient

__all__ = [
    "PassReport",
    "cancel_run",
    "download_batch",
    "download_run",
    "poll_every",
    "poll_pass",
    "redownload_run",
    "refresh_batch",
    "refresh_for_status",
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
    failed_runs: list[str] = field(default_factory=list)
    backed_off: list[str] = field(default_factory=list)
    finished_with_failures: list[str] = field(default_factory=list)  # run dirs this pass finished

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _token_limit(batch: dict[str, Any]) -> int | None:
    """For a batch failed with ``token_limit_exceeded``: the limit its message states (0 when it
    states none); None for any other failure."""
    for e in (batch.get("errors") or {}).get("data") or []:
        if (e or {}).get("code") == "token_limit_exceeded":
            m = re.search(r"Limit: ([\d,]+)", str(e.get("message") or ""))
            return int(m.group(1).replace(",", "")) if m else 0
    return None


def _can_requeue(run: Run, bs: BatchState, limit: int, max_requeues: int) -> bool:
    """Whether a batch refused for queue space may be created again. It may not when it can
    never fit (its own tokens exceed the organization's limit) or after ``max_requeues``; then
    it stays failed with the reason, its rows are failed at ingest, and ``retry`` plans them
    again in batches cut to the limit (recorded in the run's limits)."""
    # The tokenizer's count decides "never": the queue-token figure (bytes/4 when larger) is a
    # scheduling margin, and a batch it overstates may still fit the provider's own count.
    real = bs.tokenizer_tokens or bs.tokens
    if limit and real > limit:
        bs.error = (
            f"batch of {real:,} tokens can never fit the organization's enqueued-token limit "
            f"of {limit:,}; its rows are failed and `retry` plans them in smaller batches"
        )
        run.state.limits["max_enqueued_tokens"] = min(limit, run.state.limits.get("max_enqueued_tokens") or limit)
        run.state.max_enqueued_tokens = run.state.limits["max_enqueued_tokens"]
        run.save()
        return False
    if bs.attempt >= max_requeues:
        bs.error = f"refused with token_limit_exceeded {bs.attempt + 1} times; its rows are failed"
        return False
    return True


async def refresh_batch(client: BatchClient, run: Run, bs: BatchState, *, save: bool = True) -> bool:
    """Fetch the batch object and record its status; re-queue token_limit_exceeded failures.

    Args:
        save: write batch.json (needs the run lock); False only updates the object (status).

    Returns:
        True when the batch was re-queued.
    """
    if bs.pending is not None and save:
        await adopt_pending(client, run, bs)
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
    limit = _token_limit(batch) if batch["status"] == "failed" else None
    if limit is not None and _can_requeue(run, bs, limit, client.policy.max_requeues):
        wait_s = min(3600.0, client.policy.requeue_s * 2 ** min(bs.attempt, 16))
        log.info("token_limit_exceeded; batch re-queued", run=run.run_id, batch=bs.name, wait_s=wait_s)
        bs.retry_of.append(bs.batch_id)
        bs.batch_id = None
        bs.attempt += 1
        bs.remote_status = None
        bs.succeeded = bs.failed = None
        bs.output_file_id = bs.error_file_id = None
        bs.not_before = (utc_now() + timedelta(seconds=wait_s)).isoformat()
        bs.set_status("uploaded")
        requeued = True
    elif batch["status"] != bs.status:
        bs.set_status(batch["status"])
        if batch["status"] == "failed" and limit is None:  # (a refused re-queue set its own reason)
            bs.error = "; ".join(
                f"{e.get('code')}: {e.get('message')}" for e in (batch.get("errors") or {}).get("data") or []
            )
    if save:
        run.save_batch(bs)
    return requeued


async def download_batch(client: BatchClient, run: Run, bs: BatchState, *, redownload: bool = False) -> bool:
    """Stream the output and error files of a finished batch into its folder; mark downloaded.

    Args:
        redownload: fetch the files again for a batch already downloaded or ingested.
    """
    if bs.status not in REMOTE_TERMINAL and not (redownload and bs.status in ("downloaded", "ingested")):
        return False
    d = run.batch_dir(bs)
    for file_id, name in ((bs.output_file_id, "output.jsonl"), (bs.error_file_id, "errors.jsonl")):
        if file_id and (redownload or not (d / name).exists()):
            try:
                await client.download(file_id, d / name)
            except ProviderError as exc:
                if exc.status_code != 404:
                    raise
                # Gone at the provider (expired or deleted): its rows fail with this reason at
                # ingest, and `retry` plans them again, instead of the run stalling for good.
                bs.error = f"{name} {file_id} is no longer at the provider (404); its rows are failed"
                log.warning("file gone at the provider", run=run.run_id, batch=bs.name, file=file_id)
    if bs.status in REMOTE_TERMINAL:
        bs.set_status("downloaded")
    run.save_batch(bs)
    return True


async def download_run(client: BatchClient, run: Run, *, redownload: bool = False) -> int:
    """Download every finished batch of a run (again, with ``redownload``). Returns the count."""
    n = 0
    for bs in run.batches:
        n += await download_batch(client, run, bs, redownload=redownload)
    return n


async def redownload_run(client: BatchClient, paths: RunPaths) -> int:
    """``ingest --redownload``: fetch every finished batch's files again, under the run lock."""
    with Run.open(paths, purpose="redownload") as run:
        return await download_run(client, run, redownload=True)


async def refresh_for_status(client: BatchClient, paths: RunPaths, *, update: bool) -> tuple[Run, bool]:
    """Refresh every non-terminal batch of a run for ``status``.

    With ``update`` the run lock is taken and the refreshed state written; when another process
    (a poll) holds the run, nothing is written (its state is newer than ours could be).

    Returns:
        ``(run, written)``.
    """
    if update:
        try:
            with Run.open(paths, purpose="status --update-json") as run:
                for bs in run.batches:
                    if bs.pending is not None or bs.is_remote_active:
                        await refresh_batch(client, run, bs)
                run.state.actual["status_totals"] = run.totals()
                run.state.counts.update({"succeeded": run.state.actual["status_totals"]["succeeded"]})
                run.save()
                return run, True
        except LockedError:
            log.info("run is held by another process; status not written", run=paths.run_id)
    run = Run.read(paths)
    for bs in run.batches:
        if bs.is_remote_active:
            await refresh_batch(client, run, bs, save=False)
    return run, False


async def poll_run(
    ws: Workspace,
    client: BatchClient,
    paths: RunPaths,
    report: PassReport,
    *,
    max_enqueued_tokens: int | None,
    ingest: bool,
    ingest_config: IngestConfig | None,
    concurrency: int = 4,
    wait_s: float | None = None,
    queue_of_others: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """One pass over one run under its lock (see :func:`poll_pass`): the run is loaded once.

    Returns:
        The run's queue after the pass (tokens, requests the provider holds), which the pass
        counts for the runs after it.
    """
    with Run.open(paths, wait_s=wait_s, purpose="poll") as run:
        if run.state.kind != "batchapi" or run.state.status != "active":
            return run.queue()
        report.runs += 1
        for bs in run.batches:
            if bs.pending is not None or bs.is_remote_active:
                report.requeued += await refresh_batch(client, run, bs)
                report.refreshed += 1
            if bs.status in REMOTE_TERMINAL:
                report.downloaded += await download_batch(client, run, bs)
        submitted = await submit_locked(
            ws,
            client,
            run,
            concurrency=concurrency,
            max_enqueued_tokens=max_enqueued_tokens,
            queue_of_others=queue_of_others,
        )
        report.submitted += len(submitted)
        if ingest:
            cfg = ingest_config or IngestConfig()
            result = await ingest_locked(ws, run, cfg)
            report.ingested += result.batches
            if cfg.delete_files:
                from embedbatch.engines.batchapi.clean import CleanReport, clean_batch

                cleaned = CleanReport()
                for bs in run.batches:
                    await clean_batch(client, run, bs, cleaned)
        crash_point("poll_before_save")
        run.state.failure = None
        run.settle()
        if run.state.status == "active":
            report.active_runs += 1
        elif run.state.failed_rows:
            report.finished_with_failures.append(str(run.paths.root))
        run.save()
        return run.queue()


async def poll_pass(
    ws: Workspace,
    client: BatchClient,
    *,
    max_enqueued_tokens: int | None = None,
    ingest: bool = False,
    ingest_config: IngestConfig | None = None,
    runs: list[RunPaths] | None = None,
    wait_s: float | None = None,
    isolate: bool = True,
) -> PassReport:
    """One cron pass over every active run of the workspace, found in the open-runs index:
    each active run's state is read once (under its lock), finished runs not at all.

    Args:
        runs: only these runs (``embedbatch run``); default every run.
        wait_s: how long to wait for the workspace lock and each run lock (None: skip at once).
        isolate: a run that fails is recorded on the run (``failure``, with back-off) and the
            pass goes on with the others; False re-raises (``embedbatch run`` watching one run).

    Raises:
        LockedError: another poll holds the workspace lock.
    """
    report = PassReport()
    with file_lock(ws.lock, what="workspace", timeout_s=wait_s, purpose="poll"):
        # The open-runs index, read once: finished runs are never opened, and each model's
        # queue is summed once here and kept up to date as the pass changes it.
        index = OpenRuns.entries(ws)
        entries = [e for e in index if e.kind == "batchapi" and e.status == "active"]
        if runs is not None:
            wanted = {r.root for r in runs}
            entries = [e for e in entries if e.paths.root in wanted]
        queue = {e.paths.root: (e.model, e.queue_tokens, e.queue_requests) for e in index}
        for entry in entries:
            paths = entry.paths
            if isolate and entry.retry_after and entry.retry_after > utc_now().isoformat():
                report.backed_off.append(paths.run_id)
                continue
            others = [(t, r) for root, (m, t, r) in queue.items() if m == entry.model and root != paths.root]
            try:
                tokens, requests = await poll_run(
                    ws,
                    client,
                    paths,
                    report,
                    max_enqueued_tokens=max_enqueued_tokens,
                    ingest=ingest,
                    ingest_config=ingest_config,
                    wait_s=wait_s,
                    queue_of_others=(sum(t for t, _ in others), sum(r for _, r in others)),
                )
                queue[paths.root] = (entry.model, tokens, requests)
            except LockedError:
                report.skipped_locked.append(paths.run_id)
                log.info("run locked by another process; skipped", run=paths.run_id)
            except Exception as exc:
                if not isolate:
                    raise
                # One broken run must not stop cron from serving the others.
                report.failed_runs.append(paths.run_id)
                _record_failure(paths, exc)
    return report


async def poll_every(interval_s: float, one_pass: Callable[[], Awaitable[Literal["done", "again", "wait"]]]) -> None:
    """Call ``one_pass`` until it returns ``done``: after ``wait``, sleep what is left of
    ``interval_s`` seconds once the pass's own time is taken off; after ``again``, go on at once.
    The one loop behind ``poll --watch`` and :func:`embedbatch.engines.batchapi.drive.drive_run`."""
    while True:
        started = time.monotonic()
        outcome = await one_pass()
        if outcome == "done":
            return
        if outcome == "wait":
            await anyio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


def _record_failure(paths: RunPaths, exc: Exception) -> None:
    """Note the error on the run, with an exponential back-off (1 min doubling to 1 h)."""
    try:
        with Run.open(paths, purpose="poll: record failure") as run:
            attempts = int((run.state.failure or {}).get("attempts", 0)) + 1
            delay_s = min(3600, 60 * 2 ** (attempts - 1))
            now = utc_now()
            run.state.failure = {
                "error": f"{type(exc).__name__}: {exc}",
                "at": now.isoformat(),
                "attempts": attempts,
                "retry_after": (now + timedelta(seconds=delay_s)).isoformat(),
            }
            run.save()
            log.warning("run failed; other runs go on", run=paths.run_id, attempts=attempts, error=str(exc))
    except LockedError:
        log.warning("run failed and is now held by another process", run=paths.run_id, error=str(exc))


async def cancel_run(client: BatchClient, paths: RunPaths, *, wait_s: float | None = None) -> list[tuple[str, str]]:
    """Cancel every batch of the run that can still run or bill: each one is refreshed first
    (local state may be stale), planned and uploaded ones are cancelled locally, and an error on
    one batch is reported and does not stop the others.

    Returns:
        ``(batch name, outcome)`` per batch: its status after the call, or the error.

    Args:
        wait_s: how long to wait for a run lock another process holds (None: fail at once).

    Raises:
        LockedError: another process holds the run (past ``wait_s``).
    """
    outcomes: list[tuple[str, str]] = []
    with Run.open(paths, wait_s=wait_s, purpose="cancel") as run:
        for bs in run.batches:
            try:
                if bs.pending is not None:
                    await adopt_pending(client, run, bs)
                if bs.is_remote_active and bs.batch_id:
                    await refresh_batch(client, run, bs)
                if bs.is_remote_active and bs.batch_id:
                    batch = await client.cancel_batch(bs.batch_id)
                    bs.remote = batch
                    bs.remote_status = batch["status"]
                    bs.set_status(batch["status"])
                elif bs.status in ("planned", "uploaded"):
                    bs.set_status("cancelled")
                    bs.pending = None
                run.save_batch(bs)
                outcomes.append((bs.name, bs.status))
            except EmbedbatchError as exc:
                log.warning("cancel failed for one batch; going on", run=run.run_id, batch=bs.name, error=str(exc))
                outcomes.append((bs.name, f"error: {exc}"))
        run.settle()
        run.save()
    return outcomes
