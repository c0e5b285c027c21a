"""The local worker on a Ray cluster: Ray Data streams prepared rows through a pool of encoder
actors, and the driver commits the vectors through the dataset store, exactly once.

Stages:

1. Driver: the shared intake reads, prepares and samples the source (every source kind, with
   the same ids, rejects and duplicate checks as ``embedbatch local``) and writes the rows not
   yet embedded to a Parquet spool in the run folder (``ray-input/``, 8,192 rows per file).
   Ids and sampling are global decisions (line numbers, duplicate ids, quotas), which is why
   this step is not split across the cluster.
2. Ray Data: ``read_parquet`` of the spool, its read tasks pinned to the driver's node (the
   spool is a local folder), so other nodes need no shared file system.
3. Actor pool (``--ray-actors N``, ``--ray-gpus-per-actor``): each actor loads the model once
   and, per block of rows, tokenizes, cuts at the token limit, buckets by length under the token
   budget and encodes, exactly as the single-process worker does. Actors are restarted and
   their tasks retried by Ray when a worker process dies.
4. Driver: ``iter_batches`` hands back rows with their vectors; the driver drops any id it
   has already written in this run or that the dataset already holds with this text (Ray may
   run a block twice after a failure), then writes and commits shards through
   :class:`~embedbatch.store.stream.StreamCommitter`. Only the driver writes, under the
   dataset's locks, so a retried block can never add a row twice.

A driver killed mid-run leaves committed shards; the same command again skips every committed
id (before the spool is written) and embeds the rest.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import orjson

from embedbatch.config import RayConfig
from embedbatch.engines.local.bucketing import Bucketer, Item
from embedbatch.engines.local.model import LocalEncoder
from embedbatch.engines.local.stages import LocalJob, chunk_tokenizer, cut
from embedbatch.errors import MissingExtraError, UsageError
from embedbatch.intake import Intake
from embedbatch.records import Record, text_sha256
from embedbatch.store.index import IdIndex, id_key
from embedbatch.store.stream import StreamCommitter
from embedbatch.workspace import crash_point

__all__ = ["EncodeActor", "run_ray"]

P = ParamSpec("P")
T = TypeVar("T")

BLOCK_ROWS = 256  # rows per actor call, about: bucketed together; smaller blocks spread better
SPOOL_ROWS = 8192  # rows per spool file


def connect(address: str) -> bool:
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` runs here; ``local``: a new
    one in this process). Returns True when this call started Ray (and must shut it down).

    Raises:
        MissingExtraError: ray is not installed.
        UsageError: no cluster answers at ``address``.
    """
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError("ray[data]", "ray") from exc
    import logging

    # Ray reports each dataset's start and plan at INFO and advice at WARNING on stderr; the
    # command reports the run itself. Errors still come through (as exceptions, too).
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\..*")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # read by the core worker at init
    ray.data.DataContext.get_current().enable_progress_bars = False  # the command draws its own
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address == "local":
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--ray-address {address}: no Ray cluster answers ({exc})") from exc
    return True


def join(ray_cfg: RayConfig) -> bool:
    """Connect to (or start) the cluster and check it has the GPUs asked for: done before any
    run exists. Returns True when this call started Ray (:func:`run_ray` then shuts it down).

    Raises:
        MissingExtraError: ray is not installed.
        UsageError: no cluster answers, or it has fewer GPUs than actors × GPUs per actor.
    """
    owns = connect(ray_cfg.address)
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
    if ray_cfg.gpus_per_actor * ray_cfg.actors > gpus:
        if owns:
            ray.shutdown()
        raise UsageError(
            f"--ray-actors {ray_cfg.actors} × --ray-gpus-per-actor {ray_cfg.gpus_per_actor:g} needs "
            f"{ray_cfg.actors * ray_cfg.gpus_per_actor:g} GPUs; the cluster has {gpus:g}"
        )
    return owns


class EncodeActor:
    """One encoder on a Ray worker: a block of prepared rows in, the same rows with vectors out.

    Args:
        model / device / dtype / backend / quantize / cache_dir: as :class:`LocalEncoder`.
        max_content: content tokens kept per text (the cut).
        tokens_per_batch / edges / pad_to: the bucketing, as in the single-process worker.

    ``__call__`` takes ``{"id", "text", "split", "metadata"}`` (numpy object arrays; metadata
    as JSON text) and returns them with ``text`` cut at the token limit, ``metadata`` marking a
    cut (and ``cut`` True), ``n_tokens``, ``vector`` ``(n, dim) float32``, and per row ``real_tokens`` (with the
    special tokens), ``padded_tokens``, ``encode_s`` (its share of its forward pass),
    ``forward_rows`` (rows in its forward pass), ``worker`` (host:pid)
    and ``ready_at`` (when the actor had loaded its model, epoch seconds).
    """

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str,
        backend: str,
        quantize: str | None,
        cache_dir: str,
        max_content: int,
        tokens_per_batch: int,
        edges: list[int],
        pad_to: str,
    ) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.enc = LocalEncoder(
            model, device=device, dtype=dtype, backend=backend, quantize=quantize, cache_dir=Path(cache_dir)
        )
        self.tok = self.enc.new_tokenizer()
        self.max_content = max_content
        self.tokens_per_batch = tokens_per_batch
        self.edges = edges
        self.pad_to = pad_to
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.ready_at = time.time()  # wall clock: compared with the driver's across processes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        crash_point("ray_actor_block")
        texts = [str(t) for t in batch["text"]]
        metas = [orjson.loads(m) for m in batch["metadata"]]
        n = len(texts)
        out_texts = list(texts)
        n_tokens = np.zeros(n, np.int64)
        real = np.zeros(n, np.int64)
        bucketer = Bucketer(self.edges, self.tokens_per_batch, self.pad_to)  # type: ignore[arg-type]
        was_cut = np.zeros(n, bool)
        for i, tk in enumerate(self.enc.tokenize(self.tok, texts, max_tokens=self.max_content)):
            out_texts[i], n_tokens[i], was_cut[i] = cut(texts[i], metas[i], tk, self.max_content)
            real[i] = len(tk.ids)
            bucketer.add(Item(tk.ids, i))
        vectors = np.zeros((n, self.enc.dim), np.float32)
        padded = np.zeros(n, np.int64)
        seconds = np.zeros(n, np.float64)
        forward_rows = np.zeros(n, np.int64)
        for group in bucketer.drain():
            rows = [int(item.payload) for item in group]
            out = self.enc.encode_ids([item.ids for item in group], pad_to=bucketer.pad_width(group))
            vectors[rows] = out.vectors
            padded[rows] = out.padded_tokens // len(rows)
            seconds[rows] = out.seconds / len(rows)
            forward_rows[rows] = len(rows)
        return {
            "id": batch["id"],
            "split": batch["split"],
            "text": np.asarray(out_texts, dtype=object),
            "metadata": np.asarray([orjson.dumps(m).decode() for m in metas], dtype=object),
            "n_tokens": n_tokens,
            "vector": vectors,
            "real_tokens": real,
            "cut": was_cut,
            "padded_tokens": padded,
            "encode_s": seconds,
            "forward_rows": forward_rows,
            "worker": np.asarray([self.worker] * n, dtype=object),
            "ready_at": np.full(n, self.ready_at),
        }


def _spool(intake: Intake, folder: Path) -> tuple[int, int]:
    """Write the intake's records to ``folder/part-NNNNN.parquet``; returns (rows, bytes of
    text and metadata written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in ("id", "text", "split", "metadata")])

    folder.mkdir(parents=True, exist_ok=True)
    rows = 0
    size = 0
    part: list[Record] = []

    def flush() -> None:
        table = pa.table(
            {
                "id": [r.id for r in part],
                "text": [r.text for r in part],
                "split": [r.split for r in part],
                "metadata": [orjson.dumps(r.metadata).decode() for r in part],
            },
            schema=schema,
        )
        pq.write_table(table, folder / f"part-{rows // SPOOL_ROWS:05d}.parquet")

    for rec in intake.records():
        part.append(rec)
        size += len(rec.text.encode()) + 2 * len(rec.id) + 200  # + metadata, about
        if len(part) == SPOOL_ROWS:
            flush()
            rows += len(part)
            part = []
    if part:
        flush()
        rows += len(part)
    return rows, size


def _stdout_to_stderr(fn: Callable[P, T]) -> Callable[P, T]:
    """Ray's driver prints cluster events (a worker that died, a task retried) on stdout, which
    belongs to the command's own output (``--json``): they go to stderr while Ray runs."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with contextlib.redirect_stdout(sys.stderr):
            return fn(*args, **kwargs)

    return wrapper


@_stdout_to_stderr
def run_ray(job: LocalJob, ray_cfg: RayConfig, owns_cluster: bool) -> Intake:
    """Embed through a Ray cluster joined by :func:`join` (see the module docstring); fills
    ``result`` and returns the intake (its counts). Holds the dataset's ``local`` engine lock
    throughout; shuts Ray down at the end when ``owns_cluster``.

    Raises:
        MissingExtraError: ray is not installed.
        RayError (from Ray): an actor failed more often than Ray retries it.
    """
    import ray

    store, run, enc, local, result = job.store, job.run, job.enc, job.local, job.result
    spool = run.paths.root / "ray-input"
    try:
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
        gpus = float(resources.get("GPU", 0))
        with store.engine_lock("local"):
            embedded = store.id_index()
            intake = Intake(
                source=job.source,
                prepare=job.prepare,
                sample=job.sample,
                tokenizer=None,
                rejected_path=run.paths.rejected,
                exclude=embedded.contains,  # committed with this text: not spooled again
                stored=embedded.has_ids if job.prepare.chunk_tokens else None,
                chunk_tokenizer=chunk_tokenizer(job),
            )
            t = time.perf_counter()
            spooled, spool_bytes = _spool(intake, spool)
            result.loader.busy_s = time.perf_counter() - t
            info: dict[str, Any] = {
                "address": ray_cfg.address,
                "actors": ray_cfg.actors,
                "gpus_per_actor": ray_cfg.gpus_per_actor,
                "cluster_cpus": float(resources.get("CPU", 0)),
                "cluster_gpus": gpus,
                "nodes": len([n for n in ray.nodes() if n.get("Alive")]),  # type: ignore[no-untyped-call]
                "spooled_rows": spooled,
                "spool_s": round(result.loader.busy_s, 3),
                "duplicates_dropped": 0,
            }
            result.ray = info
            if not spooled:
                return intake
            # Leave one CPU of the cluster to Ray Data's own tasks (listing and reading the
            # spool): actors holding every CPU starve them and the pipeline never starts.
            cpus = min(ray_cfg.cpus_per_actor, max(0.0, float(resources.get("CPU", 1)) - 1) / ray_cfg.actors)
            info["cpus_per_actor"] = round(cpus, 3)
            device = local.device if ray_cfg.gpus_per_actor > 0 else ("cpu" if local.device == "auto" else local.device)
            here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}  # the spool is on this node
            # Blocks of about BLOCK_ROWS rows: Ray Data cuts blocks by bytes (128 MiB by default,
            # which made a whole small run one block, one task, one busy actor).
            ctx = ray.data.DataContext.get_current()
            ctx.target_max_block_size = max(64 * 1024, spool_bytes * BLOCK_ROWS // spooled)
            ds = ray.data.read_parquet(str(spool), num_cpus=0, label_selector=here)
            ds = ds.map_batches(
                EncodeActor,
                batch_size=BLOCK_ROWS,
                batch_format="numpy",
                # One block at a time per actor: blocks go to whichever actor is free (with
                # several queued per actor, a small run went to one actor while the other idled).
                compute=ray.data.ActorPoolStrategy(size=ray_cfg.actors, max_tasks_in_flight_per_actor=1),
                num_cpus=cpus,
                num_gpus=ray_cfg.gpus_per_actor,
                # Ray Data's actor pools restart a dead actor and run its block again by default
                # (max_restarts=-1, max_task_retries=-1); the driver drops the repeats.
                fn_constructor_kwargs={
                    "model": local.model,
                    "device": device,
                    "dtype": local.dtype if enc.backend == "torch" else enc.precision,
                    "backend": enc.backend,
                    "quantize": enc.quantize,
                    "cache_dir": str(job.cache_dir),
                    "max_content": job.max_content,
                    "tokens_per_batch": job.tokens_per_batch,
                    "edges": job.edges,
                    "pad_to": local.pad_to,
                },
            )
            _commit(job, ds, embedded, info)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
        if owns_cluster:
            ray.shutdown()
    return intake


def _commit(job: LocalJob, ds: Any, embedded: IdIndex, info: dict[str, Any]) -> None:
    """Driver: rows with vectors from the actors → shards, each id once."""
    rs, result, on_rows, ingest = job.run.state, job.result, job.on_rows, job.ingest
    storage = job.store.storage(ingest, rs.args)
    sink = StreamCommitter(
        job.store, rs, kind="local", dim=job.enc.dim, storage=storage, rows_per_shard=ingest.rows_per_shard
    )
    written: set[int] = set()  # 64-bit id keys written by this run
    workers: Counter[str] = Counter()
    clock = result.writer
    encode_s = 0.0
    forward_passes = 0.0
    t = time.perf_counter()
    started = time.time()
    ready = 0.0
    ready_at: dict[str, float] = {}  # worker → when its model was loaded
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            t = clock.idle(t)
            ready = max(ready, float(batch["ready_at"].max()))
            ready_at.update(zip((str(w) for w in batch["worker"]), (float(r) for r in batch["ready_at"]), strict=True))
            keep: list[int] = []
            records: list[Record] = []
            for i, rid in enumerate(batch["id"]):
                rid = str(rid)
                key = id_key(rid)
                text = str(batch["text"][i])
                if key in written:
                    info["duplicates_dropped"] += 1
                    continue
                if embedded.contains(rid, text_sha256(text)):  # committed before with the cut text
                    result.skipped_existing += 1
                    continue
                written.add(key)
                keep.append(i)
                split = batch["split"][i]
                records.append(
                    Record(
                        id=rid,
                        source=rs.source,
                        dataset=rs.dataset,
                        split=None if split is None else str(split),
                        text=text,
                        n_tokens=int(batch["n_tokens"][i]),
                        metadata=orjson.loads(batch["metadata"][i]),
                    )
                )
                result.truncated += bool(batch["cut"][i])
            if keep:
                sink.add(records, batch["vector"][keep])
                result.real_tokens += int(batch["real_tokens"][keep].sum())
                result.padded_tokens += int(batch["padded_tokens"][keep].sum())
                encode_s += float(batch["encode_s"][keep].sum())
                forward_passes += float((1.0 / batch["forward_rows"][keep]).sum())
                workers.update(str(w) for w in batch["worker"][keep])
                result.rows = sink.rows
                result.shards = sink.shards
                if on_rows is not None:
                    on_rows(result.rows)
            t = clock.busy(t)
            crash_point("ray_driver_batch")
        sink.check_complete()
        sink.commit()
        result.shards = sink.shards
    except BaseException:
        sink.abort()
        raise
    finally:
        clock.busy(t)
    result.encoder.busy_s = encode_s
    # Idle: the actors' time from ready to the end of the run, less their forward passes.
    result.encoder.idle_s = max(0.0, sum(time.time() - r for r in ready_at.values()) - encode_s)
    result.batches = round(forward_passes)
    info["workers"] = dict(workers)
    # The actors' start (worker processes, imports, model load), until the last was ready.
    info["actors_ready_s"] = round(ready - started, 3) if ready else None
