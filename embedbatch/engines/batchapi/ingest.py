"""Ingest: map output lines back to requests by ``custom_id`` and write shards, exactly once.

Per batch: the input's ids are indexed (8 bytes of state per row plus the id), the output file
is streamed line by line and each vector decoded (base64 little-endian float32, or a float
list) into a preallocated ``(n, dim)`` float32 array at its input position, validated (HTTP 200,
dimension, finite). Error-file lines (both shapes) and ids absent from every file are failed
with their reason into ``failed_ids.tsv``. Then input and records are streamed again, in input
order, into the open shard.

Order of writes, so a crash anywhere is resumed with no duplicate and no lost row: shard files
(temp → rename, unlisted) → manifest (lists the shards and their ``run_id/batch`` sources) →
``batch.json`` status ``ingested``. On the next ingest, unlisted shards are deleted and batches
already listed in the manifest are only marked.
"""

from __future__ import annotations

import binascii
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pybase64
import structlog

from embedbatch.config import IngestConfig
from embedbatch.engines.batchapi.plan import RECORDS_FILE, BatchRecords
from embedbatch.errors import StateError
from embedbatch.runs import BatchState, RunState, crash_point, load_batches
from embedbatch.store.shards import Manifest, ShardWriter, remove_orphans, shard_ids, shard_text_hashes
from embedbatch.tokens import MODEL_DIMENSIONS, cost_usd
from embedbatch.workspace import RunPaths, Workspace, atomic_write_bytes, file_lock

__all__ = [
    "BatchResult",
    "IngestResult",
    "decode_vector",
    "ingest_run",
    "ingest_run_locked",
    "read_batch_results",
]

log = structlog.get_logger(__name__)
CHUNK_ROWS = 8192


def decode_vector(value: Any) -> np.ndarray:
    """A vector from an output line: base64 of little-endian float32, or a list of floats.

    Returns:
        ``(dim,)`` float32.

    Raises:
        ValueError: not decodable.
    """
    if isinstance(value, str):
        # pybase64 decodes with SIMD: 6x the stdlib's rate on 8 KiB vectors (bench/ingest.py),
        # where the stdlib decoder was the largest cost of an ingest.
        raw = pybase64.b64decode(value, validate=True)
        if len(raw) % 4:
            raise ValueError(f"base64 payload of {len(raw)} bytes is not float32")
        return np.frombuffer(raw, dtype="<f4")
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float32)
    raise ValueError(f"embedding is a {type(value).__name__}")


@dataclass
class BatchResult:
    """Decoded results of one batch.

    Attributes:
        vectors: ``(n, dim)`` float32 in input order (rows with ``ok`` False are garbage).
        ok: ``(n,)`` bool.
        failed: (id, reason, line) — line is the output/error file line, 0 if absent.
        usage_tokens: ``usage.total_tokens`` summed over successful lines.
    """

    ids: list[str]
    vectors: np.ndarray
    ok: np.ndarray
    failed: list[tuple[str, str, int]] = field(default_factory=list)
    usage_tokens: int = 0
    dim: int | None = None


def _error_reason(line: dict[str, Any]) -> str:
    err = line.get("error")
    if err:
        return f"{err.get('code') or 'error'}: {err.get('message', '')}".strip()
    resp = line.get("response") or {}
    body = resp.get("body") or {}
    e = body.get("error") if isinstance(body, dict) else None
    if isinstance(e, dict):
        code = e.get("code") or e.get("type") or "error"
        return f"http {resp.get('status_code')} {code}: {e.get('message', '')}".strip()
    return f"http {resp.get('status_code')}"


class BatchReader:
    """Streams one downloaded batch: ok rows in output order, chunk by chunk.

    The batch's records (``records.parquet``: ids, splits, metadata) are read first and
    ``input.jsonl`` is indexed (the byte offset of every line: 8 bytes each), so a row's text is
    read back by offset when its vector arrives; the output file is never held whole and no
    ``(n, dim)`` array is built.

    After :meth:`chunks` is exhausted, ``failed`` lists (id, reason, line) for every input id that
    is not ok (error lines of both shapes, invalid vectors, and ids absent from every file),
    ``usage_tokens`` sums ``usage.total_tokens``, and ``dim`` is the vectors' dimension.
    """

    def __init__(
        self,
        batch_dir: Path,
        *,
        expected_dim: int | None,
        remote_status: str | None,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.dir = batch_dir
        self.dim = expected_dim
        self.remote_status = remote_status
        self.chunk_rows = chunk_rows
        self.records = BatchRecords.read(batch_dir)
        self.ids: list[str] = self.records.ids
        inp_off = [0]
        with open(batch_dir / "input.jsonl", "rb") as fh:
            for line in fh:
                inp_off.append(inp_off[-1] + len(line))
        if len(inp_off) - 1 != len(self.ids):
            raise StateError(
                f"{batch_dir}: {RECORDS_FILE} has {len(self.ids)} rows but input.jsonl {len(inp_off) - 1} lines"
            )
        self.inp_off = np.asarray(inp_off, dtype=np.int64)
        self.pos = {rid: i for i, rid in enumerate(self.ids)}
        self.ok = np.zeros(len(self.ids), dtype=bool)
        self.failed_at: dict[int, tuple[str, int]] = {}
        self.usage_tokens = 0
        self.failed: list[tuple[str, str, int]] = []

    @property
    def n_ok(self) -> int:
        return int(self.ok.sum())

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions (m,) int64, vectors (m, dim) float32)`` of valid rows, in output order."""
        out = self.dir / "output.jsonl"
        if out.exists():
            yield from self._output_chunks(out)
        self._read_errors()
        for i in range(len(self.ids)):
            if not self.ok[i]:
                reason, lineno = self.failed_at.get(
                    i, (f"missing from output (batch {self.remote_status or 'unknown'})", 0)
                )
                self.failed.append((self.ids[i], reason, lineno))

    def _output_chunks(self, out: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pos_get = self.pos.get
        positions: list[int] = []
        lines: list[int] = []
        usages: list[int] = []
        buf: np.ndarray | None = np.empty((self.chunk_rows, self.dim), np.float32) if self.dim else None
        with open(out, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = orjson.loads(raw)
                    i = pos_get(line["custom_id"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    if raw.strip():
                        log.warning("unreadable output line", batch=self.dir.name, line=lineno)
                    continue
                if i is None or self.ok[i]:
                    log.warning("output line for an unknown or repeated custom_id", batch=self.dir.name, line=lineno)
                    continue
                resp = line.get("response") or {}
                if resp.get("status_code") != 200 or line.get("error"):
                    self.failed_at[i] = (_error_reason(line), lineno)
                    continue
                try:
                    body = resp["body"]
                    data = body["data"]
                    item = data[0] if len(data) == 1 else next(d for d in data if d.get("index", 0) == 0)
                    vec = decode_vector(item["embedding"])
                except (KeyError, TypeError, StopIteration, ValueError, binascii.Error) as exc:
                    self.failed_at[i] = (f"undecodable embedding: {exc}", lineno)
                    continue
                if self.dim is None:
                    self.dim = len(vec)
                if buf is None:
                    buf = np.empty((self.chunk_rows, self.dim), np.float32)
                if len(vec) != self.dim:
                    self.failed_at[i] = (f"dimension {len(vec)} != expected {self.dim}", lineno)
                    continue
                buf[len(positions)] = vec
                positions.append(i)
                lines.append(lineno)
                usages.append(int((body.get("usage") or {}).get("total_tokens") or 0))
                self.ok[i] = True
                self.failed_at.pop(i, None)
                if len(positions) == self.chunk_rows:
                    yield self._finish_chunk(buf, positions, lines, usages)
                    buf = np.empty((self.chunk_rows, self.dim), np.float32)
                    positions, lines, usages = [], [], []
        if positions and buf is not None:
            yield self._finish_chunk(buf, positions, lines, usages)

    def _finish_chunk(
        self, buf: np.ndarray, positions: list[int], lines: list[int], usages: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        vecs = buf[: len(positions)]
        pos = np.asarray(positions, dtype=np.int64)
        self.usage_tokens += sum(usages)
        # Finiteness in one vectorised pass (a per-row check costs a ufunc call per line).
        finite = np.isfinite(vecs).all(axis=1)
        if not finite.all():
            for k in np.nonzero(~finite)[0]:
                self.ok[pos[k]] = False
                self.failed_at[int(pos[k])] = ("non-finite values in embedding", lines[k])
                self.usage_tokens -= usages[k]  # an invalid row counts as failed, as before
            vecs, pos = vecs[finite], pos[finite]
        return pos, vecs

    def _read_errors(self) -> None:
        err = self.dir / "errors.jsonl"
        if not err.exists():
            return
        with open(err, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                i = self.pos.get(line.get("custom_id"))
                if i is not None and not self.ok[i]:
                    self.failed_at[i] = (_error_reason(line), lineno)

    def rows_at(self, positions: np.ndarray) -> tuple[list[str], list[str], list[str], list[str | None]]:
        """(ids, texts, metadata JSON, splits) of input rows, read back by byte offset."""
        recs = self.records
        ids, texts, metas, splits = [], [], [], []
        off = self.inp_off
        with open(self.dir / "input.jsonl", "rb") as inf:
            ifd = inf.fileno()
            for i in positions.tolist():
                req = orjson.loads(os.pread(ifd, int(off[i + 1] - off[i]), int(off[i])))
                rid = recs.ids[i]
                if req["custom_id"] != rid:
                    raise StateError(f"{self.dir}: {RECORDS_FILE} and input.jsonl disagree at row {i} (id {rid})")
                ids.append(rid)
                texts.append(req["body"]["input"])
                metas.append(recs.metadata_json(i))
                splits.append(recs.splits[i])
        return ids, texts, metas, splits


def read_batch_results(batch_dir: Path, *, expected_dim: int | None, remote_status: str | None) -> BatchResult:
    """The whole batch decoded into input order (``(n, dim)`` float32); for inspection and tests.
    Ingest itself streams with :class:`BatchReader`."""
    reader = BatchReader(batch_dir, expected_dim=expected_dim, remote_status=remote_status)
    parts = list(reader.chunks())
    dim = reader.dim or 0
    vectors = np.zeros((len(reader.ids), dim), np.float32)
    for pos, vecs in parts:
        vectors[pos] = vecs
    return BatchResult(reader.ids, vectors, reader.ok, reader.failed, reader.usage_tokens, reader.dim)


def _tsv_field(s: str) -> str:
    return s.replace("\t", " ").replace("\n", " ").replace("\r", " ")


@dataclass
class IngestResult:
    """What an ingest call did."""

    batches: int = 0
    rows: int = 0
    failed: int = 0
    shards: list[str] = field(default_factory=list)
    usage_tokens: int = 0
    orphans_removed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pg: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _expected_dim(rs: RunState, manifest: Manifest) -> int | None:
    if rs.dimensions:
        return rs.dimensions
    if manifest.dimensions:
        return manifest.dimensions
    return MODEL_DIMENSIONS.get(rs.model)


def rebuild_failed_ids(run: RunPaths, embedded: set[str]) -> int:
    """Write the run's failed_ids.tsv: every batch's failures whose id no shard holds (a retry
    that succeeded removes the id); the latest reason per id wins. Returns the row count."""
    latest: dict[bytes, bytes] = {}
    for name in run.batch_names():
        p = run.batch_dir(name) / "failed_ids.tsv"
        if p.exists():
            for row in p.read_bytes().splitlines(keepends=True)[1:]:
                rid = row.split(b"\t", 1)[0]
                if rid.decode() not in embedded:
                    latest[rid] = row
    lines = [b"id\treason\tbatch\tline\n", *latest.values()]
    atomic_write_bytes(run.failed_ids, b"".join(lines))
    return len(lines) - 1


async def ingest_run(ws: Workspace, run: RunPaths, config: IngestConfig | None = None) -> IngestResult:
    """Ingest every downloaded batch of the run under its lock (see the module docstring).

    Raises:
        LockedError: another process holds the run.
        StateError: the dataset's shards disagree with this run (dimension).
    """
    with file_lock(run.lock, what=f"run {run.run_id}"):
        if config is not None and config.redownload:
            from embedbatch.config import Settings
            from embedbatch.engines.batchapi.client import BatchClient
            from embedbatch.engines.batchapi.poll import download_batch

            client = BatchClient(Settings.from_env(workspace=ws.root))
            try:
                for bs in load_batches(run):
                    await download_batch(client, run, bs, redownload=True)
            finally:
                await client.close()
        return await ingest_run_locked(ws, run, config or IngestConfig())


async def ingest_run_locked(ws: Workspace, run: RunPaths, config: IngestConfig) -> IngestResult:
    """:func:`ingest_run` for a caller that already holds the run lock."""
    import anyio

    result = await anyio.to_thread.run_sync(_ingest_sync, ws, run, config)
    rs = RunState.load(run)
    if rs.pg_target:
        result.pg = await sink_run_to_pg(ws, run, rs)
    return result


async def sink_run_to_pg(ws: Workspace, run: RunPaths, rs: RunState) -> dict[str, Any]:
    """Write the run's shard rows into its pgvector target (``run.json`` ``pg_target``).

    The DSN comes from DATABASE_URL (``--pg-dsn`` sets it for the process) and is never stored.
    Progress per shard is kept in run.json, so a crash resumes at the first uncommitted chunk
    and a repeated ingest writes nothing new.

    Raises:
        UsageError: no DSN is configured.
        DatabaseError: the target does not fit or PostgreSQL fails.
    """
    from embedbatch.config import PgTarget, Settings
    from embedbatch.errors import UsageError
    from embedbatch.sinks.pgvector import sync_run_to_pg

    assert rs.pg_target is not None
    dsn = Settings.from_env(workspace=ws.root).database_url
    if not dsn:
        raise UsageError("the run writes to PostgreSQL: set DATABASE_URL or pass --pg-dsn")
    manifest = Manifest.load(ws, rs.model, rs.dataset)
    if manifest.dimensions is None:
        return {}
    target = PgTarget(**rs.pg_target)
    progress: dict[str, int] = dict(rs.pg.get("progress", {}))

    def save(p: dict[str, int]) -> None:
        state = RunState.load(run)
        state.pg["progress"] = dict(p)
        state.save(run)
        crash_point("pg_after_chunk")

    report = await sync_run_to_pg(
        ws,
        model=rs.model,
        dataset=rs.dataset,
        run_id=rs.run_id,
        target=target,
        dsn=dsn,
        dim=manifest.dimensions,
        progress=progress,
        save_progress=save,
    )
    state = RunState.load(run)
    totals = state.pg.setdefault("totals", {"written": 0, "missing_ids": 0, "skipped_has_vector": 0})
    for key in totals:
        totals[key] += getattr(report, key)
    state.save(run)
    log.info(
        "pgvector",
        run=rs.run_id,
        table=target.table,
        **{k: v for k, v in report.to_json().items() if k != "index_rebuilt"},
    )
    return report.to_json()


def _ingest_sync(ws: Workspace, run: RunPaths, config: IngestConfig) -> IngestResult:
    from concurrent.futures import Future, ThreadPoolExecutor

    started = time.monotonic()
    rs = RunState.load(run)
    manifest = Manifest.load(ws, rs.model, rs.dataset)
    res = IngestResult(orphans_removed=remove_orphans(ws, manifest))
    done_sources = manifest.sources()
    todo: list[BatchState] = []
    for bs in load_batches(run):
        if bs.status != "downloaded":
            continue
        if f"{rs.run_id}/{bs.name}" in done_sources:  # crashed after the manifest write
            bs.set_status("ingested")
            bs.save(run.batch_dir(bs.name))
            continue
        todo.append(bs)
    if not todo:
        res.seconds = time.monotonic() - started
        _update_run_costs(run)
        return res
    existing = shard_text_hashes(ws, rs.model, rs.dataset) if manifest.shards else {}
    expected = _expected_dim(rs, manifest)
    writer: ShardWriter | None = None
    group: list[BatchState] = []
    # One writer thread: pyarrow releases the GIL while it encodes and writes, so chunk k is
    # written while chunk k+1 is parsed. At most two chunks are in flight.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedbatch-shard-writer")
    in_flight: list[Future[None]] = []

    def submit(fn: Any, *args: Any, **kwargs: Any) -> None:
        in_flight.append(pool.submit(fn, *args, **kwargs))
        while len(in_flight) > 2:
            in_flight.pop(0).result()

    def drain() -> None:
        while in_flight:
            in_flight.pop(0).result()

    try:
        for bs in todo:
            d = run.batch_dir(bs.name)
            reader = BatchReader(d, expected_dim=expected, remote_status=bs.remote_status)
            if writer is not None and writer.rows_in_open_shard + bs.requests > config.rows_per_shard:
                drain()
                writer.close_shard()
            for positions, vecs in reader.chunks():
                if reader.dim is not None and manifest.dimensions is not None and reader.dim != manifest.dimensions:
                    raise StateError(
                        f"batch {bs.name} has {reader.dim}-d vectors but the dataset has {manifest.dimensions}-d shards"
                    )
                if writer is None:
                    assert reader.dim is not None
                    writer = ShardWriter(
                        ws,
                        manifest,
                        dim=reader.dim,
                        dtype=config.dtype,
                        rows_per_shard=config.rows_per_shard,
                        git_sha=rs.git_sha,
                    )
                ids, texts, metas, splits = reader.rows_at(positions)
                start = 0
                while start < len(ids):
                    if writer.rows_in_open_shard >= config.rows_per_shard:
                        drain()
                        writer.close_shard()
                    room = config.rows_per_shard - writer.rows_in_open_shard
                    end = start + room
                    part_ids = ids[start:end]
                    # Count the rows now, on this thread; the write itself happens on the writer thread.
                    writer.reserve(len(part_ids))
                    submit(
                        writer.write,
                        ids=part_ids,
                        texts=texts[start:end],
                        metadata=metas[start:end],
                        splits=splits[start:end],
                        vectors=vecs[start:end],
                        source=rs.source,
                        dataset=rs.dataset,
                        model=rs.model,
                        run_id=rs.run_id,
                    )
                    writer.note_supersedes([rid for rid in part_ids if rid in existing])
                    start = end
            if reader.dim is not None:
                expected = reader.dim
            failed_rows = b"".join(
                f"{_tsv_field(rid)}\t{_tsv_field(reason)}\t{bs.name}\t{line}\n".encode()
                for rid, reason, line in reader.failed
            )
            atomic_write_bytes(d / "failed_ids.tsv", b"id\treason\tbatch\tline\n" + failed_rows)
            if writer is not None:
                writer.add_source(f"{rs.run_id}/{bs.name}")
            bs.usage_tokens = reader.usage_tokens
            bs.succeeded, bs.failed = reader.n_ok, len(reader.failed)
            group.append(bs)
            res.rows += reader.n_ok
            res.failed += len(reader.failed)
            res.usage_tokens += reader.usage_tokens
        drain()
        crash_point("before_manifest")
        if writer is not None:
            entries = writer.commit()
            res.shards = [e["file"] for e in entries]
        manifest.runs.setdefault(rs.run_id, {"created_at": rs.created_at, "kind": rs.kind})
        if rs.sampling and rs.sampling not in manifest.sampling:
            manifest.sampling.append(rs.sampling)
        manifest.dimensions = manifest.dimensions or expected
        manifest.save()
        crash_point("after_manifest")
    except BaseException:
        for f in in_flight:
            f.cancel()
        pool.shutdown(wait=True)
        if writer is not None:
            writer.abort()
        raise
    pool.shutdown(wait=True)
    for bs in group:
        bs.set_status("ingested")
        bs.save(run.batch_dir(bs.name))
    res.batches = len(group)
    rebuild_failed_ids(run, shard_ids(ws, rs.model, rs.dataset))
    _update_run_costs(run)
    res.seconds = time.monotonic() - started
    log.info("ingested", run=rs.run_id, batches=res.batches, rows=res.rows, failed=res.failed, shards=res.shards)
    return res


def _update_run_costs(run: RunPaths) -> None:
    rs = RunState.load(run)
    batches = load_batches(run)
    usage = sum(bs.usage_tokens or 0 for bs in batches)
    standard, batch = cost_usd(rs.model, usage)
    rs.actual.update({"usage_tokens": usage, "cost_batch_usd": batch, "cost_standard_usd": standard})
    rs.counts.update(
        {
            "succeeded": sum(bs.succeeded or 0 for bs in batches if bs.status == "ingested"),
            "failed": sum(bs.failed or 0 for bs in batches if bs.status == "ingested"),
        }
    )
    rs.save(run)
