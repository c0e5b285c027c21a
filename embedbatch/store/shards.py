"""Parquet shards and the dataset manifest.

A shard ``embeddings/{model}/{dataset}/shard-NNNNN.parquet`` is written to a temp file, fsynced
and renamed; it is immutable from then on. ``indexes/{model}/{dataset}/manifest.json`` is the
source of truth: a shard file that the manifest does not list is an orphan of a crash and is
removed before the next write. A later shard may re-embed an id whose text changed; it lists
such ids under ``supersedes`` and readers take the newest row.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch import __version__
from embedbatch.errors import StateError
from embedbatch.workspace import Workspace, _fsync_dir, atomic_write_json, read_json, utc_now

__all__ = [
    "Manifest",
    "ShardWriter",
    "embedding_schema",
    "iter_live_rows",
    "read_vectors",
    "shard_ids",
    "shard_text_hashes",
]


# Embedding values barely compress (measured: zstd saves a few % on float32 vectors and costs
# most of the shard-writing time), and min/max statistics on them serve no query; both are kept
# for the other columns.
_COMPRESSION = {
    name: "zstd" for name in ("id", "source", "dataset", "split", "text", "metadata", "model", "created_at", "run_id")
} | {"embedding": "none"}
_STATS_COLUMNS = ["id", "source", "dataset", "split", "model", "created_at", "run_id"]


def embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The data model: id, source, dataset, split, text, metadata, embedding, model, created_at, run_id.

    ``embedding`` is ``fixed_size_list<float32|float16>[dim]``.
    """
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("dataset", pa.string()),
            ("split", pa.string()),
            ("text", pa.string()),
            ("metadata", pa.string()),
            ("embedding", pa.list_(value, dim)),
            ("model", pa.string()),
            ("created_at", pa.timestamp("us", tz="UTC")),
            ("run_id", pa.string()),
        ]
    )


@dataclass
class Manifest:
    """``manifest.json``: shards (file, sha256, bytes, rows, sources), model, dimensions, sampling, runs."""

    path: Path
    model: str
    dataset: str
    dimensions: int | None = None
    dtype: str = "float32"
    shards: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, Any] = field(default_factory=dict)
    sampling: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, ws: Workspace, model: str, dataset: str) -> Manifest:
        path = ws.manifest_path(model, dataset)
        if not path.exists():
            return cls(path, model, dataset)
        d = read_json(path)
        return cls(
            path,
            d["model"],
            d["dataset"],
            d.get("dimensions"),
            d.get("dtype", "float32"),
            d.get("shards", []),
            d.get("runs", {}),
            d.get("sampling", []),
        )

    def save(self) -> None:
        atomic_write_json(
            self.path,
            {
                "model": self.model,
                "dataset": self.dataset,
                "dimensions": self.dimensions,
                "dtype": self.dtype,
                "rows": sum(s["rows"] for s in self.shards),
                "shards": self.shards,
                "runs": self.runs,
                "sampling": self.sampling,
                "updated_at": utc_now().isoformat(),
                "tool_version": __version__,
            },
        )

    def sources(self) -> set[str]:
        """Keys ``run_id/batch`` of every batch whose rows are in a shard."""
        return {src for s in self.shards for src in s.get("sources", [])}

    def shard_paths(self, ws: Workspace) -> list[Path]:
        base = ws.shards_dir(self.model, self.dataset)
        return [base / s["file"] for s in self.shards]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove_orphans(ws: Workspace, manifest: Manifest) -> list[str]:
    """Delete shard and temp files the manifest does not list (left by a crash); returns names."""
    base = ws.shards_dir(manifest.model, manifest.dataset)
    if not base.is_dir():
        return []
    listed = {s["file"] for s in manifest.shards}
    removed = []
    for p in base.iterdir():
        if p.name not in listed and (p.name.startswith("shard-") or p.name.endswith(".tmp")):
            p.unlink()
            removed.append(p.name)
    return removed


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


class ShardWriter:
    """Writes rows into shards of about ``rows_per_shard`` rows; nothing is visible until
    :meth:`commit` updates the manifest.

    Args:
        dim: embedding dimension.
        dtype: ``float32`` or ``float16`` storage.
        git_sha: recorded in each shard's footer.
    """

    def __init__(
        self,
        ws: Workspace,
        manifest: Manifest,
        *,
        dim: int,
        dtype: str = "float32",
        rows_per_shard: int = 100_000,
        git_sha: str | None = None,
    ) -> None:
        self.ws = ws
        self.manifest = manifest
        self.dim = dim
        self.dtype = dtype
        self.rows_per_shard = rows_per_shard
        self.git_sha = git_sha
        self.schema = embedding_schema(dim, dtype)
        self.dir = ws.shards_dir(manifest.model, manifest.dataset)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._rows = 0
        self._reserved = 0
        self._min_norm = np.inf
        self._max_norm = 0.0
        self._sources: list[str] = []
        self._supersedes: list[str] = []
        self.pending: list[dict[str, Any]] = []
        self._next = self._first_free_number()

    def _first_free_number(self) -> int:
        used = [int(s["file"][6:11]) for s in self.manifest.shards]
        return (max(used) + 1) if used else 1

    @property
    def rows_in_open_shard(self) -> int:
        """Rows written, or reserved for writes still in flight, in the open shard."""
        return max(self._rows, self._reserved)

    def reserve(self, n: int) -> None:
        """Count ``n`` rows into the open shard before a write that runs on another thread."""
        self._reserved = max(self._reserved, self._rows) + n

    def _open(self) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=self.dir)
        self._tmp = Path(tmp)
        # The checksum is taken from the bytes as they are written (on the writing thread), so
        # closing a shard need not read it back.
        self._file = _HashingFile(os.fdopen(fd, "wb"))
        # zstd level 1 for the small columns; dictionaries only for the low-cardinality ones.
        self._writer = pq.ParquetWriter(
            self._file,
            self.schema,
            compression=_COMPRESSION,
            compression_level={name: 1 for name, codec in _COMPRESSION.items() if codec == "zstd"},
            use_dictionary=["source", "dataset", "split", "model", "run_id"],
            write_statistics=_STATS_COLUMNS,
        )
        self._rows = 0
        self._min_norm, self._max_norm = np.inf, 0.0

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
        """
        if len(ids) == 0:
            return
        if self._writer is None:
            self._open()
        assert self._writer is not None
        n = len(ids)
        v32 = vectors.astype(np.float32, copy=False)
        norms = np.sqrt(np.einsum("ij,ij->i", v32, v32))
        self._min_norm = min(self._min_norm, float(norms.min()))
        self._max_norm = max(self._max_norm, float(norms.max()))
        flat = vectors.astype(np.float16 if self.dtype == "float16" else np.float32, copy=False).reshape(-1)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(flat), self.dim)
        ts = pa.array([created_at or utc_now()] * n, type=pa.timestamp("us", tz="UTC"))
        table = pa.Table.from_arrays(
            [
                pa.array(ids, pa.string()),
                pa.array([source] * n, pa.string()),
                pa.array([dataset] * n, pa.string()),
                pa.array(splits, pa.string()),
                pa.array(texts, pa.string()),
                pa.array(metadata, pa.string()),
                emb,
                pa.array([model] * n, pa.string()),
                ts,
                pa.array([run_id] * n, pa.string()),
            ],
            schema=self.schema,
        )
        self._writer.write_table(table, row_group_size=16_384)
        self._rows += n

    def add_source(self, key: str) -> None:
        """Record that batch ``key`` (``run_id/batch``) is in the open shard."""
        self._sources.append(key)

    def note_supersedes(self, ids: list[str]) -> None:
        """Record ids in the open shard that replace rows of earlier shards (text changed)."""
        self._supersedes.extend(ids)

    def close_shard(self) -> None:
        """Finish the open shard: footer stats, fsync, rename into place (still unlisted)."""
        if self._writer is None:
            return
        assert self._tmp is not None
        created = utc_now().isoformat()
        stats = {
            "rows": self._rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "min_norm": self._min_norm if self._rows else None,
            "max_norm": self._max_norm if self._rows else None,
            "created_at": created,
            "tool_version": __version__,
            "git_sha": self.git_sha,
        }
        self._writer.add_key_value_metadata({"embedbatch": orjson.dumps(stats).decode()})
        self._writer.close()
        self._writer = None
        digest = self._file.finish()
        name = f"shard-{self._next:05d}.parquet"
        self._next += 1
        final = self.dir / name
        os.replace(self._tmp, final)
        _fsync_dir(self.dir)
        entry = {
            "file": name,
            "sha256": digest,
            "bytes": final.stat().st_size,
            **stats,
            "sources": self._sources,
        }
        if self._supersedes:
            entry["supersedes"] = self._supersedes
        self.pending.append(entry)
        self._sources, self._supersedes = [], []
        self._rows = self._reserved = 0

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._file.abort()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()

    def commit(self) -> list[dict[str, Any]]:
        """List every closed shard in the manifest (one atomic write); returns their entries."""
        self.close_shard()
        if not self.pending:
            return []
        self.manifest.shards.extend(self.pending)
        self.manifest.dimensions = self.dim
        self.manifest.dtype = self.dtype
        self.manifest.save()
        done, self.pending = self.pending, []
        return done


def _superseded(manifest: Manifest) -> dict[str, set[str]]:
    """shard file → ids that later shards replaced."""
    out: dict[str, set[str]] = {}
    later: set[str] = set()
    for s in reversed(manifest.shards):
        out[s["file"]] = set(later)
        later.update(s.get("supersedes", []))
    return out


def iter_live_rows(ws: Workspace, manifest: Manifest, columns: list[str]) -> Iterator[dict[str, list[Any]]]:
    """Column chunks of the current rows (superseded rows dropped), shard by shard."""
    gone = _superseded(manifest)
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


def shard_text_hashes(ws: Workspace, model: str, dataset: str) -> dict[str, str]:
    """id → sha256 of the embedded text, for every current row of the dataset."""
    manifest = Manifest.load(ws, model, dataset)
    out: dict[str, str] = {}
    for chunk in iter_live_rows(ws, manifest, ["text"]):
        for rid, text in zip(chunk["id"], chunk["text"], strict=True):
            out[rid] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return out


def shard_ids(ws: Workspace, model: str, dataset: str) -> set[str]:
    """Ids of every current row of the dataset (reads the ``id`` column only)."""
    manifest = Manifest.load(ws, model, dataset)
    out: set[str] = set()
    for chunk in iter_live_rows(ws, manifest, []):
        out.update(chunk["id"])
    return out


def read_vectors(ws: Workspace, model: str, dataset: str) -> tuple[list[str], list[str], np.ndarray]:
    """All current rows: (ids, texts, ``(n, dim)`` float32 vectors)."""
    manifest = Manifest.load(ws, model, dataset)
    ids: list[str] = []
    texts: list[str] = []
    vecs: list[np.ndarray] = []
    gone = _superseded(manifest)
    base = ws.shards_dir(model, dataset)
    for s in manifest.shards:
        table = pq.read_table(base / s["file"], columns=["id", "text", "embedding"])
        drop = gone.get(s["file"], set())
        emb = table.column("embedding").combine_chunks()
        arr = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), -1)
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
