"""Option groups shared by CLI commands, parsed into typed objects that build the config dataclasses.

Each group is a frozen dataclass whose fields are the flags (typer reads their ``Annotated``
types). A command declares a parameter of a group's type; :func:`with_options` shows typer the
group's flags in its place and hands the command one typed group object, whose methods build
the stage configs (:class:`SourceConfig`, :class:`PrepareConfig`, ...). No flag values travel
in dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from embedbatch.config import (
    BatchLimits,
    IngestConfig,
    LibsqlTarget,
    PgTarget,
    PrepareConfig,
    RealtimeConfig,
    SampleConfig,
    Settings,
    SourceConfig,
    SubmitConfig,
)
from embedbatch.errors import UsageError

__all__ = [
    "BatchOptions",
    "OptionGroup",
    "PrepareOptions",
    "RealtimeOptions",
    "SampleOptions",
    "SinkOptions",
    "SourceOptions",
    "SubmitOptions",
    "with_options",
]

F = TypeVar("F", bound=Callable[..., Any])


class OptionGroup:
    """Base of the option groups (marks the parameters :func:`with_options` expands)."""


@dataclass(frozen=True)
class SourceOptions(OptionGroup):
    """Where rows come from."""

    id_field: Annotated[str, typer.Option("--id-field", help="Field holding the record id (custom_id).")] = "id"
    split_field: Annotated[str | None, typer.Option("--split-field", help="Field holding the split.")] = None
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset name (default: file stem or table).")] = None
    skip_bad_rows: Annotated[
        bool, typer.Option("--skip-bad-rows", help="Record bad rows in rejected.jsonl and go on.")
    ] = False
    table: Annotated[str | None, typer.Option("--table", help="postgres/SQLite source: table.")] = None
    id_column: Annotated[str, typer.Option("--id-column", help="postgres/SQLite source: id column.")] = "id"
    text_column: Annotated[str, typer.Option("--text-column", help="postgres/SQLite source: text column.")] = "content"
    where: Annotated[str | None, typer.Option("--where", help="postgres/SQLite source: WHERE with $1.. params.")] = None
    param: Annotated[list[str] | None, typer.Option("--param", help="postgres/SQLite source: a $n parameter.")] = None
    query: Annotated[str | None, typer.Option("--query", help="postgres/SQLite source: a whole SELECT.")] = None
    vector_column: Annotated[
        str | None, typer.Option("--vector-column", help="postgres/SQLite source: only rows where it IS NULL.")
    ] = None
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Embed/write rows that have a vector.")] = False
    dsn: Annotated[str | None, typer.Option("--dsn", help="postgres source DSN (env DATABASE_URL).")] = None
    id_template: Annotated[
        str | None, typer.Option("--id-template", help="Ids from fields, e.g. '{split}/{dialogue_id}'.")
    ] = None
    subset: Annotated[str | None, typer.Option("--subset", help="Hugging Face source: config/subset.")] = None
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Hugging Face source: a split (repeat; default: all).")
    ] = None
    revision: Annotated[str | None, typer.Option("--revision", help="Hugging Face source: branch, tag, commit.")] = None

    def build(self, source: str, settings: Settings) -> SourceConfig:
        """The source of ``source`` (a path, or ``postgres`` with ``--table``/``--query``).

        Raises:
            UsageError: a postgres source without a DSN or without a table or query.
        """
        common: dict[str, Any] = {
            "id_template": self.id_template,
            "split_field": self.split_field,
            "dataset": self.dataset,
            "skip_bad_rows": self.skip_bad_rows,
        }
        from embedbatch.sources import is_sqlite_source

        if source != "postgres" and is_sqlite_source(source):
            if not self.table and not self.query:
                raise UsageError("a SQLite source needs --table or --query")
            return SourceConfig(
                path=source,
                id_field=self.id_column,
                pg_table=self.table,
                pg_id_column=self.id_column,
                pg_text_column=self.text_column,
                pg_vector_column=self.vector_column,
                pg_where=self.where,
                pg_params=tuple(self.param or ()),
                pg_query=self.query,
                pg_overwrite=self.overwrite,
                **common,
            )
        if source == "postgres":
            dsn = self.dsn or settings.database_url
            if not dsn:
                raise UsageError("the postgres source needs --dsn or DATABASE_URL")
            if not self.table and not self.query:
                raise UsageError("the postgres source needs --table or --query")
            return SourceConfig(
                path="postgres",
                id_field=self.id_column,
                pg_dsn=dsn,
                pg_table=self.table,
                pg_id_column=self.id_column,
                pg_text_column=self.text_column,
                pg_vector_column=self.vector_column,
                pg_where=self.where,
                pg_params=tuple(self.param or ()),
                pg_query=self.query,
                pg_overwrite=self.overwrite,
                **common,
            )
        return SourceConfig(
            path=source,
            id_field=self.id_field,
            subset=self.subset,
            splits=tuple(self.split or ()),
            revision=self.revision,
            raw_dir=settings.workspace / "datasets" / "raw",
            hf_offline=settings.hf_hub_offline,
            **common,
        )


@dataclass(frozen=True)
class PrepareOptions(OptionGroup):
    """How a row becomes text."""

    fields: Annotated[str | None, typer.Option("--fields", help="Comma-separated fields to join (default: text).")] = (
        None
    )
    template: Annotated[
        str | None, typer.Option("--template", help="e.g. 'Title: {title}\\nAbstract: {abstract}'.")
    ] = None
    prefix: Annotated[str | None, typer.Option("--prefix")] = None
    suffix: Annotated[str | None, typer.Option("--suffix")] = None
    delimiter: Annotated[str | None, typer.Option("--delimiter", help="Between fields (default: blank line).")] = None
    lowercase: Annotated[bool, typer.Option("--lowercase")] = False
    truncate_chars: Annotated[int | None, typer.Option("--truncate-chars")] = None
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Token cut (default 8191).")] = None
    config: Annotated[Path | None, typer.Option("--config", help="YAML, JSON or TOML preparation config.")] = None
    allow_missing_fields: Annotated[
        bool, typer.Option("--allow-missing-fields", help="Embed rows that lack some fields without them.")
    ] = False
    messages_field: Annotated[
        str | None,
        typer.Option("--messages-field", help="Chat column: a list of {role, content} (auto-detected)."),
    ] = None
    message_template: Annotated[
        str, typer.Option("--message-template", help="Each message: {role}, {content}, {index}.")
    ] = "{role}: {content}"
    roles: Annotated[str | None, typer.Option("--roles", help="Keep these roles, e.g. user,assistant.")] = None
    unit: Annotated[
        str, typer.Option("--unit", help="conversation (a row each) or message (id {conversation id}/{index}).")
    ] = "conversation"
    max_messages: Annotated[int | None, typer.Option("--max-messages", help="Keep the last N messages.")] = None
    chunk_tokens: Annotated[
        int | None, typer.Option("--chunk-tokens", help="Split each text into chunks of at most N tokens.")
    ] = None
    chunk_overlap: Annotated[int | None, typer.Option("--chunk-overlap", help="Tokens shared by neighbours.")] = None
    chunker: Annotated[str | None, typer.Option("--chunker", help="recursive (default), markdown or tokens.")] = None
    chunk_id_template: Annotated[
        str | None, typer.Option("--chunk-id-template", help="A chunk's id (default '{parent_id}#{k}').")
    ] = None
    chunk_aggregate: Annotated[
        str | None,
        typer.Option(
            "--chunk-aggregate",
            help="mean: store one row per document (token-weighted mean of its chunk vectors, L2-normalised).",
        ),
    ] = None

    def build(self, source: str, src: SourceOptions) -> PrepareConfig:
        """Preparation from flags, or from ``--config`` with flags winning.

        Raises:
            UsageError: a bad config file or template.
        """
        overrides: dict[str, Any] = {
            "fields": tuple(f.strip() for f in self.fields.split(",") if f.strip()) if self.fields else None,
            "template": self.template.replace("\\n", "\n") if self.template else None,
            "prefix": self.prefix,
            "suffix": self.suffix,
            "delimiter": self.delimiter.replace("\\n", "\n") if self.delimiter is not None else None,
            "lowercase": self.lowercase or None,
            "truncate_chars": self.truncate_chars,
            "max_tokens": self.max_tokens,
            "allow_missing_fields": self.allow_missing_fields or None,
            "messages_field": self.messages_field,
            "detect_messages": (self.fields is None and self.template is None and self.config is None) or None,
            "message_template": self.message_template.replace("\\n", "\n"),
            "roles": tuple(r.strip() for r in self.roles.split(",") if r.strip()) if self.roles else None,
            "unit": self.unit,
            "max_messages": self.max_messages,
            "chunk_tokens": self.chunk_tokens,
            "chunk_overlap": self.chunk_overlap,
            "chunker": self.chunker,
            "chunk_id_template": self.chunk_id_template,
            "chunk_aggregate": self.chunk_aggregate,
        }
        chunk_flags = (self.chunk_overlap, self.chunker, self.chunk_id_template, self.chunk_aggregate)
        if self.chunk_tokens is None and self.config is None and chunk_flags != (None,) * 4:
            raise UsageError(
                "--chunk-overlap, --chunker, --chunk-id-template and --chunk-aggregate need --chunk-tokens"
            )
        if self.unit not in ("conversation", "message"):
            raise UsageError(f"--unit must be conversation or message, got {self.unit!r}")
        if self.config is not None:
            return PrepareConfig.from_file(self.config, **overrides)
        values = {k: v for k, v in overrides.items() if v is not None}
        from embedbatch.sources import is_sqlite_source

        db = source == "postgres" or is_sqlite_source(source)
        values.setdefault("fields", (src.text_column,) if db else ("text",))
        return PrepareConfig(**values)


@dataclass(frozen=True)
class SampleOptions(OptionGroup):
    """Which rows."""

    n: Annotated[int | None, typer.Option("--n", help="Sample n rows.")] = None
    p: Annotated[float | None, typer.Option("--p", help="Sample each row with probability p.")] = None
    seed: Annotated[int, typer.Option("--seed")] = 0
    stratify_by: Annotated[str | None, typer.Option("--stratify-by")] = None
    ids: Annotated[str | None, typer.Option("--ids", help='e.g. "1,5,10-20".')] = None

    def build(self) -> SampleConfig:
        return SampleConfig(n=self.n, p=self.p, seed=self.seed, stratify_by=self.stratify_by, ids=self.ids)


@dataclass(frozen=True)
class BatchOptions(OptionGroup):
    """The model and the Batch API limits."""

    model: Annotated[str | None, typer.Option("--model", help="Embedding model (env OPENAI_EMBED_MODEL).")] = None
    dimensions: Annotated[int | None, typer.Option("--dimensions", help="text-embedding-3 models only.")] = None
    max_requests_per_batch: Annotated[int, typer.Option("--max-requests-per-batch")] = 50_000
    max_bytes_per_batch: Annotated[int, typer.Option("--max-bytes-per-batch")] = 188_743_680
    max_enqueued_tokens: Annotated[
        int | None, typer.Option("--max-enqueued-tokens", help="Org queue limit per model (tokens).")
    ] = None

    def limits(self) -> BatchLimits:
        return BatchLimits(
            max_requests=self.max_requests_per_batch,
            max_bytes=self.max_bytes_per_batch,
            max_enqueued_tokens=self.max_enqueued_tokens,
        )

    def model_name(self, settings: Settings) -> str:
        return self.model or settings.openai_embed_model


@dataclass(frozen=True)
class RealtimeOptions(OptionGroup):
    """The realtime engine's rate limits, keys and request packing."""

    max_rpm: Annotated[
        int | None, typer.Option("--max-rpm", help="Requests/min per key (default: from the answers' headers).")
    ] = None
    max_tpm: Annotated[
        int | None, typer.Option("--max-tpm", help="Tokens/min per key (default: from the answers' headers).")
    ] = None
    api_key_file: Annotated[
        Path | None, typer.Option("--api-key-file", help="API keys, one per line (else OPENAI_API_KEYS/KEY).")
    ] = None
    max_inputs: Annotated[int, typer.Option("--max-inputs", help="Inputs per request (API max 2048).")] = 2048
    max_request_tokens: Annotated[
        int, typer.Option("--max-request-tokens", help="Tokens per request (API max 300000).")
    ] = 300_000
    max_concurrency: Annotated[int, typer.Option("--max-concurrency", help="Requests in flight at most.")] = 32
    commit_rows: Annotated[int, typer.Option("--commit-rows", help="Rows per committed shard.")] = 20_000
    commit_interval_s: Annotated[
        float, typer.Option("--commit-interval-s", help="Commit at least this often (seconds).")
    ] = 30.0

    def build(self, batch: BatchOptions, settings: Settings) -> RealtimeConfig:
        """Raises: UsageError: a limit outside the API's."""
        return RealtimeConfig(
            model=batch.model_name(settings),
            dimensions=batch.dimensions,
            max_rpm=self.max_rpm,
            max_tpm=self.max_tpm,
            max_inputs=self.max_inputs,
            max_request_tokens=self.max_request_tokens,
            max_concurrency=self.max_concurrency,
            commit_rows=self.commit_rows,
            commit_interval_s=self.commit_interval_s,
            retry_initial_s=settings.retry_initial_s,
            attempts=settings.retry_attempts,
        )

    def with_keys(self, settings: Settings) -> Settings:
        """``settings`` with the keys of ``--api-key-file`` (one per line; blank lines and ``#``
        comments skipped), when given.

        Raises:
            UsageError: the file cannot be read or holds no key.
        """
        if self.api_key_file is None:
            return settings
        try:
            lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"--api-key-file {self.api_key_file}: {exc.strerror}") from exc
        keys = tuple(k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#"))
        if not keys:
            raise UsageError(f"--api-key-file {self.api_key_file}: no key in it")
        return dataclasses.replace(settings, openai_api_keys=keys)


@dataclass(frozen=True)
class SubmitOptions(OptionGroup):
    """What is sent with each batch."""

    max_cost_usd: Annotated[
        float | None, typer.Option("--max-cost-usd", help="Refuse above this Batch-price estimate.")
    ] = None
    completion_window: Annotated[str, typer.Option("--completion-window")] = "24h"
    metadata: Annotated[list[str] | None, typer.Option("--metadata", help="k=v passed on to each batch.")] = None
    file_expiry_days: Annotated[
        int | None, typer.Option("--file-expiry-days", help="Uploaded input files expire after N days (1-30).")
    ] = None
    output_expiry_days: Annotated[
        int | None,
        typer.Option("--output-expiry-days", help="Batches' output and error files expire after N days (1-30)."),
    ] = None

    def build(self, batch: BatchOptions, settings: Settings, *, dry_run: bool = False) -> SubmitConfig:
        """Raises: UsageError: a window other than 24h, a bad ``--metadata`` or ``--file-expiry-days``."""
        for flag, days in (
            ("--file-expiry-days", self.file_expiry_days),
            ("--output-expiry-days", self.output_expiry_days),
        ):
            if days is not None and not 1 <= days <= 30:
                raise UsageError(f"{flag} must be 1 to 30 (the Files and Batch APIs accept 1 hour to 30 days, 2026)")
        if self.completion_window != "24h":
            raise UsageError("--completion-window must be 24h (the only window the Batch API offers, 2026)")
        metadata: dict[str, str] = {}
        for item in self.metadata or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--metadata takes k=v, got {item!r}")
            metadata[key] = value
        return SubmitConfig(
            model=batch.model_name(settings),
            dimensions=batch.dimensions,
            limits=batch.limits(),
            dry_run=dry_run,
            max_cost_usd=self.max_cost_usd,
            completion_window=self.completion_window,
            metadata=metadata,
            file_expiry_days=self.file_expiry_days,
            output_expiry_days=self.output_expiry_days,
        )


@dataclass(frozen=True)
class StoreOptions(OptionGroup):
    """How vectors are stored: dtype, float vectors kept beside compressed ones, Matryoshka cut."""

    store_dtype: Annotated[
        str | None,
        typer.Option("--store-dtype", help="float32 (default), float16, int8 or binary vectors in the shards."),
    ] = None
    keep_float: Annotated[
        str | None,
        typer.Option("--keep-float", help="int8/binary: float16 (default) keeps the vectors beside them, or none."),
    ] = None
    truncate_dim: Annotated[
        int | None,
        typer.Option("--truncate-dim", help="Keep each vector's first N components, re-normalised (Matryoshka)."),
    ] = None
    force: Annotated[
        bool, typer.Option("--force", help="--truncate-dim for a model not known to be Matryoshka-trained.")
    ] = False

    def fields(self, model: str, legacy_dtype: str | None = None) -> dict[str, Any]:
        """:class:`IngestConfig` keyword arguments (``legacy_dtype``: the older ``--dtype`` /
        ``--shard-dtype`` flag, used when ``--store-dtype`` is not given).

        Raises:
            UsageError: ``--truncate-dim`` for a model not known to support it, without ``--force``.
        """
        from embedbatch.store.quant import check_truncation

        check_truncation(model, self.truncate_dim, force=self.force)
        dtype = self.store_dtype or legacy_dtype or "float32"
        out: dict[str, Any] = {"dtype": dtype, "truncate_dim": self.truncate_dim}
        if self.keep_float:
            out["keep_float"] = self.keep_float
        IngestConfig(**out)  # checks the values now, before anything is sent
        return out


@dataclass(frozen=True)
class SinkOptions(OptionGroup):
    """The database sinks: pgvector and libSQL."""

    pg_table: Annotated[str | None, typer.Option("--pg-table", help="Write vectors into this table.")] = None
    pg_chunks_table: Annotated[
        str | None,
        typer.Option(
            "--pg-chunks-table",
            help="Chunk mode: one row per chunk (id, parent_id, chunk_index, chunk, embedding) in this table; a "
            "re-chunked parent's stale chunks are deleted in the same transaction. Created if missing.",
        ),
    ] = None
    pg_id_column: Annotated[str, typer.Option("--pg-id-column")] = "id"
    pg_vector_column: Annotated[str, typer.Option("--pg-vector-column")] = "embedding"
    update_chunk_size: Annotated[
        int | None,
        typer.Option("--update-chunk-size", help="Rows per transaction (default: pgvector 1000, libSQL 5000)."),
    ] = None
    pg_mode: Annotated[str, typer.Option("--pg-mode", help="update (fill rows by id) or insert (COPY).")] = "update"
    rebuild_index: Annotated[bool, typer.Option("--rebuild-index", help="Drop a vector index, write, recreate.")] = (
        False
    )
    concurrently: Annotated[bool, typer.Option("--concurrently", help="Recreate the index CONCURRENTLY.")] = False
    pg_dsn: Annotated[str | None, typer.Option("--pg-dsn", help="Sink DSN (env DATABASE_URL).")] = None
    libsql_url: Annotated[
        str | None, typer.Option("--libsql-url", help="libSQL database: a file, file:PATH or libsql://…")
    ] = None
    libsql_auth_token: Annotated[
        str | None, typer.Option("--libsql-auth-token", help="Remote libSQL token (env TURSO_AUTH_TOKEN).")
    ] = None
    libsql_table: Annotated[str | None, typer.Option("--libsql-table", help="Write vectors into this table.")] = None
    libsql_chunks_table: Annotated[
        str | None,
        typer.Option("--libsql-chunks-table", help="Chunk mode (as --pg-chunks-table) into this libSQL table."),
    ] = None
    libsql_id_column: Annotated[str, typer.Option("--libsql-id-column")] = "id"
    libsql_vector_column: Annotated[str, typer.Option("--libsql-vector-column")] = "embedding"
    libsql_mode: Annotated[str, typer.Option("--libsql-mode", help="update (fill rows by id) or insert.")] = "update"
    libsql_index: Annotated[
        bool, typer.Option("--libsql-index", help="Create (or rebuild around the write) a libsql_vector_idx index.")
    ] = False

    def libsql_token(self, settings: Settings) -> str | None:
        """``--libsql-auth-token``, else TURSO_AUTH_TOKEN; passed to the sink, never stored."""
        return self.libsql_auth_token or settings.turso_auth_token

    def libsql_target(
        self, source: str = "", src: SourceOptions | None = None, *, overwrite: bool = False
    ) -> LibsqlTarget | None:
        """The libSQL target: ``--libsql-url`` with ``--libsql-table``, or for a SQLite source
        with ``--vector-column`` the source table itself (rows map back by id).

        Raises:
            UsageError: a bad ``--libsql-mode``, or a URL without a table.
        """
        from embedbatch.sources import is_sqlite_source, sqlite_path

        url, table = self.libsql_url, self.libsql_table
        id_column, vector_column = self.libsql_id_column, self.libsql_vector_column
        if self.libsql_chunks_table:
            if table:
                raise UsageError("give --libsql-table or --libsql-chunks-table, not both")
            if url is None:
                raise UsageError("--libsql-chunks-table needs --libsql-url")
            return LibsqlTarget(
                url=url,
                table=self.libsql_chunks_table,
                id_column=id_column,
                vector_column=vector_column,
                update_chunk_size=self.update_chunk_size or 5000,
                mode="chunks",
                index=self.libsql_index,
            )
        if url is None and source and src and src.table and src.vector_column and is_sqlite_source(source):
            url, table = str(sqlite_path(source)), src.table
            id_column, vector_column = src.id_column, src.vector_column
        if url is None:
            return None
        if not table:
            raise UsageError("--libsql-url needs --libsql-table")
        if self.libsql_mode not in ("update", "insert"):
            raise UsageError(f"--libsql-mode must be update or insert, got {self.libsql_mode!r}")
        return LibsqlTarget(
            url=url,
            table=table,
            id_column=id_column,
            vector_column=vector_column,
            overwrite=overwrite or (src.overwrite if src else False),
            update_chunk_size=self.update_chunk_size or 5000,
            mode=self.libsql_mode,  # type: ignore[arg-type]
            index=self.libsql_index,
        )

    def dsn(self, settings: Settings, src: SourceOptions | None = None) -> str | None:
        """The sink's DSN: ``--pg-dsn``, else the source's ``--dsn``, else DATABASE_URL. It is
        passed to the stages and never stored."""
        return self.pg_dsn or (src.dsn if src else None) or settings.database_url

    def target(self, source: str = "", src: SourceOptions | None = None, *, overwrite: bool = False) -> PgTarget | None:
        """The pgvector target: ``--pg-table``, or for a postgres source with ``--vector-column``
        the source table itself (rows map back by id). The DSN is not part of it.

        Raises:
            UsageError: a bad ``--pg-mode``.
        """
        table, id_column, vector_column = self.pg_table, self.pg_id_column, self.pg_vector_column
        if self.pg_chunks_table:
            if table:
                raise UsageError("give --pg-table or --pg-chunks-table, not both")
            return PgTarget(
                table=self.pg_chunks_table,
                id_column=id_column,
                vector_column=vector_column,
                update_chunk_size=self.update_chunk_size or 1000,
                mode="chunks",
                rebuild_index=self.rebuild_index,
                concurrently=self.concurrently,
            )
        if table is None and source == "postgres" and src and src.table and src.vector_column:
            table, id_column, vector_column = src.table, src.id_column, src.vector_column
        if not table:
            return None
        if self.pg_mode not in ("update", "insert"):
            raise UsageError(f"--pg-mode must be update or insert, got {self.pg_mode!r}")
        return PgTarget(
            table=table,
            id_column=id_column,
            vector_column=vector_column,
            overwrite=overwrite or (src.overwrite if src else False),
            update_chunk_size=self.update_chunk_size or 1000,
            mode=self.pg_mode,  # type: ignore[arg-type]
            text_column="content" if self.pg_mode == "insert" else None,  # insert keeps the text (search reads it)
            rebuild_index=self.rebuild_index,
            concurrently=self.concurrently,
        )


def with_options(fn: F) -> F:
    """Expand the command's :class:`OptionGroup` parameters into their flags for typer, and
    rebuild one group object per parameter from the parsed values when the command runs."""
    sig = inspect.signature(fn, eval_str=True)
    groups = {
        name: p.annotation
        for name, p in sig.parameters.items()
        if isinstance(p.annotation, type) and issubclass(p.annotation, OptionGroup)
    }
    params: list[inspect.Parameter] = []
    flat: dict[str, list[str]] = {}
    for name, p in sig.parameters.items():
        if name not in groups:
            params.append(p)
            continue
        hints = typing.get_type_hints(groups[name], include_extras=True)
        flat[name] = []
        for f in dataclasses.fields(groups[name]):  # type: ignore[arg-type]
            flat[name].append(f.name)
            default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default  # a required flag
            params.append(
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name])
            )
    names = [p.name for p in params]
    if len(names) != len(set(names)):
        raise TypeError(f"{fn.__name__}: two option groups declare the same flag")
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name, cls in groups.items():
            kwargs[name] = cls(**{field: kwargs.pop(field) for field in flat[name]})
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=positional + keyword)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in positional + keyword}
    return wrapper  # type: ignore[return-value]


def estimate_from(
    source: str,
    src: SourceOptions,
    prep: PrepareOptions,
    sample: SampleOptions,
    batch: BatchOptions,
    settings: Settings,
    *,
    on_row: Any = None,
) -> Any:
    """The :class:`~embedbatch.engines.batchapi.estimate.Estimate` of a job given by the CLI's
    option groups (estimate, embed --dry-run, run --engine auto); sends nothing."""
    from embedbatch.engines.batchapi.estimate import estimate as run_estimate

    return run_estimate(
        source=src.build(source, settings),
        prepare=prep.build(source, src),
        sample=sample.build(),
        model=batch.model_name(settings),
        dimensions=batch.dimensions,
        limits=batch.limits(),
        on_row=on_row,
    )
