"""Retry: plan the failed and missing ids of a run again, as new batches in the same run."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field

import orjson

from embedbatch.config import BatchLimits
from embedbatch.engines.batchapi.plan import BatchRecords, BatchSplitter, read_record_ids
from embedbatch.engines.batchapi.submit import BatchFileWriter
from embedbatch.runs import RunState, load_batches
from embedbatch.store.shards import shard_text_hashes
from embedbatch.tokens import queue_tokens
from embedbatch.workspace import RunPaths, Workspace, atomic_write_json, file_lock

__all__ = ["RetryPlan", "plan_retry"]


@dataclass
class RetryPlan:
    """What retry planned: new batch names, ids re-planned, ids given up (over max attempts)."""

    batches: list[str] = field(default_factory=list)
    requeued: int = 0
    given_up: list[str] = field(default_factory=list)
    already_embedded: int = 0


def plan_retry(ws: Workspace, run: RunPaths, *, max_attempts: int = 3) -> RetryPlan:
    """Re-plan every id in the run's failed_ids.tsv that no shard holds with the same text.

    An id is tried at most ``max_attempts`` times in all (the first try counts); ids past that
    stay in failed_ids.tsv and are listed in ``given_up`` (also in ``retry.json``). Ids already
    re-planned in a batch that is not ingested yet are in flight and skipped.

    Raises:
        LockedError: another process holds the run.
    """
    with file_lock(run.lock, what=f"run {run.run_id}"):
        rs = RunState.load(run)
        plan = RetryPlan()
        if not run.failed_ids.exists():
            return plan
        with open(run.failed_ids, newline="", encoding="utf-8") as fh:
            failed = {row["id"] for row in csv.DictReader(fh, delimiter="\t")}
        if not failed:
            return plan
        embedded = shard_text_hashes(ws, rs.model, rs.dataset)
        batches = load_batches(run)
        in_flight: set[str] = set()
        for bs in batches:
            if bs.status != "ingested" and bs.name.startswith("retry_"):
                in_flight.update(read_record_ids(run.batch_dir(bs.name)))
        limits = BatchLimits(**{k: v for k, v in rs.limits.items() if v is not None}) if rs.limits else BatchLimits()
        n_retry = sum(1 for b in batches if b.name.startswith("retry_"))
        writer = BatchFileWriter(run.root, BatchSplitter(limits), prefix="retry", first_number=n_retry + 1)
        chosen: set[str] = set()
        try:
            for bs in batches:
                d = run.batch_dir(bs.name)
                records = BatchRecords.read(d)
                with open(d / "input.jsonl", "rb") as inf:
                    for i, iline in enumerate(inf):
                        rid = records.ids[i]
                        if rid not in failed or rid in in_flight or rid in chosen:
                            continue
                        text = orjson.loads(iline)["body"]["input"]
                        if embedded.get(rid) == hashlib.sha256(text.encode("utf-8")).hexdigest():
                            plan.already_embedded += 1
                            continue
                        if rs.attempts.get(rid, 1) >= max_attempts:
                            plan.given_up.append(rid)
                            continue
                        row = records.row(i)
                        n_tokens = int(row["n_tokens"] or 0)
                        writer.add_row(iline, row, queue_tokens(n_tokens, len(text.encode("utf-8"))))
                        chosen.add(rid)
                        rs.attempts[rid] = rs.attempts.get(rid, 1) + 1
        except BaseException:
            writer.abort()
            raise
        states = writer.finish()
        atomic_write_json(run.root / "retry.json", {"given_up": plan.given_up, "max_attempts": max_attempts})
        if not chosen:
            return plan
        rs.status = "active"
        rs.counts["retried"] = rs.counts.get("retried", 0) + len(chosen)
        rs.save(run)
        plan.batches = [bs.name for bs in states]
        plan.requeued = len(chosen)
        return plan
