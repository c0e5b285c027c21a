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

import base64
import binascii
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog

from embedbatch.batchapi.state import BatchState, RunState, crash_point, load_batches
from embedbatch.config import IngestConfig
from embedbatch.sinks.parquet import Manifest, ShardWriter, remove_orphans, shard_ids, shard_text_hashes
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
        raw = base64.b64decode(value, validate=True)
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


def read_batch_results(batch_dir: Path, *, expected_dim: int | None, remote_status: str | None) -> BatchResult:
    """Decode a downloaded batch (see the module docstring); never loads a file whole."""
    ids: list[str] = []
    with open(batch_dir / "records.jsonl", "rb") as fh:
        for line in fh:
            ids.append(orjson.loads(line)["id"])
    pos = {rid: i for i, rid in enumerate(ids)}
    n = len(ids)
    dim = expected_dim
    vectors = np.empty((n, dim), dtype=np.float32) if dim else np.empty((0, 0), np.float32)
    ok = np.zeros(n, dtype=bool)
    failed_at: dict[int, tuple[str, int]] = {}
    usage = 0
    out = batch_dir / "output.jsonl"
    if out.exists():
        with open(out, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    line = orjson.loads(raw)
                    cid = line["custom_id"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    log.warning("unreadable output line", batch=batch_dir.name, line=lineno)
                    continue
                i = pos.get(cid)
                if i is None:
                    log.warning("output line for an unknown custom_id", batch=batch_dir.name, line=lineno)
                    continue
                resp = line.get("response") or {}
                if resp.get("status_code") != 200 or line.get("error"):
                    failed_at[i] = (_error_reason(line), lineno)
                    continue
                try:
                    data = resp["body"]["data"]
                    item = next(d for d in data if d.get("index", 0) == 0)
                    vec = decode_vector(item["embedding"])
                except (KeyError, TypeError, StopIteration, ValueError, binascii.Error) as exc:
                    failed_at[i] = (f"undecodable embedding: {exc}", lineno)
                    continue
                if dim is None:
                    dim = len(vec)
                    vectors = np.empty((n, dim), dtype=np.float32)
                if len(vec) != dim:
                    failed_at[i] = (f"dimension {len(vec)} != expected {dim}", lineno)
                    continue
                if not np.isfinite(vec).all():
                    failed_at[i] = ("non-finite values in embedding", lineno)
                    continue
                vectors[i] = vec
                ok[i] = True
                failed_at.pop(i, None)
                usage += int(((resp["body"].get("usage") or {}).get("total_tokens")) or 0)
    err = batch_dir / "errors.jsonl"
    if err.exists():
        with open(err, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                i = pos.get(line.get("custom_id"))
                if i is not None and not ok[i]:
                    failed_at[i] = (_error_reason(line), lineno)
    failed: list[tuple[str, str, int]] = []
    for i in range(n):
        if ok[i]:
            continue
        reason, lineno = failed_at.get(i, (f"missing from output (batch {remote_status or 'unknown'})", 0))
        failed.append((ids[i], reason, lineno))
    if dim is None:
        vectors = np.empty((n, 0), np.float32)
    return BatchResult(ids, vectors, ok, failed, usage, dim)


def _rows(batch_dir: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, text) pairs in input order, streamed from records.jsonl and input.jsonl."""
    with open(batch_dir / "records.jsonl", "rb") as rf, open(batch_dir / "input.jsonl", "rb") as inf:
        for rline, iline in zip(rf, inf, strict=True):
            rec = orjson.loads(rline)
            req = orjson.loads(iline)
            if req["custom_id"] != rec["id"]:
                raise AssertionError(f"{batch_dir}: records.jsonl and input.jsonl disagree at id {rec['id']}")
            yield rec, req["body"]["input"]


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
            from embedbatch.batchapi.client import BatchClient
            from embedbatch.batchapi.poll import download_batch
            from embedbatch.config import Settings

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
    from embedbatch.errors import StateError

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
    try:
        for bs in todo:
            d = run.batch_dir(bs.name)
            br = read_batch_results(d, expected_dim=expected, remote_status=bs.remote_status)
            if br.dim is not None:
                if manifest.dimensions is not None and br.dim != manifest.dimensions:
                    raise StateError(
                        f"batch {bs.name} has {br.dim}-d vectors but the dataset has {manifest.dimensions}-d shards"
                    )
                expected = br.dim
            rows = b"".join(
                f"{_tsv_field(rid)}\t{_tsv_field(reason)}\t{bs.name}\t{line}\n".encode()
                for rid, reason, line in br.failed
            )
            atomic_write_bytes(d / "failed_ids.tsv", b"id\treason\tbatch\tline\n" + rows)
            n_ok = int(br.ok.sum())
            if n_ok and writer is None:
                assert br.dim is not None
                writer = ShardWriter(
                    ws,
                    manifest,
                    dim=br.dim,
                    dtype=config.dtype,
                    rows_per_shard=config.rows_per_shard,
                    git_sha=rs.git_sha,
                )
            if (
                writer is not None
                and writer.rows_in_open_shard
                and writer.rows_in_open_shard + n_ok > config.rows_per_shard
            ):
                writer.close_shard()
            if n_ok:
                assert writer is not None
                rows_iter = _rows(d)
                index = 0
                while True:
                    chunk = list(islice(rows_iter, CHUNK_ROWS))
                    if not chunk:
                        break
                    sel = np.nonzero(br.ok[index : index + len(chunk)])[0]
                    if len(sel):
                        ids = [chunk[j][0]["id"] for j in sel]
                        writer.write(
                            ids=ids,
                            texts=[chunk[j][1] for j in sel],
                            metadata=[orjson.dumps(chunk[j][0]["metadata"]).decode() for j in sel],
                            splits=[chunk[j][0]["split"] for j in sel],
                            vectors=br.vectors[index + sel],
                            source=rs.source,
                            dataset=rs.dataset,
                            model=rs.model,
                            run_id=rs.run_id,
                        )
                        writer.note_supersedes([rid for rid in ids if rid in existing])
                    index += len(chunk)
                    if writer.rows_in_open_shard >= config.rows_per_shard:
                        writer.close_shard()
                writer.add_source(f"{rs.run_id}/{bs.name}")
            elif writer is not None:
                writer.add_source(f"{rs.run_id}/{bs.name}")
            bs.usage_tokens = br.usage_tokens
            bs.succeeded, bs.failed = n_ok, len(br.failed)
            group.append(bs)
            res.rows += n_ok
            res.failed += len(br.failed)
            res.usage_tokens += br.usage_tokens
            del br
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
        if writer is not None:
            writer.abort()
        raise
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
