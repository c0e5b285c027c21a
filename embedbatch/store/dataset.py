"""The dataset store: the one writer of a (model, dataset)'s shards, manifest and id index.

Every engine writes rows through a :class:`ShardWriter` that :meth:`DatasetStore.writer` gives
it. The writer only *stages* shards: temp files in the shards folder, each held open under an
``flock`` while its process lives. :meth:`DatasetStore.commit` then takes the dataset lock and,
in this order:

1. reloads the manifest (another process may have committed since) and removes orphans:
   ``shard-*.parquet`` files the manifest does not list (renamed by a process that died before
   its manifest write) and staged temp files whose ``flock`` is free (their writer died);
2. numbers the staged shards after the last listed one and renames them into place;
3. writes each shard's id index file and lists ids that replace older rows (``supersedes``);
4. writes the manifest (one atomic rename: the commit point);

so a crash anywhere leaves either the old dataset or the new one, never a half. Shard numbers,
orphan cleanup, the manifest and the id index are touched only under the lock; planning also
holds it while it reads what is embedded or in flight and writes its run, so two submits never
plan the same row.

Lock order: run lock, then dataset lock; nothing takes a run lock while holding a dataset lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import structlog

from embedbatch._version import __version__
from embedbatch.errors import StateError
from embedbatch.store.index import IdIndex, write_shard_index
from embedbatch.store.manifest import Manifest, file_sha256
from embedbatch.store.shards import ShardWriter, StagedShard, embedding_schema
from embedbatch.workspace import Workspace, atomic_open, crash_point, file_lock, fsync_dir, utc_now

__all__ = ["ALL_COLUMNS", "DatasetStore"]

ALL_COLUMNS = ["id", "source", "dataset", "split", "text", "metadata", "embedding", "model", "created_at", "run_id"]

log = structlog.get_logger(__name__)


class DatasetStore:
    """Shards, manifest and id index of one (model, dataset), and the lock that guards them.

    Args:
        ws: the workspace (its ``lock_timeout_s`` bounds how long :meth:`locked` waits).
        model / dataset: path components (checked).
    """

    def __init__(self, ws: Workspace, model: str, dataset: str) -> None:
        self.ws = ws
        self.model = model
        self.dataset = dataset
        self.shards_dir = ws.shards_dir(model, dataset)
        self.index_dir = ws.index_dir(model, dataset)
        self.lock_path = ws.manifest_path(model, dataset).with_name("dataset.lock")
        self._held = 0

    @contextlib.contextmanager
    def locked(self, purpose: str) -> Iterator[None]:
        """Hold the dataset lock (re-entrant within this object), waiting up to the workspace's
        ``lock_timeout_s`` for another process to release it.

        Raises:
            LockedError: still held by another process after the timeout (names its pid and purpose).
        """
        if self._held:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
            return
        with file_lock(
            self.lock_path,
            what=f"dataset {self.model}/{self.dataset}",
            timeout_s=self.ws.lock_timeout_s,
            purpose=purpose,
        ):
            self._held = 1
            try:
                yield
            finally:
                self._held = 0

    def engine_lock_path(self, kind: str) -> Path:
        return self.shards_dir.parent / f".{self.dataset}.{kind}.lock"

    def engine_lock(self, kind: str) -> contextlib.AbstractContextManager[None]:
        """The lock a streaming engine (``local``, ``realtime``) holds for a whole run of this
        dataset: one such run at a time; planning a Batch API run refuses while a realtime run
        holds it (its rows in flight are known only to it).

        Raises:
            LockedError: another run of that engine holds it (at once, no waiting).
        """
        return file_lock(self.engine_lock_path(kind), what=f"{kind} run of {self.dataset}", purpose=kind)

    def engine_running(self, kind: str) -> bool:
        """True while a live process holds :meth:`engine_lock` for ``kind``."""
        path = self.engine_lock_path(kind)
        return path.exists() and not _unlocked(path)

    def manifest(self) -> Manifest:
        """A snapshot of the manifest (atomic file: no lock needed to read)."""
        return Manifest.load(self.ws, self.model, self.dataset)

    def id_index(self, manifest: Manifest | None = None) -> IdIndex:
        """The id index of the committed rows (see :mod:`embedbatch.store.index`)."""
        return IdIndex.load(self.ws, manifest or self.manifest())

    def get(
        self, ids: list[str], *, columns: list[str] | None = None, index: IdIndex | None = None
    ) -> list[dict[str, Any] | None]:
        """The current rows of ``ids`` (None where absent), through the id index: a binary
        search, then one row group (≤ 16,384 rows) read per shard holding them.

        Args:
            columns: shard columns to return (default: all); ``embedding`` comes back as a
                ``(dim,)`` float32 array.
            index: an already loaded id index (repeated look-ups).
        """
        from embedbatch.store.shards import read_rows_at

        index = index if index is not None else self.id_index()
        cols = list(dict.fromkeys(["id", *(columns or ALL_COLUMNS)]))
        found: dict[str, list[tuple[int, int]]] = {}
        out: list[dict[str, Any] | None] = [None] * len(ids)
        for i, rid in enumerate(ids):
            loc = index.locate(rid)
            if loc is not None:
                found.setdefault(loc[0], []).append((i, loc[1]))
        for file, places in found.items():
            rows = read_rows_at(self.shards_dir / file, [r for _, r in places], cols)
            for (i, _), row in zip(places, rows, strict=True):
                if "embedding" in row and row["embedding"] is not None:
                    row["embedding"] = np.asarray(row["embedding"], dtype=np.float32)
                row["shard"] = file
                out[i] = row
        return out

    def chunks_of(self, parent: str, *, template: str = "{parent_id}#{k}") -> list[dict[str, Any]]:
        """A document's current chunks, in order (ids from ``template``, numbered from 0 without
        gaps): ``{"chunk_index", "id", "start", "end", "count", "text"}``; empty when none.
        Cost: one id-index look-up per chunk and one row group read per shard."""
        import orjson

        out: list[dict[str, Any]] = []
        index = self.id_index()
        try:
            k = 0
            while True:
                ids = [template.format(parent_id=parent, k=j) for j in range(k, k + 16)]
                rows = self.get(ids, columns=["text", "metadata"], index=index)
                for j, row in enumerate(rows, start=k):
                    if row is None:
                        return out
                    chunk = orjson.loads(row["metadata"] or "{}").get("chunk") or {}
                    out.append(
                        {
                            "chunk_index": j,
                            "id": row["id"],
                            "start": chunk.get("start"),
                            "end": chunk.get("end"),
                            "count": chunk.get("count"),
                            "text": row["text"],
                        }
                    )
                k += 16
        finally:
            index.close()

    def writer(
        self,
        *,
        dim: int | None,
        dtype: str = "float32",
        rows_per_shard: int = 100_000,
        git_sha: str | None = None,
        keep_float: bool = False,
        truncate_dim: int | None = None,
    ) -> ShardWriter:
        """A writer that stages shards for :meth:`commit` (nothing is visible before it).

        Args:
            dim: embedding dimension, or None to take it from the first write.
            dtype: ``float32``, ``float16``, ``int8`` or ``binary`` storage; int8 uses the
                dataset's calibrated ranges when it has them (:attr:`Manifest.quantization`).
            keep_float: int8/binary: keep the vectors as float16 beside them (for rescoring).
            truncate_dim: cut each vector to its first N components, re-normalised.
        """
        from embedbatch.store.quant import codec_from_json

        q = self.manifest().quantization if dtype == "int8" else None
        codec = codec_from_json(q) if q else None
        return ShardWriter(
            self.shards_dir,
            dim=dim,
            dtype=dtype,
            rows_per_shard=rows_per_shard,
            git_sha=git_sha,
            codec=codec,
            keep_float=keep_float,
            truncate_dim=truncate_dim,
        )

    def storage(self, cfg: Any, run_args: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`writer`'s ``dtype``, ``keep_float`` and ``truncate_dim`` for a run: what the run
        recorded when it was planned (``--store-dtype``, ``--keep-float``, ``--truncate-dim``),
        else the dataset's own compressed storage or cut (a cron ``poll`` without flags keeps
        it), else ``cfg`` (:class:`~embedbatch.config.IngestConfig`)."""
        args = run_args or {}
        m = self.manifest()
        compressed = m.dtype in ("int8", "binary") and m.rows > 0
        dtype = args.get("store_dtype") or (m.dtype if compressed else cfg.dtype)
        keep = args.get("keep_float") or (m.keep_float or "none" if compressed else cfg.keep_float)
        return {
            "dtype": dtype,
            "keep_float": keep == "float16",
            "truncate_dim": args.get("truncate_dim") or m.truncate_dim or cfg.truncate_dim,
        }

    def remove_orphans(self, manifest: Manifest) -> list[str]:
        """Delete unlisted shard files, dead writers' temp files and unlisted index files.

        Call under the lock. Returns the names removed.
        """
        removed: list[str] = []
        listed = {s["file"] for s in manifest.shards}
        if self.shards_dir.is_dir():
            for p in self.shards_dir.iterdir():
                if (p.name.startswith("shard-") and p.name not in listed) or (p.name.endswith(".tmp") and _unlocked(p)):
                    p.unlink()
                    removed.append(p.name)
        if self.index_dir.is_dir():
            for p in self.index_dir.iterdir():
                if p.name not in listed:
                    p.unlink()
        if removed:
            log.info("removed orphans", dataset=self.dataset, files=removed)
        return removed

    def commit(
        self,
        writer: ShardWriter,
        *,
        run_id: str,
        run_info: dict[str, Any],
        sampling: dict[str, Any] | None = None,
        deletes: Sequence[str] = (),
        deletes_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """List the writer's staged shards in the manifest, under the dataset lock (module doc).

        Args:
            run_info: recorded under ``runs[run_id]`` (``created_at``, ``kind``).
            sampling: the run's sampling description, recorded once per distinct value.
            deletes: ids to take out of the current view with this commit (tombstones): those
                the dataset holds (and this commit does not write) are listed under the last new
                entry's ``deletes``, or a zero-row shard's when no rows come with them.
            deletes_key: recorded in that entry's ``sources``, so a caller can tell its
                deletions were committed (exactly once, like a batch).

        Returns:
            The new manifest entries (may be empty: the run is still recorded).

        Raises:
            StateError: the staged vectors' dimension differs from the dataset's.
            LockedError: the lock stayed busy past the timeout (the staged shards are discarded).
        """
        writer.close_shard()
        staged = writer.take_staged()
        try:
            with self.locked(f"commit {run_id}"):
                return self._commit_locked(
                    staged,
                    writer,
                    run_id=run_id,
                    run_info=run_info,
                    sampling=sampling,
                    deletes=deletes,
                    deletes_key=deletes_key,
                )
        finally:
            for st in staged:
                st.release()

    def _commit_locked(
        self,
        staged: list[StagedShard],
        writer: ShardWriter,
        *,
        run_id: str,
        run_info: dict[str, Any],
        sampling: dict[str, Any] | None,
        deletes: Sequence[str] = (),
        deletes_key: str | None = None,
    ) -> list[dict[str, Any]]:
        manifest = self.manifest()
        self.remove_orphans(manifest)
        if staged and manifest.dimensions is not None and writer.dim != manifest.dimensions:
            raise StateError(
                f"{writer.dim}-d vectors cannot join dataset {self.model}/{self.dataset}, "
                f"whose shards are {manifest.dimensions}-d"
            )
        index = self.id_index(manifest) if (staged or deletes) and manifest.shards else IdIndex.empty()
        used = [int(s["file"][6:11]) for s in manifest.shards]
        number = (max(used) + 1) if used else 1
        entries: list[dict[str, Any]] = []
        new_ids: set[str] = set()
        for st in staged:
            name = f"shard-{number:05d}.parquet"
            number += 1
            final = self.shards_dir / name
            os.replace(st.tmp, final)
            write_shard_index(self.index_dir / name, st.ids, st.text_keys)
            again = index.has_ids(st.ids) if len(index) else np.zeros(len(st.ids), bool)
            supersedes = [rid for rid, old in zip(st.ids, again.tolist(), strict=True) if old or rid in new_ids]
            new_ids.update(st.ids)
            entry = {"file": name, **st.entry}
            if supersedes:
                entry["supersedes"] = supersedes
            entries.append(entry)
        gone = [r for r, held in zip(deletes, index.has_ids(list(deletes)).tolist(), strict=True) if held]
        gone = [r for r in dict.fromkeys(gone) if r not in new_ids]
        if gone:
            if not entries:
                entries.append(self._empty_shard(f"shard-{number:05d}.parquet", manifest))
            entries[-1]["deletes"] = gone
            if deletes_key:
                entries[-1]["sources"] = [*entries[-1].get("sources", []), deletes_key]
        if entries:
            fsync_dir(self.shards_dir)
        crash_point("store_before_manifest")
        manifest.shards.extend(entries)
        if staged:
            manifest.dimensions = writer.dim
            manifest.dtype = writer.dtype
            if writer.dtype == "int8" and manifest.quantization is None and writer.codec is not None:
                manifest.quantization = writer.codec.to_json()  # the ranges every later writer uses
            manifest.keep_float = "float16" if writer.keep_float else None
            manifest.truncate_dim = manifest.truncate_dim or writer.truncate_dim
        manifest.runs.setdefault(run_id, run_info)
        if sampling and sampling not in manifest.sampling:
            manifest.sampling.append(sampling)
        manifest.save()
        crash_point("store_before_id_db")
        if entries:  # the point-look-up index follows the manifest (a lag is covered by readers)
            IdIndex.catch_up(self.ws, manifest)
        return entries

    def delete(self, ids: Sequence[str], *, key: str, run_id: str, run_info: dict[str, Any]) -> list[str]:
        """Take ``ids`` out of the current view (tombstones, a zero-row shard's ``deletes``),
        exactly once per ``key``: a key the manifest already lists deletes nothing again.
        Ids the dataset does not hold are ignored. Returns the ids deleted.

        Raises:
            LockedError: the dataset lock stayed busy past the timeout.
        """
        if not ids:
            return []
        with self.locked(f"delete {key}"):
            if key in self.manifest().sources():
                return []
            writer = self.writer(dim=None)
            entries = self._commit_locked(
                [], writer, run_id=run_id, run_info=run_info, sampling=None, deletes=ids, deletes_key=key
            )
        return list(entries[-1].get("deletes", [])) if entries else []

    def _empty_shard(self, name: str, manifest: Manifest) -> dict[str, Any]:
        """A zero-row shard (the dataset's schema) to carry deletions alone; its entry."""
        path = self.shards_dir / name
        empty = embedding_schema(int(manifest.dimensions or 1), manifest.dtype).empty_table()
        with atomic_open(path) as fh:
            pq.write_table(empty, fh)
        write_shard_index(self.index_dir / name, [], np.empty(0, np.uint64))
        return {
            "file": name,
            "sha256": file_sha256(path),
            "bytes": path.stat().st_size,
            "rows": 0,
            "dim": manifest.dimensions,
            "dtype": manifest.dtype,
            "min_norm": None,
            "max_norm": None,
            "created_at": utc_now().isoformat(),
            "tool_version": __version__,
            "sources": [],
        }

    def record_run(self, run_id: str, run_info: dict[str, Any], *, sampling: dict[str, Any] | None) -> None:
        """Record a run and its sampling in the manifest without adding shards."""
        with self.locked(f"record {run_id}"):
            manifest = self.manifest()
            manifest.runs.setdefault(run_id, run_info)
            if sampling and sampling not in manifest.sampling:
                manifest.sampling.append(sampling)
            manifest.save()

    def repair_index(self) -> int:
        """Rebuild every shard's id index file from the shards and the look-up database from
        them (``verify --repair``), under the lock. Returns the number of files written."""
        from embedbatch.store.index import build_shard_index

        with self.locked("repair index"):
            manifest = self.manifest()
            self.remove_orphans(manifest)
            for s in manifest.shards:
                build_shard_index(self.shards_dir / s["file"], self.index_dir / s["file"])
            IdIndex.catch_up(self.ws, manifest, rebuild=True)
            return len(manifest.shards)


def _unlocked(path: Path) -> bool:
    """True when no live process holds an ``flock`` on ``path`` (its writer is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
