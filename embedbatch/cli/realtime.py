"""The realtime engine's command (``embed``) and the helper ``run --engine realtime`` shares."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from embedbatch.cli.app import EXIT_FAILED_ROWS, Dtype, JsonOut, SourceArg, app, open_workspace, safe_args, settings
from embedbatch.cli.options import (
    BatchOptions,
    PrepareOptions,
    RealtimeOptions,
    SampleOptions,
    SinkOptions,
    SourceOptions,
    StoreOptions,
    estimate_from,
    with_options,
)
from embedbatch.cli.render import (
    RowProgress,
    print_estimate,
    print_failed_rows,
    print_held_rows,
    print_json,
    print_realtime_result,
    print_sink_not_filled,
)
from embedbatch.config import IngestConfig


@app.command()
@with_options
def embed(
    source: SourceArg,
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    rt: RealtimeOptions,
    sink: SinkOptions,
    store: StoreOptions,
    max_cost_usd: Annotated[
        float | None, typer.Option("--max-cost-usd", help="Refuse above this standard-price estimate.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the estimate; send nothing.")] = False,
    shard_dtype: Dtype = "float32",
    json_out: JsonOut = False,
) -> None:
    """Embed now through /v1/embeddings at the account's rate limit (several keys), into the
    same shards and sinks; resumable (the same command again skips committed rows)."""
    if dry_run:
        est = estimate_from(source, src, prep, sample, batch, settings())
        if json_out:
            print_json(est.to_json())
        else:
            print_estimate(est)
        return
    embed_realtime(source, src, prep, sample, batch, rt, sink, max_cost_usd, store, shard_dtype, json_out=json_out)


def embed_realtime(
    source: str,
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    rt: RealtimeOptions,
    sink: SinkOptions,
    max_cost_usd: float | None,
    store: StoreOptions,
    shard_dtype: str,
    *,
    json_out: bool,
) -> Any:
    """Run the realtime engine with the CLI's option groups and print the result."""
    from embedbatch.engines.realtime.pipeline import run_realtime

    s = rt.with_keys(settings())
    with RowProgress("embedding", log_every_s=s.progress_log_s) as progress:
        result = run_realtime(
            open_workspace(),
            s,
            source=src.build(source, s),
            prepare=prep.build(source, src),
            sample=sample.build(),
            realtime=rt.build(batch, s),
            ingest=IngestConfig(
                dsn=sink.dsn(s, src),
                libsql_auth_token=sink.libsql_token(s),
                **store.fields(batch.model_name(s), shard_dtype),
            ),
            pg_target=sink.target(source, src),
            libsql_target=sink.libsql_target(source, src),
            max_cost_usd=max_cost_usd,
            args=safe_args(source, src, prep, sample, batch, rt, sink, store, engine="realtime"),
            on_rows=progress,
        )
    if json_out:
        print_json(result.to_json())
    else:
        print_realtime_result(result)
    print_held_rows(result.held_by)
    if result.skipped_existing and (result.pg or result.libsql or sink.pg_table or sink.libsql_table):
        print_sink_not_filled(result.run_dir, result.skipped_existing, sys.argv[1:])
    if result.failed:
        from embedbatch.failures import read_failed_ids, top_reasons

        failed_ids = Path(result.run_dir) / "failed_ids.tsv"
        reasons = top_reasons(read_failed_ids(failed_ids).values()) if failed_ids.exists() else {}
        print_failed_rows(result.run_dir, result.failed, reasons)
        raise typer.Exit(EXIT_FAILED_ROWS)
    return result
