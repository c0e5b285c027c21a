"""Commands around the data: local worker, verify, list, search, serve, db init, version."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from embedbatch._version import __version__
from embedbatch.cli.app import (
    AllRuns,
    JsonOut,
    LastRuns,
    Model,
    SourceArg,
    app,
    check_bind,
    db_app,
    open_workspace,
    safe_args,
    settings,
)
from embedbatch.cli.options import (
    PrepareOptions,
    SampleOptions,
    SinkOptions,
    SourceOptions,
    StoreOptions,
    with_options,
)
from embedbatch.cli.render import (
    RowProgress,
    console,
    err_console,
    print_hits,
    print_json,
    print_local_result,
    print_sink_not_filled,
    print_verify,
    print_workspace,
)
from embedbatch.cli.tool_options import LibsqlSearchOptions, LocalOptions, PgSearchOptions, RayOptions, ShardOptions
from embedbatch.errors import UsageError


@app.command()
@with_options
def local(
    source: SourceArg,
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    sink: SinkOptions,
    worker: LocalOptions,
    ray: RayOptions,
    shards: ShardOptions,
    store: StoreOptions,
    json_out: JsonOut = False,
) -> None:
    """Embed with a local SentenceTransformer (GPU or CPU, or a Ray cluster) into the same shards and sinks."""
    from embedbatch.engines.local.pipeline import run_local

    cfg = worker.build()
    s = settings()
    with RowProgress("embedding", log_every_s=s.progress_log_s) as progress:
        result = run_local(
            open_workspace(),
            source=src.build(source, s),
            prepare=prep.build(source, src),
            sample=sample.build(),
            local=cfg,
            ingest=shards.build(store.fields(worker.model, shards.shard_dtype)),
            pg_target=sink.target(source, src),
            dsn=sink.dsn(s, src),
            libsql_target=sink.libsql_target(source, src),
            libsql_auth_token=sink.libsql_token(s),
            args=safe_args(source, src, prep, sample, sink, store, model=worker.model),
            on_rows=progress,
            ray=ray.build(),
        )
    if json_out:
        print_json(result.to_json())
    else:
        print_local_result(result)
    if result.skipped_existing and (sink.pg_table or sink.libsql_table):
        print_sink_not_filled(result.run_dir, result.skipped_existing, sys.argv[1:])


@app.command()
def verify(
    dataset: Annotated[str | None, typer.Option("--dataset")] = None,
    model: Annotated[str | None, typer.Option("--model")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild the id index from the shards first.")] = False,
    quick: Annotated[
        int | None,
        typer.Option("--quick", help="Only the manifest and the size and sha256 of the last N shards (cron)."),
    ] = None,
    json_out: JsonOut = False,
) -> None:
    """Re-read every shard and check it against the manifest and id index (and vector indexes'
    files against their checksums); exit 1 on any problem."""
    from embedbatch.store.verify import verify_dataset

    ws = open_workspace()
    pairs = [(m, d) for m, d in ws.datasets() if (dataset is None or d == dataset) and (model is None or m == model)]
    if not pairs:
        raise UsageError(f"no dataset matches (have: {', '.join(f'{m}/{d}' for m, d in ws.datasets()) or 'none'})")
    from embedbatch.search.index import check_index_files

    reports = [verify_dataset(ws, m, d, repair=repair, quick=quick) for m, d in pairs]
    for r in [] if quick is not None else reports:  # the vector indexes: their files against index.json
        for folder in sorted(ws.manifest_path(r.model, r.dataset).parent.glob("faiss/*/")):
            r.problems += check_index_files(folder)
    if json_out:
        print_json([r.__dict__ | {"ok": r.ok} for r in reports])
    else:
        print_verify(reports)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command("list")
def list_cmd(last: LastRuns = 20, all_runs: AllRuns = False, json_out: JsonOut = False) -> None:
    """Datasets, models, row counts, and runs with their states: every open run and the newest
    20 others (--last N, --all)."""
    from embedbatch.store.verify import list_workspace

    data = list_workspace(open_workspace(), last=None if all_runs else last)
    if json_out:
        print_json(data)
    else:
        print_workspace(data)


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only this dataset and its runs.")] = None,
    run: Annotated[str | None, typer.Option("--run", help="Only this run (id or folder) and its dataset.")] = None,
    last: Annotated[int, typer.Option("--last", min=0, help="Open runs and the newest N others.")] = 200,
    sample: Annotated[int, typer.Option("--sample", min=0, help="Rows sampled per dataset for the map.")] = 2000,
) -> None:
    """Write one self-contained HTML page (opens offline): runs, cost, batch timeline, failures,
    datasets (norms, a 2-D map of a sample), local runs."""
    from embedbatch.report.data import collect
    from embedbatch.report.page import render
    from embedbatch.workspace import atomic_write_bytes

    page = render(collect(open_workspace(), dataset=dataset, run=run, last=last, sample=sample))
    atomic_write_bytes(out, page.encode())
    console.print(f"report written to {out} ({len(page) / 1e6:.1f} MB)")


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Required bearer token(s), comma-separated (default: any).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Local SentenceTransformer (default: hash model).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Where files are kept.")] = None,
    faults: Annotated[str, typer.Option("--faults", help="e.g. rate_429=0.05,line_error_rate=0.05")] = "",
    step_s: Annotated[float, typer.Option("--step-s", help="Seconds per batch status step.")] = 0.2,
    rpm: Annotated[int | None, typer.Option("--rpm", help="/v1/embeddings requests per minute, per key.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="/v1/embeddings tokens per minute, per key.")] = None,
    ui: Annotated[bool, typer.Option("--ui", help="Also serve the workspace's live report page at /.")] = False,
) -> None:
    """Run an OpenAI-compatible server (files, batches, embeddings) for tests and local models."""
    import tempfile

    from aiohttp import web

    from embedbatch.server.app import FakeOpenAI, FaultConfig, build_app
    from embedbatch.server.ratelimit import ProviderLimits

    check_bind(host, api_key, flag="serve --host", key_flag="--api-key")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0-65535 (0: any free port), got {port}")
    if api_key is not None and not any(k.strip() for k in api_key.split(",")):
        raise UsageError("--api-key names no key (give one or more, comma-separated, or leave it out)")
    for name, value in (("--rpm", rpm), ("--tpm", tpm)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if step_s < 0:
        raise UsageError(f"--step-s must be 0 or more, got {step_s}")
    try:
        fault_cfg = FaultConfig.parse(faults) if faults else FaultConfig()
    except ValueError as exc:
        raise UsageError(f"--faults {faults!r}: {exc}") from exc
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
        limits=ProviderLimits(rpm=rpm, tpm=tpm),
    )
    limits = f", {rpm or '∞'} RPM / {tpm or '∞'} TPM per key" if rpm or tpm else ""
    err_console.print(f"embedbatch serve on http://{host}:{port}/v1 (model: {model or 'hash'}{limits})")
    page = None
    if ui:
        from embedbatch.report.live import LivePage

        keys = [k.strip() for k in api_key.split(",") if k.strip()] if api_key else None
        page = LivePage(open_workspace(), keys=keys)
        err_console.print(f"live report on http://{host}:{port}/")
    web.run_app(build_app(state, ui=page), host=host, port=port, print=None, access_log=None)


@app.command()
@with_options
def search(
    pg: PgSearchOptions,
    lib: LibsqlSearchOptions,
    query_text: Annotated[str | None, typer.Argument(help="The query text (or --id).")] = None,
    record_id: Annotated[
        str | None, typer.Option("--id", help="Find the neighbours of this stored row (with --dataset).")
    ] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Search the dataset's shards.")] = None,
    model: Model = None,
    k: Annotated[int, typer.Option("-k", "--k")] = 5,
    local_model: Annotated[str | None, typer.Option("--local-model", help="Embed the query locally.")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Exact search even when a vector index is current.")] = False,
    group_by_parent: Annotated[
        bool, typer.Option("--group-by-parent", help="The best chunk of each document (chunked datasets).")
    ] = False,
    rescore_multiplier: Annotated[
        int | None,
        typer.Option("--rescore-multiplier", help="int8/binary shards: candidates per result to rescore (4)."),
    ] = None,
    json_out: JsonOut = False,
) -> None:
    """Embed a query with the dataset's model and print the nearest rows (exact, streamed over
    the shards in bounded memory), or the neighbours of a stored row (--id)."""
    from embedbatch.search.exact import search_by_id, search_libsql, search_pg, search_shards

    ws = open_workspace()
    s = settings()
    if (query_text is None) == (record_id is None):
        raise UsageError("give a query text or --id ID (not both)")
    if group_by_parent and (pg.pg_table or lib.libsql_url or not dataset):
        raise UsageError("--group-by-parent searches a dataset's shards: give --dataset")
    wanted, k = k, k * 8 if group_by_parent else k  # chunks of one document crowd each other out
    if record_id is not None:
        if not dataset:
            raise UsageError("--id needs --dataset")
        hits = search_by_id(ws, record_id, dataset=dataset, model=model, k=k, exact=exact)
    elif query_text is None:
        raise AssertionError("not reached")
    elif pg.pg_table:
        hits = search_pg(
            s,
            query_text,
            dsn=pg.pg_dsn or s.database_url,
            table=pg.pg_table,
            id_column=pg.pg_id_column,
            vector_column=pg.pg_vector_column,
            text_column=pg.pg_text_column,
            model=model,
            k=k,
            local_model=local_model,
        )
    elif lib.libsql_url:
        hits = search_libsql(
            s,
            query_text,
            url=lib.libsql_url,
            auth_token=lib.libsql_auth_token or s.turso_auth_token,
            table=lib.libsql_table,
            id_column=lib.libsql_id_column,
            vector_column=lib.libsql_vector_column,
            text_column=lib.libsql_text_column,
            model=model,
            k=k,
            local_model=local_model,
        )
    elif dataset:
        hits = search_shards(
            ws,
            s,
            query_text,
            dataset=dataset,
            model=model,
            k=k,
            local_model=local_model,
            exact=exact,
            rescore_multiplier=rescore_multiplier,
        )
    else:
        raise UsageError("give --dataset (Parquet shards), --pg-table (PostgreSQL) or --libsql-url (libSQL)")
    if group_by_parent and dataset:
        from embedbatch.search.exact import best_per_parent, find_dataset

        m, d = find_dataset(ws, dataset, model)
        hits = best_per_parent(ws, m, d, hits, wanted)
    if json_out:
        print_json(hits)
    else:
        print_hits(f"id {record_id}" if record_id is not None else str(query_text), hits)


@db_app.command("init")
def db_init(
    dsn: Annotated[str | None, typer.Option("--dsn", help="Database (env DATABASE_URL).")] = None,
    migrations: Annotated[Path | None, typer.Option("--migrations", help="Folder of *.sql files.")] = None,
    libsql_url: Annotated[str | None, typer.Option("--libsql-url", help="Create the example table here.")] = None,
    libsql_auth_token: Annotated[str | None, typer.Option("--libsql-auth-token")] = None,
    dim: Annotated[int, typer.Option("--dim", help="The vector dimension (libSQL, --chunks-table).")] = 1536,
    chunks_table: Annotated[
        str | None,
        typer.Option(
            "--chunks-table",
            help="Create a chunks table (id, parent_id, chunk_index, chunk, embedding) for "
            "--pg-chunks-table / --libsql-chunks-table instead.",
        ),
    ] = None,
) -> None:
    """Apply the SQL migrations (pgvector extension, example knowledge_chunks table), or with
    --libsql-url create the example knowledge_chunks table (F32_BLOB) in a libSQL database; with
    --chunks-table create a chunks table (in PostgreSQL, or in libSQL with --libsql-url)."""
    import anyio

    from embedbatch.db.pg import MIGRATIONS, apply_migrations

    if chunks_table:
        _init_chunks_table(chunks_table, dim, dsn=dsn, libsql_url=libsql_url, libsql_auth_token=libsql_auth_token)
        return
    if libsql_url:
        from embedbatch.sinks.libsql import init_example

        table = init_example(libsql_url, libsql_auth_token or settings().turso_auth_token, dim=dim)
        console.print(f"created {table} in {libsql_url}")
        return

    dsn = dsn or settings().database_url
    if not dsn:
        raise UsageError("db init needs --dsn or DATABASE_URL")
    folder = migrations or MIGRATIONS
    applied = anyio.run(apply_migrations, dsn, folder)
    console.print(f"applied {', '.join(applied)}")


def _init_chunks_table(
    table: str, dim: int, *, dsn: str | None, libsql_url: str | None, libsql_auth_token: str | None
) -> None:
    import anyio

    if libsql_url:
        from embedbatch.sinks.chunks import create_libsql_table
        from embedbatch.sinks.libsql import connect

        conn = connect(libsql_url, libsql_auth_token or settings().turso_auth_token)
        try:
            create_libsql_table(conn, table, dim)
        finally:
            conn.close()
        console.print(f"created chunks table {table} (F32_BLOB({dim})) in {libsql_url}")
        return
    from embedbatch.sinks.chunks import init_pg_table

    dsn = dsn or settings().database_url
    if not dsn:
        raise UsageError("db init needs --dsn or DATABASE_URL")
    anyio.run(init_pg_table, dsn, table, dim)
    console.print(f"created chunks table {table} (vector({dim}))")


PgDataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="The server's data folder (default: WORKSPACE/postgres).")
]


def _pg_folder(data_dir: Path | None) -> Path:
    return data_dir or settings().workspace / "postgres"


@db_app.command("start")
def db_start(
    data_dir: PgDataDir = None,
) -> None:
    """Start PostgreSQL 18 with pgvector on this machine (the postgres extra; Unix socket only)
    and print its DSN: `export DATABASE_URL=$(embedbatch db start)`. It runs until `db stop`."""
    from embedbatch.db.embedded import start

    folder = _pg_folder(data_dir)
    dsn = start(folder)
    err_console.print(f"PostgreSQL with pgvector is running on {folder}; stop it with: embedbatch db stop")
    print(dsn)


@db_app.command("stop")
def db_stop(
    data_dir: PgDataDir = None,
) -> None:
    """Stop the PostgreSQL server `db start` started (its data folder stays)."""
    from embedbatch.db.embedded import stop

    folder = _pg_folder(data_dir)
    console.print(f"stopped PostgreSQL on {folder}" if stop(folder) else f"no PostgreSQL running on {folder}")


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"embedbatch {__version__}")
