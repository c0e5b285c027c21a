"""The id index of a dataset: id → content hash → (shard, row), so that "is this row already
embedded with this text?" never re-reads and re-hashes the shards' texts, and never loads every
id of the dataset either.

Two layers on disk, both under ``indexes/{model}/{dataset}/``:

- ``ids/shard-NNNNN.parquet``, one per shard: ``id`` (string), ``id_key`` (uint64: the first 8
  bytes of blake2b(id)) and ``text_key`` (uint64: the first 8 bytes of sha256(text)), row for
  row as in the shard. The store writes it at commit, beside the shard, before the manifest
  lists the shard: it is the durable record (a lost file is rebuilt from its shard).
- ``ids.sqlite``, the point-look-up index derived from them: one row per current id
  (``id_key`` primary key → ``text_key``, shard position, row), and how many of the manifest's
  shards it has taken in. The dataset's writer brings it up to date under the dataset lock after
  each commit (:meth:`IdIndex.catch_up`, one transaction); ``verify --repair`` rebuilds it.

:class:`IdIndex` answers from the database, plus an in-memory overlay (:class:`ShardKeys`) of
the shards the database has not taken in yet (a process killed between the manifest and the
database, or a dataset written before the database existed): a look-up costs one indexed read,
whatever the dataset's size, and opening it reads no id.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.store.manifest import Manifest
from embedbatch.workspace import Workspace, atomic_open

__all__ = ["INDEX_SCHEMA", "IdIndex", "ShardKeys", "build_shard_index", "id_key", "text_key", "write_shard_index"]

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
class ShardKeys:
    """The current rows of some of a dataset's shards by id, in memory (a superseded row is
    replaced by its newer one): the overlay of :class:`IdIndex` for shards its database has not
    taken in yet.

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
    def empty(cls) -> ShardKeys:
        z = np.empty(0, np.uint64)
        return cls(z, z, np.empty(0, np.int32), np.empty(0, np.int32), [])

    @classmethod
    def load(cls, ws: Workspace, manifest: Manifest, *, start: int = 0) -> ShardKeys:
        """Read the index files of the manifest's shards from position ``start`` on; a missing
        one is rebuilt from its shard first. Cost: 16 bytes read per row, no text is touched."""
        if len(manifest.shards) <= start:
            return cls.empty()
        base = ws.index_dir(manifest.model, manifest.dataset)
        shards = ws.shards_dir(manifest.model, manifest.dataset)
        ik, tk, sh, rw = [], [], [], []
        files = [s["file"] for s in manifest.shards]
        for n, name in enumerate(files):
            if n < start:
                continue
            path = base / name
            if not path.exists():
                build_shard_index(shards / name, path)
            t = pq.read_table(path, columns=["id_key", "text_key"])
            ik.append(t.column("id_key").to_numpy())
            tk.append(t.column("text_key").to_numpy())
            sh.append(np.full(len(t), n, np.int32))
            rw.append(np.arange(len(t), dtype=np.int32))
            gone = manifest.shards[n].get("deletes", [])
            if gone:  # tombstones, after the shard's rows: shard -1 hides older rows of the id
                ik.append(np.fromiter((id_key(r) for r in gone), np.uint64, count=len(gone)))
                tk.append(np.zeros(len(gone), np.uint64))
                sh.append(np.full(len(gone), -1, np.int32))
                rw.append(np.full(len(gone), -1, np.int32))
        keys = np.concatenate(ik)
        order = np.argsort(keys, kind="stable")  # equal keys stay in manifest order: newest last
        keys = keys[order]
        keep = np.ones(len(keys), bool)
        keep[:-1] = keys[:-1] != keys[1:]  # the newest row of each id
        sel = order[keep]
        return cls(keys[keep], np.concatenate(tk)[sel], np.concatenate(sh)[sel], np.concatenate(rw)[sel], files)

    # An id whose newest entry here is a tombstone (shard -1) is absent, whatever older shards
    # (or the database) hold.

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
        """``(len(ids),)`` bool: which ids have a current row (here)."""
        keys = np.fromiter((id_key(r) for r in ids), np.uint64, count=len(ids))
        pos = self._find(keys)
        return (pos >= 0) & (self.shard[np.maximum(pos, 0)] >= 0) if len(self.shard) else pos >= 0

    def find(self, key: int) -> tuple[int, int, int] | None:
        """``(text_key, shard position, row)`` of the id with this 64-bit key, or None; a deleted
        id gives shard position -1."""
        if not len(self.id_keys):
            return None
        k = np.uint64(key)
        i = int(np.searchsorted(self.id_keys, k))
        if i >= len(self.id_keys) or self.id_keys[i] != k:
            return None
        return int(self.text_keys[i]), int(self.shard[i]), int(self.row[i])


_LOOKUP_CHUNK = 500  # ids per "IN (...)" query (SQLite's default limit is 32,766 variables)


def _signed(key: int) -> int:
    """A uint64 key as SQLite's signed 64-bit INTEGER."""
    return key - (1 << 64) if key >= (1 << 63) else key


def _files_digest(files: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def db_path(ws: Workspace, model: str, dataset: str) -> Path:
    """``indexes/{model}/{dataset}/ids.sqlite``."""
    return ws.index_dir(model, dataset).with_name("ids.sqlite")


@contextlib.contextmanager
def _connect(path: Path, *, write: bool) -> Iterator[sqlite3.Connection]:
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=600)
        conn.execute("PRAGMA journal_mode=WAL")  # readers are never blocked by a commit
        conn.execute("PRAGMA synchronous=NORMAL")  # derived data: a lost last commit is redone
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ids (id_key INTEGER PRIMARY KEY, text_key INTEGER NOT NULL, "
            "shard INTEGER NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    else:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=600)
    try:
        yield conn
    finally:
        conn.close()


def _applied(conn: sqlite3.Connection, files: Sequence[str]) -> int:
    """How many of the manifest's first shards the database holds (0 when it disagrees)."""
    try:
        meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
    except sqlite3.DatabaseError:
        return 0
    n = int(meta.get("shards", 0))
    if n > len(files) or meta.get("files_sha256") != _files_digest(files[:n]):
        return 0
    return n


class IdIndex:
    """The current rows of a dataset by id, answered on disk (module doc): ``ids.sqlite`` for
    the shards it has taken in, an in-memory :class:`ShardKeys` for the rest.

    Opening costs one small read (and the overlay's shards, normally none); each look-up is one
    indexed read. ``len()`` is the manifest's count of current rows.
    """

    def __init__(self, conn: sqlite3.Connection | None, overlay: ShardKeys, files: list[str], rows: int) -> None:
        self._conn = conn
        self._overlay = overlay
        self.files = files
        self._rows = rows

    @classmethod
    def empty(cls) -> IdIndex:
        return cls(None, ShardKeys.empty(), [], 0)

    @classmethod
    def load(cls, ws: Workspace, manifest: Manifest) -> IdIndex:
        """The index of ``manifest``'s shards (a snapshot: shards committed later are not seen)."""
        files = [s["file"] for s in manifest.shards]
        if not files:
            return cls.empty()
        path = db_path(ws, manifest.model, manifest.dataset)
        conn = None
        applied = 0
        if path.exists():
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=600, check_same_thread=False)
            applied = _applied(conn, files)
            if not applied:
                conn.close()
                conn = None
        return cls(conn, ShardKeys.load(ws, manifest, start=applied), files, manifest.current_rows)

    @staticmethod
    def catch_up(ws: Workspace, manifest: Manifest, *, rebuild: bool = False) -> int:
        """Take the manifest's shards the database lacks into it, oldest first (a newer row of an
        id replaces the older one), in one transaction. Call under the dataset lock (the only
        writer). Returns the shards taken in.

        Args:
            rebuild: start from an empty database (``verify --repair``).
        """
        files = [s["file"] for s in manifest.shards]
        path = db_path(ws, manifest.model, manifest.dataset)
        if rebuild:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        if not files and not path.exists():
            return 0
        base = ws.index_dir(manifest.model, manifest.dataset)
        shards = ws.shards_dir(manifest.model, manifest.dataset)
        with _connect(path, write=True) as conn:
            start = _applied(conn, files)
            if start == 0:
                conn.execute("DELETE FROM ids")
            with conn:  # one transaction: the rows and the count of shards move together
                for n in range(start, len(files)):
                    idx = base / files[n]
                    if not idx.exists():
                        build_shard_index(shards / files[n], idx)
                    t = pq.read_table(idx, columns=["id_key", "text_key"])
                    keys = t.column("id_key").to_numpy().view(np.int64).tolist()
                    tks = t.column("text_key").to_numpy().view(np.int64).tolist()
                    conn.executemany(
                        "INSERT OR REPLACE INTO ids VALUES (?, ?, ?, ?)",
                        zip(keys, tks, [n] * len(keys), range(len(keys)), strict=True),
                    )
                    gone = manifest.shards[n].get("deletes", [])
                    conn.executemany("DELETE FROM ids WHERE id_key = ?", [(_signed(id_key(r)),) for r in gone])
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('shards', ?), ('files_sha256', ?)",
                    (str(len(files)), _files_digest(files)),
                )
        return len(files) - start

    def db_rows(self) -> int | None:
        """Ids in the database when it covers every shard of the snapshot (``verify``), else None.

        Raises:
            sqlite3.DatabaseError: the database is damaged.
        """
        if self._conn is None or len(self._overlay):
            return None
        (n,) = self._conn.execute("SELECT count(*) FROM ids").fetchone()
        return int(n)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __len__(self) -> int:
        return self._rows

    def _find(self, key: int) -> tuple[int, int, int] | None:
        """``(text_key, shard position, row)`` of the current row of the id with this key."""
        hit = self._overlay.find(key)
        if hit is not None or self._conn is None:
            return None if hit is None or hit[1] < 0 else hit  # shard -1: deleted after the database
        row = self._conn.execute("SELECT text_key, shard, row FROM ids WHERE id_key = ?", (_signed(key),)).fetchone()
        return None if row is None else (row[0] & 0xFFFFFFFFFFFFFFFF, row[1], row[2])

    def shard_positions(self, ids: Sequence[str]) -> np.ndarray:
        """``(len(ids),)`` int32: the manifest position of the shard holding each id's current
        row, -1 where absent. Batched: one query per 500 ids."""
        keys = np.fromiter((id_key(r) for r in ids), np.uint64, count=len(ids))
        found = self._overlay._find(keys)
        out = np.full(len(keys), -1, np.int32)
        hit = found >= 0
        out[hit] = self._overlay.shard[found[hit]]  # -1 for a tombstone: absent, the database not asked
        if self._conn is not None:
            rest = np.flatnonzero(found < 0)
            for lo in range(0, len(rest), _LOOKUP_CHUNK):
                part = rest[lo : lo + _LOOKUP_CHUNK]
                signed = keys[part].view(np.int64).tolist()
                marks = ",".join("?" * len(signed))
                query = f"SELECT id_key, shard FROM ids WHERE id_key IN ({marks})"
                where = dict(self._conn.execute(query, signed).fetchall())
                out[part] = [where.get(k, -1) for k in signed]
        return out

    def has_ids(self, ids: Sequence[str]) -> np.ndarray:
        """``(len(ids),)`` bool: which ids have a current row."""
        return self.shard_positions(ids) >= 0

    def contains(self, record_id: str, text_sha256_hex: str) -> bool:
        """True when ``record_id`` has a current row whose text has this sha256."""
        hit = self._find(id_key(record_id))
        return hit is not None and hit[0] == text_key(text_sha256_hex)

    def locate(self, record_id: str) -> tuple[str, int] | None:
        """(shard file, row) of the id's current row, or None."""
        hit = self._find(id_key(record_id))
        return None if hit is None else (self.files[hit[1]], hit[2])
