"""Typed configuration: settings from the environment and one dataclass per stage.

Config flows one way: CLI flags → these dataclasses → stages. No stage reads environment
variables itself; :meth:`Settings.from_env` is the only place that does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from embedbatch.errors import UsageError
from embedbatch.workspace import Workspace

__all__ = [
    "CHUNK_COLUMNS",
    "BatchLimits",
    "IngestConfig",
    "LibsqlTarget",
    "LocalConfig",
    "PgTarget",
    "PrepareConfig",
    "RealtimeConfig",
    "SampleConfig",
    "Settings",
    "SourceConfig",
    "SubmitConfig",
    "redact",
    "redact_dsn",
]

DEFAULT_MODEL = "text-embedding-3-small"


def redact_dsn(dsn: str | None) -> str | None:
    """Return ``dsn`` with any password replaced by ``***`` (safe to log or store)."""
    if not dsn:
        return dsn
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "***"
    if parts.password is None:
        return re.sub(r"(password=)\S+", r"\1***", dsn)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(value: str | None) -> str:
    """Return a fixed placeholder that shows whether a secret is set, never the secret."""
    return "<set>" if value else "<unset>"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Process-wide settings, read once from the environment (and ``.env``, which never overrides).

    Attributes:
        openai_api_key: OPENAI_API_KEY; never logged, never written to run files.
        openai_base_url: OPENAI_BASE_URL, e.g. ``http://127.0.0.1:8765/v1`` for ``embedbatch serve``.
        openai_embed_model: OPENAI_EMBED_MODEL, default ``text-embedding-3-small``.
        openai_timeout_s: OPENAI_TIMEOUT in seconds (default 600).
        database_url: DATABASE_URL for the pgvector sink and postgres source.
        workspace: EMBEDBATCH_WORKSPACE, default ``./workspace``.
        lock_timeout_s: EMBEDBATCH_LOCK_TIMEOUT_S, how long to wait for a busy dataset lock
            (seconds, default 900).
        retry_attempts / retry_initial_s: EMBEDBATCH_RETRY_ATTEMPTS (default 8) and
            EMBEDBATCH_RETRY_INITIAL_S (default 1.0): the provider retry policy.
        turso_auth_token: TURSO_AUTH_TOKEN for a remote libSQL sink; never logged or stored.
        requeue_s: EMBEDBATCH_REQUEUE_S (default 60): first wait before a batch refused with
            ``token_limit_exceeded`` is created again (doubling, at most 1 h).
        openai_api_keys: OPENAI_API_KEYS, several keys separated by commas for the realtime
            engine (each gets its own rate limiter); never logged or stored.
        hf_hub_offline: HF_HUB_OFFLINE is set (1/true): Hugging Face sources read local copies only.
        progress_log_s: EMBEDBATCH_PROGRESS_LOG_S (default 30): below a terminal (cron, pipes),
            ``embed`` and ``local`` log a ``progress`` line at most this often (seconds).
    """

    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_embed_model: str = DEFAULT_MODEL
    openai_timeout_s: float = 600.0
    database_url: str | None = field(default=None, repr=False)
    workspace: Path = Path("workspace")
    lock_timeout_s: float = 900.0
    retry_attempts: int = 8
    retry_initial_s: float = 1.0
    requeue_s: float = 60.0
    turso_auth_token: str | None = field(default=None, repr=False)
    openai_api_keys: tuple[str, ...] = field(default=(), repr=False)
    hf_hub_offline: bool = False
    progress_log_s: float = 30.0

    def api_keys(self) -> tuple[str, ...]:
        """The keys the realtime engine spreads requests over: OPENAI_API_KEYS, else the one
        OPENAI_API_KEY (empty when neither is set)."""
        if self.openai_api_keys:
            return self.openai_api_keys
        return (self.openai_api_key,) if self.openai_api_key else ()

    def open_workspace(self) -> Workspace:
        """The :class:`Workspace` these settings name."""
        return Workspace(self.workspace, lock_timeout_s=self.lock_timeout_s)

    @classmethod
    def from_env(cls, *, env_file: Path | None = Path(".env"), **overrides: Any) -> Settings:
        """Build settings from the environment after loading ``env_file`` without overriding.

        Args:
            env_file: a dotenv file; missing is fine.
            **overrides: values that win over the environment (from CLI flags); None is ignored.

        Raises:
            UsageError: OPENAI_TIMEOUT is not a number.
        """
        if env_file is not None and env_file.is_file():
            from dotenv import load_dotenv

            load_dotenv(env_file, override=False)
        env = os.environ

        def number(name: str, default: str, kind: type[float] | type[int] = float) -> Any:
            try:
                return kind(env.get(name) or default)
            except ValueError as exc:
                raise UsageError(f"{name} must be a number, got {env[name]!r}") from exc

        timeout = number("OPENAI_TIMEOUT", "600")
        values: dict[str, Any] = {
            "openai_api_key": env.get("OPENAI_API_KEY") or None,
            "openai_base_url": env.get("OPENAI_BASE_URL") or None,
            "openai_embed_model": env.get("OPENAI_EMBED_MODEL") or DEFAULT_MODEL,
            "openai_timeout_s": timeout,
            "database_url": env.get("DATABASE_URL") or None,
            "workspace": Path(env.get("EMBEDBATCH_WORKSPACE") or "workspace"),
            "lock_timeout_s": number("EMBEDBATCH_LOCK_TIMEOUT_S", "900"),
            "retry_attempts": number("EMBEDBATCH_RETRY_ATTEMPTS", "8", int),
            "retry_initial_s": number("EMBEDBATCH_RETRY_INITIAL_S", "1.0"),
            "requeue_s": number("EMBEDBATCH_REQUEUE_S", "60"),
            "progress_log_s": number("EMBEDBATCH_PROGRESS_LOG_S", "30"),
            "turso_auth_token": env.get("TURSO_AUTH_TOKEN") or None,
            "hf_hub_offline": (env.get("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on"),
            "openai_api_keys": tuple(k.strip() for k in (env.get("OPENAI_API_KEYS") or "").split(",") if k.strip()),
        }
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise UsageError(f"unknown setting {key!r}; valid: {sorted(names)}")
            if value is not None:
                values[key] = value
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """Where records come from and how rows map to records.

    Attributes:
        path: a file, a directory, or a glob; ``postgres`` for a PostgreSQL table; or a SQLite
            file (``sqlite:PATH``, ``.db``/``.sqlite``/``.sqlite3``, or the SQLite header).
        id_field: the field holding the record id (``custom_id``).
        split_field: a field holding the split (train/test...), optional.
        dataset: dataset name (a path component); default: the file's stem.
        skip_bad_rows: record bad rows in ``rejected.jsonl`` and go on instead of stopping.
        pg_*: the database source, PostgreSQL or SQLite (table, columns, WHERE with $n params,
            or a whole query).
        id_template: ids built from each row's fields (``"{split}/{dialogue_id}"``); ``{index}``
            is the row's place in its split or file, ``{split}`` the split of a Hugging Face row
            or the ``split_field``'s value; wins over ``id_field``.
        subset / splits / revision: a Hugging Face source's config, splits (empty: all) and
            revision (branch, tag or commit; None: the default branch).
        raw_dir: the workspace's ``datasets/raw`` folder, where ``download-dataset`` keeps copies
            that ``hf://`` sources read first.
        hf_offline: HF_HUB_OFFLINE is set: never reach the hub.
    """

    path: str
    id_field: str = "id"
    id_template: str | None = None
    subset: str | None = None
    splits: tuple[str, ...] = ()
    revision: str | None = None
    raw_dir: Path | None = None
    hf_offline: bool = False
    split_field: str | None = None
    dataset: str | None = None
    skip_bad_rows: bool = False
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = "auto"
    pg_dsn: str | None = field(default=None, repr=False)
    pg_table: str | None = None
    pg_id_column: str = "id"
    pg_text_column: str = "content"
    pg_vector_column: str | None = None
    pg_where: str | None = None
    pg_params: tuple[str, ...] = ()
    pg_query: str | None = None
    pg_overwrite: bool = False

    @property
    def is_postgres(self) -> bool:
        """True when rows come from a PostgreSQL table or query."""
        return self.path == "postgres"

    @property
    def is_sqlite(self) -> bool:
        """True when rows come from a SQLite file's table or query."""
        from embedbatch.sources import is_sqlite_source

        return not self.is_postgres and is_sqlite_source(self.path)

    @property
    def is_huggingface(self) -> bool:
        """True for ``hf://ORG/NAME``, a ``save_to_disk`` folder, or a hub-style dataset folder."""
        from embedbatch.sources.huggingface import is_hf_source

        return not self.is_postgres and is_hf_source(self.path)

    @property
    def kind(self) -> str:
        """The ``source`` column value: ``postgres``, ``sqlite``, ``huggingface`` or ``file``."""
        if self.is_postgres:
            return "postgres"
        if self.is_sqlite:
            return "sqlite"
        return "huggingface" if self.is_huggingface else "file"


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """How a row becomes the text that is embedded.

    Attributes:
        fields: fields joined with ``delimiter``; list values joined with ", ".
        template: a ``str.format`` template over the row's fields; wins over ``fields``.
        max_tokens: tokens kept, cut at a token boundary (8191 is OpenAI's input limit for
            text-embedding-3-* and ada-002, per the embeddings guide, 2026).
        truncate_chars: characters kept before tokenizing (None: all).
        allow_missing_fields: embed rows that lack some of the fields (or placeholders) without
            them; by default such rows stop the run before anything is sent, with counts.
        messages_field: a column holding a conversation, a list of ``{role, content}`` objects;
            its messages become the text (see :mod:`embedbatch.conversations`).
        detect_messages: with no fields or template given and no ``text`` column, use the first
            column that holds such a list.
        message_template / roles / unit / max_messages: each kept message is rendered with the
            template (``{role}``, ``{content}``, ``{index}``), only ``roles`` are kept (empty:
            all), the last ``max_messages``; ``unit`` ``conversation`` gives one record per
            conversation, ``message`` one per kept message (id ``{conversation id}/{index}``).
        chunk_tokens: split each prepared text into chunks of at most this many tokens of the
            model's tokenizer, one record each (None: no chunking; a text longer than
            ``max_tokens`` is cut, as before); see :mod:`embedbatch.chunking`.
        chunk_overlap: tokens shared by consecutive chunks, at most.
        chunker: ``recursive`` (paragraph, then sentence, then word boundaries), ``markdown``
            (headings and code blocks too) or ``tokens`` (token boundaries).
        chunk_id_template: a chunk's id from ``{parent_id}`` and ``{k}`` (0-based).
        chunk_aggregate: ``mean``: store one row per document, the token-weighted mean of its
            chunk vectors, L2-normalised (see :mod:`embedbatch.aggregate`); None: one row per
            chunk.
    """

    fields: tuple[str, ...] = ("text",)
    template: str | None = None
    prefix: str = ""
    suffix: str = ""
    delimiter: str = "\n\n"
    lowercase: bool = False
    truncate_chars: int | None = None
    max_tokens: int = 8191
    allow_missing_fields: bool = False
    messages_field: str | None = None
    detect_messages: bool = False
    message_template: str = "{role}: {content}"
    roles: tuple[str, ...] = ()
    unit: Literal["conversation", "message"] = "conversation"
    max_messages: int | None = None
    chunk_tokens: int | None = None
    chunk_overlap: int = 0
    chunker: Literal["tokens", "recursive", "markdown"] = "recursive"
    chunk_id_template: str = "{parent_id}#{k}"
    chunk_aggregate: Literal["mean"] | None = None

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> PrepareConfig:
        """Read keys fields, template, prefix, suffix, delimiter, lowercase, truncate,
        max_tokens and the chunking keys (chunk_tokens, chunk_overlap, chunker,
        chunk_id_template, chunk_aggregate) from a YAML, JSON or TOML file; ``overrides`` (non-None) win.

        Raises:
            UsageError: unreadable file, unknown key, or wrong type.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = "no such file" if isinstance(exc, FileNotFoundError) else str(exc)
            raise UsageError(f"--config {path}: {reason}") from exc
        data: Any
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            elif path.suffix == ".json":
                import orjson

                data = orjson.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:
            raise UsageError(f"{path}: cannot parse config: {exc}") from exc
        if not isinstance(data, dict):
            raise UsageError(f"{path}: config must be a mapping of keys")
        allowed = {
            "fields",
            "template",
            "prefix",
            "suffix",
            "delimiter",
            "lowercase",
            "truncate",
            "max_tokens",
            "chunk_tokens",
            "chunk_overlap",
            "chunker",
            "chunk_id_template",
            "chunk_aggregate",
        }
        unknown = set(data) - allowed
        if unknown:
            raise UsageError(f"{path}: unknown config keys {sorted(unknown)}; valid: {sorted(allowed)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "fields":
                values["fields"] = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
            elif key == "truncate":
                values["truncate_chars"] = int(value) if value is not None else None
            else:
                values[key] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Deterministic sampling: a row is kept by a seeded hash of its id.

    Attributes:
        n: keep the n rows with the smallest hashes (O(n) memory).
        p: keep each row whose hash falls under ``p`` (O(1) memory).
        seed: the hash seed.
        stratify_by: with ``n``, allocate n proportionally across the values of this field.
        ids: an id filter like ``"1,5,10-20"`` (ranges compare integer ids).
    """

    n: int | None = None
    p: float | None = None
    seed: int = 0
    stratify_by: str | None = None
    ids: str | None = None

    def __post_init__(self) -> None:
        if self.n is not None and self.p is not None:
            raise UsageError("give --n or --p, not both")
        if self.n is not None and self.n < 1:
            raise UsageError(f"--n must be at least 1, got {self.n}")
        if self.p is not None and not 0.0 < self.p <= 1.0:
            raise UsageError(f"--p must be in (0, 1], got {self.p}")

    def describe(self) -> dict[str, Any]:
        """The sampling criteria as recorded in run.json and the manifest."""
        return {"n": self.n, "p": self.p, "seed": self.seed, "stratify_by": self.stratify_by, "ids": self.ids}


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """Per-batch limits of the OpenAI Batch API (Batch API guide and rate-limits page, 2026).

    Attributes:
        max_requests: request lines per input file (API: 50,000).
        max_bytes: bytes per input file (API: 200 MB; default cut 180 MiB = 188,743,680 for margin).
        max_inputs: embedding inputs across all requests (API: 50,000 for /v1/embeddings).
        max_enqueued_tokens: the org's enqueued-token limit per model (3M at tier 1 … 4B at
            tier 5 for text-embedding-3-small, rate-limits page, 2026); None: unlimited.
    """

    max_requests: int = 50_000
    max_bytes: int = 188_743_680
    max_inputs: int = 50_000
    max_enqueued_tokens: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_requests <= 50_000:
            raise UsageError(f"--max-requests-per-batch must be in 1..50000, got {self.max_requests}")
        if not 1024 <= self.max_bytes <= 200 * 1024 * 1024:
            raise UsageError(f"--max-bytes-per-batch must be in 1024..209715200, got {self.max_bytes}")
        if not 1 <= self.max_inputs <= 50_000:
            raise UsageError(f"max inputs per batch must be in 1..50000, got {self.max_inputs}")
        if self.max_enqueued_tokens is not None and self.max_enqueued_tokens < 1:
            raise UsageError("--max-enqueued-tokens must be positive")


@dataclass(frozen=True, kw_only=True)
class SubmitConfig:
    """What ``submit`` sends, on top of the source, preparation and sampling.

    Attributes:
        dimensions: output dims (text-embedding-3-* only).
        max_cost_usd: refuse before any upload when the Batch-price estimate is higher.
        file_expiry_days: uploaded input files expire this many days after upload
            (``expires_after``; the Files API accepts 1 hour to 30 days, per its reference, 2026).
        output_expiry_days: the batches' output and error files expire this many days after
            they are made (``output_expires_after`` on batch create; 1 hour to 30 days, Batch
            API reference, 2026).
        concurrency: uploads/creates in flight at once.
    """

    model: str = DEFAULT_MODEL
    dimensions: int | None = None
    limits: BatchLimits = field(default_factory=BatchLimits)
    dry_run: bool = False
    max_cost_usd: float | None = None
    completion_window: str = "24h"
    metadata: dict[str, str] = field(default_factory=dict)
    file_expiry_days: int | None = None
    output_expiry_days: int | None = None
    concurrency: int = 4


@dataclass(frozen=True, kw_only=True)
class PgTarget:
    """A pgvector column to write embeddings into (``--pg-*`` flags); the DSN is never stored.

    Attributes:
        mode: ``update`` fills existing rows by id; ``insert`` loads rows by binary COPY into the
            table, created when missing as (id text primary key, vector(dim)[, text_column text]);
            ``chunks`` (``--pg-chunks-table``) upserts one row per chunk into a chunks table
            (id, parent_id, chunk_index, chunk, vector) and deletes a re-chunked parent's stale
            chunks in the same transaction (:data:`CHUNK_COLUMNS`).
        text_column: insert mode: also store each row's text here (when the table has it).
        update_chunk_size: rows per transaction.
    """

    table: str
    id_column: str = "id"
    vector_column: str = "embedding"
    text_column: str | None = None
    overwrite: bool = False
    update_chunk_size: int = 1000
    mode: Literal["update", "insert", "chunks"] = "update"
    rebuild_index: bool = False
    concurrently: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form stored in run.json (no DSN)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The columns of a chunks table besides its id and vector columns (``db init --chunks-table``
# creates them; the sinks' chunk mode writes them).
CHUNK_COLUMNS = ("parent_id", "chunk_index", "chunk")


@dataclass(frozen=True, kw_only=True)
class LibsqlTarget:
    """A libSQL (Turso) table to write embeddings into (``--libsql-*`` flags), as ``F32_BLOB(dim)``
    little-endian float32 (``struct.pack('<{dim}f', ...)``: 6,144 bytes for 1,536 dimensions).
    The auth token is never stored.

    Attributes:
        url: a file path, ``file:PATH``, or ``libsql://…`` / ``https://…`` for a remote database.
        mode: ``update`` fills existing rows by id (NULL only unless ``overwrite``); ``insert``
            writes rows (id, vector, model, created_at) into the table, created if missing;
            ``chunks`` (``--libsql-chunks-table``) as for :class:`PgTarget`.
        update_chunk_size: rows per transaction. Each commit syncs the file, so chunks are larger
            than for PostgreSQL: 5,000 rows reach the speed of one single transaction
            (bench/libsql_sink.py: 1.00x at 5,000 rows, 0.74x at 1,000).
        index: create a ``libsql_vector_idx`` index on the column after writing (an existing
            one is dropped first and recreated after the write).
    """

    url: str
    table: str
    id_column: str = "id"
    vector_column: str = "embedding"
    overwrite: bool = False
    update_chunk_size: int = 5000
    mode: Literal["update", "insert", "chunks"] = "update"
    index: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form stored in run.json (no auth token)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """How results become shards.

    Attributes:
        rows_per_shard: shard size target in rows (a batch starts a new shard when it would
            not fit in the open one).
        dtype: how the ``embedding`` column stores vectors: ``float32``, ``float16``, ``int8``
            or ``binary`` (:mod:`embedbatch.store.quant`). A dataset keeps the storage of its
            first commit: later writers follow the manifest.
        keep_float: int8/binary: ``float16`` keeps the vectors beside them (rescoring, exact
            reads), ``none`` keeps only the compressed ones.
        truncate_dim: keep the first N components of each vector and L2-normalise them
            (Matryoshka; see :func:`embedbatch.store.quant.check_truncation`).
        dsn: PostgreSQL for runs with a pgvector target (never written to run state or logs).
        libsql_auth_token: the remote libSQL token for runs with a libSQL target (never stored).
        delete_files: once a batch is ingested, delete its files at the provider and its local
            JSONL (``--delete-remote-files``; see :mod:`embedbatch.engines.batchapi.clean`).
    """

    rows_per_shard: int = 100_000
    dtype: Literal["float32", "float16", "int8", "binary"] = "float32"
    keep_float: Literal["float16", "none"] = "float16"
    truncate_dim: int | None = None
    dsn: str | None = field(default=None, repr=False)
    libsql_auth_token: str | None = field(default=None, repr=False)
    delete_files: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "int8", "binary"):
            raise UsageError(f"--store-dtype must be float32, float16, int8 or binary, got {self.dtype!r}")
        if self.keep_float not in ("float16", "none"):
            raise UsageError(f"--keep-float must be float16 or none, got {self.keep_float!r}")
        if self.truncate_dim is not None and self.truncate_dim < 1:
            raise UsageError(f"--truncate-dim must be at least 1, got {self.truncate_dim}")


@dataclass(frozen=True, kw_only=True)
class LocalConfig:
    """The local SentenceTransformer worker.

    Attributes:
        tokens_per_batch: padded tokens per forward pass (None: 131072 on GPU, 8192 on CPU).
        bucket_min_tokens / bucket_max_tokens: power-of-two bucket edges, capped at the model's
            max length.
        pad_to: ``longest`` pads to the batch's longest text; ``bucket`` to the bucket edge.
        backend / quantize: ``torch``, ``onnx`` (ONNX Runtime, CPU) or ``openvino`` (CPU), the
            last two with optional ``int8``; ``auto`` measures them and keeps the fastest that
            passes the quality guard (the choice is cached per machine and model).
        min_cosine: the quality guard's threshold (None: 0.999, or 0.98 for int8); the guard
            runs for anything but torch float32.
    """

    model: str
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    tokens_per_batch: int | None = None
    bucket_min_tokens: int = 128
    bucket_max_tokens: int = 32768
    pad_to: Literal["longest", "bucket"] = "longest"
    compile: bool = False
    devices: tuple[str, ...] = ()
    backend: Literal["torch", "onnx", "openvino", "auto"] = "torch"
    quantize: Literal["int8"] | None = None
    min_cosine: float | None = None


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """The local worker on a Ray cluster (:mod:`embedbatch.engines.local.raydata`).

    Attributes:
        address: ``auto`` (the cluster ``ray start`` runs on this machine), ``local`` (a new
            one inside this process, all its CPUs), or a cluster address (``HOST:6379``,
            ``ray://HOST:10001``).
        actors: encoder actors in the pool (each loads the model once).
        gpus_per_actor: GPUs reserved per actor (0: CPU actors); fractions share a GPU.
        cpus_per_actor: CPUs reserved per actor.
    """

    address: str
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise UsageError(f"--ray-actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise UsageError("--ray-gpus-per-actor must be >= 0 and CPUs per actor > 0")


@dataclass(frozen=True, kw_only=True)
class RealtimeConfig:
    """The realtime engine (``POST /v1/embeddings``).

    Per-request limits from the Embeddings API reference (checked 2026-11): at most 2,048 inputs
    and 300,000 tokens summed over the inputs of one request, 8,192 tokens per input.

    Attributes:
        model / dimensions: the embedding model and optional shortened dimension.
        max_rpm / max_tpm: the rate limit per key (requests, tokens per minute) the limiter starts
            from; None: learned from the first answer's ``x-ratelimit-*`` headers (one request
            in flight per key until then).
        max_inputs / max_request_tokens: packing limits per request.
        max_concurrency: requests in flight at most (all keys); the engine adapts below it.
        commit_rows / commit_interval_s: a shard is committed every ``commit_rows`` rows or
            ``commit_interval_s`` seconds, whichever comes first (bounds what a crash costs).
        attempts: tries per request for 5xx and transport errors (tenacity, exponential backoff).
        max_429: how many 429 answers one request may get before its rows are failed.
    """

    model: str = DEFAULT_MODEL
    dimensions: int | None = None
    max_rpm: int | None = None
    max_tpm: int | None = None
    max_inputs: int = 2048
    max_request_tokens: int = 300_000
    max_concurrency: int = 32
    commit_rows: int = 20_000
    commit_interval_s: float = 30.0
    attempts: int = 6
    retry_initial_s: float = 1.0
    max_429: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.max_inputs <= 2048:
            raise UsageError(f"--max-inputs must be 1..2048 (the API's limit), got {self.max_inputs}")
        if not 1 <= self.max_request_tokens <= 300_000:
            raise UsageError(f"--max-request-tokens must be 1..300000 (the API's limit), got {self.max_request_tokens}")
        for name in ("max_rpm", "max_tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
