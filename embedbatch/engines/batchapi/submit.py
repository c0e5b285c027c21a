"""Submit: upload input files and create batches, crash-safely, under the queue budget.

Every remote call is bracketed by state writes: ``pending`` is saved before the call and the
result after. A process killed in between leaves ``pending`` set; the next ``submit --resume``,
``poll`` or ``status --update-json`` looks the file up by its name, or the batch by its
metadata, and adopts it instead of calling again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from embedbatch.runs import BatchState, OpenRuns, Run, RunState, crash_point
from embedbatch.workspace import RunPaths, Workspace, utc_now

if TYPE_CHECKING:  # the SDK is imported only by the commands that call the provider
    from embedbatch.api.openai import BatchClient

__all__ = [
    "MAX_ENQUEUED_REQUESTS",
    "adopt_pending",
    "enqueued",
    "run_key",
    "submit_locked",
    "submit_run",
]

log = structlog.get_logger(__name__)


def run_key(rs: RunState) -> str:
    """The run's name at the provider: ``{model}/{dataset}/{run_id}`` (unique in a workspace)."""
    return f"{rs.model}/{rs.dataset}/{rs.run_id}"


def upload_filename(rs: RunState, bs: BatchState) -> str:
    """The input file's name at the provider; resume and retries find an upload by it.

    Model and dataset names are reduced to ``[A-Za-z0-9._-]`` (a name with quotes or slashes
    would come back from the provider spelled differently), and a hash of the exact run key keeps
    two such names apart.
    """
    digest = hashlib.sha256(f"{run_key(rs)}/{bs.name}".encode()).hexdigest()[:12]
    return f"embedbatch__{_slug(rs.model)}__{_slug(rs.dataset)}__{rs.run_id}__{bs.name}__{digest}.jsonl"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:60] or "-"


def batch_metadata(rs: RunState, bs: BatchState) -> dict[str, str]:
    """Metadata sent with the batch; resume finds a created batch by it."""
    meta = dict(rs.metadata)
    meta.update({"embedbatch_run": run_key(rs), "embedbatch_batch": bs.name, "embedbatch_attempt": str(bs.attempt)})
    return meta


# Requests of one model an organisation may have enqueued in the Batch API at once, for
# /v1/embeddings (Batch API guide, rate limits, 2026), beside the enqueued-token limit.
MAX_ENQUEUED_REQUESTS = 1_000_000


def enqueued(ws: Workspace, model: str, *, exclude: RunPaths | None = None) -> tuple[int, int]:
    """Queue tokens and requests of this model's batches that the provider holds now,
    workspace-wide, from the open-runs index (finished runs hold none): ``(tokens, requests)``.

    Args:
        exclude: leave this run out (its caller counts it from the batches it holds).
    """
    tokens = requests = 0
    for e in OpenRuns.entries(ws, model):
        if e.kind == "batchapi" and (exclude is None or e.paths.root != exclude.root):
            tokens += e.queue_tokens
            requests += e.queue_requests
    return tokens, requests


async def adopt_pending(client: BatchClient, run: Run, bs: BatchState) -> bool:
    """Resolve a remote call that a crash interrupted, without calling again.

    Returns:
        True if the upload or batch was found at the provider and recorded.
    """
    rs = run.state
    if bs.pending == "upload":
        found = await client.find_file(upload_filename(rs, bs))
        if found is None:
            return False
        bs.file_id = found["id"]
        bs.pending = None
        bs.set_status("uploaded")
        run.save_batch(bs)
        log.info("adopted upload", run=rs.run_id, batch=bs.name, file_id=bs.file_id)
        return True
    if bs.pending == "create":
        found = await client.find_batch(batch_metadata(rs, bs))
        if found is None:
            return False
        _record_created(bs, found)
        run.save_batch(bs)
        log.info("adopted batch", run=rs.run_id, batch=bs.name, batch_id=bs.batch_id)
        return True
    return False


def _record_created(bs: BatchState, batch: dict[str, Any]) -> None:
    bs.batch_id = batch["id"]
    bs.remote = batch
    bs.remote_status = batch["status"]
    bs.pending = None
    bs.set_status("submitted")


async def submit_batch(client: BatchClient, run: Run, bs: BatchState) -> None:
    """Take one batch from planned (or uploaded) to submitted, crash-safely."""
    rs = run.state
    d = run.batch_dir(bs)
    if bs.pending is not None:
        await adopt_pending(client, run, bs)
    if bs.status == "planned":
        bs.pending = "upload"
        run.save_batch(bs)
        crash_point("before_upload")
        expires_s = rs.file_expiry_days * 86_400 if rs.file_expiry_days else None
        obj = await client.upload(d / "input.jsonl", upload_filename(rs, bs), expires_after_s=expires_s)
        crash_point("after_upload")
        bs.file_id = obj["id"]
        bs.pending = None
        bs.set_status("uploaded")
        run.save_batch(bs)
        crash_point("after_upload_state")
    if bs.status == "uploaded":
        assert bs.file_id is not None
        bs.pending = "create"
        run.save_batch(bs)
        crash_point("before_create")
        output_s = rs.output_expiry_days * 86_400 if rs.output_expiry_days else None
        batch = await client.create_batch(
            bs.file_id, window=rs.completion_window, metadata=batch_metadata(rs, bs), output_expires_after_s=output_s
        )
        crash_point("after_create")
        _record_created(bs, batch)
        run.save_batch(bs)
        log.info("batch submitted", run=rs.run_id, batch=bs.name, batch_id=bs.batch_id, requests=bs.requests)


async def submit_run(
    ws: Workspace,
    client: BatchClient,
    paths: RunPaths,
    *,
    concurrency: int = 4,
    max_enqueued_tokens: int | None = None,
    on_batch: Callable[[BatchState], None] | None = None,
    wait_s: float | None = None,
) -> list[BatchState]:
    """Submit the run's planned and uploaded batches while enqueued tokens stay under budget.

    Holds the run lock. Batches that do not fit the budget stay planned for ``poll``.

    Args:
        wait_s: how long to wait for a run lock another process holds (None: fail at once).

    Returns:
        The batches submitted by this call.

    Raises:
        LockedError: another process holds the run.
        ProviderError: a terminal API error (after saving the state reached so far).
    """
    with Run.open(paths, wait_s=wait_s, purpose="submit") as run:
        return await submit_locked(
            ws, client, run, concurrency=concurrency, max_enqueued_tokens=max_enqueued_tokens, on_batch=on_batch
        )


async def submit_locked(
    ws: Workspace,
    client: BatchClient,
    run: Run,
    *,
    concurrency: int = 4,
    max_enqueued_tokens: int | None = None,
    on_batch: Callable[[BatchState], None] | None = None,
    queue_of_others: tuple[int, int] | None = None,
) -> list[BatchState]:
    """:func:`submit_run` for a caller that holds the run (poll).

    Args:
        queue_of_others: queue tokens and requests of this model's other runs (a poll pass
            computes them once for all runs); None reads them from the open-runs index.
    """
    rs = run.state
    if rs.status != "active":
        return []
    budget = max_enqueued_tokens if max_enqueued_tokens is not None else rs.max_enqueued_tokens
    now = utc_now().isoformat()
    todo = [bs for bs in run.batches if bs.status in ("planned", "uploaded") and (bs.not_before or "") <= now]
    if not todo:
        return []
    # The other runs' queue (a poll pass reads it once and passes it down), and this run's own.
    others = enqueued(ws, rs.model, exclude=run.paths) if queue_of_others is None else queue_of_others
    own = run.queue()
    in_queue, requests_in_queue = others[0] + own[0], others[1] + own[1]
    chosen: list[BatchState] = []
    for bs in todo:
        if budget is not None and in_queue + bs.tokens > budget and (in_queue > 0 or chosen):
            continue
        if requests_in_queue + bs.requests > MAX_ENQUEUED_REQUESTS:  # the provider would refuse it
            continue
        in_queue += bs.tokens
        requests_in_queue += bs.requests
        chosen.append(bs)
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    done: list[BatchState] = []

    async def one(bs: BatchState) -> None:
        async with limiter:
            await submit_batch(client, run, bs)
            done.append(bs)
            if on_batch is not None:
                on_batch(bs)

    try:
        async with anyio.create_task_group() as tg:
            for bs in chosen:
                tg.start_soon(one, bs)
    except BaseExceptionGroup as group:
        # Surface the first real error (the others were cancelled with it); state is on disk.
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group
    return done
