"""The realtime engine's command (``embed``) and the helper ``run --engine realtime`` shares."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from embedbatch.cli.app import Dtype, JsonOut, SourceArg, app, open_workspace, safe_args, settings
from embedbatch.cli.options import (
    BatchOptions,
    PrepareOptions,
    RealtimeOptions,
    SampleOptions,
    SinkOptions,
    SourceOptions,
    estimate_from,
    with_options,
)
from embedbatch.cli.render import RowProgress, console, print_estimate, print_json, print_realtime_result
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
    embed_realtime(source, src, prep, sample, batch, rt, sink, max_cost_usd, shard_dtype, json_out=json_out)


def embed_realtime(
    source: str,
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    rt: RealtimeOptions,
    sink: SinkOptions,
    max_cost_usd: float | None,
    shard_dtype: str,
    *,
    json_out: bool,
) -> Any:
    """Run the realtime engine with the CLI's option groups and print the result."""
    from embedbatch.engines.realtime.pipeline import run_realtime

    s = rt.with_keys(settings())
    with RowProgress("embedding") as progress:
        result = run_realtime(
            open_workspace(),
            s,
            source=src.build(source, s),
            prepare=prep.build(source, src),
            sample=sample.build(),
            realtime=rt.build(batch, s),
            ingest=IngestConfig(
                dtype=shard_dtype,  # type: ignore[arg-type]
                dsn=sink.dsn(s, src),
                libsql_auth_token=sink.libsql_token(s),
            ),
            pg_target=sink.target(source, src),
            libsql_target=sink.libsql_target(source, src),
            max_cost_usd=max_cost_usd,
            args=safe_args(source, src, prep, sample, batch, rt, sink, engine="realtime"),
            on_rows=progress,
        )
    if json_out:
        print_json(result.to_json())
    else:
        print_realtime_result(result)
        if result.failed:
            console.print(
                f"{result.failed:,} rows failed: see failed_ids.tsv; `embedbatch retry --run-dir {result.run_dir}`"
            )
    return result
