"""The ``embedbatch`` command line: parses flags into config objects, calls stages, prints.

This is the only place errors become messages and exit codes (``EMBEDBATCH_RAISE_ERRORS=1``
re-raises instead). Flags shared by several commands are declared once in
:mod:`embedbatch.cli.options`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from embedbatch import __version__
from embedbatch.cli.options import (
    BatchOptions,
    PrepareOptions,
    SampleOptions,
    SinkOptions,
    SourceOptions,
    SubmitOptions,
    with_options,
)
from embedbatch.cli.render import (
    RowProgress,
    console,
    err_console,
    print_estimate,
    print_hits,
    print_json,
    print_local_result,
    print_run_summary,
    print_verify,
    print_workspace,
    status_table,
)
from embedbatch.config import IngestConfig, Settings
from embedbatch.errors import EmbedbatchError, UsageError
from embedbatch.logs import configure_logging, scrub

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Turn datasets into embeddings, cheaply.")
db_app = typer.Typer(no_args_is_help=True, help="PostgreSQL helpers.")
app.add_typer(db_app, name="db")


@dataclass
class _Globals:
    workspace: Path | None = None
    log_format: str = "auto"


_G = _Globals()

SourceArg = Annotated[str, typer.Argument(help="File, directory, glob, or 'postgres'.")]
Model = Annotated[str | None, typer.Option("--model", help="Embedding model (env OPENAI_EMBED_MODEL).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Resume = Annotated[Path | None, typer.Option("--resume", help="Resume this run directory.")]
RowsPerShard = Annotated[int, typer.Option("--rows-per-shard")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 or float16 shards.")]
PgTable = Annotated[str | None, typer.Option("--pg-table", help="Write vectors into this table.")]
PgIdColumn = Annotated[str, typer.Option("--pg-id-column")]
PgVectorColumn = Annotated[str, typer.Option("--pg-vector-column")]
PgDsn = Annotated[str | None, typer.Option("--pg-dsn", help="Sink DSN (env DATABASE_URL).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Write rows that already have a vector.")]


@app.callback()
def _main(
    workspace: Annotated[Path | None, typer.Option(help="Workspace root (env EMBEDBATCH_WORKSPACE).")] = None,
    log_format: Annotated[str, typer.Option(help="auto, console or json.")] = "auto",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    _G.workspace = workspace
    _G.log_format = log_format
    configure_logging(log_format, log_level)


def settings() -> Settings:
    return Settings.from_env(workspace=_G.workspace)


def _workspace() -> Any:
    return settings().open_workspace()


def _client() -> Any:
    from embedbatch.api.openai import BatchClient

    return BatchClient(settings())


async def _with_client(fn: Any) -> Any:
    client = _client()
    try:
        return await fn(client)
    finally:
        await client.close()


def _run(coro_fn: Any) -> Any:
    import anyio

    return anyio.run(_with_client, coro_fn)


def _safe_args(source: str, *groups: Any, **values: Any) -> dict[str, Any]:
    """CLI args for run.json, from the option groups and extra values, without secrets (DSNs
    are dropped)."""
    from dataclasses import asdict

    merged: dict[str, Any] = {"source": source}
    for g in groups:
        merged.update(asdict(g))
    merged.update(values)
    out: dict[str, Any] = {}
    for k, v in merged.items():
        if "dsn" in k or k.startswith("_"):
            continue
        if isinstance(v, Path):
            out[k] = str(v)
        elif (
            v is None
            or isinstance(v, str | int | float | bool)
            or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        ):
            out[k] = v
    return out


@app.command()
@with_options
def estimate(
    source: SourceArg,
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    json_out: JsonOut = False,
) -> None:
    """Count rows, tokens, batch files and cost; sends nothing."""
    from embedbatch.engines.batchapi.estimate import estimate as run_estimate

    s = settings()
    with RowProgress("reading") as progress:
        est = run_estimate(
            source=src.build(source, s),
            prepare=prep.build(source, src),
            sample=sample.build(),
            model=batch.model_name(s),
            dimensions=batch.dimensions,
            limits=batch.limits(),
            on_row=progress,
        )
    if json_out:
        print_json(est.to_json())
    else:
        print_estimate(est)


@dataclass(frozen=True)
class _PlanOptions:
    src: SourceOptions
    prep: PrepareOptions
    sample: SampleOptions
    batch: BatchOptions
    submit: SubmitOptions
    sink: SinkOptions


def _plan(source: str, resume: Path | None, o: _PlanOptions, *, dry_run: bool) -> tuple[Any, Any]:
    """The run to submit: ``--resume RUN_DIR``, or a new one planned from ``source``."""
    from embedbatch.engines.batchapi.plan import plan_run

    ws = _workspace()
    if resume is not None:
        return ws.resolve_run(resume), None
    if not source:
        raise UsageError("give a SOURCE or --resume RUN_DIR")
    s = settings()
    with RowProgress("planning") as progress:
        planned = plan_run(
            ws,
            source=o.src.build(source, s),
            prepare=o.prep.build(source, o.src),
            sample=o.sample.build(),
            submit=o.submit.build(o.batch, s, dry_run=dry_run),
            args=_safe_args(source, o.src, o.prep, o.sample, o.batch, o.submit, o.sink),
            on_row=progress,
            pg_target=o.sink.target(source, o.src),
        )
    return planned.run, planned


def _print_planned(run: Any, planned: Any, *, json_out: bool) -> None:
    if planned is None:
        return
    if json_out:
        print_json(
            {"run_dir": str(run.root), "skipped_existing": planned.skipped_existing, **planned.estimate.to_json()}
        )
        return
    print_estimate(planned.estimate)
    if planned.skipped_existing:
        console.print(f"skipped {planned.skipped_existing:,} rows already embedded or planned")


@app.command()
@with_options
def submit(
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    submit: SubmitOptions,
    sink: SinkOptions,
    source: SourceArg = "",
    resume: Resume = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write the JSONL files; no network.")] = False,
    concurrency: Annotated[int, typer.Option(help="Uploads/creates at once.")] = 4,
    json_out: JsonOut = False,
) -> None:
    """Plan batch input files under the API limits, upload them and create batches."""
    from embedbatch.engines.batchapi.submit import submit_run

    run, planned = _plan(source, resume, _PlanOptions(src, prep, sample, batch, submit, sink), dry_run=dry_run)
    _print_planned(run, planned, json_out=json_out)
    if dry_run:
        console.print(f"dry run: batch files written to {run.root} (nothing sent)")
        return
    ws = _workspace()

    async def go(client: Any) -> Any:
        from rich.progress import Progress

        from embedbatch.runs import load_batches

        total = sum(1 for b in load_batches(run) if b.status in ("planned", "uploaded"))
        with Progress(console=err_console, disable=not err_console.is_terminal, transient=True) as prog:
            task = prog.add_task("submitting batches", total=total)
            return await submit_run(ws, client, run, concurrency=concurrency, on_batch=lambda bs: prog.advance(task))

    done = _run(go)
    if not json_out:
        console.print(f"submitted {len(done)} batch(es); run directory:")
    print(run.root)


@app.command("run")
@with_options
def run_cmd(
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    submit: SubmitOptions,
    sink: SinkOptions,
    source: SourceArg = "",
    resume: Resume = None,
    poll_seconds: Annotated[float, typer.Option("--poll-seconds")] = 10.0,
    max_attempts: Annotated[int, typer.Option("--max-attempts")] = 3,
    rows_per_shard: RowsPerShard = 100_000,
    dtype: Dtype = "float32",
    json_out: JsonOut = False,
) -> None:
    """Submit, poll until every batch is terminal, ingest, retry failures; print a summary."""
    from embedbatch.engines.batchapi.drive import drive_run

    run, planned = _plan(source, resume, _PlanOptions(src, prep, sample, batch, submit, sink), dry_run=False)
    if not json_out:
        _print_planned(run, planned, json_out=False)
        console.print(f"run directory: {run.root}")
    ws = _workspace()
    cfg = IngestConfig(rows_per_shard=rows_per_shard, dtype=dtype, dsn=sink.dsn(settings(), src))  # type: ignore[arg-type]
    summary = _run(
        lambda c: drive_run(
            ws,
            c,
            run,
            poll_s=poll_seconds,
            max_attempts=max_attempts,
            ingest_config=cfg,
            max_enqueued_tokens=batch.max_enqueued_tokens,
        )
    )
    if json_out:
        print_json(summary.__dict__)
    else:
        print_run_summary(summary)


@app.command()
@with_options
def ingest(
    sink: SinkOptions,
    run_dir: Annotated[Path, typer.Option("--run-dir")],
    redownload: Annotated[bool, typer.Option("--redownload")] = False,
    rows_per_shard: RowsPerShard = 100_000,
    dtype: Dtype = "float32",
    overwrite: Overwrite = False,
    json_out: JsonOut = False,
) -> None:
    """Map downloaded outputs into Parquet shards and the manifest (and pgvector)."""
    import anyio

    from embedbatch.engines.batchapi.ingest import ingest_run
    from embedbatch.engines.batchapi.poll import redownload_run

    ws = _workspace()
    run = ws.resolve_run(run_dir)
    target = sink.target(overwrite=overwrite)
    cfg = IngestConfig(rows_per_shard=rows_per_shard, dtype=dtype, dsn=sink.dsn(settings()))  # type: ignore[arg-type]
    if redownload:
        _run(lambda c: redownload_run(c, run))
    result = anyio.run(lambda: ingest_run(ws, run, cfg, pg_target=target))
    if json_out:
        print_json(result.to_json())
        return
    console.print(
        f"ingested {result.batches} batch(es): {result.rows:,} rows, {result.failed:,} failed, "
        f"shards {', '.join(result.shards) or '-'} ({result.seconds:.2f} s)"
    )
    if result.pg:
        console.print(f"postgres: {result.pg}")


@app.command()
@with_options
def local(
    source: SourceArg,
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    sink: SinkOptions,
    model: Annotated[str, typer.Option("--model", help="SentenceTransformer path or hub name.")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
    devices: Annotated[str | None, typer.Option(help="e.g. cuda:0,cuda:1: one encoder process each.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16.")] = "auto",
    tokens_per_batch: Annotated[int | None, typer.Option(help="Padded tokens/batch (GPU 131072, CPU 8192).")] = None,
    bucket_min_tokens: Annotated[int, typer.Option()] = 128,
    bucket_max_tokens: Annotated[int, typer.Option(help="Capped at the model's max length.")] = 32768,
    pad_to: Annotated[str, typer.Option(help="longest or bucket.")] = "longest",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile, warmed per bucket shape.")] = False,
    rows_per_shard: RowsPerShard = 100_000,
    shard_dtype: Annotated[str, typer.Option("--shard-dtype", help="float32 or float16 shards.")] = "float32",
    json_out: JsonOut = False,
) -> None:
    """Embed with a local SentenceTransformer (GPU or CPU) into the same shards and sinks."""
    from embedbatch.config import LocalConfig
    from embedbatch.engines.local.pipeline import run_local

    if pad_to not in ("longest", "bucket"):
        raise UsageError(f"--pad-to must be longest or bucket, got {pad_to!r}")
    target = sink.target(source, src)
    cfg = LocalConfig(
        model=model,
        device=device,
        dtype=dtype,  # type: ignore[arg-type]
        tokens_per_batch=tokens_per_batch,
        bucket_min_tokens=bucket_min_tokens,
        bucket_max_tokens=bucket_max_tokens,
        pad_to=pad_to,  # type: ignore[arg-type]
        compile=compile_,
        devices=tuple(d.strip() for d in devices.split(",")) if devices else (),
    )
    with RowProgress("embedding") as progress:
        result = run_local(
            _workspace(),
            source=src.build(source, settings()),
            prepare=prep.build(source, src),
            sample=sample.build(),
            local=cfg,
            ingest=IngestConfig(rows_per_shard=rows_per_shard, dtype=shard_dtype),  # type: ignore[arg-type]
            pg_target=target,
            dsn=sink.dsn(settings(), src),
            args=_safe_args(source, src, prep, sample, sink, model=model),
            on_rows=progress,
        )
    if json_out:
        print_json(result.to_json())
    else:
        print_local_result(result)


@app.command()
def status(
    run_dir: Annotated[Path | None, typer.Option("--run-dir")] = None,
    batch_file: Annotated[Path | None, typer.Option("--batch-file", help="One batch.json.")] = None,
    update_json: Annotated[bool, typer.Option("--update-json", help="Write refreshed state to disk.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Show what is on disk; no API calls.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Show every run (or one run / one batch) with fresh status from the API."""
    from dataclasses import asdict

    from embedbatch.engines.batchapi.poll import refresh_for_status
    from embedbatch.runs import Run

    ws = _workspace()
    if batch_file is not None:
        runs = [ws.resolve_run(batch_file.parent.parent.parent)]
        only = batch_file.parent.name
    else:
        runs = [ws.resolve_run(run_dir)] if run_dir else ws.all_runs()
        only = None

    async def go(client: Any) -> list[tuple[Any, bool]]:
        out = []
        for paths in runs:
            if offline:
                out.append((Run.read(paths), False))
            else:
                out.append(await refresh_for_status(client, paths, update=update_json))
        return out

    if offline:
        import anyio

        results = anyio.run(go, None)
    else:
        results = _run(go)
    payload = []
    for run, written in results:
        batches = [b for b in run.batches if b.name == only] if only else run.batches
        totals = run.totals(batches)
        rs = run.state
        if json_out:
            payload.append(
                {
                    "run_dir": str(run.paths.root),
                    "run_id": rs.run_id,
                    "status": rs.status,
                    "totals": totals,
                    "estimate": rs.estimate,
                    "written": written,
                    "batches": [asdict(b) for b in batches],
                }
            )
        else:
            console.print(status_table(rs, batches, totals))
            if update_json and not written:
                console.print(f"{rs.run_id}: held by another process (a poll); state not written")
    if json_out:
        print_json(payload)
    elif not results:
        console.print("no runs in the workspace")


@app.command()
def poll(
    watch: Annotated[float | None, typer.Option("--watch", help="Repeat every N seconds.")] = None,
    ingest: Annotated[bool, typer.Option("--ingest", help="Ingest finished batches too.")] = False,
    max_enqueued_tokens: Annotated[int | None, typer.Option(help="Override the runs' queue budget.")] = None,
    rows_per_shard: RowsPerShard = 100_000,
    dtype: Dtype = "float32",
) -> None:
    """One pass over every active run (the cron entry point)."""
    import time as _t

    import anyio
    import structlog

    from embedbatch.engines.batchapi.poll import poll_pass

    log = structlog.get_logger("embedbatch.poll")
    ws = _workspace()
    cfg = IngestConfig(rows_per_shard=rows_per_shard, dtype=dtype, dsn=settings().database_url)  # type: ignore[arg-type]
    while True:
        started = _t.monotonic()
        report = _run(
            lambda c: poll_pass(ws, c, max_enqueued_tokens=max_enqueued_tokens, ingest=ingest, ingest_config=cfg)
        )
        log.info("poll pass", **report.to_json())
        if watch is None:
            return
        # Sleep the interval minus the time the pass took.
        anyio.run(anyio.sleep, max(0.0, watch - (_t.monotonic() - started)))


@app.command()
def cancel(run_dir: Annotated[Path, typer.Option("--run-dir")]) -> None:
    """Cancel a run's active batches and record the result."""
    from embedbatch.engines.batchapi.poll import cancel_run

    run = _workspace().resolve_run(run_dir)
    batches = _run(lambda c: cancel_run(c, run))
    for bs in batches:
        console.print(f"{bs.name}: {bs.status}")


@app.command()
def retry(
    run_dir: Annotated[Path, typer.Option("--run-dir")],
    max_attempts: Annotated[int, typer.Option("--max-attempts")] = 3,
    no_submit: Annotated[bool, typer.Option("--no-submit", help="Only plan the retry batch.")] = False,
) -> None:
    """Plan the failed and missing ids of a run again (a new batch in the same run)."""
    from embedbatch.engines.batchapi.retry import plan_retry
    from embedbatch.engines.batchapi.submit import submit_run

    ws = _workspace()
    run = ws.resolve_run(run_dir)
    plan = plan_retry(ws, run, max_attempts=max_attempts)
    console.print(
        f"re-planned {plan.requeued:,} ids in {plan.batches or 'no batch'}; "
        f"{len(plan.given_up):,} over {max_attempts} attempts stay failed; "
        f"{plan.already_embedded:,} were embedded since"
    )
    if plan.requeued and not no_submit:
        _run(lambda c: submit_run(ws, c, run))


@app.command()
def verify(
    dataset: Annotated[str | None, typer.Option("--dataset")] = None,
    model: Annotated[str | None, typer.Option("--model")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild the id index from the shards first.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Re-read every shard and check it against the manifest and id index; exit 1 on any problem."""
    from embedbatch.store.verify import verify_dataset

    ws = _workspace()
    pairs = [(m, d) for m, d in ws.datasets() if (dataset is None or d == dataset) and (model is None or m == model)]
    if not pairs:
        raise UsageError(f"no dataset matches (have: {', '.join(f'{m}/{d}' for m, d in ws.datasets()) or 'none'})")
    reports = [verify_dataset(ws, m, d, repair=repair) for m, d in pairs]
    if json_out:
        print_json([r.__dict__ | {"ok": r.ok} for r in reports])
    else:
        print_verify(reports)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command("list")
def list_cmd(json_out: JsonOut = False) -> None:
    """Datasets, models, row counts, runs and their states in the workspace."""
    from embedbatch.store.verify import list_workspace

    data = list_workspace(_workspace())
    if json_out:
        print_json(data)
    else:
        print_workspace(data)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    api_key: Annotated[str | None, typer.Option("--api-key", help="Required bearer token (default: any).")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Local SentenceTransformer (default: hash model).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Where files are kept.")] = None,
    faults: Annotated[str, typer.Option("--faults", help="e.g. rate_429=0.05,line_error_rate=0.05")] = "",
    step_s: Annotated[float, typer.Option("--step-s", help="Seconds per batch status step.")] = 0.2,
) -> None:
    """Run an OpenAI-compatible server (files, batches, embeddings) for tests and local models."""
    import tempfile

    from aiohttp import web

    from embedbatch.server.app import FakeOpenAI, FaultConfig, build_app

    fault_cfg = FaultConfig.parse(faults) if faults else FaultConfig()
    fault_cfg.step_s = step_s
    backend = None
    if model:
        from embedbatch.engines.local.model import LocalBackend

        backend = LocalBackend(model)
    state = FakeOpenAI(
        data_dir or Path(tempfile.mkdtemp(prefix="embedbatch-serve-")),
        api_key=api_key,
        backend=backend,
        faults=fault_cfg,
    )
    err_console.print(f"embedbatch serve on http://{host}:{port}/v1 (model: {model or 'hash'})")
    web.run_app(build_app(state), host=host, port=port, print=None, access_log=None)


@app.command()
def search(
    query_text: Annotated[str, typer.Argument(help="The query text.")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="Search the dataset's shards.")] = None,
    model: Model = None,
    k: Annotated[int, typer.Option("-k", "--k")] = 5,
    pg_table: PgTable = None,
    pg_dsn: PgDsn = None,
    pg_id_column: PgIdColumn = "id",
    pg_vector_column: PgVectorColumn = "embedding",
    pg_text_column: Annotated[str, typer.Option("--pg-text-column")] = "content",
    local_model: Annotated[str | None, typer.Option("--local-model", help="Embed the query locally.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Embed a query with the dataset's model and print the nearest rows."""
    from embedbatch.search.exact import search_pg, search_shards

    ws = _workspace()
    s = settings()
    if pg_table:
        hits = search_pg(
            s,
            query_text,
            dsn=pg_dsn or s.database_url,
            table=pg_table,
            id_column=pg_id_column,
            vector_column=pg_vector_column,
            text_column=pg_text_column,
            model=model,
            k=k,
            local_model=local_model,
        )
    elif dataset:
        hits = search_shards(ws, s, query_text, dataset=dataset, model=model, k=k, local_model=local_model)
    else:
        raise UsageError("give --dataset (Parquet shards) or --pg-table (PostgreSQL)")
    if json_out:
        print_json(hits)
    else:
        print_hits(query_text, hits)


@db_app.command("init")
def db_init(
    dsn: Annotated[str | None, typer.Option("--dsn", help="Database (env DATABASE_URL).")] = None,
    migrations: Annotated[Path | None, typer.Option("--migrations", help="Folder of *.sql files.")] = None,
) -> None:
    """Apply the SQL migrations (pgvector extension, example knowledge_chunks table)."""
    import anyio

    from embedbatch.db.pg import apply_migrations

    dsn = dsn or settings().database_url
    if not dsn:
        raise UsageError("db init needs --dsn or DATABASE_URL")
    folder = migrations or Path(__file__).resolve().parents[2] / "migrations"
    applied = anyio.run(apply_migrations, dsn, folder)
    console.print(f"applied {', '.join(applied)}")


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"embedbatch {__version__}")


def main() -> None:
    """Entry point: run the app, turning EmbedbatchError into a message and its exit code."""
    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except EmbedbatchError as exc:
        if os.environ.get("EMBEDBATCH_RAISE_ERRORS") == "1":
            raise
        err_console.print(Text("error: ", style="bold red") + Text(scrub(str(exc))), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; the run can be resumed")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
