"""The resumable bookkeeping every database sink shares (pgvector, libSQL).

A sink writes a run's committed shard rows chunk by chunk; after each chunk the database
committed, the run's section in run.json (:class:`embedbatch.runs.SinkState`) records the rows
written per shard and the totals in one atomic write, so a crash resumes at the first
uncommitted chunk and never counts a row twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from embedbatch.runs import Run, SinkState
from embedbatch.store.shards import ChunkColumns, iter_run_chunks
from embedbatch.workspace import Workspace, crash_point

__all__ = ["SinkProgress"]


class SinkProgress:
    """The resumable bookkeeping of one target of a run (``run.state.pg`` or ``.libsql``).

    Use: iterate :meth:`chunks` into the sink's writer, call :meth:`committed` after each chunk
    the database committed, :meth:`dropping` before dropping vector indexes for a bulk write,
    then :meth:`done` or :meth:`failed`. Each call that changes state saves run.json, so the
    caller must hold the run.

    Args:
        name: ``pg`` or ``libsql`` (the run.json section, and the crash point
            ``{name}_after_chunk`` tests stop at).
        chunk_rows: rows per chunk (the target's ``update_chunk_size``).
    """

    def __init__(self, ws: Workspace, run: Run, name: str, *, chunk_rows: int) -> None:
        self.ws, self.run, self.name, self.chunk_rows = ws, run, name, chunk_rows
        self.state: SinkState = getattr(run.state, name)
        self.progress: dict[str, int] = dict(self.state.progress)
        self._pending: list[tuple[str, int]] = []
        self._counted = 0

    def remaining_rows(self) -> int:
        """Rows of this run's shards not yet written to the target (for a progress bar)."""
        from embedbatch.store.manifest import Manifest

        rs = self.run.state
        total = 0
        for s in Manifest.load(self.ws, rs.model, rs.dataset).shards:
            if any(src.startswith(f"{rs.run_id}/") for src in s.get("sources", [])):
                total += max(0, int(s["rows"]) - self.progress.get(s["file"], 0))
        return total

    def chunks(self) -> Iterator[tuple[list[str], np.ndarray, list[str] | None]]:
        """``(ids, (n, dim) float32 vectors, texts or None)`` from the first row not written."""
        for ids, vecs, texts, _ in self.chunk_rows_with_parents(with_chunks=False):
            yield ids, vecs, texts

    def chunk_rows_with_parents(
        self, *, with_chunks: bool = True
    ) -> Iterator[tuple[list[str], np.ndarray, list[str], ChunkColumns | None]]:
        """:meth:`chunks` with each row's parent, chunk index and the parent's chunk count (the
        sinks' chunk mode)."""
        rs = self.run.state
        for shard, end, ids, vecs, texts, cols in iter_run_chunks(
            self.ws,
            rs.model,
            rs.dataset,
            rs.run_id,
            chunk_rows=self.chunk_rows,
            progress=self.progress,
            with_chunks=with_chunks,
        ):
            self._pending.append((shard, end))
            yield ids, vecs, texts, cols

    def committed(self, written: int) -> None:
        """The oldest chunk handed out is committed; ``written``: rows written so far in this
        pass. Rows are counted with their chunk's progress in one run.json write, so a crash
        and resume neither loses nor repeats them in the totals."""
        shard, end = self._pending.pop(0)
        self.progress[shard] = end
        self.state.progress = dict(self.progress)
        self.state.totals["written"] = self.state.totals.get("written", 0) + written - self._counted
        self._counted = written
        self.run.save()
        crash_point(f"{self.name}_after_chunk")

    def dropping(self, indexes: list[dict[str, str]]) -> None:
        """Vector indexes (``name``, ``definition``) are about to be dropped for a bulk write."""
        self.state.pending_indexes = list(indexes)
        self.run.save()

    def indexes_rebuilt(self) -> None:
        """The dropped indexes exist again (recreated after a crash, or rebuilt by the write)."""
        self.state.pending_indexes = []

    def done(self, report: Any, keys: tuple[str, ...]) -> None:
        """The pass wrote every row: add ``report``'s counters named in ``keys`` to the totals."""
        for key in keys:
            self.state.totals[key] = self.state.totals.get(key, 0) + int(getattr(report, key))
        self.state.totals.setdefault("written", 0)
        self.state.status = "done"
        self.state.error = None
        self.run.save()

    def failed(self, exc: BaseException) -> None:
        """Only the sink step failed: the shards are committed, the run stays open until a later
        ingest or run (with corrected flags) finishes it."""
        self.state.status = "failed"
        self.state.error = f"{type(exc).__name__}: {exc}"
        self.run.save()
