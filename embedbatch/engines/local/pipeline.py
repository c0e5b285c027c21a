"""The local worker: embed a source with a SentenceTransformer on this machine's CPU or GPUs.

:func:`run_local` creates a run (kind ``local``), holds its lock for the whole run, and drives
the stages of :mod:`embedbatch.engines.local.stages` into the dataset store; memory is bounded
by the queue sizes and the bucket cap, not by the dataset. A crashed run restarted with the
same arguments skips ids whose text is already in the dataset (the store's id index).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from embedbatch.config import (
    IngestConfig,
    LibsqlTarget,
    LocalConfig,
    PgTarget,
    PrepareConfig,
    RayConfig,
    SampleConfig,
    SourceConfig,
)
from embedbatch.engines.local.bucketing import Bucketer, bucket_edges
from embedbatch.engines.local.calibrate import choose_backend
from embedbatch.engines.local.devices import DevicePool
from embedbatch.engines.local.model import LocalEncoder, model_label
from embedbatch.engines.local.quality import default_min_cosine, needs_guard, probe
from embedbatch.engines.local.stages import (
    END,
    QUEUE_CHUNKS,
    WRITE_QUEUE,
    LocalJob,
    LocalResult,
    chunk_tokenizer,
    encode,
    load,
    write,
)
from embedbatch.errors import UsageError
from embedbatch.intake import Intake, dataset_name, source_label
from embedbatch.runs import Run, RunState, git_sha, lockfile_sha256
from embedbatch.sinks.runner import check_targets, run_sinks_blocking
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.deletes import run_deletes_key
from embedbatch.workspace import Workspace

__all__ = ["LocalResult", "run_local"]


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
    libsql_target: LibsqlTarget | None = None,
    libsql_auth_token: str | None = None,
    args: dict[str, Any] | None = None,
    encoder: LocalEncoder | None = None,
    on_rows: Callable[[int], None] | None = None,
    ray: RayConfig | None = None,
) -> LocalResult:
    """Embed a source with a local SentenceTransformer into the dataset's shards (and pgvector).

    Args:
        encoder: an already loaded encoder (tests, serve); else built from ``local``.
        dsn: PostgreSQL for ``pg_target`` (never stored).
        on_rows: progress callback with the rows written so far.
        ray: run the encoding on a Ray cluster (:mod:`.raydata`), joined (or started) first;
            the model is also loaded here, on the CPU, for its dimension, its token limits and
            the quality guard.

    Returns:
        :class:`LocalResult`, also written to the run's run.json.

    Raises:
        InputError: bad input (before anything is written).
        UsageError: bad device, dtype or model.
        LockedError: another local run of this dataset and model is running.
        DatabaseError: the pgvector target cannot take this model's vectors (checked first).
    """
    ingest = ingest or IngestConfig()
    if ray is not None and (local.devices or local.compile):
        raise UsageError("--ray-address runs one encoder per actor: drop --devices and --compile")
    if ray is not None and ray.gpus_per_actor and local.backend != "torch":
        # onnx and openvino run on the CPU here, and auto would measure the driver's CPU.
        raise UsageError(f"--ray-gpus-per-actor runs the torch backend, not --backend {local.backend}")
    owns_cluster = False
    if ray is not None:
        from embedbatch.engines.local.raydata import join

        owns_cluster = join(ray)  # before any run: a cluster answers, with the GPUs asked for
    cache_dir = ws.root / "cache" / "models"
    calibration = None
    quality = None
    if encoder is not None:
        enc = encoder
    elif local.backend == "auto":
        enc, calibration = choose_backend(
            local.model,
            device=local.device,
            dtype=local.dtype,
            quantize=local.quantize,
            cache_dir=cache_dir,
            min_cosine=local.min_cosine,
        )
        if not calibration["cache_hit"]:
            quality = calibration["quality"]  # probed just now
    else:
        enc = LocalEncoder(
            local.model,
            device="cpu" if ray is not None and local.device not in ("auto", "cpu") else local.device,
            dtype=local.dtype,
            compile=local.compile,
            backend=local.backend,
            quantize=local.quantize,
            cache_dir=cache_dir,
        )
    if encoder is None and quality is None and needs_guard(enc.backend, enc.dtype, enc.quantize):
        # Before any work: the chosen path must embed like the reference does.
        reference = LocalEncoder(local.model, device="cpu", dtype="float32")
        threshold = local.min_cosine if local.min_cosine is not None else default_min_cosine(enc.dtype, enc.quantize)
        quality = probe(reference, enc, min_cosine=threshold)
        del reference
    label = model_label(local.model)
    dataset = dataset_name(source)
    on_device = enc.device.startswith("cuda") or bool(local.devices) or bool(ray and ray.gpus_per_actor)
    tokens_per_batch = local.tokens_per_batch or (131_072 if on_device else 8192)
    max_tokens = min(local.bucket_max_tokens, enc.max_length)
    edges = bucket_edges(min(local.bucket_min_tokens, max_tokens), max_tokens)
    pad_to = "bucket" if local.compile else local.pad_to
    bucketer = Bucketer(edges, tokens_per_batch, pad_to)  # type: ignore[arg-type]
    max_content = min(prepare.max_tokens, enc.max_length - enc.special_tokens(enc.new_tokenizer()))
    # Before any work: the targets must take this model's vectors.
    check_targets(
        dim=ingest.truncate_dim or enc.dim,  # (vectors cut to --truncate-dim are stored cut)
        pg_target=pg_target,
        libsql_target=libsql_target,
        dsn=dsn,
        libsql_auth_token=libsql_auth_token,
    )
    run = ws.new_run(label, dataset)
    result = LocalResult(str(run.root), label, enc.device, enc.dtype if not local.devices else local.dtype)
    result.backend = enc.backend
    result.quality = quality
    result.cache_hit = enc.runner.cache_hit if enc.runner is not None else None
    result.calibration = calibration
    rs = RunState(
        run_id=run.run_id,
        model=label,
        dataset=dataset,
        source=source.kind,
        source_path=source_label(source),
        kind="local",
        args=args or {},
        git_sha=git_sha(),
        lockfile_sha256=lockfile_sha256(),
        pg_target=pg_target.to_json() if pg_target else None,
        libsql_target=libsql_target.to_json() if libsql_target else None,
    )
    Run.create(run, rs)
    store = DatasetStore(ws, label, dataset)
    # The run lock is held for the whole run: poll and status leave a running local run alone.
    with Run.open(run, purpose="local") as state:
        job = LocalJob(
            store=store,
            run=state,
            enc=enc,
            source=source,
            prepare=prepare,
            sample=sample,
            local=local,
            ingest=ingest,
            result=result,
            tokens_per_batch=tokens_per_batch,
            edges=edges,
            max_content=max_content,
            cache_dir=cache_dir,
            on_rows=on_rows,
        )
        if ray is not None:
            from embedbatch.engines.local.raydata import run_ray

            result.device = local.device if ray.gpus_per_actor else "cpu"
            started = time.perf_counter()
            finish(job, run_ray(job, ray, owns_cluster), started)
        else:
            _run_locked(job, bucketer)
        written = run_sinks_blocking(ws, state, dsn=dsn, libsql_auth_token=libsql_auth_token)
        result.pg = written.get("pg", result.pg)
        result.libsql = written.get("libsql", result.libsql)
        from embedbatch.sinks.resume import finish_dead_runs

        finish_dead_runs(ws, run, result, kind="local", dsn=dsn, libsql_auth_token=libsql_auth_token)
        if pg_target is not None or libsql_target is not None:
            state.state.local = result.to_json()
            state.save()
    return result


def _run_locked(job: LocalJob, bucketer: Bucketer) -> None:
    """The single-process engine: loader thread → encoder (here) → writer thread."""
    store, run, enc, local, result = job.store, job.run, job.enc, job.local, job.result
    tokens_per_batch, edges = job.tokens_per_batch, job.edges
    rs = run.state
    started = time.perf_counter()
    with store.engine_lock("local"):
        embedded = store.id_index()
        # No tokenizer here: the loader counts and cuts in batches. Already-embedded rows are
        # dropped after the cut (their shard text is the cut text), so resume compares like with like.
        intake = Intake(
            source=job.source,
            prepare=job.prepare,
            sample=job.sample,
            tokenizer=None,
            rejected_path=run.paths.rejected,
            stored=embedded.has_ids if job.prepare.chunk_tokens else None,
            chunk_tokenizer=chunk_tokenizer(job),
        )
        if local.compile:
            # One forward per bucket shape before the run, so compilation is not timed as work.
            t0 = time.perf_counter()
            enc.warm_up([(max(1, tokens_per_batch // e), e) for e in edges])
            result.warmup_s = time.perf_counter() - t0
        chunks: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_CHUNKS)
        writes: queue.Queue[Any] = queue.Queue(maxsize=WRITE_QUEUE)
        errors: list[BaseException] = []
        loader = threading.Thread(
            target=load, args=(intake, enc, job.max_content, embedded, chunks, result, errors), daemon=True
        )
        writer = threading.Thread(
            target=write, args=(store, rs, enc.dim, job.ingest, writes, result, errors, job.on_rows), daemon=True
        )
        loader.start()
        writer.start()
        pool = DevicePool(local.model, local.devices, local.dtype) if local.devices else None
        try:
            encode(enc, pool, bucketer, chunks, writes, result, cap_items=8 * max(1, tokens_per_batch // edges[0]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            writes.put(END)
            writer.join()
            if pool is not None:
                pool.close()
            loader.join(timeout=5)
        if errors:
            raise errors[0]
    finish(job, intake, started)


def finish(job: LocalJob, intake: Intake, started: float) -> None:
    """Close a local run that embedded everything: counts, sampling and the result into run.json."""
    store, run, result = job.store, job.run, job.result
    rs = run.state
    result.wall_s = time.perf_counter() - started
    result.rejected = intake.stats.rejected
    result.skipped_existing += intake.skipped_existing  # dropped before the cut (the Ray engine)
    rs.status = "finished"
    # Stale chunks of re-chunked documents leave the current view, once per run.
    key = run_deletes_key(rs.run_id)
    deleted = len(store.delete(intake.stale, key=key, run_id=rs.run_id, run_info={"kind": "local"}))
    rs.sampling = intake.sampler.describe()  # counts are final only now
    if result.shards:
        store.record_run(rs.run_id, {"created_at": rs.created_at, "kind": "local"}, sampling=rs.sampling)
    rs.intake = intake.stats.to_json()
    rs.counts = {
        "planned": intake.stats.sampled,
        "succeeded": result.rows,
        "failed": 0,
        "rejected": intake.stats.rejected,
        "skipped_existing": result.skipped_existing,
        "deleted": deleted,
    }
    rs.local = result.to_json()
    rs.timings = {"wall_s": round(result.wall_s, 3)}
    run.save()
