"""Option groups of ``run``, the local worker and search (see :mod:`embedbatch.cli.options` for
how a group becomes flags): each builds its typed config, so the commands stay thin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

from embedbatch.cli.options import OptionGroup
from embedbatch.config import IngestConfig, LocalConfig, RayConfig
from embedbatch.errors import UsageError

__all__ = ["DriveOptions", "LibsqlSearchOptions", "LocalOptions", "PgSearchOptions", "RayOptions", "ShardOptions"]


@dataclass(frozen=True)
class LocalOptions(OptionGroup):
    """The local SentenceTransformer worker: model, device, precision, bucketing, backend."""

    model: Annotated[str, typer.Option("--model", help="SentenceTransformer path or hub name.")]
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto"
    devices: Annotated[str | None, typer.Option(help="e.g. cuda:0,cuda:1: one encoder process each.")] = None
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16.")] = "auto"
    tokens_per_batch: Annotated[int | None, typer.Option(help="Padded tokens/batch (GPU 131072, CPU 8192).")] = None
    bucket_min_tokens: Annotated[int, typer.Option()] = 128
    bucket_max_tokens: Annotated[int, typer.Option(help="Capped at the model's max length.")] = 32768
    pad_to: Annotated[str, typer.Option(help="longest or bucket.")] = "longest"
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile, warmed per bucket shape.")] = False
    backend: Annotated[
        str, typer.Option("--backend", help="torch, onnx, openvino (CPU), or auto (the fastest measured here).")
    ] = "torch"
    quantize: Annotated[str | None, typer.Option("--quantize", help="int8 (onnx, openvino, auto).")] = None
    min_cosine: Annotated[
        float | None, typer.Option("--min-cosine", help="Quality guard threshold (default 0.999; int8 0.98).")
    ] = None

    def build(self) -> LocalConfig:
        """The :class:`LocalConfig`.

        Raises:
            UsageError: a bad ``--pad-to``.
        """
        if self.pad_to not in ("longest", "bucket"):
            raise UsageError(f"--pad-to must be longest or bucket, got {self.pad_to!r}")
        return LocalConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,  # type: ignore[arg-type]
            tokens_per_batch=self.tokens_per_batch,
            bucket_min_tokens=self.bucket_min_tokens,
            bucket_max_tokens=self.bucket_max_tokens,
            pad_to=self.pad_to,  # type: ignore[arg-type]
            compile=self.compile_,
            devices=tuple(d.strip() for d in self.devices.split(",")) if self.devices else (),
            backend=self.backend,  # type: ignore[arg-type]
            quantize=self.quantize,  # type: ignore[arg-type]
            min_cosine=self.min_cosine,
        )


@dataclass(frozen=True)
class RayOptions(OptionGroup):
    """Encode on a Ray cluster instead of this process."""

    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Encode on Ray: auto (running cluster), local (start one), HOST:PORT."),
    ] = None
    ray_actors: Annotated[int, typer.Option("--ray-actors", help="Encoder actors (each loads the model).")] = 1
    ray_gpus_per_actor: Annotated[float, typer.Option("--ray-gpus-per-actor", help="GPUs per actor (0: CPU).")] = 0.0

    def build(self) -> RayConfig | None:
        """The :class:`RayConfig`, or None without ``--ray-address``."""
        if self.ray_address is None:
            return None
        return RayConfig(address=self.ray_address, actors=self.ray_actors, gpus_per_actor=self.ray_gpus_per_actor)


@dataclass(frozen=True)
class ShardOptions(OptionGroup):
    """How the local worker's vectors become shards."""

    rows_per_shard: Annotated[int, typer.Option("--rows-per-shard")] = 100_000
    shard_dtype: Annotated[str, typer.Option("--shard-dtype", help="float32 or float16 shards.")] = "float32"

    def build(self, store: dict[str, Any] | None = None) -> IngestConfig:
        """``store``: :meth:`StoreOptions.fields` (else ``--shard-dtype``)."""
        return IngestConfig(rows_per_shard=self.rows_per_shard, **(store or {"dtype": self.shard_dtype}))


@dataclass(frozen=True)
class PgSearchOptions(OptionGroup):
    """Search a PostgreSQL table's pgvector column."""

    pg_table: Annotated[str | None, typer.Option("--pg-table", help="Search this table.")] = None
    pg_dsn: Annotated[str | None, typer.Option("--pg-dsn", help="Database (env DATABASE_URL).")] = None
    pg_id_column: Annotated[str, typer.Option("--pg-id-column")] = "id"
    pg_vector_column: Annotated[str, typer.Option("--pg-vector-column")] = "embedding"
    pg_text_column: Annotated[str, typer.Option("--pg-text-column")] = "content"


@dataclass(frozen=True)
class LibsqlSearchOptions(OptionGroup):
    """Search a libSQL table's F32_BLOB column."""

    libsql_url: Annotated[str | None, typer.Option("--libsql-url", help="Search this libSQL database.")] = None
    libsql_table: Annotated[str, typer.Option("--libsql-table")] = "knowledge_chunks"
    libsql_id_column: Annotated[str, typer.Option("--libsql-id-column")] = "id"
    libsql_vector_column: Annotated[str, typer.Option("--libsql-vector-column")] = "embedding"
    libsql_text_column: Annotated[str | None, typer.Option("--libsql-text-column")] = "content"
    libsql_auth_token: Annotated[str | None, typer.Option("--libsql-auth-token")] = None


@dataclass(frozen=True)
class DriveOptions(OptionGroup):
    """How ``embedbatch run`` takes a Batch API run to the end."""

    poll_seconds: Annotated[float, typer.Option("--poll-seconds")] = 10.0
    max_attempts: Annotated[int, typer.Option("--max-attempts")] = 3
    delete_remote_files: Annotated[
        bool,
        typer.Option("--delete-remote-files", help="Delete ingested batches' files, remote and local."),
    ] = False
    rows_per_shard: Annotated[int, typer.Option("--rows-per-shard")] = 100_000
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float16 shards.")] = "float32"

    def ingest(
        self, *, dsn: str | None, libsql_auth_token: str | None, store: dict[str, Any] | None = None
    ) -> IngestConfig:
        """The :class:`IngestConfig` (the credentials are passed, never stored); ``store``:
        :meth:`StoreOptions.fields` (else ``--dtype``)."""
        return IngestConfig(
            rows_per_shard=self.rows_per_shard,
            dsn=dsn,
            libsql_auth_token=libsql_auth_token,
            delete_files=self.delete_remote_files,
            **(store or {"dtype": self.dtype}),
        )
