"""Option groups shared by CLI commands, and the config objects built from them.

Each group is declared once as a template function (its parameters are the flags) and added to a
command with :func:`with_options`, which extends the command's signature; the command receives
the group's values in ``**opts`` and turns them into config dataclasses with the builders below.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from embedbatch.config import BatchLimits, PgTarget, PrepareConfig, SampleConfig, Settings, SourceConfig, SubmitConfig
from embedbatch.errors import UsageError

__all__ = [
    "batch_limits",
    "prepare_config",
    "sample_config",
    "sink_dsn",
    "sink_target",
    "source_config",
    "submit_config",
    "with_options",
]

F = TypeVar("F", bound=Callable[..., Any])

# ---- option groups (the parameter lists are the flags) -------------------------------------


def source_options(
    id_field: Annotated[str, typer.Option("--id-field", help="Field holding the record id (custom_id).")] = "id",
    split_field: Annotated[str | None, typer.Option("--split-field", help="Field holding the split.")] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset name (default: file stem or table).")
    ] = None,
    skip_bad_rows: Annotated[
        bool, typer.Option("--skip-bad-rows", help="Record bad rows in rejected.jsonl and go on.")
    ] = False,
    table: Annotated[str | None, typer.Option("--table", help="postgres source: table.")] = None,
    id_column: Annotated[str, typer.Option("--id-column", help="postgres source: id column.")] = "id",
    text_column: Annotated[str, typer.Option("--text-column", help="postgres source: text column.")] = "content",
    where: Annotated[str | None, typer.Option("--where", help="postgres source: WHERE with $1.. params.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="postgres source: a $n parameter.")] = None,
    query: Annotated[str | None, typer.Option("--query", help="postgres source: a whole SELECT.")] = None,
    vector_column: Annotated[
        str | None, typer.Option("--vector-column", help="postgres source: only rows where it IS NULL.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="postgres: embed/write rows that have a vector.")
    ] = False,
    dsn: Annotated[str | None, typer.Option("--dsn", help="postgres source DSN (env DATABASE_URL).")] = None,
) -> None:
    """Where rows come from."""


def prepare_options(
    fields: Annotated[
        str | None, typer.Option("--fields", help="Comma-separated fields to join (default: text).")
    ] = None,
    template: Annotated[
        str | None, typer.Option("--template", help="e.g. 'Title: {title}\\nAbstract: {abstract}'.")
    ] = None,
    prefix: Annotated[str | None, typer.Option("--prefix")] = None,
    suffix: Annotated[str | None, typer.Option("--suffix")] = None,
    delimiter: Annotated[str | None, typer.Option("--delimiter", help="Between fields (default: blank line).")] = None,
    lowercase: Annotated[bool, typer.Option("--lowercase")] = False,
    truncate_chars: Annotated[int | None, typer.Option("--truncate-chars")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Token cut (default 8191).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML, JSON or TOML preparation config.")] = None,
) -> None:
    """How a row becomes text."""


def sample_options(
    n: Annotated[int | None, typer.Option("--n", help="Sample n rows.")] = None,
    p: Annotated[float | None, typer.Option("--p", help="Sample each row with probability p.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    stratify_by: Annotated[str | None, typer.Option("--stratify-by")] = None,
    ids: Annotated[str | None, typer.Option("--ids", help='e.g. "1,5,10-20".')] = None,
) -> None:
    """Which rows."""


def batch_options(
    model: Annotated[str | None, typer.Option("--model", help="Embedding model (env OPENAI_EMBED_MODEL).")] = None,
    dimensions: Annotated[int | None, typer.Option("--dimensions", help="text-embedding-3 models only.")] = None,
    max_requests_per_batch: Annotated[int, typer.Option("--max-requests-per-batch")] = 50_000,
    max_bytes_per_batch: Annotated[int, typer.Option("--max-bytes-per-batch")] = 188_743_680,
    max_enqueued_tokens: Annotated[
        int | None, typer.Option("--max-enqueued-tokens", help="Org queue limit per model (tokens).")
    ] = None,
) -> None:
    """The model and the Batch API limits."""


def submit_options(
    max_cost_usd: Annotated[
        float | None, typer.Option("--max-cost-usd", help="Refuse above this Batch-price estimate.")
    ] = None,
    completion_window: Annotated[str, typer.Option("--completion-window")] = "24h",
    metadata: Annotated[list[str] | None, typer.Option("--metadata", help="k=v passed on to each batch.")] = None,
) -> None:
    """What is sent with each batch."""


def sink_options(
    pg_table: Annotated[str | None, typer.Option("--pg-table", help="Write vectors into this table.")] = None,
    pg_id_column: Annotated[str, typer.Option("--pg-id-column")] = "id",
    pg_vector_column: Annotated[str, typer.Option("--pg-vector-column")] = "embedding",
    update_chunk_size: Annotated[int, typer.Option("--update-chunk-size")] = 1000,
    pg_mode: Annotated[str, typer.Option("--pg-mode", help="update (fill rows by id) or insert (COPY).")] = "update",
    rebuild_index: Annotated[
        bool, typer.Option("--rebuild-index", help="Drop a vector index, write, recreate.")
    ] = False,
    concurrently: Annotated[bool, typer.Option("--concurrently", help="Recreate the index CONCURRENTLY.")] = False,
    pg_dsn: Annotated[str | None, typer.Option("--pg-dsn", help="Sink DSN (env DATABASE_URL).")] = None,
) -> None:
    """The pgvector sink."""


def with_options(*groups: Callable[..., None]) -> Callable[[F], F]:
    """Add the groups' parameters to a command that takes ``**opts`` (typer reads the extended
    signature and annotations; the command receives the values in ``opts``)."""

    def deco(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        hints = dict(getattr(fn, "__annotations__", {}))
        added: list[inspect.Parameter] = []
        for group in groups:
            for p in inspect.signature(group, eval_str=True).parameters.values():
                added.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
                hints[p.name] = p.annotation
        params = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        params += [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY] + added
        fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        fn.__annotations__ = {**{k: v.annotation for k, v in sig.parameters.items()}, **hints}
        return fn

    return deco


# ---- builders ---------------------------------------------------------------------------------


def source_config(source: str, opts: dict[str, Any], settings: Settings) -> SourceConfig:
    """The source of ``source`` (a path, or ``postgres`` with ``--table``/``--query``).

    Raises:
        UsageError: a postgres source without a DSN or without a table or query.
    """
    common = {"split_field": opts["split_field"], "dataset": opts["dataset"], "skip_bad_rows": opts["skip_bad_rows"]}
    if source == "postgres":
        dsn = opts["dsn"] or settings.database_url
        if not dsn:
            raise UsageError("the postgres source needs --dsn or DATABASE_URL")
        if not opts["table"] and not opts["query"]:
            raise UsageError("the postgres source needs --table or --query")
        return SourceConfig(
            path="postgres",
            id_field=opts["id_column"],
            pg_dsn=dsn,
            pg_table=opts["table"],
            pg_id_column=opts["id_column"],
            pg_text_column=opts["text_column"],
            pg_vector_column=opts["vector_column"],
            pg_where=opts["where"],
            pg_params=tuple(opts["param"] or ()),
            pg_query=opts["query"],
            pg_overwrite=opts["overwrite"],
            **common,
        )
    return SourceConfig(path=source, id_field=opts["id_field"], **common)


def prepare_config(source: str, opts: dict[str, Any]) -> PrepareConfig:
    """Preparation from flags, or from ``--config`` with flags winning.

    Raises:
        UsageError: a bad config file or template.
    """
    fields = opts["fields"]
    overrides: dict[str, Any] = {
        "fields": tuple(f.strip() for f in fields.split(",") if f.strip()) if fields else None,
        "template": opts["template"].replace("\\n", "\n") if opts["template"] else None,
        "prefix": opts["prefix"],
        "suffix": opts["suffix"],
        "delimiter": opts["delimiter"].replace("\\n", "\n") if opts["delimiter"] is not None else None,
        "lowercase": opts["lowercase"] or None,
        "truncate_chars": opts["truncate_chars"],
        "max_tokens": opts["max_tokens"],
    }
    if opts["config"] is not None:
        return PrepareConfig.from_file(opts["config"], **overrides)
    values = {k: v for k, v in overrides.items() if v is not None}
    values.setdefault("fields", (opts["text_column"],) if source == "postgres" else ("text",))
    return PrepareConfig(**values)


def sample_config(opts: dict[str, Any]) -> SampleConfig:
    return SampleConfig(n=opts["n"], p=opts["p"], seed=opts["seed"], stratify_by=opts["stratify_by"], ids=opts["ids"])


def batch_limits(opts: dict[str, Any]) -> BatchLimits:
    return BatchLimits(
        max_requests=opts["max_requests_per_batch"],
        max_bytes=opts["max_bytes_per_batch"],
        max_enqueued_tokens=opts["max_enqueued_tokens"],
    )


def submit_config(opts: dict[str, Any], settings: Settings, *, dry_run: bool = False) -> SubmitConfig:
    """Raises: UsageError: a window other than 24h, or a bad ``--metadata``."""
    if opts["completion_window"] != "24h":
        raise UsageError("--completion-window must be 24h (the only window the Batch API offers, 2026)")
    metadata: dict[str, str] = {}
    for item in opts["metadata"] or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata takes k=v, got {item!r}")
        metadata[key] = value
    return SubmitConfig(
        model=opts["model"] or settings.openai_embed_model,
        dimensions=opts["dimensions"],
        limits=batch_limits(opts),
        dry_run=dry_run,
        max_cost_usd=opts["max_cost_usd"],
        completion_window=opts["completion_window"],
        metadata=metadata,
    )


def sink_dsn(opts: dict[str, Any], settings: Settings) -> str | None:
    """The pgvector sink's DSN: ``--pg-dsn``, else the source's ``--dsn``, else DATABASE_URL.
    It is passed to the stages and never stored."""
    return opts.get("pg_dsn") or opts.get("dsn") or settings.database_url


def sink_target(source: str, opts: dict[str, Any]) -> PgTarget | None:
    """The pgvector target: ``--pg-table``, or for a postgres source with ``--vector-column`` the
    source table itself (rows map back by id). The DSN is not part of it (see :func:`sink_dsn`).

    Raises:
        UsageError: a bad ``--pg-mode``.
    """
    table, id_column, vector_column = opts["pg_table"], opts["pg_id_column"], opts["pg_vector_column"]
    if table is None and source == "postgres" and opts.get("table") and opts.get("vector_column"):
        table, id_column, vector_column = opts["table"], opts["id_column"], opts["vector_column"]
    if not table:
        return None
    if opts["pg_mode"] not in ("update", "insert"):
        raise UsageError(f"--pg-mode must be update or insert, got {opts['pg_mode']!r}")
    return PgTarget(
        table=table,
        id_column=id_column,
        vector_column=vector_column,
        overwrite=opts["overwrite"],
        update_chunk_size=opts["update_chunk_size"],
        mode=opts["pg_mode"],
        rebuild_index=opts["rebuild_index"],
        concurrently=opts["concurrently"],
    )
