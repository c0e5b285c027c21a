"""The id index of a dataset: id → content hash → (shard, row), so that "is this row already
embedded with this text?" never re-reads and re-hashes the shards' texts.

On disk, one small Parquet file per shard, ``indexes/{model}/{dataset}/ids/shard-NNNNN.parquet``,
with the columns ``id`` (string), ``id_key`` (uint64: the first 8 bytes of blake2b(id)) and
``text_key`` (uint64: the first 8 bytes of sha256(text)), row for row as in the shard. The store
writes it at commit, beside the shard, before the manifest lists the shard; a lost file is
rebuilt from its shard (``verify --repair`` rebuilds all of them).

In memory, :class:`IdIndex` holds four arrays sorted by ``id_key`` (24 bytes a row): a
500,000-row dataset costs ~12 MB and a look-up is a binary search.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.store.manifest import Manifest
from embedbatch.workspace import Workspace, atomic_open

__all__ = ["INDEX_SCHEMA", "IdIndex", "build_shard_index", "id_key", "text_key", "write_shard_index"]

INDEX_SCHEMA = pa.schema([("id", pa.string()), ("id_key", pa.uint64()), ("text_key", pa.uint64())])


def id_key(record_id: str) -> int:
    """A record id's 64-bit key: the first 8 bytes of blake2b(id), little-endian."""
    return int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "little")


def text_key(text_sha256_hex: str) -> int:
    """A text's 64-bit content key from its hex sha256 (see :func:`records.text_sha256`)."""
    return int.from_bytes(bytes.fromhex(text_sha256_hex[:16]), "little")


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """``(n,)`` uint64 content keys of texts (sha256 of the UTF-8 text)."""
    out = np.empty(len(texts), np.uint64)
    for i, t in enumerate(texts):
        out[i] = int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:8], "little")
    return out


def write_shard_index(path: Path, ids: Sequence[str], tkeys: np.ndarray) -> None:
    """Write one shard's index file atomically.

    Args:
        ids: the shard's ids in row order.
        tkeys: ``(n,)`` uint64 content keys aligned with ``ids``.
    """
    ikeys = np.fromiter((id_key(r) for r in ids), np.uint64, count=len(ids))
    table = pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(ikeys, pa.uint64()), pa.array(tkeys, pa.uint64())],
        schema=INDEX_SCHEMA,
    )
    with atomic_open(path) as fh:
        pq.write_table(table, fh, compression="zstd", compression_level=1)


def build_shard_index(shard: Path, path: Path) -> None:
    """Rebuild one shard's index file from the shard's ``id`` and ``text`` columns."""
    table = pq.read_table(shard, columns=["id", "text"])
    write_shard_index(path, table.column("id").to_pylist(), text_keys(table.column("text").to_pylist()))


@dataclass
class IdIndex:
    """The current rows of a dataset by id (a superseded row is replaced by its newer one).

    Attributes:
        id_keys: ``(n,)`` uint64, sorted.
        text_keys: ``(n,)`` uint64 content keys, aligned with ``id_keys``.
        shard: ``(n,)`` int32 position in ``files``.
        row: ``(n,)`` int32 row within that shard.
        files: shard file names, in manifest order.
    """

    id_keys: np.ndarray
    text_keys: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    files: list[str]

    @classmethod
    def empty(cls) -> IdIndex:
        z = np.empty(0, np.uint64)
        return cls(z, z, np.empty(0, np.int32), np.empty(0, np.int32), [])

    @classmethod
    def load(cls, ws: Workspace, manifest: Manifest) -> IdIndex:
        """Read the index files of every shard the manifest lists; a missing one is rebuilt from
        its shard first. Cost: 16 bytes read per row, no text is touched."""
        if not manifest.shards:
            return cls.empty()
        base = ws.index_dir(manifest.model, manifest.dataset)
        shards = ws.shards_dir(manifest.model, manifest.dataset)
        ik, tk, sh, rw = [], [], [], []
        files = [s["file"] for s in manifest.shards]
        for n, name in enumerate(files):
            path = base / name
            if not path.exists():
                build_shard_index(shards / name, path)
            t = pq.read_table(path, columns=["id_key", "text_key"])
            ik.append(t.column("id_key").to_numpy())
            tk.append(t.column("text_key").to_numpy())
            sh.append(np.full(len(t), n, np.int32))
            rw.append(np.arange(len(t), dtype=np.int32))
        keys = np.concatenate(ik)
        order = np.argsort(keys, kind="stable")  # equal keys stay in manifest order: newest last
        keys = keys[order]
        keep = np.ones(len(keys), bool)
        keep[:-1] = keys[:-1] != keys[1:]  # the newest row of each id
        sel = order[keep]
        return cls(keys[keep], np.concatenate(tk)[sel], np.concatenate(sh)[sel], np.concatenate(rw)[sel], files)

    def __len__(self) -> int:
        return len(self.id_keys)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Positions of ``keys`` in the index, -1 where absent."""
        if not len(self.id_keys):
            return np.full(len(keys), -1, np.int64)
        pos = np.searchsorted(self.id_keys, keys)
        pos = np.minimum(pos, len(self.id_keys) - 1)
        return np.where(self.id_keys[pos] == keys, pos, -1)

    def has_ids(self, ids: Sequence[str]) -> np.ndarray:
        """``(len(ids),)`` bool: which ids have a current row."""
        keys = np.fromiter((id_key(r) for r in ids), np.uint64, count=len(ids))
        return self._find(keys) >= 0

    def contains(self, record_id: str, text_sha256_hex: str) -> bool:
        """True when ``record_id`` has a current row whose text has this sha256."""
        if not len(self.id_keys):
            return False
        k = np.uint64(id_key(record_id))
        i = int(np.searchsorted(self.id_keys, k))
        return i < len(self.id_keys) and self.id_keys[i] == k and int(self.text_keys[i]) == text_key(text_sha256_hex)

    def locate(self, record_id: str) -> tuple[str, int] | None:
        """(shard file, row) of the id's current row, or None."""
        i = int(self._find(np.asarray([id_key(record_id)], np.uint64))[0])
        return None if i < 0 else (self.files[int(self.shard[i])], int(self.row[i]))
