"""Retry: plan the failed and missing ids of a run again, as new batches in the same run.

Replayable, in this order: the new batch files (invisible without their batch.json) → run.json
``active`` → each batch.json ``planned`` → run.json attempts and counts. A process that dies
before the batch.json files leaves an active run with nothing new (the next poll finishes it and
the ids stay in failed_ids.tsv for the next retry); one that dies after them leaves planned
batches that poll submits, whose ids are in flight, so a second retry does not plan them twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from embedbatch.config import BatchLimits
from embedbatch.engines.batchapi.batchfiles import BatchFileWriter, BatchRecords, read_record_ids
from embedbatch.engines.batchapi.split import BatchSplitter
from embedbatch.failures import is_permanent, read_failed_ids
from embedbatch.records import text_sha256
from embedbatch.runs import Run, crash_point
from embedbatch.store.dataset import DatasetStore
from embedbatch.tokens import queue_tokens
from embedbatch.workspace import RunPaths, Workspace, atomic_write_json

__all__ = ["RetryPlan", "plan_retry", "plan_retry_locked"]


@dataclass
class RetryPlan:
    """What retry planned: new batch names, ids re-planned, ids given up (over max attempts)."""

    batches: list[str] = field(default_factory=list)
    requeued: int = 0
    given_up: list[str] = field(default_factory=list)
    already_embedded: int = 0
    permanent: dict[str, int] = field(default_factory=dict)  # reason → ids left alone (not forced)


def plan_retry(
    ws: Workspace, paths: RunPaths, *, max_attempts: int = 3, wait_s: float | None = None, force: bool = False
) -> RetryPlan:
    """Re-plan every id in the run's failed_ids.tsv that no shard holds with the same text.

    An id whose failure cannot change (:func:`~embedbatch.failures.is_permanent`: a 400 for that
    input, a wrong dimension) is left alone and counted in ``permanent`` unless ``force``.

    An id is tried at most ``max_attempts`` times in all (the first try counts); ids past that
    stay in failed_ids.tsv and are listed in ``given_up`` (also in ``retry.json``). Ids already
    re-planned in a batch that is not ingested yet are in flight and skipped.

    Raises:
        LockedError: another process holds the run.
    """
    with Run.open(paths, wait_s=wait_s, purpose="retry") as run:
        return plan_retry_locked(ws, run, max_attempts=max_attempts, force=force)


def plan_retry_locked(ws: Workspace, run: Run, *, max_attempts: int = 3, force: bool = False) -> RetryPlan:
    """:func:`plan_retry` for a caller that holds the run."""
    rs = run.state
    plan = RetryPlan()
    if not run.paths.failed_ids.exists():
        return plan
    failed = _retryable(read_failed_ids(run.paths.failed_ids), plan, force=force)
    if not failed:
        return plan
    limits = BatchLimits(**{k: v for k, v in rs.limits.items() if v is not None}) if rs.limits else BatchLimits()
    n_retry = sum(1 for b in run.batches if b.name.startswith("retry_"))
    writer = BatchFileWriter(run.paths.root, BatchSplitter(limits), prefix="retry", first_number=n_retry + 1)
    try:
        chosen = _write_rows(ws, run, writer, failed, plan, max_attempts=max_attempts)
        if chosen:
            rs.status = "active"  # before the batches appear: poll must visit this run again
            run.save()
        states = writer.finish()
    except BaseException:
        writer.abort()
        raise
    atomic_write_json(run.paths.root / "retry.json", {"given_up": plan.given_up, "max_attempts": max_attempts})
    if not chosen:
        return plan
    run.add_batches(states)
    crash_point("retry_before_run_state")
    for rid in chosen:
        rs.attempts[rid] = rs.attempts.get(rid, 1) + 1
    rs.counts["retried"] = rs.counts.get("retried", 0) + len(chosen)
    run.save()
    plan.batches = [bs.name for bs in states]
    plan.requeued = len(chosen)
    return plan


def _retryable(failed: dict[str, str], plan: RetryPlan, *, force: bool) -> dict[str, str]:
    """The failed ids worth sending again: without ``force``, those whose failure cannot change
    are counted in ``plan.permanent`` and left out."""
    if force:
        return failed
    out: dict[str, str] = {}
    for rid, reason in failed.items():
        if is_permanent(reason):
            plan.permanent[reason[:200]] = plan.permanent.get(reason[:200], 0) + 1
        else:
            out[rid] = reason
    return out


def _write_rows(
    ws: Workspace, run: Run, writer: BatchFileWriter, failed: dict[str, str], plan: RetryPlan, *, max_attempts: int
) -> list[str]:
    """Copy the request line of every failed id (once) into the retry batches, skipping ids in
    flight in an earlier retry batch, already embedded with the same text, or over
    ``max_attempts`` (given up). Returns the ids written, in order."""
    rs = run.state
    index = DatasetStore(ws, rs.model, rs.dataset).id_index()
    in_flight: set[str] = set()
    for bs in run.batches:
        if bs.status != "ingested" and bs.name.startswith("retry_"):
            in_flight.update(read_record_ids(run.batch_dir(bs)))
    chosen: list[str] = []
    seen: set[str] = set()
    given_up: set[str] = set()
    aggregate = rs.args.get("chunk_aggregate") is not None
    parent_done: dict[str, bool] = {}

    def embedded(rid: str, text: str, meta: dict[str, Any] | None) -> bool:
        if meta is None:
            return index.contains(rid, text_sha256(text))
        # --chunk-aggregate: a chunk is done when its document is stored with the same text (the
        # first chunk carries it and comes first: a document's chunks are kept in order).
        chunk = meta.get("chunk") or {}
        pid = str(chunk.get("parent_id"))
        if "parent_text" in chunk:
            parent_done[pid] = index.contains(pid, text_sha256(chunk["parent_text"]))
        return parent_done.get(pid, False)

    for bs in run.batches:
        d = run.batch_dir(bs)
        if not (d / "input.jsonl").exists():  # cleaned: it had no failed rows left
            continue
        records = BatchRecords.read(d)
        with open(d / "input.jsonl", "rb") as inf:
            for i, iline in enumerate(inf):
                rid = records.ids[i]
                if rid not in failed or rid in in_flight or rid in seen:
                    continue
                text = orjson.loads(iline)["body"]["input"]
                if embedded(rid, text, records.metadata_at(i) if aggregate else None):
                    plan.already_embedded += 1
                    continue
                if rs.attempts.get(rid, 1) >= max_attempts:
                    if rid not in given_up:  # an id is in every batch that tried it
                        given_up.add(rid)
                        plan.given_up.append(rid)
                    continue
                row = records.row(i)
                n_tokens = int(row["n_tokens"] or 0)
                writer.add_row(iline, row, queue_tokens(n_tokens, len(text.encode("utf-8"))))
                chosen.append(rid)
                seen.add(rid)
    return chosen
