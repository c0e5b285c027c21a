"""Rows streamed into a dataset by an engine that embeds as it goes (local, realtime).

:class:`StreamCommitter` writes records with their vectors into shards of one run and commits
each full shard through :meth:`DatasetStore.commit` (the commit point); :meth:`commit` also
commits a partly filled shard, which the realtime engine does every few seconds so that a crash
loses little paid work. Rows are visible once committed, never before.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from embedbatch.aggregate import ChunkAggregator, is_aggregated
from embedbatch.errors import StateError
from embedbatch.records import Record
from embedbatch.runs import RunState
from embedbatch.store.dataset import DatasetStore
from embedbatch.workspace import crash_point

__all__ = ["StreamCommitter"]


class StreamCommitter:
    """Shards of one run, each committed when full (or when :meth:`commit` is called).

    Args:
        store: the dataset.
        state: the run (its id, model, source and git sha go into the rows and the manifest).
        kind: the engine (``local``, ``realtime``): names each commit ``{run_id}/{kind}-NNNNN``.
        dim: vector dimension (None: from the first write).
        storage: the writer's ``dtype``/``keep_float``/``truncate_dim``
            (:meth:`DatasetStore.storage`; default float32).
        rows_per_shard: rows per shard.

    Attributes:
        rows: rows written (committed or not); committed_rows: rows committed.
        shards: file names of the committed shards.
    """

    def __init__(
        self,
        store: DatasetStore,
        state: RunState,
        *,
        kind: str,
        dim: int | None,
        storage: dict[str, Any] | None = None,
        rows_per_shard: int = 100_000,
    ) -> None:
        self.store = store
        self.state = state
        self.kind = kind
        self.rows_per_shard = rows_per_shard
        self.writer = store.writer(dim=dim, rows_per_shard=rows_per_shard, git_sha=state.git_sha, **(storage or {}))
        self.rows = 0
        self.committed_rows = 0
        self.commits = 0
        self.shards: list[str] = []
        self.last_commit = time.monotonic()
        self.aggregator = ChunkAggregator()
        self._held: dict[str, list[Record]] = {}  # document id → its chunks received so far

    def add(self, records: Sequence[Record], vectors: np.ndarray) -> None:
        """Write ``records`` with their ``(n, dim) float32`` vectors, committing every full shard.
        Chunks of ``--chunk-aggregate`` are held until their document is complete, then
        written as one row (see :mod:`embedbatch.aggregate`).

        Raises:
            StateError: the vectors' dimension differs from the dataset's (at commit).
        """
        marks = [is_aggregated(r.metadata) for r in records]  # one look at each row
        if any(marks):
            records, vectors = self._aggregate(records, vectors, marks)
        self._write(records, vectors)

    def _aggregate(
        self, records: Sequence[Record], vectors: np.ndarray, marks: list[bool]
    ) -> tuple[list[Record], np.ndarray]:
        """Ordinary rows as they are, then the documents these chunks completed."""
        chunk = [i for i, m in enumerate(marks) if m]
        plain = [i for i, m in enumerate(marks) if not m]
        for i in chunk:
            self._held.setdefault(str(records[i].metadata["chunk"]["parent_id"]), []).append(records[i])
        ids, texts, metas, splits, vecs = self.aggregator.add(
            [records[i].id for i in chunk],
            [records[i].metadata for i in chunk],
            [records[i].split for i in chunk],
            np.asarray(vectors, np.float32)[chunk],
        )
        rs = self.state
        out = [records[i] for i in plain]
        for pid, text, meta, split in zip(ids, texts, metas, splits, strict=True):
            self._held.pop(pid, None)
            out.append(Record(pid, rs.source, rs.dataset, split, text, 0, meta))
        return out, np.concatenate([np.asarray(vectors, np.float32)[plain], vecs]) if plain else vecs

    def incomplete(self) -> list[Record]:
        """The chunks held for documents that are still partial (a chunk of theirs failed or
        never came): the caller reports them failed, so a retry sends the whole document."""
        return [r for held in self._held.values() for r in held]

    def check_complete(self) -> None:
        """For an engine whose every row is embedded or the run fails (local): no document may
        be left partial.

        Raises:
            StateError: documents whose chunks did not all arrive (named, up to 5).
        """
        if self._held:
            names = ", ".join(list(self._held)[:5])
            raise StateError(f"{len(self._held)} document(s) lack chunk vectors at the end of the run: {names}")

    def _write(self, records: Sequence[Record], vectors: np.ndarray) -> None:
        rs = self.state
        start = 0
        while start < len(records):
            room = self.rows_per_shard - self.writer.rows_in_open_shard
            part = records[start : start + room]
            self.writer.write(
                ids=[r.id for r in part],
                texts=[r.text for r in part],
                metadata=[orjson.dumps(r.metadata).decode() for r in part],
                splits=[r.split for r in part],
                vectors=np.asarray(vectors[start : start + len(part)], dtype=np.float32),
                source=rs.source,
                dataset=rs.dataset,
                model=rs.model,
                run_id=rs.run_id,
            )
            start += len(part)
            self.rows += len(part)
            if self.writer.rows_in_open_shard >= self.rows_per_shard:
                self.commit()

    @property
    def pending(self) -> int:
        """Rows written and not committed yet."""
        return self.rows - self.committed_rows

    def commit(self) -> list[str]:
        """Commit what is written and not committed yet; returns the new shard files."""
        if not self.pending:
            return []
        rs = self.state
        self.commits += 1
        self.writer.add_source(f"{rs.run_id}/{self.kind}-{self.commits:05d}")
        crash_point(f"{self.kind}_before_commit")
        entries = self.store.commit(
            self.writer, run_id=rs.run_id, run_info={"created_at": rs.created_at, "kind": self.kind}
        )
        files = [e["file"] for e in entries]
        self.shards += files
        self.committed_rows = self.rows
        self.last_commit = time.monotonic()
        crash_point(f"{self.kind}_after_commit")
        return files

    def abort(self) -> None:
        """Drop what is written and not committed (the rows are embedded again on resume)."""
        self.writer.abort()
