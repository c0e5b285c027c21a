"""Retry: plan the failed and missing ids of a run again, as a new batch in the same run."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import orjson

from embedbatch.batchapi.plan import BatchSplitter, size_of
from embedbatch.batchapi.state import BatchState, RunState, load_batches
from embedbatch.config import BatchLimits
from embedbatch.sinks.parquet import shard_text_hashes
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
    """Re-plan every id in the run's failed_ids.tsv that no shard holds yet.

    An id is tried at most ``max_attempts`` times in all (the first try counts); ids past that
    stay in failed_ids.tsv and are listed in ``given_up``.

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
        embedded = shard_text_hashes(ws, rs.model, rs.dataset)
        batches = load_batches(run)
        # An id already re-planned in a batch that is not ingested yet is in flight: skip it.
        in_flight: set[str] = set()
        for bs in batches:
            if bs.status != "ingested" and bs.retry_of is not None and bs.name.startswith("retry"):
                with open(run.batch_dir(bs.name) / "records.jsonl", "rb") as fh2:
                    in_flight.update(orjson.loads(line)["id"] for line in fh2)
        chosen: dict[str, tuple[bytes, bytes, int, int]] = {}
        for bs in batches:
            d = run.batch_dir(bs.name)
            with open(d / "records.jsonl", "rb") as rf, open(d / "input.jsonl", "rb") as inf:
                for rline, iline in zip(rf, inf, strict=True):
                    rec = orjson.loads(rline)
                    rid = rec["id"]
                    if rid not in failed or rid in in_flight or rid in chosen:
                        continue
                    if embedded.get(rid) == rec["sha256"]:
                        plan.already_embedded += 1
                        continue
                    attempts = rs.attempts.get(rid, 1)
                    if attempts >= max_attempts:
                        plan.given_up.append(rid)
                        continue
                    text = orjson.loads(iline)["body"]["input"]
                    chosen[rid] = (rline, iline, len(text.encode("utf-8")), rs_tokens(rec, text))
        if not chosen:
            return plan
        limits = BatchLimits(**{k: v for k, v in rs.limits.items() if v is not None}) if rs.limits else BatchLimits()
        splitter = BatchSplitter(limits)
        n_existing = sum(1 for b in batches if b.name.startswith("retry_"))
        states: list[BatchState] = []
        files: dict[int, tuple[object, object]] = {}
        try:
            for rid, (rline, iline, nbytes, ntok) in chosen.items():
                idx = splitter.add(size_of(iline, ntok, nbytes))
                if idx not in files:
                    name = f"retry_{n_existing + idx + 1:03d}"
                    d = run.batch_dir(name)
                    d.mkdir(parents=True)
                    files[idx] = (open(d / "records.jsonl", "wb"), open(d / "input.jsonl", "wb"))  # noqa: SIM115
                    states.append(BatchState(name=name, retry_of=[]))
                rf2, inf2 = files[idx]
                rf2.write(rline)  # type: ignore[attr-defined]
                inf2.write(iline)  # type: ignore[attr-defined]
                bs = states[idx]
                bs.requests += 1
                bs.inputs += 1
                bs.bytes += len(iline)
                bs.tokens += size_of(iline, ntok, nbytes).tokens
                rs.attempts[rid] = rs.attempts.get(rid, 1) + 1
        finally:
            for rf2, inf2 in files.values():
                rf2.close()  # type: ignore[attr-defined]
                inf2.close()  # type: ignore[attr-defined]
        for bs in states:
            bs.history.append(["planned", bs.updated_at or ""])
            bs.save(run.batch_dir(bs.name))
        rs.status = "active"
        rs.counts["retried"] = rs.counts.get("retried", 0) + len(chosen)
        rs.save(run)
        plan.batches = [bs.name for bs in states]
        plan.requeued = len(chosen)
        atomic_write_json(run.root / "retry.json", {"given_up": plan.given_up, "max_attempts": max_attempts})
        return plan


def rs_tokens(rec: dict[str, object], text: str) -> int:
    """Tokens of a re-planned input: the tokenizer count is not stored per row, so use the
    conservative bytes/4 bound (the queue counts the larger anyway)."""
    return -(-len(text.encode("utf-8")) // 4)
