"""Ingest: map downloaded output lines back to requests by ``custom_id`` into the dataset store.

Ingest reads only what poll downloaded (``ingest --redownload`` asks poll's download step
first). Per batch, :class:`~embedbatch.engines.batchapi.output.BatchReader` streams the output
file; valid rows go to a staged shard in input order, failures to the batch's
``failed_ids.tsv``, and the batch's counts and usage to its batch.json (still ``downloaded``).

Order of writes, so that a crash anywhere is resumed with no duplicate, no lost row and nothing
left to rebuild: batch results → store commit (shard rename, id index, manifest: the commit
point, see :mod:`embedbatch.store.dataset`) → batch.json ``ingested`` → the run's
``failed_ids.tsv``, counts and cost (derived from the batches, rewritten on every ingest). A
batch whose ``run_id/batch`` key the manifest already lists is only marked ingested.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import structlog

from embedbatch.aggregate import INCOMPLETE_DOCUMENT, ChunkAggregator, is_aggregated, parent_of_chunk
from embedbatch.config import IngestConfig, LibsqlTarget, PgTarget
from embedbatch.engines.batchapi.output import BatchReader
from embedbatch.errors import StateError
from embedbatch.failures import top_reasons, tsv_escape, tsv_unescape
from embedbatch.runs import BatchState, Run, SinkState, crash_point
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.deletes import commit_run_deletes
from embedbatch.store.index import IdIndex
from embedbatch.store.manifest import Manifest
from embedbatch.tokens import MODEL_DIMENSIONS, cost_usd
from embedbatch.workspace import RunPaths, Workspace, atomic_write_bytes

__all__ = ["IngestResult", "ingest_locked", "ingest_run", "rebuild_failed_ids"]

log = structlog.get_logger(__name__)

# An ingest commits (and marks its batches ingested) at the first batch boundary past this many
# rows, so its memory does not grow with the run (2M rows in one commit: +240 MiB of ids).
COMMIT_ROWS = 500_000


@dataclass
class IngestResult:
    """What an ingest call did: batches, rows written, rows failed, new shard files, usage
    tokens, seconds, and the pgvector report."""

    batches: int = 0
    rows: int = 0
    failed: int = 0
    shards: list[str] = field(default_factory=list)
    usage_tokens: int = 0
    seconds: float = 0.0
    pg: dict[str, Any] = field(default_factory=dict)
    libsql: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _expected_dim(model: str, dimensions: int | None, manifest: Manifest) -> int | None:
    """The dimension output lines must have: asked for, else the dataset's (unless its vectors
    are stored cut to ``truncate_dim``), else the model's."""
    stored = None if manifest.truncate_dim else manifest.dimensions
    return dimensions or stored or MODEL_DIMENSIONS.get(model)


def rebuild_failed_ids(run: Run, index: IdIndex) -> int:
    """Write the run's failed_ids.tsv: every batch's failures whose id no shard holds (a retry
    that succeeded removes the id); the latest reason per id wins. The run's ``counts.failed``
    and ``failed_reasons`` become those outstanding rows (saved by the caller). Returns the row
    count."""
    latest: dict[bytes, bytes] = {}
    for bs in run.batches:
        p = run.batch_dir(bs) / "failed_ids.tsv"
        if p.exists():
            for row in p.read_bytes().splitlines(keepends=True)[1:]:
                latest[row.split(b"\t", 1)[0]] = row
    ids = [tsv_unescape(k.decode()) for k in latest]
    aggregate = run.state.args.get("chunk_aggregate")
    if aggregate:  # a chunk is done once its document is stored
        parent = parent_of_chunk(aggregate["chunk_id_template"])
        embedded: list[bool] = index.has_ids([parent(i) or i for i in ids]).tolist() if ids else []
    else:
        embedded = index.has_ids(ids).tolist() if ids else []
    rows = [row for row, done in zip(latest.values(), embedded, strict=True) if not done]
    atomic_write_bytes(run.paths.failed_ids, b"".join([b"id\treason\tbatch\tline\n", *rows]))
    run.state.counts["failed"] = len(rows)
    run.state.failed_reasons = top_reasons(tsv_unescape(r.split(b"\t", 2)[1].decode()) for r in rows)
    return len(rows)


async def ingest_run(
    ws: Workspace,
    paths: RunPaths,
    config: IngestConfig | None = None,
    *,
    dsn: str | None = None,
    wait_s: float | None = None,
    pg_target: PgTarget | None = None,
    no_pg: bool = False,
    libsql_target: LibsqlTarget | None = None,
) -> IngestResult:
    """Ingest every downloaded batch of the run under its lock (see the module docstring).

    Args:
        dsn: PostgreSQL for a run with a pgvector target (never stored).
        wait_s: how long to wait for a run lock another process holds (None: fail at once).
        pg_target: from now on, also write this run's vectors into this pgvector column.
        libsql_target: from now on, also write this run's vectors into this libSQL table.
        no_pg: from now on, write this run into no database (a way out of a sink that keeps
            failing; the shards are unaffected).

    Raises:
        LockedError: another process holds the run (or the dataset, past the timeout).
        StateError: the dataset's shards disagree with this run (dimension).
    """
    with Run.open(paths, wait_s=wait_s, purpose="ingest") as run:
        # Progress is per target: a new target starts from the first row.
        if libsql_target is not None:
            if run.state.libsql_target != libsql_target.to_json():  # (an index still to recreate stays noted)
                run.state.libsql = SinkState(pending_indexes=run.state.libsql.pending_indexes)
            run.state.libsql_target = libsql_target.to_json()
            run.state.libsql.status = "pending"
            run.save()
        if pg_target is not None or no_pg:
            new_target = None if no_pg else pg_target.to_json()  # type: ignore[union-attr]
            if run.state.pg_target != new_target:
                run.state.pg = SinkState(pending_indexes=run.state.pg.pending_indexes)
            run.state.pg_target = new_target
            run.state.pg.status = "pending"
            run.save()
        return await ingest_locked(ws, run, config or IngestConfig(), dsn=dsn)


async def ingest_locked(ws: Workspace, run: Run, config: IngestConfig, *, dsn: str | None = None) -> IngestResult:
    """:func:`ingest_run` for a caller that holds the run (poll, drive)."""
    result = await anyio.to_thread.run_sync(_ingest_sync, ws, run, config)
    if run.state.pg_target or run.state.libsql_target:
        from embedbatch.sinks.runner import run_sinks

        written = await run_sinks(ws, run, dsn=dsn or config.dsn, libsql_auth_token=config.libsql_auth_token)
        result.pg = written.get("pg", result.pg)
        result.libsql = written.get("libsql", result.libsql)
    run.state.failure = None  # whatever failed before is behind this run now
    run.settle()
    run.save()
    return result


def _ingest_sync(ws: Workspace, run: Run, config: IngestConfig) -> IngestResult:
    started = time.monotonic()
    rs = run.state
    store = DatasetStore(ws, rs.model, rs.dataset)
    manifest = store.manifest()
    res = IngestResult()
    done_sources = manifest.sources()
    todo: list[BatchState] = []
    for bs in run.batches:
        if bs.status != "downloaded":
            continue
        if f"{rs.run_id}/{bs.name}" in done_sources:  # committed by a process that died just after
            bs.set_status("ingested")
            run.save_batch(bs)
            continue
        todo.append(bs)
    if todo:
        _write_batches(store, run, todo, config, manifest, res)
    # Chunks of re-chunked documents past their new count leave the current view (once).
    deleted = commit_run_deletes(store, run.paths.root, run_id=rs.run_id, run_info={"kind": rs.kind})
    if deleted:
        rs.counts["deleted"] = rs.counts.get("deleted", 0) + deleted
    rebuild_failed_ids(run, store.id_index())
    _update_run_costs(run)
    res.seconds = time.monotonic() - started
    if res.batches:
        log.info("ingested", run=rs.run_id, batches=res.batches, rows=res.rows, failed=res.failed, shards=res.shards)
    return res


class _GroupWriter:
    """Writes downloaded batches into staged shards on one writer thread and commits them a
    group at a time (at the first batch boundary past :data:`COMMIT_ROWS`): what one ingest
    keeps in memory (the staged shards' ids) is bounded by COMMIT_ROWS, not by the run.

    pyarrow releases the GIL while it encodes and writes, so chunk k is written while chunk k+1
    is parsed; at most two chunks are in flight.
    """

    def __init__(self, store: DatasetStore, run: Run, config: IngestConfig, res: IngestResult) -> None:
        self.store, self.run, self.config, self.res = store, run, config, res
        rs = run.state
        self.writer = store.writer(
            dim=None, rows_per_shard=config.rows_per_shard, git_sha=rs.git_sha, **store.storage(config, rs.args)
        )
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedbatch-shard-writer")
        self.in_flight: list[Future[None]] = []
        self.group: list[BatchState] = []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self.in_flight.append(self.pool.submit(fn, *args, **kwargs))
        while len(self.in_flight) > 2:
            self.in_flight.pop(0).result()

    def drain(self) -> None:
        while self.in_flight:
            self.in_flight.pop(0).result()

    def close_shard_if(self, full: bool) -> None:
        if full:
            self.drain()
            self.writer.close_shard()

    def write_rows(self, ids: list[str], texts: list[str], metas: list[str], splits: list[Any], vecs: Any) -> None:
        rs, per_shard = self.run.state, self.config.rows_per_shard
        start = 0
        while start < len(ids):
            self.close_shard_if(self.writer.rows_in_open_shard >= per_shard)
            end = start + per_shard - self.writer.rows_in_open_shard
            # Count the rows now, on this thread; the write itself happens on the writer thread.
            self.writer.reserve(len(ids[start:end]))
            self.submit(
                self.writer.write,
                ids=ids[start:end],
                texts=texts[start:end],
                metadata=metas[start:end],
                splits=splits[start:end],
                vectors=vecs[start:end],
                source=rs.source,
                dataset=rs.dataset,
                model=rs.model,
                run_id=rs.run_id,
            )
            start = end

    def batch_done(self, bs: BatchState) -> None:
        self.writer.add_source(f"{self.run.state.run_id}/{bs.name}")
        self.group.append(bs)
        if sum(b.succeeded or 0 for b in self.group) >= COMMIT_ROWS:
            self.commit()

    def commit(self) -> None:
        """Commit the batches written since the last commit, then mark them ingested."""
        if not self.group:
            return
        rs = self.run.state
        self.drain()
        crash_point("before_manifest")
        entries = self.store.commit(
            self.writer,
            run_id=rs.run_id,
            run_info={"created_at": rs.created_at, "kind": rs.kind},
            sampling=rs.sampling or None,
        )
        self.res.shards += [e["file"] for e in entries]
        crash_point("after_manifest")
        for b in self.group:
            b.set_status("ingested")
            self.run.save_batch(b)
        self.res.batches += len(self.group)
        self.group.clear()

    def abort(self) -> None:
        for f in self.in_flight:
            f.cancel()
        self.pool.shutdown(wait=True)
        self.writer.abort()


def _write_batches(
    store: DatasetStore,
    run: Run,
    todo: list[BatchState],
    config: IngestConfig,
    manifest: Manifest,
    res: IngestResult,
) -> None:
    rs = run.state
    expected = _expected_dim(rs.model, rs.dimensions, manifest)
    out = _GroupWriter(store, run, config, res)
    agg = ChunkAggregator()  # --chunk-aggregate: a document's chunks are all in one batch
    try:
        for bs in todo:
            d = run.batch_dir(bs)
            reader = BatchReader(d, expected_dim=expected, remote_status=bs.remote_status, missing_reason=bs.error)
            rows_open = out.writer.rows_in_open_shard
            out.close_shard_if(rows_open > 0 and rows_open + bs.requests > config.rows_per_shard)
            for positions, vecs in reader.chunks():
                cut = out.writer.truncate_dim or reader.dim
                if reader.dim is not None and manifest.dimensions is not None and cut != manifest.dimensions:
                    raise StateError(
                        f"batch {bs.name} has {reader.dim}-d vectors but the dataset has {manifest.dimensions}-d shards"
                    )
                ids, texts, metas, splits = reader.rows_at(positions)
                if metas and is_aggregated(metas[0]):
                    ids, texts, metas, splits, vecs = _aggregate(agg, ids, metas, splits, vecs)
                out.write_rows(ids, texts, metas, splits, vecs)
            if reader.dim is not None:
                expected = reader.dim
            # A document with a chunk that failed is failed whole: its other chunks go with it.
            partial = [(cid, INCOMPLETE_DOCUMENT, "") for cids in agg.drop().values() for cid in cids]
            failed_rows = b"".join(
                f"{tsv_escape(rid)}\t{tsv_escape(reason)}\t{bs.name}\t{line}\n".encode()
                for rid, reason, line in [*reader.failed, *partial]
            )
            # The batch's results are recorded before the commit, so a process that dies after
            # the manifest write leaves nothing for the next one to rebuild.
            atomic_write_bytes(d / "failed_ids.tsv", b"id\treason\tbatch\tline\n" + failed_rows)
            bs.usage_tokens = reader.usage_tokens
            bs.succeeded, bs.failed = reader.n_ok - len(partial), len(reader.failed) + len(partial)
            run.save_batch(bs)
            res.rows += bs.succeeded
            res.failed += bs.failed
            res.usage_tokens += reader.usage_tokens
            out.batch_done(bs)
        out.commit()
    except BaseException:
        out.abort()
        raise
    out.pool.shutdown(wait=True)


def _aggregate(
    agg: ChunkAggregator, ids: list[str], metas: list[str], splits: list[Any], vecs: Any
) -> tuple[list[str], list[str], list[str], list[Any], Any]:
    """Chunk rows of ``--chunk-aggregate`` → the documents they complete (metadata as JSON)."""
    ids, texts, meta_dicts, splits, vecs = agg.add(ids, [orjson.loads(m) for m in metas], splits, vecs)
    return ids, texts, [orjson.dumps(m).decode() for m in meta_dicts], splits, vecs


def _update_run_costs(run: Run) -> None:
    rs = run.state
    usage = sum(bs.usage_tokens or 0 for bs in run.batches)
    standard, batch = cost_usd(rs.model, usage)
    rs.actual.update({"usage_tokens": usage, "cost_batch_usd": batch, "cost_standard_usd": standard})
    ingested = [bs for bs in run.batches if bs.status == "ingested"]
    rs.counts["succeeded"] = sum(bs.succeeded or 0 for bs in ingested)
    run.save()
