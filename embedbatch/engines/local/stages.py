"""The local worker's stages: loader thread → encoder → writer thread, with bounded queues.

- Loader: reads, prepares and samples (the shared intake), then tokenizes chunks with the fast
  tokenizer's batch call on its own tokenizer instance (fast tokenizers are not thread-safe).
- Encoder: puts sequences into length buckets, takes the fullest bucket, sizes the batch as
  ``tokens_per_batch // padded_len``, runs the model under ``torch.inference_mode()`` and moves
  each batch to CPU (or hands it to a :class:`DevicePool`).
- Writer: writes rows (ids travel with their vectors, whatever order they were encoded in)
  through the dataset store, committing every full shard.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedbatch.config import IngestConfig, LocalConfig, PrepareConfig, SampleConfig, SourceConfig
from embedbatch.engines.local.bucketing import Bucketer, Item
from embedbatch.engines.local.devices import DevicePool
from embedbatch.engines.local.model import LocalEncoder, Tokenized
from embedbatch.intake import Intake
from embedbatch.records import Record
from embedbatch.runs import Run, RunState
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.index import IdIndex
from embedbatch.store.stream import StreamCommitter

__all__ = ["END", "LocalJob", "LocalResult", "StageClock", "chunk_tokenizer", "cut", "encode", "load", "write"]

LOAD_CHUNK = 256  # records tokenized per batch call
QUEUE_CHUNKS = 8  # loader → encoder queue depth (chunks)
WRITE_QUEUE = 16  # encoder → writer queue depth (batches)
END = object()  # closes a queue


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
        quality: the quality guard's probe (min and mean cosine against torch float32), when
            the backend, dtype or quantization is not the default.
        cache_hit: onnx/openvino backend: the export came from the cache.
        calibration: ``--backend auto``: the candidates measured (rows/s, min cosine) and the
            choice, or the remembered choice (``cache_hit``).
        ray: runs on a Ray cluster: address, actors, cluster CPUs/GPUs and nodes, rows spooled,
            rows per worker (host:pid), repeats dropped by the driver, and the seconds until
            the last actor had loaded its model (``actors_ready_s``).
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
    libsql: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"
    quality: dict[str, Any] | None = None
    cache_hit: bool | None = None
    calibration: dict[str, Any] | None = None
    ray: dict[str, Any] | None = None

    @property
    def padding_ratio(self) -> float:
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["padding_ratio"] = round(self.padding_ratio, 4)
        out["rows_per_s"] = round(self.rows / self.wall_s, 2) if self.wall_s else None
        out["tokens_per_s"] = round(self.real_tokens / self.wall_s, 1) if self.wall_s else None
        out["rows_per_batch"] = round(self.rows / self.batches, 1) if self.batches else None
        return out


@dataclass(kw_only=True)
class LocalJob:
    """What one local run works with, from :func:`~.pipeline.run_local` to the engine that
    embeds (the single process, or :mod:`.raydata`).

    Attributes:
        store / run: the dataset and the run (its lock held).
        enc: the loaded encoder (on the driver, for Ray).
        tokens_per_batch / edges: the bucketing (padded tokens per forward pass; bucket edges,
            tokens).
        max_content: content tokens kept per text (the cut).
        cache_dir: ``workspace/cache/models``.
        on_rows: progress callback with the rows written so far.
    """

    store: DatasetStore
    run: Run
    enc: LocalEncoder
    source: SourceConfig
    prepare: PrepareConfig
    sample: SampleConfig
    local: LocalConfig
    ingest: IngestConfig
    result: LocalResult
    tokens_per_batch: int
    edges: list[int]
    max_content: int
    cache_dir: Path
    on_rows: Callable[[int], None] | None = None


def cut(text: str, metadata: dict[str, Any], tk: Tokenized, max_content: int) -> tuple[str, int, bool]:
    """The text as embedded: cut at the end of its last kept token when ``tk`` says it is longer
    than ``max_content`` tokens (marked in ``metadata``). Returns (text, content tokens, cut?)."""
    if tk.chars >= len(text):
        return text, min(tk.tokens_before, max_content), False
    metadata["truncated"] = True
    metadata["truncated_tokens"] = tk.tokens_before - max_content
    return text[: tk.chars], max_content, True


def load(
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
                rec.text, rec.n_tokens, was_cut = cut(rec.text, rec.metadata, tk, max_content)
                result.truncated += was_cut
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
        out.put(END)


def batches(
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
        if item is END:
            done = True
        elif item is not None:
            for rec, ids in item:
                bucketer.add(Item(ids, rec))
        while (batch := bucketer.take(force=bucketer.pending > cap_items)) is not None:
            yield batch
        if item is None:
            yield None
    yield from bucketer.drain()


def encode(
    enc: LocalEncoder,
    pool: DevicePool | None,
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

    for batch in batches(bucketer, chunks, clock, cap_items, lambda: pool is None or pool.busy < pool.capacity):
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


def write(
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
    storage = store.storage(cfg, rs.args)
    sink = StreamCommitter(store, rs, kind="local", dim=dim, storage=storage, rows_per_shard=cfg.rows_per_shard)
    t = time.perf_counter()
    try:
        while True:
            t = clock.busy(t)
            item = inbox.get()
            t = clock.idle(t)
            if item is END:
                break
            if errors:
                continue
            records, vectors = item
            sink.add(records, vectors)
            result.rows = sink.rows
            result.shards = sink.shards
            if on_rows is not None:
                on_rows(result.rows)
        if not errors:
            sink.check_complete()
            sink.commit()
            result.shards = sink.shards
        else:
            sink.abort()
    except BaseException as exc:
        sink.abort()
        errors.append(exc)
    finally:
        clock.busy(t)


def chunk_tokenizer(job: LocalJob) -> Any:
    """The local model's own tokenizer for chunking (None without ``--chunk-tokens``)."""
    if not job.prepare.chunk_tokens:
        return None
    from embedbatch.tokens import HFTokenizer

    return HFTokenizer(job.enc.model.tokenizer.name_or_path)
