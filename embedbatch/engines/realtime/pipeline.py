"""The realtime engine: ``POST /v1/embeddings`` at the account's rate limit, into the same store.

A run goes in two passes, so every check is done before the first remote call:

1. **Intake** (under the dataset lock only while reading what is embedded or planned): read,
   prepare, sample and cut to 8,192 tokens; bad rows stop the run (or are recorded), duplicate
   ids stop it, the cost cap is checked; rows to embed are spooled to the run's ``rows.jsonl``.
2. **Embedding**: the spool is packed into requests (:mod:`.packing`), each sent on the key with
   room (:mod:`.keys`), and the answers are committed through the dataset store every
   ``commit_rows`` rows or ``commit_interval_s`` seconds (:class:`StreamCommitter`).

A killed run leaves committed shards and a ``running`` run.json; the same command again skips
the committed rows (the store's id index) and marks the dead run ``interrupted``. Rows that the
provider refuses (HTTP 400, isolated by bisecting the request) or that keep failing go to
``failed_ids.tsv`` with the reason and to ``failed_rows.jsonl`` for :func:`retry_realtime`.
While a realtime run holds the dataset's ``realtime`` engine lock, Batch API planning of the
dataset refuses, so no row is paid for twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import structlog

from embedbatch.aggregate import INCOMPLETE_DOCUMENT
from embedbatch.api.openai import EmbeddingAnswer, embeddings_once, new_sdk_client
from embedbatch.config import (
    IngestConfig,
    LibsqlTarget,
    PgTarget,
    PrepareConfig,
    RealtimeConfig,
    SampleConfig,
    Settings,
    SourceConfig,
)
from embedbatch.engines.realtime.packing import read_rows, write_rows
from embedbatch.engines.realtime.sender import Sender
from embedbatch.errors import LimitError, StateError, UsageError
from embedbatch.failures import is_permanent, read_failed_ids, top_reasons, tsv_escape
from embedbatch.intake import Intake, dataset_name, source_label
from embedbatch.planned import skip_done_or_planned
from embedbatch.records import Record
from embedbatch.runs import OpenRuns, Run, RunState, git_sha, lockfile_sha256
from embedbatch.sinks.runner import check_targets, run_sinks_blocking, target_dimension
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.deletes import commit_run_deletes, save_run_deletes, stored_ids
from embedbatch.store.stream import StreamCommitter
from embedbatch.tokens import check_model_options, cost_usd, get_tokenizer
from embedbatch.workspace import RunPaths, Workspace, atomic_write_bytes

__all__ = ["RealtimeResult", "retry_realtime", "run_realtime"]

log = structlog.get_logger(__name__)

MAX_INPUT_TOKENS = 8192  # per input, Embeddings API reference (checked 2026-11)


@dataclass
class RealtimeResult:
    """What a realtime run did; also stored in run.json under ``realtime``.

    Attributes:
        rows: rows embedded and committed; failed: rows in failed_ids.tsv.
        usage_tokens: ``usage.prompt_tokens`` summed over the answers (billed tokens).
        cost_usd: ``usage_tokens`` at the model's standard price (None: unpriced model).
        answered_429: 429 answers (all keys); retries: 5xx/transport retries.
        keys: per key fingerprint: requests, tokens, 429s, the limits in force at the end.
        wall_s: seconds of the embedding pass.
    """

    run_dir: str
    model: str
    dataset: str
    planned: int = 0
    rows: int = 0
    failed: int = 0
    requests: int = 0
    usage_tokens: int = 0
    cost_usd: float | None = None
    answered_429: int = 0
    retries: int = 0
    splits: int = 0
    skipped_existing: int = 0
    already_planned: int = 0
    held_by: dict[str, int] = field(default_factory=dict)  # unfinished Batch API run dir → rows it holds
    rejected: int = 0
    truncated: int = 0
    permanent: dict[str, int] = field(default_factory=dict)  # retry: reason → rows left alone
    shards: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    intake_s: float = 0.0
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    interrupted_runs: list[str] = field(default_factory=list)
    pg: dict[str, Any] = field(default_factory=dict)
    libsql: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_per_s"] = round(self.rows / self.wall_s, 2) if self.wall_s else None
        out["tokens_per_min"] = round(self.usage_tokens * 60 / self.wall_s) if self.wall_s else None
        out["share_429"] = round(self.answered_429 / (self.requests + self.answered_429), 4) if self.requests else None
        return out


def run_realtime(
    ws: Workspace,
    settings: Settings,
    *,
    source: SourceConfig,
    prepare: PrepareConfig,
    sample: SampleConfig,
    realtime: RealtimeConfig,
    ingest: IngestConfig | None = None,
    pg_target: PgTarget | None = None,
    libsql_target: LibsqlTarget | None = None,
    max_cost_usd: float | None = None,
    args: dict[str, Any] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> RealtimeResult:
    """Embed a source through ``/v1/embeddings`` into the dataset's shards (and the sinks).

    Args:
        settings: base URL, timeout and the API keys (:meth:`Settings.api_keys`).
        ingest: shard dtype, and the sinks' DSN/token (never stored).
        max_cost_usd: stop before any remote call when the standard-price estimate is higher.
        on_rows: progress callback with the rows committed or written so far.

    Returns:
        :class:`RealtimeResult`, also written to the run's run.json.

    Raises:
        UsageError: no API key; bad model options.
        InputError, DuplicateIdError: bad input (nothing is sent).
        LimitError: the estimate exceeds ``max_cost_usd`` (nothing is sent).
        LockedError: another realtime run of the dataset is running.
        DatabaseError: a sink cannot take the vectors (checked before any embedding request).
        ProviderError: the provider is unreachable or refuses the key or model (rows committed
            so far are kept; the same command resumes).
    """
    ingest = ingest or IngestConfig()
    keys = settings.api_keys()
    if not keys:
        raise UsageError("OPENAI_API_KEY (or OPENAI_API_KEYS=k1,k2,...) is not set (environment or .env)")
    check_model_options(realtime.model, realtime.dimensions)
    prepare = _capped(prepare)
    dataset = dataset_name(source)
    store = DatasetStore(ws, realtime.model, dataset)
    with store.engine_lock("realtime"):
        run = ws.new_run(realtime.model, dataset)
        result = RealtimeResult(str(run.root), realtime.model, dataset)
        rs = RunState(
            run_id=run.run_id,
            model=realtime.model,
            dataset=dataset,
            source=source.kind,
            source_path=source_label(source),
            dimensions=realtime.dimensions,
            kind="realtime",
            status="running",
            args=args or {},
            git_sha=git_sha(),
            lockfile_sha256=lockfile_sha256(),
            pg_target=pg_target.to_json() if pg_target else None,
            libsql_target=libsql_target.to_json() if libsql_target else None,
        )
        Run.create(run, rs)
        with Run.open(run, purpose="realtime") as state:
            result.interrupted_runs = _mark_interrupted(ws, realtime.model, dataset, run)
            _intake(ws, store, state, source, prepare, sample, result)
            cost = state.state.estimate.get("cost_standard_usd")
            if max_cost_usd is not None and cost is not None and cost > max_cost_usd:
                state.state.status = "failed"
                state.state.failure = {"error": "over --max-cost-usd"}
                state.save()
                raise LimitError(
                    f"estimated cost ${cost:.4f} at the standard price exceeds --max-cost-usd "
                    f"${max_cost_usd:.4f}; nothing was sent"
                )
            _check_sinks(settings, keys[0], realtime, pg_target, libsql_target, ingest)
            records = read_rows(run.rows)
            _embed(ws, store, state, settings, keys, realtime, ingest, result, records, on_rows)
            _sinks(ws, state, ingest, result)
    return result


def retry_realtime(
    ws: Workspace,
    settings: Settings,
    paths: RunPaths,
    *,
    realtime: RealtimeConfig | None = None,
    ingest: IngestConfig | None = None,
    on_rows: Callable[[int], None] | None = None,
    force: bool = False,
) -> RealtimeResult:
    """Embed again the rows of a finished realtime run listed in its failed_ids.tsv (their
    prepared text is in failed_rows.jsonl), as part of the same run. Rows whose failure cannot
    change (:func:`~embedbatch.failures.is_permanent`) stay failed unless ``force``
    (``permanent`` counts them).

    Returns:
        This retry's :class:`RealtimeResult` (``planned``: rows tried, ``rows``: embedded now);
        run.json's ``realtime`` keeps the run's totals.

    Raises:
        StateError: not a realtime run, or it is still running.
        LockedError: another realtime run of the dataset is running.
    """
    ingest = ingest or IngestConfig()
    keys = settings.api_keys()
    if not keys:
        raise UsageError("OPENAI_API_KEY (or OPENAI_API_KEYS) is not set (environment or .env)")
    rs0 = RunState.load(paths)
    if rs0.kind != "realtime":
        raise StateError(f"{paths.root} is a {rs0.kind} run, not a realtime one")
    cfg = realtime or RealtimeConfig(model=rs0.model, dimensions=rs0.dimensions)
    store = DatasetStore(ws, rs0.model, rs0.dataset)
    with store.engine_lock("realtime"), Run.open(paths, wait_s=ws.lock_timeout_s, purpose="retry") as state:
        before = dict(state.state.realtime)
        counts = dict(state.state.counts)
        result = RealtimeResult(str(paths.root), rs0.model, rs0.dataset)
        index = store.id_index()
        reasons = read_failed_ids(paths.failed_ids) if paths.failed_ids.exists() else {}
        todo: list[Record] = []
        kept: list[tuple[Record, str]] = []
        for r in read_rows(paths.failed_rows):
            if index.contains(r.id, r.sha256):
                continue
            reason = reasons.get(r.id, "")
            if not force and is_permanent(reason):
                kept.append((r, reason))
            else:
                todo.append(r)
        result.planned = len(todo)
        result.permanent = top_reasons((reason for _, reason in kept), n=len(kept) or 1)
        _embed(ws, store, state, settings, keys, cfg, ingest, result, iter(todo), on_rows, kept)
        _sinks(ws, state, ingest, result)
        # run.json keeps the run's totals: the first pass plus every retry.
        total = state.state.realtime
        for k in ("rows", "requests", "usage_tokens", "answered_429", "retries", "splits"):
            total[k] = int(before.get(k) or 0) + int(total.get(k) or 0)
        total["shards"] = list(before.get("shards") or []) + list(total.get("shards") or [])
        total["planned"] = before.get("planned", total["planned"])
        total["cost_usd"] = cost_usd(rs0.model, total["usage_tokens"])[0]
        state.state.counts = {**counts, "succeeded": total["rows"], "failed": result.failed}
        state.state.failed_reasons = top_reasons(read_failed_ids(paths.failed_ids).values()) if result.failed else {}
        state.state.actual = {"usage_tokens": total["usage_tokens"], "cost_standard_usd": total["cost_usd"]}
        state.save()
    return result


def _capped(prepare: PrepareConfig) -> PrepareConfig:
    if prepare.max_tokens <= MAX_INPUT_TOKENS:
        return prepare
    from dataclasses import replace

    return replace(prepare, max_tokens=MAX_INPUT_TOKENS)


def _mark_interrupted(ws: Workspace, model: str, dataset: str, current: RunPaths) -> list[str]:
    """Realtime runs of this dataset left ``running`` by a dead process, or stopped by Ctrl-C,
    become ``interrupted`` and name the run that resumes them (called under the engine lock, so
    no live run is among them)."""
    marked = []
    for entry in OpenRuns.entries(ws, model, dataset):
        paths = entry.paths
        if paths.root == current.root or entry.kind != "realtime":
            continue
        rs = Run.read_state(paths)
        if rs is None:
            continue
        resumable = rs.status == "running" or (rs.status == "interrupted" and not (rs.failure or {}).get("resumed_by"))
        if rs.kind == "realtime" and resumable:
            with Run.open(paths, purpose="mark interrupted") as old:
                old.state.status = "interrupted"
                old.state.failure = {
                    "error": (old.state.failure or {}).get("error") or "the process stopped before the run finished",
                    "resumed_by": current.run_id,
                }
                old.save()
            marked.append(paths.root.name)
    return marked


def _intake(
    ws: Workspace,
    store: DatasetStore,
    run: Run,
    source: SourceConfig,
    prepare: PrepareConfig,
    sample: SampleConfig,
    result: RealtimeResult,
) -> None:
    """Pass 1: validate everything and spool the rows to embed (nothing is sent yet)."""
    rs = run.state
    started = time.monotonic()
    with store.locked("realtime intake"):
        exclude, already_planned = skip_done_or_planned(ws, rs.model, rs.dataset)
    intake = Intake(
        source=source,
        prepare=prepare,
        sample=sample,
        tokenizer=get_tokenizer(rs.model),
        rejected_path=run.paths.rejected,
        exclude=exclude,
        stored=stored_ids(store) if prepare.chunk_tokens else None,
    )
    try:
        write_rows(run.paths.rows, intake.records())
        save_run_deletes(run.paths.root, intake.stale)
    except BaseException:
        run.paths.rows.unlink(missing_ok=True)
        rs.status = "failed"
        rs.failure = {"error": "input refused before any request (see the error)"}
        run.save()
        raise
    standard, batch = cost_usd(rs.model, intake.stats.tokens_total)
    rs.sampling = intake.sampler.describe()
    rs.intake = intake.stats.to_json()
    rs.estimate = {"tokens": intake.stats.tokens_total, "cost_standard_usd": standard, "cost_batch_usd": batch}
    result.planned = intake.stats.sampled
    result.rejected = intake.stats.rejected
    result.truncated = intake.stats.truncated
    result.already_planned = sum(already_planned.values())
    result.held_by = dict(already_planned)
    result.skipped_existing = intake.skipped_existing - result.already_planned
    result.intake_s = round(time.monotonic() - started, 3)
    run.save()


def _check_sinks(
    settings: Settings,
    key: str,
    cfg: RealtimeConfig,
    pg_target: PgTarget | None,
    libsql_target: LibsqlTarget | None,
    ingest: IngestConfig,
) -> None:
    """The sinks must take the model's vectors before any embedding request is paid for; an
    unknown model's dimension costs one tiny request."""
    if pg_target is None and libsql_target is None:
        return

    def probe() -> int:
        async def once() -> EmbeddingAnswer:
            client = new_sdk_client(key, settings)
            try:
                return await embeddings_once(client, ["dimension probe"], model=cfg.model)
            finally:
                await client.close()

        return int(anyio.run(once).vectors.shape[1])

    check_targets(
        dim=ingest.truncate_dim or target_dimension(cfg.model, cfg.dimensions, probe),
        pg_target=pg_target,
        libsql_target=libsql_target,
        dsn=ingest.dsn,
        libsql_auth_token=ingest.libsql_auth_token,
    )


def _embed(
    ws: Workspace,
    store: DatasetStore,
    run: Run,
    settings: Settings,
    keys: tuple[str, ...],
    cfg: RealtimeConfig,
    ingest: IngestConfig,
    result: RealtimeResult,
    records: Iterator[Record],
    on_rows: Callable[[int], None] | None,
    kept_failed: list[tuple[Record, str]] | None = None,
) -> None:
    """Pass 2: send, commit, and record the outcome in run.json (also when it stops early).
    ``kept_failed``: rows a retry did not send (their failure cannot change); they stay failed."""
    rs = run.state
    storage = store.storage(ingest, rs.args)
    sink = StreamCommitter(store, rs, kind="realtime", dim=None, storage=storage, rows_per_shard=cfg.commit_rows)
    write_lock = asyncio.Lock()

    async def deliver(records: list[Record], answer: EmbeddingAnswer) -> None:
        result.usage_tokens += answer.prompt_tokens
        async with write_lock:
            await asyncio.to_thread(sink.add, records, answer.vectors)
            if sink.pending and time.monotonic() - sink.last_commit >= cfg.commit_interval_s:
                await asyncio.to_thread(sink.commit)
        if on_rows is not None:
            on_rows(sink.rows)

    engine = Sender(settings, keys, cfg, deliver)
    started = time.monotonic()
    ok = False
    stopped: BaseException | None = None
    try:
        anyio.run(engine.run, records)
        ok = True
    except BaseException as exc:
        stopped = exc
        raise
    finally:
        # Paid-for rows are committed even when the run stops early (Ctrl-C, a fatal answer).
        try:
            sink.commit()
        except Exception:
            sink.abort()
            if ok:
                raise
        result.shards += sink.shards
        result.rows = sink.committed_rows
        result.wall_s = round(time.monotonic() - started, 3)
        std, _ = cost_usd(rs.model, result.usage_tokens)
        result.cost_usd = std
        result.keys = {k.name: k.stats() for k in engine.pool.keys + engine.pool.retired}
        for name in ("requests", "answered_429", "retries", "splits"):
            setattr(result, name, getattr(result, name) + getattr(engine.stats, name))
        failed = [*(kept_failed or []), *engine.failed]
        failed += [(r, INCOMPLETE_DOCUMENT) for r in sink.incomplete()]  # sent again whole by a retry
        _write_failed(run.paths, failed)
        result.failed = len(failed)
        if ok:
            rs.status, rs.failure = "finished", None
        else:
            interrupted = isinstance(stopped, KeyboardInterrupt | asyncio.CancelledError)
            rs.status = "interrupted" if interrupted else "failed"
            rs.failure = {"error": str(stopped) or type(stopped).__name__, "resume": "run the same command again"}
        rs.failed_reasons = top_reasons(reason for _, reason in failed)
        rs.counts = {
            "planned": result.planned,
            "succeeded": result.rows,
            "failed": result.failed,
            "rejected": result.rejected,
            "skipped_existing": result.skipped_existing,
        }
        rs.actual = {"usage_tokens": result.usage_tokens, "cost_standard_usd": std}
        rs.realtime = result.to_json()
        rs.timings = {"intake_s": result.intake_s, "wall_s": result.wall_s}
        if ok:
            run.paths.rows.unlink(missing_ok=True)
            info = {"created_at": rs.created_at, "kind": "realtime"}
            rs.counts["deleted"] = commit_run_deletes(store, run.paths.root, run_id=rs.run_id, run_info=info)
            if rs.sampling:
                store.record_run(rs.run_id, {"created_at": rs.created_at, "kind": "realtime"}, sampling=rs.sampling)
        run.save()


def _sinks(ws: Workspace, run: Run, ingest: IngestConfig, result: RealtimeResult) -> None:
    rs = run.state
    written = run_sinks_blocking(ws, run, dsn=ingest.dsn, libsql_auth_token=ingest.libsql_auth_token)
    result.pg = written.get("pg", result.pg)
    result.libsql = written.get("libsql", result.libsql)
    from embedbatch.sinks.resume import finish_dead_runs

    finish_dead_runs(ws, run.paths, result, kind="realtime", dsn=ingest.dsn, libsql_auth_token=ingest.libsql_auth_token)
    if rs.pg_target is not None or rs.libsql_target is not None:
        rs.realtime = result.to_json()
        run.save()


def _write_failed(paths: RunPaths, failed: list[tuple[Record, str]]) -> None:
    """failed_ids.tsv (id, reason) and failed_rows.jsonl (the rows, for retry)."""
    if not failed and not paths.failed_ids.exists():
        return
    lines = [b"id\treason\tbatch\tline\n"]
    lines += [f"{tsv_escape(r.id)}\t{tsv_escape(reason)}\trealtime\t\n".encode() for r, reason in failed]
    atomic_write_bytes(paths.failed_ids, b"".join(lines))
    tmp = paths.failed_rows.with_suffix(".tmp")
    write_rows(tmp, iter([r for r, _ in failed]))
    tmp.replace(paths.failed_rows)
