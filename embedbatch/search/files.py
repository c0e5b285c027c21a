"""Reading an index's files without loading them: the row map one row group at a time
(:class:`RowMap`), and a flat Faiss index scanned from its file (:class:`FlatFile`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedbatch.errors import StateError

__all__ = ["FLAT_BLOCK_BYTES", "FlatFile", "RowMap", "read_header"]

FLAT_BLOCK_BYTES = 8 << 20  # a flat index is scanned from its file this many bytes at a time


def read_header(path: Path) -> tuple[bytes, int, int] | None:
    """A Faiss index file's header without loading the index: four-character code, ``d``
    (int32) and ``ntotal`` (int64), which every index type Faiss writes starts with. None when
    the file is too short or not a Faiss index."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 16 or not head[:4].isascii():
        return None
    return head[:4], int(np.frombuffer(head[4:8], "<i4")[0]), int(np.frombuffer(head[8:16], "<i8")[0])


class RowMap:
    """An index's row map (index row → dataset, shard, row in shard, id), read one row group
    at a time as positions are asked for: a search reads the groups that hold its hits, never
    the whole map (30M rows are ~1 GB of strings in memory)."""

    def __init__(self, path: Path) -> None:
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        self._bounds = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._groups: dict[int, list[tuple[str, str, int, str]]] = {}

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def at(self, position: int) -> tuple[str, str, int, str]:
        """``(dataset, shard file, row in shard, id)`` of an index row."""
        g = int(np.searchsorted(self._bounds, position, side="right")) - 1
        if g not in self._groups:
            names = ["dataset", "shard", "row", "id"]
            t = self._file.read_row_group(g, columns=names, use_threads=False)
            self._groups[g] = list(zip(*(t.column(c).to_pylist() for c in names), strict=True))
        return self._groups[g][position - int(self._bounds[g])]


class FlatFile:
    """A flat Faiss index (``IndexFlatIP``/``IndexFlatL2``) searched straight from its file,
    :data:`FLAT_BLOCK_BYTES` at a time into one reused buffer, with a running top-k: memory is
    one block whatever the index's size, and nothing is loaded first (Faiss's ``read_index``
    copies the whole file: 30M 8-d vectors are 960 MB). Same answers as ``IndexFlat.search``.

    File layout (Faiss 1.7-1.15 ``write_index``, read 2026-12-08 from ``faiss/impl/index_write.cpp``):
    four-character code ``IxFI`` (inner product) or ``IxF2`` (L2), ``d`` int32, ``ntotal``
    int64, two int64 and a bool and the metric int32, then the codes as a uint64 count of
    float32 values followed by the ``(ntotal, d)`` float32 vectors, last in the file.
    """

    def __init__(self, path: Path, *, l2: bool, d: int, ntotal: int, offset: int) -> None:
        self.path, self.l2, self.d, self.ntotal, self.offset = path, l2, d, ntotal, offset

    @classmethod
    def open(cls, path: Path) -> FlatFile | None:
        """The file as a :class:`FlatFile`, or None when it is not a flat index laid out as
        above (then Faiss reads it)."""
        header = read_header(path)
        if header is None or header[0] not in (b"IxFI", b"IxF2"):
            return None
        code, d, ntotal = header
        with open(path, "rb") as fh:
            offset = os.fstat(fh.fileno()).st_size - ntotal * d * 4
            if d <= 0 or ntotal < 0 or offset < 24:
                return None
            fh.seek(offset - 8)
            if int(np.frombuffer(fh.read(8), "<u8")[0]) != ntotal * d:
                return None
        return cls(path, l2=code == b"IxF2", d=d, ntotal=ntotal, offset=offset)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Faiss's ``search`` for one query ``(1, d)`` float32: ``((1, k) float32, (1, k) int64)``,
        inner products descending (or squared L2 distances ascending), -1 past ``ntotal``."""
        k = max(0, min(k, self.ntotal))
        if k == 0:
            return np.empty((1, 0), np.float32), np.empty((1, 0), np.int64)
        query = np.ascontiguousarray(q[0], np.float32)
        block = max(1, FLAT_BLOCK_BYTES // (self.d * 4))
        buf = np.empty(block * self.d, np.float32)
        best_s, best_p = np.empty(0, np.float32), np.empty(0, np.int64)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            for start in range(0, self.ntotal, block):
                n = min(block, self.ntotal - start)
                view = memoryview(buf[: n * self.d].data).cast("B")
                got = 0
                while got < len(view):
                    read = fh.readinto(view[got:])
                    if not read:
                        raise StateError(f"{self.path}: ends before its {self.ntotal:,} vectors")
                    got += read
                x = buf[: n * self.d].reshape(n, self.d)
                # higher is nearer inside the loop: the inner product, or minus the squared distance
                s = x @ query if not self.l2 else 2 * (x @ query) - np.einsum("ij,ij->i", x, x) - query @ query
                # only scores above the running k-th best can enter: most blocks add nothing
                local = np.flatnonzero(s > best_s.min()) if len(best_s) == k else np.arange(n)
                if len(local) == 0:
                    continue
                s, p = np.concatenate([best_s, s[local]]), np.concatenate([best_p, local + start])
                keep = np.argpartition(-s, k - 1)[:k] if len(s) > k else np.arange(len(s))
                best_s, best_p = s[keep], p[keep]
        order = np.lexsort((best_p, -best_s))
        scores, positions = best_s[order], best_p[order]
        return (-scores if self.l2 else scores)[None, :], positions[None, :]
