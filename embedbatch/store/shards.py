"""Parquet shards: the schema, the writer that stages them, and readers of committed rows.

A shard ``embeddings/{model}/{dataset}/shard-NNNNN.parquet`` is written to a temp file and
fsynced; :class:`embedbatch.store.dataset.DatasetStore` renames it into place and lists it in
the manifest; it is immutable from then on. A later shard may re-embed an id whose text changed;
it lists such ids under ``supersedes`` and readers take the newest row.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch._version import __version__
from embedbatch.errors import StateError
from embedbatch.store.index import text_keys
from embedbatch.store.manifest import Manifest, superseded_ids
from embedbatch.store.quant import (
    CALIBRATION_ROWS,
    COMPRESSED,
    FLOAT_COLUMN,
    Codec,
    calibrate,
    codec_from_metadata,
    itemsize,
    truncate,
)
from embedbatch.workspace import Workspace, utc_now

__all__ = [
    "ChunkColumns",
    "ShardWriter",
    "StagedShard",
    "best_vectors",
    "embedding_schema",
    "iter_code_chunks",
    "iter_live_rows",
    "iter_run_chunks",
    "iter_vector_chunks",
    "read_rows_at",
    "read_vectors",
    "row_group_rows",
    "vector_columns",
    "vector_source",
    "vectors_of",
]


# Embedding values barely compress (measured: zstd saves a few % on float32 vectors and costs
# most of the shard-writing time), and min/max statistics on them serve no query; both are kept
# for the other columns.
_COMPRESSION = {
    name: "zstd"
    for name in ("id", "source", "dataset", "split", "text", "metadata", "model", "created_at", "run_id", "parent_id")
} | {"embedding": "none", FLOAT_COLUMN: "none", "chunk_index": "zstd"}
_STATS_COLUMNS = ["id", "source", "dataset", "split", "model", "created_at", "run_id"]


def embedding_schema(
    dim: int, dtype: str = "float32", *, codec: Codec | None = None, keep_float: bool = False
) -> pa.Schema:
    """The data model: id, source, dataset, split, text, metadata, embedding, model, created_at,
    run_id, parent_id, chunk_index[, embedding_float].

    ``embedding`` is ``fixed_size_list<float32|float16>[dim]``, or ``fixed_size_binary[dim]``
    (int8 codes) / ``fixed_size_binary[dim / 8]`` (sign bits) for compressed storage (see
    :mod:`embedbatch.store.quant`; the codec, with int8's ranges, is in the schema metadata);
    ``embedding_float`` (``fixed_size_list<float16>[dim]``) holds the float vectors beside
    int8/binary ones when they are kept. ``parent_id`` (string)
    and ``chunk_index`` (int32) are set for chunk rows and null otherwise (shards written before
    chunking existed lack both columns: readers treat them as null).
    """
    codec = codec or Codec(dtype, dim)
    fields = [
        ("id", pa.string()),
        ("source", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("text", pa.string()),
        ("metadata", pa.string()),
        ("embedding", codec.arrow_type()),
        ("model", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("parent_id", pa.string()),
        ("chunk_index", pa.int32()),
    ]
    if keep_float:
        fields.append((FLOAT_COLUMN, pa.list_(pa.float16(), dim)))
    schema = pa.schema(fields)
    return schema.with_metadata(codec.metadata()) if codec.dtype in COMPRESSED else schema


def _chunk_columns(metadata: list[str]) -> tuple[pa.Array, pa.Array]:
    """``parent_id`` and ``chunk_index`` from each row's metadata JSON (its ``chunk``), null
    for rows that are not chunks (their metadata is not parsed)."""
    parents: list[str | None] = [None] * len(metadata)
    index: list[int | None] = [None] * len(metadata)
    for i, m in enumerate(metadata):
        if '"chunk"' in m:
            chunk = orjson.loads(m).get("chunk")
            if isinstance(chunk, dict):
                parents[i], index[i] = chunk.get("parent_id"), chunk.get("index")
    return pa.array(parents, pa.string()), pa.array(index, pa.int32())


class _HashingFile:
    """A binary file that sha256-hashes what is written to it; ``finish`` fsyncs, closes and
    returns the hex digest."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()
        self._pos = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self._fh.write(view)
        self._pos += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._fh.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """pyarrow closes its sink when the writer closes; the file stays open for :meth:`finish`."""

    def finish(self) -> str:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.closed = True
        return self._hash.hexdigest()

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()


@dataclass
class StagedShard:
    """A finished shard waiting for :meth:`DatasetStore.commit`: a temp file in the shards folder,
    held under an ``flock`` (``fd``) so that orphan cleanup leaves it alone while we live.

    Attributes:
        entry: the manifest entry without ``file`` (sha256, bytes, rows, dim, norms, sources...).
        ids: the shard's ids in row order; text_keys: ``(rows,)`` uint64 content keys.
    """

    tmp: Path
    fd: int
    entry: dict[str, Any]
    ids: list[str]
    text_keys: np.ndarray

    def release(self) -> None:
        """Drop the ``flock``; remove the temp file if it was not renamed into place."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class ShardWriter:
    """Writes rows into shards of about ``rows_per_shard`` rows and stages them; nothing is
    visible until :meth:`DatasetStore.commit` lists them. Get one from
    :meth:`DatasetStore.writer`.

    Args:
        directory: the dataset's shards folder.
        dim: embedding dimension (None: taken from the first write).
        dtype: ``float32``, ``float16``, ``int8`` or ``binary`` storage (:mod:`embedbatch.store.quant`).
        codec: int8: the dataset's calibrated ranges (None: this writer calibrates them on its
            first :data:`~embedbatch.store.quant.CALIBRATION_ROWS` rows, buffered until then).
        keep_float: int8/binary: also keep each vector as float16 (``embedding_float``).
        truncate_dim: keep each vector's first N components, L2-normalised (Matryoshka).
        git_sha: recorded in each shard's footer.
    """

    def __init__(
        self,
        directory: Path,
        *,
        dim: int | None,
        dtype: str = "float32",
        rows_per_shard: int = 100_000,
        git_sha: str | None = None,
        codec: Codec | None = None,
        keep_float: bool = False,
        truncate_dim: int | None = None,
    ) -> None:
        self.dir = directory
        self.dim = truncate_dim if truncate_dim and dim is not None else dim
        self.dtype = dtype
        self.codec = codec
        self.keep_float = keep_float and dtype in COMPRESSED
        self.truncate_dim = truncate_dim
        self.rows_per_shard = rows_per_shard
        self.git_sha = git_sha
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._lock_fd = -1
        self._rows = 0
        self._reserved = 0
        self._min_norm = np.inf
        self._max_norm = 0.0
        self._clipped = 0
        self._sources: list[str] = []
        self._ids: list[str] = []
        self._text_keys: list[np.ndarray] = []
        self._uncalibrated: list[tuple[dict[str, Any], np.ndarray]] = []  # int8 rows before the ranges
        self.staged: list[StagedShard] = []

    @property
    def rows_in_open_shard(self) -> int:
        """Rows written, or reserved for writes still in flight, in the open shard."""
        return max(self._rows, self._reserved)

    @property
    def staged_rows(self) -> int:
        """Rows in staged (closed, uncommitted) shards."""
        return sum(int(s.entry["rows"]) for s in self.staged)

    def reserve(self, n: int) -> None:
        """Count ``n`` rows into the open shard before a write that runs on another thread."""
        self._reserved = max(self._reserved, self._rows) + n

    def _open(self) -> None:
        assert self.dim is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=self.dir)
        self._tmp = Path(tmp)
        # A second descriptor holds an flock for as long as the shard is staged: orphan
        # cleanup (under the dataset lock) removes only temp files whose flock is free.
        self._lock_fd = os.open(tmp, os.O_RDONLY)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The checksum is taken from the bytes as they are written (on the writing thread), so
        # closing a shard need not read it back.
        self._file = _HashingFile(os.fdopen(fd, "wb"))
        # zstd level 1 for the small columns; dictionaries only for the low-cardinality ones.
        self._writer = pq.ParquetWriter(
            self._file,
            embedding_schema(self.dim, self.dtype, codec=self.codec, keep_float=self.keep_float),
            compression=_COMPRESSION,
            compression_level={name: 1 for name, codec in _COMPRESSION.items() if codec == "zstd"},
            use_dictionary=["source", "dataset", "split", "model", "run_id"],
            write_statistics=_STATS_COLUMNS,
        )

    def write(
        self,
        *,
        ids: list[str],
        texts: list[str],
        metadata: list[str],
        splits: list[str | None],
        vectors: np.ndarray,
        source: str,
        dataset: str,
        model: str,
        run_id: str,
        created_at: datetime | None = None,
    ) -> None:
        """Append rows to the open shard.

        Args:
            vectors: ``(n, dim)`` float32, rows aligned with ``ids``.

        Raises:
            StateError: the vectors' dimension differs from the writer's.
        """
        if len(ids) == 0:
            return
        if self.truncate_dim is not None:
            vectors = truncate(np.asarray(vectors, np.float32), self.truncate_dim)
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        if vectors.shape[1] != self.dim:
            raise StateError(f"{vectors.shape[1]}-d vectors written to a {self.dim}-d shard")
        n = len(ids)
        v32 = vectors.astype(np.float32, copy=False)
        norms = np.sqrt(np.einsum("ij,ij->i", v32, v32))
        self._min_norm = min(self._min_norm, float(norms.min()))
        self._max_norm = max(self._max_norm, float(norms.max()))
        self._ids.extend(ids)
        self._text_keys.append(text_keys(texts))
        self._rows += n
        columns = {
            "ids": ids,
            "texts": texts,
            "metadata": metadata,
            "splits": splits,
            "source": source,
            "dataset": dataset,
            "model": model,
            "run_id": run_id,
            "created_at": created_at or utc_now(),
        }
        if self.codec is None and self.dtype == "int8":
            self._uncalibrated.append((columns, v32))
            if sum(len(v) for _, v in self._uncalibrated) >= CALIBRATION_ROWS:
                self._calibrate()
            return
        self._write_table(columns, v32)

    def _calibrate(self) -> None:
        """int8: the ranges from the rows buffered so far, then write those rows."""
        held, self._uncalibrated = self._uncalibrated, []
        if not held:
            return
        assert self.dim is not None
        lo, hi = calibrate(np.concatenate([v for _, v in held]))
        self.codec = Codec("int8", self.dim, lo, hi)
        for columns, v32 in held:
            self._write_table(columns, v32)

    def _write_table(self, columns: dict[str, Any], v32: np.ndarray) -> None:
        assert self.dim is not None
        if self.codec is None:
            self.codec = Codec(self.dtype, self.dim)
        if self._writer is None:
            self._open()
        assert self._writer is not None
        n = len(columns["ids"])
        emb, clipped = self.codec.encode(v32)
        self._clipped += clipped
        table = pa.Table.from_arrays(
            [
                pa.array(columns["ids"], pa.string()),
                pa.array([columns["source"]] * n, pa.string()),
                pa.array([columns["dataset"]] * n, pa.string()),
                pa.array(columns["splits"], pa.string()),
                pa.array(columns["texts"], pa.string()),
                pa.array(columns["metadata"], pa.string()),
                emb,
                pa.array([columns["model"]] * n, pa.string()),
                pa.array([columns["created_at"]] * n, type=pa.timestamp("us", tz="UTC")),
                pa.array([columns["run_id"]] * n, pa.string()),
                *_chunk_columns(columns["metadata"]),
                *([Codec("float16", self.dim).encode(v32)[0]] if self.keep_float else []),
            ],
            schema=embedding_schema(self.dim, self.dtype, codec=self.codec, keep_float=self.keep_float),
        )
        per_row = itemsize(self.dtype) + (2 if self.keep_float else 0)
        self._writer.write_table(table, row_group_size=row_group_rows(self.dim, per_row))

    def add_source(self, key: str) -> None:
        """Record that batch ``key`` (``run_id/batch``) is in the open shard."""
        self._sources.append(key)

    def close_shard(self) -> None:
        """Finish the open shard: footer stats, fsync; it stays a staged temp file."""
        self._calibrate()  # int8 rows still waiting for their ranges (a small first shard)
        if self._writer is None:
            return
        assert self._tmp is not None
        stats = {
            "rows": self._rows,
            "dim": self.dim,
            "dtype": self.dtype,
            **({"keep_float": "float16"} if self.keep_float else {}),
            **({"clipped": self._clipped} if self.dtype == "int8" else {}),
            "min_norm": self._min_norm if self._rows else None,
            "max_norm": self._max_norm if self._rows else None,
            "created_at": utc_now().isoformat(),
            "tool_version": __version__,
            "git_sha": self.git_sha,
        }
        self._writer.add_key_value_metadata({"embedbatch": orjson.dumps(stats).decode()})
        self._writer.close()
        self._writer = None
        digest = self._file.finish()
        entry = {"sha256": digest, "bytes": self._tmp.stat().st_size, **stats, "sources": self._sources}
        keys = np.concatenate(self._text_keys) if self._text_keys else np.empty(0, np.uint64)
        self.staged.append(StagedShard(self._tmp, self._lock_fd, entry, self._ids, keys))
        self._tmp, self._lock_fd = None, -1
        self._sources, self._ids, self._text_keys = [], [], []
        self._rows = self._reserved = self._clipped = 0
        self._min_norm, self._max_norm = np.inf, 0.0

    def take_staged(self) -> list[StagedShard]:
        """Hand the staged shards over (to the store's commit)."""
        out, self.staged = self.staged, []
        return out

    def abort(self) -> None:
        """Drop the open and staged shards (their temp files are removed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._file.abort()
        if self._tmp is not None:
            StagedShard(self._tmp, self._lock_fd, {}, [], np.empty(0, np.uint64)).release()
            self._tmp, self._lock_fd = None, -1
        for st in self.take_staged():
            st.release()
        self._uncalibrated = []


def iter_live_rows(ws: Workspace, manifest: Manifest, columns: list[str]) -> Iterator[dict[str, list[Any]]]:
    """Column chunks of the current rows (superseded rows dropped), shard by shard.

    Raises:
        StateError: a listed shard is missing.
    """
    gone = superseded_ids(manifest)
    base = ws.shards_dir(manifest.model, manifest.dataset)
    cols = list(dict.fromkeys(["id", *columns]))
    for s in manifest.shards:
        path = base / s["file"]
        if not path.exists():
            raise StateError(f"{path}: listed in the manifest but missing")
        pf = pq.ParquetFile(path)
        drop = gone.get(s["file"], set())
        for batch in pf.iter_batches(columns=cols, batch_size=65_536):
            data = batch.to_pydict()
            if drop:
                keep = [i for i, rid in enumerate(data["id"]) if rid not in drop]
                data = {k: [v[i] for i in keep] for k, v in data.items()}
            yield data


def read_vectors(ws: Workspace, model: str, dataset: str) -> tuple[list[str], list[str], np.ndarray]:
    """All current rows: (ids, texts, ``(n, dim)`` float32 vectors). Holds the whole dataset."""
    manifest = Manifest.load(ws, model, dataset)
    ids: list[str] = []
    texts: list[str] = []
    vecs: list[np.ndarray] = []
    gone = superseded_ids(manifest)
    base = ws.shards_dir(model, dataset)
    for s in manifest.shards:
        schema = pq.read_schema(base / s["file"])
        table = pq.read_table(base / s["file"], columns=["id", "text", *vector_columns(schema)])
        drop = gone.get(s["file"], set())
        arr = best_vectors(table, schema)
        sid = table.column("id").to_pylist()
        stx = table.column("text").to_pylist()
        if drop:
            keep = np.array([rid not in drop for rid in sid])
            arr = arr[keep]
            sid = [r for r, k in zip(sid, keep, strict=True) if k]
            stx = [t for t, k in zip(stx, keep, strict=True) if k]
        ids.extend(sid)
        texts.extend(stx)
        vecs.append(arr)
    dim = manifest.dimensions or 0
    return ids, texts, np.concatenate(vecs) if vecs else np.empty((0, dim), np.float32)


ROW_GROUP_BYTES = 8 << 20  # vector bytes per row group: what `get` reads to return one row


def row_group_rows(dim: int, itemsize: float = 4) -> int:
    """Rows per Parquet row group: a power of two holding about :data:`ROW_GROUP_BYTES` of
    vectors (1,024 rows at 1536-d float32, 4,096 at 384-d), between 1,024 and 16,384. Small
    enough that a look-up by id reads a few MB, large enough that a scan stays sequential."""
    rows = int(ROW_GROUP_BYTES // max(1, dim * itemsize))
    return int(min(16_384, max(1_024, 1 << max(0, rows.bit_length() - 1))))


def vectors_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A float column (fixed-size lists of float32 or float16) as ``(n, dim)`` float32; for a
    shard's vectors whatever their dtype use :func:`best_vectors`."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    flat = arr.values.to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(n, -1) if n else np.empty((0, 0), np.float32)


def vector_columns(schema: pa.Schema) -> list[str]:
    """The vector columns a shard with ``schema`` has: ``embedding`` and, when float vectors
    are kept beside int8/binary ones, ``embedding_float``."""
    return ["embedding", FLOAT_COLUMN] if FLOAT_COLUMN in schema.names else ["embedding"]


def best_vectors(data: pa.Table | pa.RecordBatch, schema: pa.Schema) -> np.ndarray:
    """The most exact ``(n, dim)`` float32 vectors ``data`` holds: the kept float16 ones when
    read (``embedding_float``), else ``embedding`` decoded (dequantised for int8/binary)."""
    if FLOAT_COLUMN in data.schema.names:
        return vectors_of(data.column(FLOAT_COLUMN))
    return codec_from_metadata(schema).decode(data.column("embedding"))


def vector_source(schema: pa.Schema) -> str:
    """What :func:`best_vectors` returns for a shard, in words (``get`` and ``export`` say it):
    ``float32``, ``float16``, ``float16 (kept beside int8)`` or ``int8 (dequantised)``."""
    dtype = codec_from_metadata(schema).dtype
    if dtype in COMPRESSED:
        return f"float16 (kept beside {dtype})" if FLOAT_COLUMN in schema.names else f"{dtype} (dequantised)"
    return dtype


def _shard_batches(
    ws: Workspace, manifest: Manifest, columns: Any, chunk_rows: int
) -> Iterator[tuple[str, int, pa.Schema, pa.RecordBatch, np.ndarray]]:
    """Every shard's ``columns(schema)`` in record batches: ``(shard file, first row, the
    shard's schema, batch, (n,) bool live)``; ``live`` is False for rows a later shard
    superseded. Pages are streamed (no read-ahead of the file).

    Raises:
        StateError: a listed shard is missing.
    """
    import pyarrow.compute as pc

    gone = superseded_ids(manifest)
    base = ws.shards_dir(manifest.model, manifest.dataset)
    for s in manifest.shards:
        path = base / s["file"]
        if not path.exists():
            raise StateError(f"{path}: listed in the manifest but missing")
        drop = gone.get(s["file"], set())
        drop_arr = pa.array(sorted(drop), pa.string()) if drop else None
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        schema = pf.schema_arrow
        start = 0
        for batch in pf.iter_batches(columns=columns(schema), batch_size=chunk_rows):
            ids = batch.column("id")
            if drop_arr is not None:
                live = np.asarray(pc.invert(pc.is_in(ids, value_set=drop_arr)).to_numpy(zero_copy_only=False))
            else:
                live = np.ones(len(ids), bool)
            yield s["file"], start, schema, batch, live
            start += len(ids)


def iter_vector_chunks(
    ws: Workspace, manifest: Manifest, *, chunk_rows: int = 2048, stored: bool = False
) -> Iterator[tuple[str, int, pa.Array, np.ndarray, np.ndarray]]:
    """Every shard's rows in chunks, for a bounded-memory scan: ``(shard file, first row,
    ids (Arrow strings), (n, dim) float32 vectors, (n,) bool live)``; ``live`` is False for rows a
    later shard superseded. Memory: one chunk (``chunk_rows × dim × 4`` bytes), whatever the
    dataset's size. The vectors are :func:`best_vectors`, or with ``stored`` the ``embedding``
    column decoded as stored (int8/binary dequantised: what a compressed scan scores).

    Raises:
        StateError: a listed shard is missing.
    """

    def columns(schema: pa.Schema) -> list[str]:
        return ["id", "embedding"] if stored else ["id", *vector_columns(schema)]

    for file, start, schema, batch, live in _shard_batches(ws, manifest, columns, chunk_rows):
        emb = codec_from_metadata(schema).decode(batch.column("embedding")) if stored else None
        yield file, start, batch.column("id"), emb if emb is not None else best_vectors(batch, schema), live


def iter_code_chunks(
    ws: Workspace, manifest: Manifest, *, chunk_rows: int = 65_536
) -> Iterator[tuple[str, int, pa.Array, Codec, pa.Array, np.ndarray]]:
    """:func:`iter_vector_chunks` without decoding: ``(shard file, first row, ids, the shard's
    codec, its embedding column as stored, (n,) bool live)``, for a scan that scores the codes
    themselves (Hamming distances of binary codes).

    Raises:
        StateError: a listed shard is missing.
    """
    for file, start, schema, batch, live in _shard_batches(ws, manifest, lambda _: ["id", "embedding"], chunk_rows):
        yield file, start, batch.column("id"), codec_from_metadata(schema), batch.column("embedding"), live


def read_rows_at(path: Path, rows: list[int], columns: list[str]) -> list[dict[str, Any]]:
    """The given rows (0-based, within the shard) of a shard, in the order asked, reading only
    the row groups that hold them (see :func:`row_group_rows`)."""
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
    out: dict[int, dict[str, Any]] = {}
    by_group: dict[int, list[int]] = {}
    for r in rows:
        by_group.setdefault(int(np.searchsorted(bounds, r, side="right")) - 1, []).append(r)
    with_vectors = "embedding" in columns
    plain = [c for c in columns if c != "embedding"]
    best = [FLOAT_COLUMN] if FLOAT_COLUMN in schema.names else ["embedding"]  # the kept floats alone, if any
    read = [*plain, *best] if with_vectors else columns
    for g, rs in by_group.items():
        table = pf.read_row_group(g, columns=read)
        local = table.take(pa.array([r - int(bounds[g]) for r in rs], pa.int64()))
        vecs = best_vectors(local, schema) if with_vectors else None
        for k, (r, row) in enumerate(zip(rs, local.select(plain).to_pylist(), strict=True)):
            if vecs is not None:
                row["embedding"] = vecs[k]
            out[r] = row
    return [out[r] for r in rows]


@dataclass(frozen=True, slots=True)
class ChunkColumns:
    """Per row of a sink chunk: ``parent_id`` (the row's own id for a row that is not a chunk),
    ``chunk_index`` (0 for such a row) and ``count``, the parent's chunk count when the row was
    made (from ``metadata.chunk``; 1 for a row that is not a chunk)."""

    parents: list[str]
    index: list[int]
    counts: list[int]


def iter_run_chunks(
    ws: Workspace,
    model: str,
    dataset: str,
    run_id: str,
    *,
    chunk_rows: int,
    progress: dict[str, int],
    with_chunks: bool = False,
) -> Iterator[tuple[str, int, list[str], np.ndarray, list[str], ChunkColumns | None]]:
    """Rows of ``run_id`` in the dataset's shards, current rows only, in shard order, as
    ``(shard, end_offset, ids, (n, dim) float32, texts, chunk columns or None)`` chunks; rows
    before ``progress[shard]`` (already committed) are skipped. ``with_chunks`` also reads the
    rows' :class:`ChunkColumns` (the sinks' chunk mode)."""
    import pyarrow.compute as pc

    manifest = Manifest.load(ws, model, dataset)
    gone = superseded_ids(manifest)
    base = ws.shards_dir(model, dataset)
    columns = ["id", "text", "embedding", "run_id"] + (["metadata", "parent_id", "chunk_index"] if with_chunks else [])
    for s in manifest.shards:
        if not any(src.startswith(f"{run_id}/") for src in s.get("sources", [])) and s.get("run_id") != run_id:
            continue
        if not s.get("rows"):
            continue  # deletions alone
        schema = pq.read_schema(base / s["file"])
        want = [*columns, *vector_columns(schema)[1:]]
        table = pq.read_table(base / s["file"], columns=[c for c in want if c in schema.names])
        table = table.filter(pc.equal(table["run_id"], run_id))
        drop = gone.get(s["file"], set())
        if drop:
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=pa.array(sorted(drop), pa.string()))))
        done = progress.get(s["file"], 0)
        for start in range(done, len(table), chunk_rows):
            part = table.slice(start, chunk_rows)
            vecs = best_vectors(part, schema)
            ids = part["id"].to_pylist()
            cols = _chunk_columns_of(part, ids) if with_chunks else None
            yield s["file"], start + len(part), ids, vecs, part["text"].to_pylist(), cols


def _chunk_columns_of(part: pa.Table, ids: list[str]) -> ChunkColumns:
    parents: list[str] = []
    index: list[int] = []
    counts: list[int] = []
    none = [None] * len(ids)
    have = set(part.column_names)  # a shard written before the chunk columns existed has none
    for rid, parent, k, meta in zip(
        ids,
        part["parent_id"].to_pylist() if "parent_id" in have else none,
        part["chunk_index"].to_pylist() if "chunk_index" in have else none,
        part["metadata"].to_pylist(),
        strict=True,
    ):
        if parent is None:
            parents.append(rid)
            index.append(0)
            counts.append(1)
            continue
        chunk = orjson.loads(meta or "{}").get("chunk") or {}
        parents.append(parent)
        index.append(int(k or 0))
        counts.append(int(chunk.get("count", int(k or 0) + 1)))
    return ChunkColumns(parents, index, counts)
