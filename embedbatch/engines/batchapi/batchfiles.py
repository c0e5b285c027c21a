"""Batch files: ``input.jsonl`` (what is uploaded) and ``records.parquet`` (what the API does not
carry back), written under the limits by one writer shared by planning and retry."""

from __future__ import annotations

import os
import shutil
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.aggregate import is_aggregated
from embedbatch.engines.batchapi.split import BatchSplitter
from embedbatch.records import Record
from embedbatch.runs import RECORDS_FILE, BatchState, read_record_ids, read_records_table
from embedbatch.workspace import utc_now

__all__ = ["PLAN_CHUNK_ROWS", "RECORDS_FILE", "BatchFileWriter", "BatchRecords", "read_record_ids"]

_SHARED_KEYS = ("fields", "truncated", "path")
_MISSING = object()
_SHARED_META_KEY = b"embedbatch_shared_metadata"


class BatchRecords:
    """A batch's ``records.parquet``: row for row with ``input.jsonl``, what the API does not
    carry back (split, provenance metadata, tokenizer count).

    Columns: ``id`` string, ``split`` string, ``n_tokens`` int64 (tokenizer tokens), ``line``
    int64 and ``metadata`` string. Most rows of a batch share their metadata but for the source
    line (same file, same fields, not truncated): such a row stores only ``line``, and the shared
    values are stored once in the file's key-value metadata. Any other row stores its whole
    metadata as JSON in ``metadata`` (and a null ``line``).

    Rows are appended on the planning hot path (list appends, no JSON per row) and the file is
    written once, when the batch closes: this halved the cost of planning against one JSON line
    per row (bench/plan.py).

    Args:
        shared: the metadata shared by the batch's rows (see :meth:`shared_from`).
    """

    __slots__ = ("_n_meta", "_shared3", "ids", "lines", "metadata", "n_tokens", "shared", "splits")

    def __init__(self, shared: dict[str, Any] | None = None) -> None:
        self.shared: dict[str, Any] = dict(shared or {})
        self.ids: list[str] = []
        self.splits: list[str | None] = []
        self.n_tokens: list[int] = []
        self.lines: list[int | None] = []
        self.metadata: list[Any] = []  # None (shared + line), a dict (appended) or JSON text (read)
        self._shared3 = tuple(self.shared.get(k, _MISSING) for k in _SHARED_KEYS)
        self._n_meta = len(self.shared) + 1

    @staticmethod
    def shared_from(metadata: dict[str, Any]) -> dict[str, Any]:
        """The part of a row's metadata that the rows of its batch share (file, fields, truncated)."""
        return {k: metadata[k] for k in _SHARED_KEYS if k in metadata}

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, rid: str, split: str | None, metadata: dict[str, Any], n_tokens: int) -> None:
        """Add one row."""
        self.extend([rid], [split], [metadata], [n_tokens])

    def extend(
        self,
        ids: Sequence[str],
        splits: Sequence[str | None],
        metadata: Sequence[dict[str, Any]],
        n_tokens: Sequence[int],
    ) -> None:
        """Add rows (the planning hot path: list comprehensions, no call per row)."""
        self.ids += ids
        self.splits += splits
        self.n_tokens += n_tokens
        n_meta, (fields, truncated, path) = self._n_meta, self._shared3
        shared = [
            type(m.get("line")) is int
            and len(m) == n_meta
            and m.get("path", _MISSING) == path
            and m.get("fields", _MISSING) == fields
            and m.get("truncated", _MISSING) == truncated
            for m in metadata
        ]
        self.lines += [m["line"] if same else None for m, same in zip(metadata, shared, strict=True)]
        self.metadata += [None if same else m for m, same in zip(metadata, shared, strict=True)]

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as ``{"id", "split", "metadata", "n_tokens"}``."""
        return {
            "id": self.ids[i],
            "split": self.splits[i],
            "metadata": self.metadata_at(i),
            "n_tokens": self.n_tokens[i],
        }

    def metadata_at(self, i: int) -> dict[str, Any]:
        """The whole metadata of row ``i``."""
        m = self.metadata[i]
        if m is None:
            return {**self.shared, "line": self.lines[i]}
        return orjson.loads(m) if isinstance(m, str) else dict(m)

    def metadata_json(self, i: int) -> str:
        """The whole metadata of row ``i`` as JSON text (the stored text when there is one)."""
        m = self.metadata[i]
        return m if isinstance(m, str) else orjson.dumps(self.metadata_at(i)).decode()

    def write(self, path: Path) -> None:
        """Write the file and fsync it; the caller makes it visible (rename or batch.json)."""
        meta = [m if m is None or isinstance(m, str) else orjson.dumps(m).decode() for m in self.metadata]
        table = pa.table(
            {
                "id": pa.array(self.ids, pa.string()),
                "split": pa.array(self.splits, pa.string()),
                "n_tokens": pa.array(self.n_tokens, pa.int64()),
                "line": pa.array(self.lines, pa.int64()),
                "metadata": pa.array(meta, pa.string()),
            }
        ).replace_schema_metadata({_SHARED_META_KEY: orjson.dumps(self.shared)})
        with open(path, "wb") as fh:
            # Ids are unique and nothing filters on these columns: no dictionaries, no statistics.
            # Uncompressed: the file is ~30 bytes a row against ~200 for input.jsonl, and zstd
            # tripled the cost of writing it.
            pq.write_table(table, fh, compression="none", use_dictionary=["split"], write_statistics=False)
            fh.flush()
            os.fsync(fh.fileno())

    @classmethod
    def read(cls, batch_dir: Path) -> BatchRecords:
        """The batch's records.

        Raises:
            StateError: the file is missing or unreadable.
        """
        table = read_records_table(batch_dir, None)
        meta = table.schema.metadata or {}
        out = cls(orjson.loads(meta[_SHARED_META_KEY]) if _SHARED_META_KEY in meta else None)
        cols = table.to_pydict()
        out.ids, out.splits, out.n_tokens = cols["id"], cols["split"], cols["n_tokens"]
        out.lines, out.metadata = cols["line"], cols["metadata"]
        return out


PLAN_CHUNK_ROWS = 4096  # rows per add_records call: large enough that per-call costs vanish


class BatchFileWriter:
    """Streams request lines into ``batches/{prefix}_NNN/{input,records}.jsonl`` under the limits.

    ``input.jsonl`` is what is uploaded; ``records.parquet`` holds, row for row, what the API does
    not carry back (split, metadata, token count) for ingest (see :class:`plan.BatchRecords`).
    Used by planning and by retry.

    Args:
        root: the run directory (or its ``.partial`` twin while planning).
        prefix / first_number: batch names, e.g. ``batch_001`` or ``retry_003``.
    """

    def __init__(self, root: Path, splitter: BatchSplitter, *, prefix: str = "batch", first_number: int = 1) -> None:
        self.root = root
        self.splitter = splitter
        self.prefix = prefix
        self.first_number = first_number
        self.current = -1
        self.inp: IO[bytes] | None = None
        self.states: list[BatchState] = []
        self._tokenizer_tokens = 0
        self.records = BatchRecords()
        self._dir: Path | None = None
        self._write_inp: Callable[[bytes], object] | None = None
        self._group: list[tuple[Any, ...]] = []  # a document's rows held together (--chunk-aggregate)
        self._group_parent: Any = None

    def add_record(self, rec: Record, line: bytes) -> None:
        """Add one prepared record and its request line (see :func:`plan.request_encoder`)."""
        self.add_records([rec], [line])

    def add_records(self, recs: Sequence[Record], lines: Sequence[bytes]) -> None:
        """Add prepared records and their request lines, in order.

        This is the planning hot path, so it works on a chunk of rows with list comprehensions
        rather than a call per row. Queue tokens are computed inline as in
        :func:`tokens.queue_tokens`: max(tokenizer count, ceil(UTF-8 bytes / 4)).
        """
        n_tokens = [r.n_tokens for r in recs]
        n_bytes = [len(t) if t.isascii() else len(t.encode()) for t in [r.text for r in recs]]  # isascii() is O(1)
        queue = [n if 4 * n >= b else (b + 3) >> 2 for n, b in zip(n_tokens, n_bytes, strict=True)]
        self._add(
            lines,
            queue,
            [r.id for r in recs],
            [r.split for r in recs],
            [r.metadata for r in recs],
            n_tokens,
        )

    def add_all(self, records: Iterable[Record], encode: Callable[[str, str], bytes]) -> None:
        """Add every record, chunk by chunk, with its request line from ``encode`` (see
        :func:`plan.request_encoder`). This is what planning runs and bench/plan.py times."""
        it = iter(records)
        while chunk := list(islice(it, PLAN_CHUNK_ROWS)):
            self.add_records(chunk, [encode(r.id, r.text) for r in chunk])

    def add_row(self, line: bytes, row: dict[str, Any], tokens: int) -> None:
        """Add a request line and its records row (``{"id", "split", "metadata", "n_tokens"}``, as
        :meth:`BatchRecords.row` gives it); ``tokens`` are queue tokens."""
        n_tokens = int(row.get("n_tokens") or 0)
        self._add([line], [tokens], [row["id"]], [row.get("split")], [row.get("metadata") or {}], [n_tokens])

    def _add(
        self,
        lines: Sequence[bytes],
        queue: list[int],
        ids: list[str],
        splits: list[str | None],
        metadata: list[dict[str, Any]],
        n_tokens: list[int],
    ) -> None:
        if self._group or (metadata and is_aggregated(metadata[0])):
            self._add_grouped(list(zip(lines, queue, ids, splits, metadata, n_tokens, strict=True)))
        else:
            self._place(lines, queue, ids, splits, metadata, n_tokens)

    def _add_grouped(self, rows: list[tuple[Any, ...]]) -> None:
        """``--chunk-aggregate``: a document's chunk requests go into one batch, so one batch's
        output completes the document. Rows are held until their document's last row is seen
        (its successor belongs to another document, or :meth:`finish`)."""
        for row in rows:
            parent = row[4].get("chunk", {}).get("parent_id")
            if self._group and parent != self._group_parent:
                self._flush_group()
            self._group.append(row)
            self._group_parent = parent

    def _flush_group(self) -> None:
        if not self._group:
            return
        lines, queue, ids, splits, metadata, n_tokens = (list(col) for col in zip(*self._group, strict=True))
        self._group = []
        self.splitter.keep_together(len(lines), sum(len(line) for line in lines), len(lines), sum(queue))
        self._place(lines, queue, ids, splits, metadata, n_tokens)

    def _place(
        self,
        lines: Sequence[bytes],
        queue: list[int],
        ids: list[str],
        splits: list[str | None],
        metadata: list[dict[str, Any]],
        n_tokens: list[int],
    ) -> None:
        batches = self.splitter.assign([len(line) for line in lines], queue)
        start = 0
        while start < len(batches):
            index = batches[start]
            end = bisect_right(batches, index, start)  # batch indices never decrease
            if index != self.current:
                self._open(index, BatchRecords.shared_from(metadata[start]))
            self._write_inp(b"".join(lines[start:end]))  # type: ignore[misc]
            self.records.extend(ids[start:end], splits[start:end], metadata[start:end], n_tokens[start:end])
            self._tokenizer_tokens += sum(n_tokens[start:end])
            start = end

    def _open(self, index: int, shared: dict[str, Any]) -> None:
        self._close()
        self.current = index
        name = f"{self.prefix}_{self.first_number + index:03d}"
        d = self.root / "batches" / name
        if d.is_dir() and not (d / "batch.json").exists():
            shutil.rmtree(d)  # files of a plan that crashed before its batch.json: never submitted
        d.mkdir(parents=True)
        self._dir = d
        self.inp = open(d / "input.jsonl", "wb", buffering=1 << 20)  # noqa: SIM115
        self._write_inp = self.inp.write
        self.records = BatchRecords(shared)
        self.states.append(BatchState(name=name))

    def _close(self) -> None:
        if self.states:
            self.states[-1].tokenizer_tokens = self._tokenizer_tokens
            self._tokenizer_tokens = 0
        if self.inp is not None:
            self.inp.flush()
            os.fsync(self.inp.fileno())
            self.inp.close()
            self.inp = None
            assert self._dir is not None
            self.records.write(self._dir / RECORDS_FILE)

    def abort(self) -> None:
        """Close files without saving batch states (the caller removes the directory)."""
        self._close()

    def finish(self) -> list[BatchState]:
        """Close the files and return each batch's state (status planned), for the caller to
        write through :mod:`embedbatch.runs` (:meth:`Run.create`, :meth:`Run.add_batches`)."""
        self._flush_group()
        self._close()
        for bs, (requests, inputs, n_bytes, tokens) in zip(self.states, self.splitter.totals(), strict=True):
            bs.requests, bs.inputs, bs.bytes, bs.tokens = requests, inputs, n_bytes, tokens
            bs.history.append(["planned", utc_now().isoformat()])
        return self.states
