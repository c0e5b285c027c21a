"""The local worker: loader thread → encoder → writer thread, with bounded queues.

- Loader: reads, prepares and samples (the shared intake), then tokenizes chunks with the fast
  tokenizer's batch call on its own tokenizer instance (fast tokenizers are not thread-safe).
- Encoder: puts sequences into length buckets, takes the fullest bucket, sizes the batch as
  ``tokens_per_batch // padded_len``, runs the model under ``torch.inference_mode()`` and moves
  each batch to CPU. With ``devices`` (``cuda:0,cuda:1``), one encoder process per device
  takes batches tagged with an id, and results are reassembled by that id.
- Writer: writes rows (ids travel with their vectors, whatever order they were encoded in) into
  the same shards and manifest as the Batch API path, committing the manifest per shard.

Memory is bounded by the queue sizes and the bucket cap, not by the dataset. A crashed run
restarted with the same arguments skips ids whose text is already in the dataset's shards.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson
import structlog

from embedbatch.config import IngestConfig, LocalConfig, PgTarget, PrepareConfig, SampleConfig, SourceConfig
from embedbatch.engines.local.bucketing import Bucketer, Item, bucket_edges
from embedbatch.engines.local.model import LocalEncoder, model_label
from embedbatch.intake import Intake, dataset_name
from embedbatch.records import Record
from embedbatch.runs import Run, RunState, git_sha, lockfile_sha256
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.index import IdIndex
from embedbatch.workspace import Workspace, file_lock

__all__ = ["LocalResult", "StageClock", "run_local"]

log = structlog.get_logger(__name__)

LOAD_CHUNK = 256  # records tokenized per batch call
QUEUE_CHUNKS = 8  # loader → encoder queue depth (chunks)
WRITE_QUEUE = 16  # encoder → writer queue depth (batches)
_END = object()


@dataclass
class StageClock:
    """Busy and idle (waiting on a queue) seconds of one pipeline stage."""

    busy_s: float = 0.0
    idle_s: float = 0.0

    def busy(self, since: float) -> float:
        now = time.perf_counter()
        self.busy_s += now - since
        return now

    def idle(self, since: float) -> float:
        now = time.perf_counter()
        self.idle_s += now - since
        return now


@dataclass
class LocalResult:
    """What a local run did; also stored in run.json under ``local``.

    Attributes:
        padding_ratio: padded tokens / real tokens (1.0 means no padding).
        rows_per_s / tokens_per_s: over the whole run (wall clock), real tokens.
    """

    run_dir: str
    model: str
    device: str
    dtype: str
    rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    skipped_existing: int = 0
    rejected: int = 0
    truncated: int = 0
    shards: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    warmup_s: float = 0.0
    loader: StageClock = field(default_factory=StageClock)
    encoder: StageClock = field(default_factory=StageClock)
    writer: StageClock = field(default_factory=StageClock)
    pg: dict[str, Any] = field(default_factory=dict)

    @property
    def padding_ratio(self) -> float:
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["padding_ratio"] = round(self.padding_ratio, 4)
        out["rows_per_s"] = round(self.rows / self.wall_s, 2) if self.wall_s else None
        out["tokens_per_s"] = round(self.real_tokens / self.wall_s, 1) if self.wall_s else None
        return out


class _DevicePool:
    """One encoder process per device; batches go out tagged with an id and come back by it."""

    def __init__(self, model: str, devices: tuple[str, ...], dtype: str) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.results: Any = ctx.Queue()
        self.inboxes: list[Any] = []
        self.procs = []
        for device in devices:
            inbox = ctx.Queue(maxsize=2)
            p = ctx.Process(target=_device_worker, args=(model, device, dtype, inbox, self.results), daemon=True)
            p.start()
            self.inboxes.append(inbox)
            self.procs.append(p)
        self.in_flight = [0] * len(devices)
        ready = [self.results.get(timeout=600) for _ in devices]
        for r in ready:
            if isinstance(r, BaseException):
                self.close()
                raise r

    def submit(self, tag: int, batch: list[list[int]], pad_to: int | None) -> None:
        slot = min(range(len(self.inboxes)), key=lambda i: self.in_flight[i])
        self.in_flight[slot] += 1
        self.inboxes[slot].put((tag, slot, batch, pad_to))

    def get(self) -> tuple[int, Any]:
        tag, slot, result = self.results.get()
        self.in_flight[slot] -= 1
        if isinstance(result, BaseException):
            raise result
        return tag, result

    @property
    def busy(self) -> int:
        return sum(self.in_flight)

    @property
    def capacity(self) -> int:
        return 2 * len(self.inboxes)

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _device_worker(model: str, device: str, dtype: str, inbox: Any, results: Any) -> None:
    try:
        enc = LocalEncoder(model, device=device, dtype=dtype)
    except BaseException as exc:
        results.put(exc)
        return
    results.put(device)
    while (job := inbox.get()) is not None:
        tag, slot, batch, pad_to = job
        try:
            results.put((tag, slot, enc.encode_ids(batch, pad_to=pad_to)))
        except BaseException as exc:
            results.put((tag, slot, exc))


def run_local(
    ws: Workspace,
    *,
    source: SourceConfig,
    prepare: PrepareConfig,
    sample: SampleConfig,
    local: LocalConfig,
    ingest: IngestConfig | None = None,
    pg_target: PgTarget | None = None,
    dsn: str | None = None,
    args: dict[str, Any] | None = None,
    encoder: LocalEncoder | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> LocalResult:
    """Embed a source with a local SentenceTransformer into the dataset's shards (and pgvector).

    Args:
        encoder: an already loaded encoder (tests, serve); else built from ``local``.
        dsn: PostgreSQL for ``pg_target`` (never stored).
        on_rows: progress callback with the rows written so far.

    Returns:
        :class:`LocalResult`, also written to the run's run.json.

    Raises:
        InputError: bad input (before anything is written).
        UsageError: bad device, dtype or model.
        LockedError: another local run of this dataset and model is running.
    """
    ingest = ingest or IngestConfig()
    enc = encoder or LocalEncoder(local.model, device=local.device, dtype=local.dtype, compile=local.compile)
    label = model_label(local.model)
    dataset = dataset_name(source)
    on_device = enc.device.startswith("cuda") or bool(local.devices)
    tokens_per_batch = local.tokens_per_batch or (131_072 if on_device else 8192)
    max_tokens = min(local.bucket_max_tokens, enc.max_length)
    edges = bucket_edges(min(local.bucket_min_tokens, max_tokens), max_tokens)
    pad_to = "bucket" if local.compile else local.pad_to
    bucketer = Bucketer(edges, tokens_per_batch, pad_to)  # type: ignore[arg-type]
    max_content = min(prepare.max_tokens, enc.max_length - enc.special_tokens(enc.new_tokenizer()))
    run = ws.new_run(label, dataset)
    run.root.mkdir(parents=True)
    result = LocalResult(str(run.root), label, enc.device, enc.dtype if not local.devices else local.dtype)
    rs = RunState(
        run_id=run.run_id,
        model=label,
        dataset=dataset,
        source="postgres" if source.is_postgres else "file",
        source_path=source.pg_table or "query" if source.is_postgres else source.path,
        kind="local",
        args=args or {},
        git_sha=git_sha(),
        lockfile_sha256=lockfile_sha256(),
        pg_target=pg_target.to_json() if pg_target else None,
    )
    rs.save(run)
    store = DatasetStore(ws, label, dataset)
    # The run lock is held for the whole run: poll and status leave a running local run alone.
    with Run.open(run, purpose="local") as state:
        _run_locked(
            ws,
            store,
            state,
            enc,
            source,
            prepare,
            sample,
            local,
            ingest,
            result,
            on_rows,
            tokens_per_batch,
            edges,
            bucketer,
            max_content,
        )
        if pg_target is not None:
            import anyio

            from embedbatch.sinks.pgvector import sink_run

            result.pg = anyio.run(lambda: sink_run(ws, state, dsn=dsn))
            state.state.local = result.to_json()
            state.save()
    return result


def _run_locked(
    ws: Workspace,
    store: DatasetStore,
    run: Run,
    enc: LocalEncoder,
    source: SourceConfig,
    prepare: PrepareConfig,
    sample: SampleConfig,
    local: LocalConfig,
    ingest: IngestConfig,
    result: LocalResult,
    on_rows: Callable[[int], None] | None,
    tokens_per_batch: int,
    edges: list[int],
    bucketer: Bucketer,
    max_content: int,
) -> None:
    rs = run.state
    started = time.perf_counter()
    with file_lock(store.shards_dir.parent / f".{store.dataset}.local.lock", what=f"local run of {store.dataset}"):
        embedded = store.id_index()
        # No tokenizer here: the loader counts and cuts in batches. Already-embedded rows are
        # dropped after the cut (their shard text is the cut text), so resume compares like with like.
        intake = Intake(source=source, prepare=prepare, sample=sample, tokenizer=None, rejected_path=run.paths.rejected)
        if local.compile:
            # One forward per bucket shape before the run, so compilation is not timed as work.
            t0 = time.perf_counter()
            enc.warm_up([(max(1, tokens_per_batch // e), e) for e in edges])
            result.warmup_s = time.perf_counter() - t0
        chunks: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_CHUNKS)
        writes: queue.Queue[Any] = queue.Queue(maxsize=WRITE_QUEUE)
        errors: list[BaseException] = []
        loader = threading.Thread(
            target=_load, args=(intake, enc, max_content, embedded, chunks, result, errors), daemon=True
        )
        writer = threading.Thread(
            target=_write, args=(store, rs, enc.dim, ingest, writes, result, errors, on_rows), daemon=True
        )
        loader.start()
        writer.start()
        pool = _DevicePool(local.model, local.devices, local.dtype) if local.devices else None
        try:
            _encode(enc, pool, bucketer, chunks, writes, result, cap_items=8 * max(1, tokens_per_batch // edges[0]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            writes.put(_END)
            writer.join()
            if pool is not None:
                pool.close()
            loader.join(timeout=5)
        if errors:
            raise errors[0]
    result.wall_s = time.perf_counter() - started
    result.rejected = intake.stats.rejected
    rs.status = "finished"
    rs.sampling = intake.sampler.describe()  # counts are final only now
    if result.shards:
        store.record_run(rs.run_id, {"created_at": rs.created_at, "kind": "local"}, sampling=rs.sampling)
    rs.intake = intake.stats.to_json()
    rs.counts = {
        "planned": intake.stats.sampled,
        "succeeded": result.rows,
        "failed": 0,
        "rejected": intake.stats.rejected,
        "skipped_existing": intake.skipped_existing,
    }
    rs.local = result.to_json()
    rs.timings = {"wall_s": round(result.wall_s, 3)}
    run.save()


def _load(
    intake: Intake,
    enc: LocalEncoder,
    max_content: int,
    embedded: IdIndex,
    out: queue.Queue[Any],
    result: LocalResult,
    errors: list[BaseException],
) -> None:
    """Loader thread: intake → tokenized chunks of (record, ids), texts cut at a token boundary."""
    clock = result.loader
    tok = enc.new_tokenizer()
    t = time.perf_counter()
    try:
        records = intake.records()
        while True:
            chunk: list[Record] = []
            for rec in records:
                chunk.append(rec)
                if len(chunk) == LOAD_CHUNK:
                    break
            if not chunk:
                break
            items = []
            for rec, tk in zip(chunk, enc.tokenize(tok, [r.text for r in chunk], max_tokens=max_content), strict=True):
                if tk.chars < len(rec.text):
                    rec.text = rec.text[: tk.chars]
                    rec.metadata["truncated"] = True
                    rec.metadata["truncated_tokens"] = tk.tokens_before - max_content
                    result.truncated += 1
                rec.n_tokens = min(tk.tokens_before, max_content)
                if embedded.contains(rec.id, rec.sha256):
                    result.skipped_existing += 1
                    continue
                items.append((rec, tk.ids))
            t = clock.busy(t)
            out.put(items)
            t = clock.idle(t)
    except BaseException as exc:
        errors.append(exc)
    finally:
        clock.busy(t)
        out.put(_END)


def _batches(
    bucketer: Bucketer, chunks: queue.Queue[Any], clock: StageClock, cap_items: int, can_take: Callable[[], bool]
) -> Iterator[list[Item] | None]:
    """Batches to encode as the loader fills the buckets; yields None when nothing is ready."""
    done = False
    while not done:
        t = time.perf_counter()
        try:
            item = chunks.get(timeout=0.05) if can_take() else None
        except queue.Empty:
            item = None
        clock.idle(t)
        if item is _END:
            done = True
        elif item is not None:
            for rec, ids in item:
                bucketer.add(Item(ids, rec))
        while (batch := bucketer.take(force=bucketer.pending > cap_items)) is not None:
            yield batch
        if item is None:
            yield None
    yield from bucketer.drain()


def _encode(
    enc: LocalEncoder,
    pool: _DevicePool | None,
    bucketer: Bucketer,
    chunks: queue.Queue[Any],
    writes: queue.Queue[Any],
    result: LocalResult,
    cap_items: int,
) -> None:
    """Encoder: buckets → forward passes (here, or on the device pool) → writer queue."""
    clock = result.encoder
    waiting: dict[int, list[Item]] = {}
    tag = 0

    def emit(batch: list[Item], enc_out: Any) -> None:
        result.real_tokens += enc_out.real_tokens
        result.padded_tokens += enc_out.padded_tokens
        result.batches += 1
        t = time.perf_counter()
        writes.put(([i.payload for i in batch], enc_out.vectors))
        clock.idle(t)

    def collect(block: bool) -> None:
        while pool is not None and pool.busy and (block or not pool.results.empty()):
            t = time.perf_counter()
            got_tag, out = pool.get()
            clock.idle(t)
            emit(waiting.pop(got_tag), out)
            block = False

    for batch in _batches(bucketer, chunks, clock, cap_items, lambda: pool is None or pool.busy < pool.capacity):
        if batch is None:
            collect(block=False)
            continue
        width = bucketer.pad_width(batch)
        if pool is None:
            t = time.perf_counter()
            out = enc.encode_ids([i.ids for i in batch], pad_to=width)
            clock.busy(t)
            emit(batch, out)
        else:
            while pool.busy >= pool.capacity:
                collect(block=True)
            waiting[tag] = batch
            pool.submit(tag, [i.ids for i in batch], width)
            tag += 1
            collect(block=False)
    while pool is not None and pool.busy:
        collect(block=True)


def _write(
    store: DatasetStore,
    rs: RunState,
    dim: int,
    cfg: IngestConfig,
    inbox: queue.Queue[Any],
    result: LocalResult,
    errors: list[BaseException],
    on_rows: Callable[[int], None] | None,
) -> None:
    """Writer thread: rows into shards; each full shard is committed through the store."""
    clock = result.writer
    writer = store.writer(dim=dim, dtype=cfg.dtype, rows_per_shard=cfg.rows_per_shard, git_sha=rs.git_sha)
    commits = 0

    def commit() -> None:
        nonlocal commits
        commits += 1
        writer.add_source(f"{rs.run_id}/local-{commits:05d}")
        entries = store.commit(writer, run_id=rs.run_id, run_info={"created_at": rs.created_at, "kind": "local"})
        result.shards += [e["file"] for e in entries]

    t = time.perf_counter()
    try:
        while True:
            t = clock.busy(t)
            item = inbox.get()
            t = clock.idle(t)
            if item is _END:
                break
            if errors:
                continue
            records, vectors = item
            start = 0
            while start < len(records):
                room = cfg.rows_per_shard - writer.rows_in_open_shard
                part = records[start : start + room]
                writer.write(
                    ids=[r.id for r in part],
                    texts=[r.text for r in part],
                    metadata=[orjson.dumps(r.metadata).decode() for r in part],
                    splits=[r.split for r in part],
                    vectors=np.asarray(vectors[start : start + len(part)], dtype=np.float32),
                    source=rs.source,
                    dataset=rs.dataset,
                    model=rs.model,
                    run_id=rs.run_id,
                )
                start += len(part)
                result.rows += len(part)
                if writer.rows_in_open_shard >= cfg.rows_per_shard:
                    commit()
            if on_rows is not None:
                on_rows(result.rows)
        if not errors and writer.rows_in_open_shard:
            commit()
        else:
            writer.abort()
    except BaseException as exc:
        writer.abort()
        errors.append(exc)
    finally:
        clock.busy(t)
