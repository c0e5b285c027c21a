"""Commands of the Batch API path: estimate, submit, run, ingest, status, poll, cancel, retry."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from embedbatch.cli.app import (
    EXIT_FAILED_ROWS,
    AllRuns,
    Dtype,
    JsonOut,
    LastRuns,
    Overwrite,
    Resume,
    RowsPerShard,
    SourceArg,
    app,
    check_bind,
    open_workspace,
    safe_args,
    settings,
    with_client,
)
from embedbatch.cli.options import (
    BatchOptions,
    PrepareOptions,
    RealtimeOptions,
    SampleOptions,
    SinkOptions,
    SourceOptions,
    StoreOptions,
    SubmitOptions,
    estimate_from,
    with_options,
)
from embedbatch.cli.render import (
    RowProgress,
    RunProgress,
    console,
    err_console,
    print_estimate,
    print_failed_rows,
    print_json,
    print_run_summary,
    print_sink_not_filled,
    print_status_lines,
    status_table,
)
from embedbatch.cli.tool_options import DriveOptions
from embedbatch.config import IngestConfig
from embedbatch.errors import EmbedbatchError, UsageError


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
    with RowProgress("reading") as progress:
        est = estimate_from(source, src, prep, sample, batch, settings(), on_row=progress)
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
    store: StoreOptions | None = None


def _plan(source: str, resume: Path | None, o: _PlanOptions, *, dry_run: bool) -> tuple[Any, Any]:
    """The run to submit: ``--resume RUN_DIR``, or a new one planned from ``source``."""
    from embedbatch.engines.batchapi.plan import plan_run

    ws = open_workspace()
    if resume is not None:
        return ws.resolve_run(resume), None
    if not source:
        raise UsageError("give a SOURCE or --resume RUN_DIR")
    s = settings()
    if not dry_run and not s.openai_api_key:
        raise UsageError("OPENAI_API_KEY is not set (put it in the environment or .env); nothing was planned")
    target = o.sink.target(source, o.src)
    libsql_target = o.sink.libsql_target(source, o.src)
    store = o.store or StoreOptions()
    store.fields(o.batch.model_name(s))  # a refused --truncate-dim stops here, before anything is sent
    with RowProgress("planning") as progress:
        planned = plan_run(
            ws,
            source=o.src.build(source, s),
            prepare=o.prep.build(source, o.src),
            sample=o.sample.build(),
            submit=o.submit.build(o.batch, s, dry_run=dry_run),
            args=safe_args(source, o.src, o.prep, o.sample, o.batch, o.submit, o.sink, store),
            on_row=progress,
            pg_target=target,
            libsql_target=libsql_target,
            dsn=o.sink.dsn(s, o.src) if target is not None else None,
            libsql_auth_token=o.sink.libsql_token(s),
            probe_dim=lambda: len(with_client(lambda c: c.embed(["dimension probe"], model=o.batch.model_name(s)))[0]),
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
        if planned.state is not None and (planned.state.pg_target or planned.state.libsql_target):
            print_sink_not_filled(str(run.root), planned.skipped_existing, sys.argv[1:])
    for run_dir, rows in planned.already_planned.items():
        console.print(
            f"{rows:,} of them are planned in an unfinished run; continue it with: "
            f"embedbatch submit --resume {run_dir}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if planned.state is not None and not planned.state.counts.get("planned"):
        console.print("nothing new to submit: every chosen row is embedded or planned (see `embedbatch status`)")


@app.command()
@with_options
def submit(
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    submit: SubmitOptions,
    sink: SinkOptions,
    store: StoreOptions,
    source: SourceArg = "",
    resume: Resume = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write the JSONL files; no network.")] = False,
    concurrency: Annotated[int, typer.Option(help="Uploads/creates at once.")] = 4,
    json_out: JsonOut = False,
) -> None:
    """Plan batch input files under the API limits, upload them and create batches."""
    from embedbatch.engines.batchapi.submit import submit_run

    run, planned = _plan(source, resume, _PlanOptions(src, prep, sample, batch, submit, sink, store), dry_run=dry_run)
    _print_planned(run, planned, json_out=json_out)
    if dry_run:
        (err_console if json_out else console).print(f"dry run: batch files written to {run.root} (nothing sent)")
        return
    ws = open_workspace()

    async def go(client: Any) -> Any:
        from rich.progress import Progress

        from embedbatch.runs import load_batches

        total = sum(1 for b in load_batches(run) if b.status in ("planned", "uploaded"))
        with Progress(console=err_console, disable=not err_console.is_terminal, transient=True) as prog:
            task = prog.add_task("submitting batches", total=total)
            return await submit_run(ws, client, run, concurrency=concurrency, on_batch=lambda bs: prog.advance(task))

    try:
        done = with_client(go)
    except EmbedbatchError:
        err_console.print(
            f"the run is planned on disk; continue it with: embedbatch submit --resume {run.root}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise
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
    rt: RealtimeOptions,
    sink: SinkOptions,
    drive: DriveOptions,
    store: StoreOptions,
    source: SourceArg = "",
    resume: Resume = None,
    engine: Annotated[
        str, typer.Option("--engine", help="batch (half price, ≤ 24 h), realtime (now), or auto.")
    ] = "batch",
    deadline: Annotated[
        str, typer.Option("--deadline", help="auto: realtime when the job fits in this (e.g. 1h, 30m).")
    ] = "1h",
    json_out: JsonOut = False,
) -> None:
    """Submit, poll until every batch is terminal, ingest, retry failures; print a summary.

    With --engine realtime (or auto choosing it) the rows go through /v1/embeddings instead."""
    from embedbatch.engines.batchapi.drive import drive_run

    if engine not in ("batch", "realtime", "auto"):
        raise UsageError(f"--engine must be batch, realtime or auto, got {engine!r}")
    if engine != "batch" and resume is not None:
        raise UsageError("--resume continues a Batch API run; a realtime run resumes by running the same command")
    if engine == "auto":
        engine = _choose(source, src, prep, sample, batch, rt, deadline, json_out=json_out)
    if engine == "realtime":
        from embedbatch.cli.realtime import embed_realtime

        embed_realtime(
            source, src, prep, sample, batch, rt, sink, submit.max_cost_usd, store, drive.dtype, json_out=json_out
        )
        return

    run, planned = _plan(source, resume, _PlanOptions(src, prep, sample, batch, submit, sink, store), dry_run=False)
    if not json_out:
        _print_planned(run, planned, json_out=False)
        console.print(f"run directory: {run.root}")
    ws = open_workspace()
    cfg = drive.ingest(
        dsn=sink.dsn(settings(), src),
        libsql_auth_token=sink.libsql_token(settings()),
        store=store.fields(batch.model_name(settings()), drive.dtype),
    )
    with RunProgress(run) as progress:
        summary = with_client(
            lambda c: drive_run(
                ws,
                c,
                run,
                poll_s=drive.poll_seconds,
                max_attempts=drive.max_attempts,
                ingest_config=cfg,
                max_enqueued_tokens=batch.max_enqueued_tokens,
                on_pass=progress,
            )
        )
    if json_out:
        print_json(summary.__dict__)
    else:
        print_run_summary(summary)
    if summary.failed:
        print_failed_rows(summary.run_dir, summary.failed, summary.failed_reasons)
        raise typer.Exit(EXIT_FAILED_ROWS)


def _choose(
    source: str,
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    rt: RealtimeOptions,
    deadline: str,
    *,
    json_out: bool,
) -> str:
    """``--engine auto``: count the tokens, pick the engine, say why."""
    from embedbatch.engines.choose import choose_engine
    from embedbatch.engines.realtime.limiter import parse_duration_s

    deadline_s = parse_duration_s(deadline)
    if deadline_s is None:
        raise UsageError(f"--deadline takes a duration such as 1h, 30m or 90s, got {deadline!r}")
    s = rt.with_keys(settings())
    est = estimate_from(source, src, prep, sample, batch, settings())
    choice = choose_engine(est.stats.tokens_total, tpm=rt.max_tpm, keys=len(s.api_keys()), deadline_s=deadline_s)
    (err_console if json_out else console).print(f"engine: {choice.engine} ({choice.reason})")
    return choice.engine


@app.command()
@with_options
def ingest(
    sink: SinkOptions,
    run_dir: Annotated[Path, typer.Option("--run-dir")],
    redownload: Annotated[bool, typer.Option("--redownload")] = False,
    no_pg: Annotated[bool, typer.Option("--no-pg", help="Stop writing this run into PostgreSQL.")] = False,
    rows_per_shard: RowsPerShard = 100_000,
    dtype: Dtype = "float32",
    overwrite: Overwrite = False,
    json_out: JsonOut = False,
) -> None:
    """Map downloaded outputs into Parquet shards and the manifest (and pgvector)."""
    import anyio

    from embedbatch.engines.batchapi.ingest import ingest_run
    from embedbatch.engines.batchapi.poll import redownload_run

    ws = open_workspace()
    run = ws.resolve_run(run_dir)
    target = sink.target(overwrite=overwrite)
    libsql_target = sink.libsql_target(overwrite=overwrite)
    cfg = IngestConfig(
        rows_per_shard=rows_per_shard,
        dtype=dtype,  # type: ignore[arg-type]
        dsn=sink.dsn(settings()),
        libsql_auth_token=sink.libsql_token(settings()),
    )
    if redownload:
        with_client(lambda c: redownload_run(c, run))
    result = anyio.run(
        lambda: ingest_run(
            ws, run, cfg, pg_target=target, wait_s=ws.lock_timeout_s, no_pg=no_pg, libsql_target=libsql_target
        )
    )
    if json_out:
        print_json(result.to_json())
        return
    console.print(
        f"ingested {result.batches} batch(es): {result.rows:,} rows, {result.failed:,} failed, "
        f"shards {', '.join(result.shards) or '-'} ({result.seconds:.2f} s)"
    )
    if result.pg:
        console.print(f"postgres: {result.pg}")
    _exit_if_failed_rows([run])


def _exit_if_failed_rows(runs: list[Any]) -> None:
    """Runs that have ended with failed rows are reported (stderr) and the command exits
    :data:`EXIT_FAILED_ROWS`; active runs are not judged yet."""
    from embedbatch.runs import RunState

    failed = [(paths, rs) for paths in runs if (rs := RunState.load(paths)).outcome == "finished with failures"]
    for paths, rs in failed:
        print_failed_rows(str(paths.root), rs.failed_rows, rs.failed_reasons)
    if failed:
        raise typer.Exit(EXIT_FAILED_ROWS)


@app.command()
def status(
    run_dir: Annotated[Path | None, typer.Option("--run-dir")] = None,
    batch_file: Annotated[Path | None, typer.Option("--batch-file", help="One batch.json.")] = None,
    update_json: Annotated[bool, typer.Option("--update-json", help="Write refreshed state to disk.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Show what is on disk; no API calls.")] = False,
    last: LastRuns = 20,
    all_runs: AllRuns = False,
    json_out: JsonOut = False,
) -> None:
    """Show runs (every open run and the newest 20 others: --last N, --all; or one run or one
    batch) with fresh status from the API."""
    from dataclasses import asdict

    from embedbatch.runs import Run, shown_runs

    ws = open_workspace()
    if batch_file is not None:
        runs, hidden = [ws.resolve_run(batch_file.parent.parent.parent)], 0
        only = batch_file.parent.name
    else:
        runs, hidden = ([ws.resolve_run(run_dir)], 0) if run_dir else shown_runs(ws, last=None if all_runs else last)
        only = None

    snapshots = [Run.read(paths) for paths in runs]
    remote = (
        []
        if offline
        else [i for i, r in enumerate(snapshots) if any(b.pending or b.is_remote_active for b in r.batches)]
    )

    async def go(client: Any) -> list[tuple[Any, bool]]:
        from embedbatch.engines.batchapi.poll import refresh_for_status

        out: list[tuple[Any, bool]] = [(r, False) for r in snapshots]
        for i in remote:  # only runs the provider still holds need a call (and the SDK loaded)
            out[i] = await refresh_for_status(client, runs[i], update=update_json)
        return out

    results = with_client(go) if remote else [(r, False) for r in snapshots]
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
                    "outcome": rs.outcome,
                    "failed_rows": rs.failed_rows,
                    "failed_reasons": rs.failed_reasons,
                    "totals": totals,
                    "estimate": rs.estimate,
                    "written": written,
                    "failure": rs.failure,
                    "batches": [asdict(b) for b in batches],
                }
            )
        elif not console.is_terminal:
            print_status_lines(str(run.paths.root), rs, batches, totals)
        else:
            console.print(status_table(rs, batches, totals))
            if update_json and not written:
                console.print(f"{rs.run_id}: held by another process (a poll); state not written")
    if json_out:
        print_json(payload)
    elif not results:
        console.print("no runs in the workspace")
    if hidden and not json_out:
        err_console.print(f"{hidden:,} older finished run(s) not shown (--last N, --all)")


@app.command()
def poll(
    watch: Annotated[float | None, typer.Option("--watch", help="Repeat every N seconds.")] = None,
    ingest: Annotated[bool, typer.Option("--ingest", help="Ingest finished batches too.")] = False,
    delete_remote_files: Annotated[
        bool,
        typer.Option("--delete-remote-files", help="Delete ingested batches' files, remote and local."),
    ] = False,
    max_enqueued_tokens: Annotated[int | None, typer.Option(help="Override the runs' queue budget.")] = None,
    rows_per_shard: RowsPerShard = 100_000,
    dtype: Dtype = "float32",
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", help="With --watch: serve Prometheus /metrics on this port.")
    ] = None,
    ui_port: Annotated[
        int | None, typer.Option("--ui-port", help="With --watch: serve the live report page at / on this port.")
    ] = None,
    ui_host: Annotated[str, typer.Option("--ui-host", help="Bind address of --ui-port (loopback by default).")] = (
        "127.0.0.1"
    ),
    ui_key: Annotated[
        str | None, typer.Option("--ui-key", help="Key the page asks for (Bearer or ?key=); needed off loopback.")
    ] = None,
) -> None:
    """One pass over every active run (the cron entry point).

    A one-shot pass that finds another pass running logs one line and exits 0 (cron overlaps are
    normal); ``--watch`` waits for the workspace lock instead. A run that fails is recorded on the
    run and retried with back-off on later passes; the others are served.
    """
    import structlog

    from embedbatch.engines.batchapi.poll import poll_every, poll_pass
    from embedbatch.errors import LockedError

    log = structlog.get_logger("embedbatch.poll")
    ws = open_workspace()
    s = settings()
    cfg = IngestConfig(
        rows_per_shard=rows_per_shard,
        dtype=dtype,  # type: ignore[arg-type]
        dsn=s.database_url,
        libsql_auth_token=s.turso_auth_token,
        delete_files=delete_remote_files,
    )
    wait_s = ws.lock_timeout_s if watch is not None else None
    if metrics_port is not None:
        if watch is None:
            raise UsageError("--metrics-port needs --watch (a one-shot pass writes workspace/metrics/ instead)")
        from embedbatch.metrics import serve_metrics

        serve_metrics(ws, metrics_port)
        log.info("serving metrics", url=f"http://127.0.0.1:{metrics_port}/metrics")
    if ui_port is not None:
        if watch is None:
            raise UsageError("--ui-port needs --watch (or write the page once: embedbatch report --out FILE)")
        from embedbatch.report.live import LivePage, start_ui

        check_bind(ui_host, ui_key, flag="--ui-host", key_flag="--ui-key")
        server = start_ui(LivePage(ws, refresh_s=max(watch, 2.0), keys=[ui_key] if ui_key else None), ui_host, ui_port)
        log.info("serving the live report", url=f"http://{ui_host}:{server.server_address[1]}/")

    def one_shot(c: Any) -> Any:
        return poll_pass(ws, c, max_enqueued_tokens=max_enqueued_tokens, ingest=ingest, ingest_config=cfg)

    if watch is None:
        try:
            report = with_client(one_shot)
        except LockedError as exc:
            log.info("another poll pass is running; this one has nothing to do", detail=str(exc))
            return
        log.info("poll pass", **report.to_json())
        _exit_if_failed_rows([ws.resolve_run(Path(d)) for d in report.finished_with_failures])
        return

    async def watching(c: Any) -> None:
        async def one_pass() -> Literal["done", "again", "wait"]:
            report = await poll_pass(
                ws, c, max_enqueued_tokens=max_enqueued_tokens, ingest=ingest, ingest_config=cfg, wait_s=wait_s
            )
            log.info("poll pass", **report.to_json())
            for d in report.finished_with_failures:
                log.warning("run finished with failures", run_dir=d)
            return "wait"

        await poll_every(watch, one_pass)

    with_client(watching)


@app.command()
def cancel(run_dir: Annotated[Path, typer.Option("--run-dir")]) -> None:
    """Cancel a run's active batches and record the result."""
    from embedbatch.engines.batchapi.poll import cancel_run

    ws = open_workspace()
    run = ws.resolve_run(run_dir)
    outcomes = with_client(lambda c: cancel_run(c, run, wait_s=ws.lock_timeout_s))
    for name, outcome in outcomes:
        console.print(f"{name}: {outcome}", markup=False, highlight=False)
    if any(o.startswith("error:") for _, o in outcomes):
        raise typer.Exit(6)


@app.command()
def retry(
    run_dir: Annotated[Path, typer.Option("--run-dir")],
    max_attempts: Annotated[int, typer.Option("--max-attempts")] = 3,
    no_submit: Annotated[bool, typer.Option("--no-submit", help="Only plan the retry batch.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Also send rows whose failure cannot change (a 400 for that input, a wrong dimension)."
        ),
    ] = False,
) -> None:
    """Plan the failed and missing ids of a run again (a new batch in the same run); a realtime
    run embeds them again at once."""
    from embedbatch.engines.batchapi.retry import plan_retry
    from embedbatch.engines.batchapi.submit import submit_run
    from embedbatch.runs import RunState

    ws = open_workspace()
    run = ws.resolve_run(run_dir)
    if RunState.load(run).kind == "realtime":
        from embedbatch.engines.realtime.pipeline import retry_realtime

        s = settings()  # the run's database targets are reached with DATABASE_URL / TURSO_AUTH_TOKEN
        ingest_cfg = IngestConfig(dsn=s.database_url, libsql_auth_token=s.turso_auth_token)
        result = retry_realtime(ws, s, run, ingest=ingest_cfg, force=force)
        console.print(f"embedded {result.rows:,} of {result.planned:,} failed rows; {result.failed:,} still failed")
        _say_permanent(result.permanent)
        return
    plan = plan_retry(ws, run, max_attempts=max_attempts, wait_s=ws.lock_timeout_s, force=force)
    console.print(
        f"re-planned {plan.requeued:,} ids in {plan.batches or 'no batch'}; "
        f"{len(plan.given_up):,} over {max_attempts} attempts stay failed; "
        f"{plan.already_embedded:,} were embedded since"
    )
    _say_permanent(plan.permanent)
    if plan.requeued and not no_submit:
        with_client(lambda c: submit_run(ws, c, run))


def _say_permanent(reasons: dict[str, int]) -> None:
    """Rows that retry left alone because sending them again cannot change their failure."""
    if not reasons:
        return
    lines = [f"not sent again ({sum(reasons.values()):,} row(s)), their failure cannot change:"]
    lines += [f"  {n:,} × {reason}" for reason, n in reasons.items()]
    lines.append("  fix the cause (model, --dimensions, the text) or pass --force to send them anyway")
    err_console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


@app.command()
def clean(
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Clean this run.")] = None,
    ingested: Annotated[bool, typer.Option("--ingested", help="Clean every run's ingested batches.")] = False,
    keep_remote: Annotated[bool, typer.Option("--keep-remote", help="Leave the provider's files alone.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Delete ingested batches' files at the provider and their local JSONL (state, records and
    failed ids stay; an input that still has failed rows stays for `retry`)."""
    from embedbatch.engines.batchapi.clean import CleanReport, clean_run

    ws = open_workspace()
    if (run_dir is None) == (not ingested):
        raise UsageError("give --run-dir RUN_DIR or --ingested (every run)")
    runs = [ws.resolve_run(run_dir)] if run_dir is not None else ws.all_runs()

    async def go(c: Any) -> CleanReport:
        total = CleanReport()
        for paths in runs:
            r = await clean_run(None if keep_remote else c, paths, wait_s=ws.lock_timeout_s)
            total.batches += r.batches
            total.remote_files += r.remote_files
            total.local_bytes += r.local_bytes
        return total

    if keep_remote:
        import anyio

        report = anyio.run(go, None)
    else:
        report = with_client(go)
    if json_out:
        print_json(report.__dict__)
    else:
        console.print(
            f"cleaned {report.batches} batch(es): {report.remote_files} provider file(s) deleted, "
            f"{report.local_bytes / 1e6:,.1f} MB freed here"
        )
