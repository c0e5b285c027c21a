"""Planning: read → prepare → sample → batch input files in a new run directory.

Planning holds the dataset lock (see :mod:`embedbatch.store.dataset`) from the moment it reads
what is already embedded or planned until its run directory is in place, so a concurrent
``submit`` of the same rows waits and then skips them: every row is planned (and paid for) once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embedbatch.config import LibsqlTarget, PgTarget, PrepareConfig, SampleConfig, SourceConfig, SubmitConfig
from embedbatch.engines.batchapi.batchfiles import BatchFileWriter
from embedbatch.engines.batchapi.estimate import Estimate
from embedbatch.engines.batchapi.split import BatchSplitter, request_encoder
from embedbatch.errors import InputError, LimitError, LockedError
from embedbatch.intake import Intake, dataset_name, source_label
from embedbatch.planned import skip_done_or_planned
from embedbatch.runs import OpenRuns, Run, RunState, git_sha, lockfile_sha256, note_run
from embedbatch.sinks.runner import check_targets, target_dimension
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.deletes import commit_run_deletes, save_run_deletes, stored_ids
from embedbatch.tokens import check_model_options, get_tokenizer
from embedbatch.workspace import RunPaths, Workspace, crash_point

__all__ = ["PlannedRun", "plan_run"]


@dataclass
class PlannedRun:
    """The outcome of planning: the run directory and the numbers ``--dry-run`` prints.

    Attributes:
        already_planned: run directory → rows skipped because that unfinished run holds them.
    """

    run: RunPaths | None
    state: RunState | None
    estimate: Estimate
    skipped_existing: int
    already_planned: dict[str, int] = field(default_factory=dict)


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
    pg_target: PgTarget | None = None,
    libsql_target: LibsqlTarget | None = None,
    dsn: str | None = None,
    libsql_auth_token: str | None = None,
    probe_dim: Callable[[], int] | None = None,
) -> PlannedRun:
    """Read, prepare, sample and split into batch input files in a new run directory.

    The run is built in ``run_<stamp>.partial`` and renamed into place only when intake
    finished cleanly, so a bad row or duplicate id leaves nothing that poll would submit.
    With ``submit.dry_run`` the files are written and kept for inspection, but the run is
    marked ``dry-run`` and is never submitted.

    The dataset lock is held from reading what is embedded or in flight until the run is in
    place, so a concurrent plan of the same dataset waits and then skips these rows.

    Args:
        pg_target: write the vectors into this pgvector column too (recorded in run.json).
        libsql_target: write the vectors into this libSQL table too (recorded in run.json).
        dsn / libsql_auth_token: how to reach the targets, to check them before anything is
            written or paid for (never stored).
        probe_dim: for a model whose dimension is not known here (and no ``dimensions``):
            returns it, e.g. from one tiny embedding request.

    Raises:
        LockedError: the dataset lock stayed busy past the workspace's ``lock_timeout_s``, or a
            realtime run of the dataset is in progress.
        InputError, DuplicateIdError: bad input (nothing is submitted).
        LimitError: the Batch-price estimate exceeds ``max_cost_usd``.
        UsageError: bad model options; a target without its DSN; a target and a model whose
            dimension is unknown without ``probe_dim``.
        DatabaseError: a target cannot take the model's vectors (nothing was written).
    """
    check_model_options(submit.model, submit.dimensions)
    if (pg_target is not None or libsql_target is not None) and not submit.dry_run:
        check_targets(
            dim=(args or {}).get("truncate_dim") or target_dimension(submit.model, submit.dimensions, probe_dim),
            pg_target=pg_target,
            libsql_target=libsql_target,
            dsn=dsn,
            libsql_auth_token=libsql_auth_token,
        )
    dataset = dataset_name(source)
    store = DatasetStore(ws, submit.model, dataset)
    with store.locked("plan"):
        if store.engine_running("realtime"):  # its rows in flight are known only to it
            raise LockedError(
                f"a realtime run of {submit.model}/{dataset} is embedding now; submit again once it has "
                "finished (its rows will then be skipped)"
            )
        # Under this lock no other plan of the dataset runs: any .partial folder is a dead one's.
        for stale in ws.runs_dir(submit.model, dataset).glob("run_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        OpenRuns.remove_dead(ws, submit.model, dataset)
        run = ws.new_run(submit.model, dataset)
        partial = run.root.with_name(run.root.name + ".partial")
        partial.mkdir(parents=True)
        started = time.monotonic()
        exclude, already_planned = skip_done_or_planned(ws, submit.model, dataset) if skip_existing else (None, {})
        intake = Intake(
            source=source,
            prepare=prepare,
            sample=sample,
            tokenizer=get_tokenizer(submit.model),
            rejected_path=partial / "rejected.jsonl",
            on_row=on_row,
            exclude=exclude,
            stored=stored_ids(store) if prepare.chunk_tokens else None,
        )
        writer = BatchFileWriter(partial, BatchSplitter(submit.limits))
        encode = request_encoder(model=submit.model, dimensions=submit.dimensions)
        try:
            writer.add_all(intake.records(), encode)
            states = writer.finish()
            save_run_deletes(partial, intake.stale)
            if intake.stats.rows_read == 0 and source.kind == "file":  # (a table may rightly select none)
                raise InputError(f"{source_label(source)}: no rows to embed (the input is empty)")
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
        if (
            submit.max_cost_usd is not None
            and est.cost_batch_usd is not None
            and est.cost_batch_usd > submit.max_cost_usd
        ):
            shutil.rmtree(partial, ignore_errors=True)
            raise LimitError(
                f"estimated Batch API cost ${est.cost_batch_usd:.4f} exceeds --max-cost-usd "
                f"${submit.max_cost_usd:.4f}; nothing was uploaded"
            )
        rs = RunState(
            run_id=run.run_id,
            model=submit.model,
            dataset=dataset,
            source=source.kind,
            source_path=source_label(source),
            dimensions=submit.dimensions,
            completion_window=submit.completion_window,
            metadata=dict(submit.metadata),
            max_enqueued_tokens=submit.limits.max_enqueued_tokens,
            file_expiry_days=submit.file_expiry_days,
            output_expiry_days=submit.output_expiry_days,
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
                "stale_chunks": len(intake.stale),
            },
            estimate={
                "tokens": intake.stats.tokens_total,
                "queue_tokens": queue,
                "cost_standard_usd": est.cost_standard_usd,
                "cost_batch_usd": est.cost_batch_usd,
            },
            timings={"plan_s": round(time.monotonic() - started, 3)},
            pg_target=pg_target.to_json() if pg_target else None,
            libsql_target=libsql_target.to_json() if libsql_target else None,
        )
        if prepare.chunk_aggregate:  # ingest and retry map chunk ids to their documents
            rs.args["chunk_aggregate"] = {
                "mode": prepare.chunk_aggregate,
                "chunk_id_template": prepare.chunk_id_template,
            }
        if source.is_postgres and source.pg_table:
            rs.args.setdefault("pg_source", {"table": source.pg_table, "id_column": source.pg_id_column})
        if not states and not submit.dry_run:
            rs.status = "finished"  # nothing to embed: keep the record of the run, as finished
        Run.create(run, rs, batches=states, staging=partial)
        partial.rename(run.root)
        note_run(run, "batchapi")
        crash_point("plan_before_unlock")
        planned = PlannedRun(run, rs, est, intake.skipped_existing, already_planned)
    if rs.status == "finished" and intake.stale:  # nothing to embed, stale chunks to take out
        commit_run_deletes(store, run.root, run_id=rs.run_id, run_info={"kind": rs.kind})
    return planned
