"""Submit: plan a run on disk, then upload input files and create batches, crash-safely.

Every remote call is bracketed by state writes: ``pending`` is saved before the call and the
result after. A process killed in between leaves ``pending`` set; the next ``submit --resume``,
``poll`` or ``status --update-json`` looks the file up by its name, or the batch by its
metadata, and adopts it instead of calling again.
"""

from __future__ import annotations

import os
import shutil
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any

import anyio
import structlog

from embedbatch.config import PrepareConfig, SampleConfig, SourceConfig, SubmitConfig
from embedbatch.engines.batchapi.client import BatchClient
from embedbatch.engines.batchapi.plan import (
    RECORDS_FILE,
    BatchRecords,
    BatchSplitter,
    check_model_options,
    read_record_ids,
    request_encoder,
)
from embedbatch.errors import LimitError
from embedbatch.estimate import Estimate
from embedbatch.intake import Intake, dataset_name
from embedbatch.records import Record
from embedbatch.runs import (
    REMOTE_ACTIVE,
    BatchState,
    RunState,
    crash_point,
    git_sha,
    load_batches,
    lockfile_sha256,
)
from embedbatch.tokens import get_tokenizer
from embedbatch.workspace import RunPaths, Workspace, file_lock, read_json

__all__ = ["PlannedRun", "adopt_pending", "existing_ids", "plan_run", "run_key", "submit_run"]

log = structlog.get_logger(__name__)


def run_key(rs: RunState) -> str:
    """The run's name at the provider: ``{model}/{dataset}/{run_id}`` (unique in a workspace)."""
    return f"{rs.model}/{rs.dataset}/{rs.run_id}"


def upload_filename(rs: RunState, bs: BatchState) -> str:
    """The input file's name at the provider; resume finds an upload by it."""
    return f"embedbatch__{rs.model}__{rs.dataset}__{rs.run_id}__{bs.name}.jsonl"


def batch_metadata(rs: RunState, bs: BatchState) -> dict[str, str]:
    """Metadata sent with the batch; resume finds a created batch by it."""
    meta = dict(rs.metadata)
    meta.update({"embedbatch_run": run_key(rs), "embedbatch_batch": bs.name, "embedbatch_attempt": str(bs.attempt)})
    return meta


def existing_ids(ws: Workspace, model: str, dataset: str) -> tuple[dict[str, str], set[str]]:
    """What is already done or under way for (model, dataset).

    Returns:
        ``(embedded, planned)``: id → text sha256 for rows in the dataset's shards, and ids in
        batches of unfinished runs that are not yet ingested or failed.
    """
    from embedbatch.store.shards import shard_text_hashes

    embedded = shard_text_hashes(ws, model, dataset)
    planned: set[str] = set()
    for run in ws.all_runs():
        if run.root.parent != ws.runs_dir(model, dataset):
            continue
        try:
            rs = RunState.load(run)
        except Exception:
            continue
        if rs.status != "active":
            continue
        for bs in load_batches(run):
            if bs.status in ("ingested", "cancelled") or (
                bs.status == "downloaded" and bs.remote_status != "completed"
            ):
                continue
            planned.update(read_record_ids(run.batch_dir(bs.name)))
    return embedded, planned


@dataclass
class PlannedRun:
    """The outcome of planning: the run directory and the numbers ``--dry-run`` prints."""

    run: RunPaths | None
    state: RunState | None
    estimate: Estimate
    skipped_existing: int


PLAN_CHUNK_ROWS = 4096  # rows per add_records call: large enough that per-call costs vanish


class BatchFileWriter:
    """Streams request lines into ``batches/{prefix}_NNN/{input,records}.jsonl`` under the limits.

    ``input.jsonl`` is what is uploaded; ``records.parquet`` holds, row for row, what the API does
    not carry back (split, metadata, token count) for ingest (see :class:`plan.BatchRecords`).
    Used by planning and by retry.

    Args:
        root: the run directory (or its ``.partial`` twin while planning).
        prefix / first_number: batch names, e.g. ``batch_001`` or ``retry_003``.
    """

    def __init__(self, root: Path, splitter: BatchSplitter, *, prefix: str = "batch", first_number: int = 1) -> None:
        self.root = root
        self.splitter = splitter
        self.prefix = prefix
        self.first_number = first_number
        self.current = -1
        self.inp: IO[bytes] | None = None
        self.states: list[BatchState] = []
        self._tokenizer_tokens = 0
        self.records = BatchRecords()
        self._dir: Path | None = None
        self._write_inp: Callable[[bytes], object] | None = None

    def add_record(self, rec: Record, line: bytes) -> None:
        """Add one prepared record and its request line (see :func:`plan.request_encoder`)."""
        self.add_records([rec], [line])

    def add_records(self, recs: Sequence[Record], lines: Sequence[bytes]) -> None:
        """Add prepared records and their request lines, in order.

        This is the planning hot path, so it works on a chunk of rows with list comprehensions
        rather than a call per row. Queue tokens are computed inline as in
        :func:`tokens.queue_tokens`: max(tokenizer count, ceil(UTF-8 bytes / 4)).
        """
        n_tokens = [r.n_tokens for r in recs]
        n_bytes = [len(t) if t.isascii() else len(t.encode()) for t in [r.text for r in recs]]  # isascii() is O(1)
        queue = [n if 4 * n >= b else (b + 3) >> 2 for n, b in zip(n_tokens, n_bytes, strict=True)]
        self._add(
            lines,
            queue,
            [r.id for r in recs],
            [r.split for r in recs],
            [r.metadata for r in recs],
            n_tokens,
        )

    def add_all(self, records: Iterable[Record], encode: Callable[[str, str], bytes]) -> None:
        """Add every record, chunk by chunk, with its request line from ``encode`` (see
        :func:`plan.request_encoder`). This is what planning runs and bench/plan.py times."""
        it = iter(records)
        while chunk := list(islice(it, PLAN_CHUNK_ROWS)):
            self.add_records(chunk, [encode(r.id, r.text) for r in chunk])

    def add_row(self, line: bytes, row: dict[str, Any], tokens: int) -> None:
        """Add a request line and its records row (``{"id", "split", "metadata", "n_tokens"}``, as
        :meth:`BatchRecords.row` gives it); ``tokens`` are queue tokens."""
        n_tokens = int(row.get("n_tokens") or 0)
        self._add([line], [tokens], [row["id"]], [row.get("split")], [row.get("metadata") or {}], [n_tokens])

    def _add(
        self,
        lines: Sequence[bytes],
        queue: list[int],
        ids: list[str],
        splits: list[str | None],
        metadata: list[dict[str, Any]],
        n_tokens: list[int],
    ) -> None:
        batches = self.splitter.assign([len(line) for line in lines], queue)
        start = 0
        while start < len(batches):
            index = batches[start]
            end = bisect_right(batches, index, start)  # batch indices never decrease
            if index != self.current:
                self._open(index, BatchRecords.shared_from(metadata[start]))
            self._write_inp(b"".join(lines[start:end]))  # type: ignore[misc]
            self.records.extend(ids[start:end], splits[start:end], metadata[start:end], n_tokens[start:end])
            self._tokenizer_tokens += sum(n_tokens[start:end])
            start = end

    def _open(self, index: int, shared: dict[str, Any]) -> None:
        self._close()
        self.current = index
        name = f"{self.prefix}_{self.first_number + index:03d}"
        d = self.root / "batches" / name
        if d.is_dir() and not (d / "batch.json").exists():
            shutil.rmtree(d)  # files of a plan that crashed before its batch.json: never submitted
        d.mkdir(parents=True)
        self._dir = d
        self.inp = open(d / "input.jsonl", "wb", buffering=1 << 20)  # noqa: SIM115
        self._write_inp = self.inp.write
        self.records = BatchRecords(shared)
        self.states.append(BatchState(name=name))

    def _close(self) -> None:
        if self.states:
            self.states[-1].tokenizer_tokens = self._tokenizer_tokens
            self._tokenizer_tokens = 0
        if self.inp is not None:
            self.inp.flush()
            os.fsync(self.inp.fileno())
            self.inp.close()
            self.inp = None
            assert self._dir is not None
            self.records.write(self._dir / RECORDS_FILE)

    def abort(self) -> None:
        """Close files without saving batch states (the caller removes the directory)."""
        self._close()

    def finish(self) -> list[BatchState]:
        """Close the files and write each ``batch.json`` (status planned)."""
        self._close()
        for bs, (requests, inputs, n_bytes, tokens) in zip(self.states, self.splitter.totals(), strict=True):
            bs.requests, bs.inputs, bs.bytes, bs.tokens = requests, inputs, n_bytes, tokens
            bs.history.append(["planned", _now()])
            bs.save(self.root / "batches" / bs.name)
        return self.states


def _now() -> str:
    from embedbatch.workspace import utc_now

    return utc_now().isoformat()


def plan_run(
    ws: Workspace,
    *,
    source: SourceConfig,
    prepare: PrepareConfig,
    sample: SampleConfig,
    submit: SubmitConfig,
    args: dict[str, Any] | None = None,
    on_row: Callable[[int], None] | None = None,
    skip_existing: bool = True,
) -> PlannedRun:
    """Read, prepare, sample and split into batch input files in a new run directory.

    The run is built in ``run_<stamp>.partial`` and renamed into place only when intake
    finished cleanly, so a bad row or duplicate id leaves nothing that poll would submit.
    With ``submit.dry_run`` the files are written and kept for inspection, but the run is
    marked ``dry-run`` and is never submitted.

    Raises:
        InputError, DuplicateIdError: bad input (nothing is submitted).
        LimitError: the Batch-price estimate exceeds ``max_cost_usd``.
        UsageError: bad model options.
    """
    check_model_options(submit.model, submit.dimensions)
    dataset = dataset_name(source)
    run = ws.new_run(submit.model, dataset)
    partial = run.root.with_name(run.root.name + ".partial")
    partial.mkdir(parents=True)
    started = time.monotonic()
    exclude = None
    if skip_existing:
        embedded, planned = existing_ids(ws, submit.model, dataset)
        if embedded or planned:

            def exclude(rid: str, sha: str) -> bool:
                return embedded.get(rid) == sha or rid in planned

    intake = Intake(
        source=source,
        prepare=prepare,
        sample=sample,
        tokenizer=get_tokenizer(submit.model),
        rejected_path=partial / "rejected.jsonl",
        on_row=on_row,
        exclude=exclude,
    )
    writer = BatchFileWriter(partial, BatchSplitter(submit.limits))
    encode = request_encoder(model=submit.model, dimensions=submit.dimensions)
    try:
        writer.add_all(intake.records(), encode)
        states = writer.finish()
    except BaseException:
        writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    queue = sum(bs.tokens for bs in states)
    est = Estimate.build(
        model=submit.model,
        dataset=dataset,
        stats=intake.stats,
        batches=len(states),
        queue_tokens=queue,
        sampling=intake.sampler.describe(),
    )
    if submit.max_cost_usd is not None and est.cost_batch_usd is not None and est.cost_batch_usd > submit.max_cost_usd:
        shutil.rmtree(partial, ignore_errors=True)
        raise LimitError(
            f"estimated Batch API cost ${est.cost_batch_usd:.4f} exceeds --max-cost-usd "
            f"${submit.max_cost_usd:.4f}; nothing was uploaded"
        )
    rs = RunState(
        run_id=run.run_id,
        model=submit.model,
        dataset=dataset,
        source="postgres" if source.is_postgres else "file",
        source_path=(source.pg_table or "query") if source.is_postgres else str(Path(source.path).absolute()),
        dimensions=submit.dimensions,
        completion_window=submit.completion_window,
        metadata=dict(submit.metadata),
        max_enqueued_tokens=submit.limits.max_enqueued_tokens,
        status="dry-run" if submit.dry_run else "active",
        args=args or {},
        git_sha=git_sha(),
        lockfile_sha256=lockfile_sha256(),
        sampling=intake.sampler.describe(),
        intake=intake.stats.to_json(),
        limits={
            "max_requests": submit.limits.max_requests,
            "max_bytes": submit.limits.max_bytes,
            "max_inputs": submit.limits.max_inputs,
            "max_enqueued_tokens": submit.limits.max_enqueued_tokens,
        },
        counts={
            "planned": sum(bs.requests for bs in states),
            "batches": len(states),
            "rejected": intake.stats.rejected,
            "skipped_existing": intake.skipped_existing,
        },
        estimate={
            "tokens": intake.stats.tokens_total,
            "queue_tokens": queue,
            "cost_standard_usd": est.cost_standard_usd,
            "cost_batch_usd": est.cost_batch_usd,
        },
        timings={"plan_s": round(time.monotonic() - started, 3)},
    )
    if source.is_postgres and source.pg_table:
        rs.args.setdefault("pg_source", {"table": source.pg_table, "id_column": source.pg_id_column})
    rs.save(RunPaths(partial))
    if not states:
        # Nothing to embed: keep the record of the run, but as finished.
        rs.status = "finished" if not submit.dry_run else rs.status
        rs.save(RunPaths(partial))
    partial.rename(run.root)
    return PlannedRun(run, rs, est, intake.skipped_existing)


def enqueued_tokens(ws: Workspace, model: str) -> int:
    """Queue tokens of this model's batches that the provider holds now, workspace-wide."""
    total = 0
    for run in ws.all_runs():
        try:
            if read_json(run.run_json).get("model") != model:
                continue
        except Exception:
            continue
        total += sum(bs.tokens for bs in load_batches(run) if bs.status in REMOTE_ACTIVE)
    return total


async def adopt_pending(client: BatchClient, run: RunPaths, rs: RunState, bs: BatchState) -> bool:
    """Resolve a remote call that a crash interrupted, without calling again.

    Returns:
        True if the upload or batch was found at the provider and recorded.
    """
    d = run.batch_dir(bs.name)
    if bs.pending == "upload":
        found = await client.find_file(upload_filename(rs, bs))
        if found is None:
            return False
        bs.file_id = found["id"]
        bs.pending = None
        bs.set_status("uploaded")
        bs.save(d)
        log.info("adopted upload", run=rs.run_id, batch=bs.name, file_id=bs.file_id)
        return True
    if bs.pending == "create":
        found = await client.find_batch(batch_metadata(rs, bs))
        if found is None:
            return False
        _record_created(bs, found)
        bs.save(d)
        log.info("adopted batch", run=rs.run_id, batch=bs.name, batch_id=bs.batch_id)
        return True
    return False


def _record_created(bs: BatchState, batch: dict[str, Any]) -> None:
    bs.batch_id = batch["id"]
    bs.remote = batch
    bs.remote_status = batch["status"]
    bs.pending = None
    bs.set_status("submitted")


async def submit_batch(client: BatchClient, run: RunPaths, rs: RunState, bs: BatchState) -> None:
    """Take one batch from planned (or uploaded) to submitted, crash-safely."""
    d = run.batch_dir(bs.name)
    if bs.pending is not None:
        await adopt_pending(client, run, rs, bs)
    if bs.status == "planned":
        bs.pending = "upload"
        bs.save(d)
        crash_point("before_upload")
        obj = await client.upload(d / "input.jsonl", upload_filename(rs, bs))
        crash_point("after_upload")
        bs.file_id = obj["id"]
        bs.pending = None
        bs.set_status("uploaded")
        bs.save(d)
        crash_point("after_upload_state")
    if bs.status == "uploaded":
        assert bs.file_id is not None
        bs.pending = "create"
        bs.save(d)
        crash_point("before_create")
        batch = await client.create_batch(bs.file_id, window=rs.completion_window, metadata=batch_metadata(rs, bs))
        crash_point("after_create")
        _record_created(bs, batch)
        bs.save(d)
        log.info("batch submitted", run=rs.run_id, batch=bs.name, batch_id=bs.batch_id, requests=bs.requests)


async def submit_run(
    ws: Workspace,
    client: BatchClient,
    run: RunPaths,
    *,
    concurrency: int = 4,
    max_enqueued_tokens: int | None = None,
    on_batch: Callable[[BatchState], None] | None = None,
) -> list[BatchState]:
    """Submit the run's planned and uploaded batches while enqueued tokens stay under budget.

    Holds the run lock. Batches that do not fit the budget stay planned for ``poll``.

    Returns:
        The batches submitted by this call.

    Raises:
        LockedError: another process holds the run.
        ProviderError: a terminal API error (after saving the state reached so far).
    """
    with file_lock(run.lock, what=f"run {run.run_id}"):
        return await _submit_locked(
            ws,
            client,
            run,
            concurrency=concurrency,
            max_enqueued_tokens=max_enqueued_tokens,
            on_batch=on_batch,
        )


async def _submit_locked(
    ws: Workspace,
    client: BatchClient,
    run: RunPaths,
    *,
    concurrency: int,
    max_enqueued_tokens: int | None,
    on_batch: Callable[[BatchState], None] | None,
) -> list[BatchState]:
    rs = RunState.load(run)
    if rs.status != "active":
        return []
    budget = max_enqueued_tokens if max_enqueued_tokens is not None else rs.max_enqueued_tokens
    todo = [bs for bs in load_batches(run) if bs.status in ("planned", "uploaded")]
    # Batches with a pending create may already exist remotely and count against the queue.
    in_queue = enqueued_tokens(ws, rs.model)
    chosen: list[BatchState] = []
    for bs in todo:
        if budget is not None and in_queue + bs.tokens > budget and (in_queue > 0 or chosen):
            continue
        in_queue += bs.tokens
        chosen.append(bs)
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    done: list[BatchState] = []

    async def one(bs: BatchState) -> None:
        async with limiter:
            await submit_batch(client, run, rs, bs)
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
