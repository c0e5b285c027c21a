"""Planning: records → request lines → batch input files under the API limits (pure).

One request per input: ``custom_id`` is the record id, ``url`` is ``/v1/embeddings``, and the
body asks for ``encoding_format: "base64"`` (about 4× smaller output than float JSON and no
float parsing on ingest).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.config import BatchLimits
from embedbatch.errors import LimitError, StateError, UsageError
from embedbatch.tokens import supports_dimensions

__all__ = [
    "RECORDS_FILE",
    "BatchRecords",
    "BatchSplitter",
    "RequestSize",
    "assign_batches",
    "check_model_options",
    "read_record_ids",
    "request_encoder",
    "request_line",
]

EMBEDDINGS_URL = "/v1/embeddings"


def check_model_options(model: str, dimensions: int | None) -> None:
    """Raise UsageError when ``dimensions`` is given for a model that does not take it
    (only text-embedding-3-* do, per the embeddings API reference, 2026)."""
    if dimensions is None:
        return
    if dimensions < 1:
        raise UsageError(f"--dimensions must be positive, got {dimensions}")
    if not supports_dimensions(model) and model.startswith("text-embedding-"):
        raise UsageError(f"--dimensions is only supported by text-embedding-3 models, not {model}")


def request_encoder(*, model: str, dimensions: int | None) -> Callable[[str, str], bytes]:
    """A function ``(custom_id, text) -> bytes`` giving one JSONL request line (with its newline).

    The line is byte for byte what ``orjson.dumps`` gives for ``{"custom_id", "method": "POST",
    "url": "/v1/embeddings", "body": {"model", "input", "encoding_format": "base64",
    "dimensions"?}}``: the parts that are the same on every line are encoded once, and only the
    id and the text are encoded per row (0.5 µs instead of 0.8 µs a line, bench/plan.py).
    """
    head = b'{"custom_id":'
    middle = b',"method":"POST","url":' + orjson.dumps(EMBEDDINGS_URL) + b',"body":{"model":'
    middle += orjson.dumps(model) + b',"input":'
    tail = b',"encoding_format":"base64"'
    if dimensions is not None:
        tail += b',"dimensions":' + orjson.dumps(int(dimensions))
    tail += b"}}\n"
    dumps, join = orjson.dumps, b"".join

    def encode(custom_id: str, text: str) -> bytes:
        return join((head, dumps(custom_id), middle, dumps(text), tail))

    return encode


def request_line(custom_id: str, text: str, *, model: str, dimensions: int | None) -> bytes:
    """One JSONL request line (with its trailing newline) for one input (see :func:`request_encoder`)."""
    return request_encoder(model=model, dimensions=dimensions)(custom_id, text)


@dataclass(frozen=True, slots=True)
class RequestSize:
    """What one request weighs against the limits: bytes of its line, inputs, queue tokens."""

    n_bytes: int
    n_inputs: int = 1
    tokens: int = 0


class BatchSplitter:
    """Decides where one batch ends and the next begins, request by request.

    Each batch stays within ``max_requests`` lines, ``max_inputs`` inputs, ``max_bytes`` bytes and
    ``max_enqueued_tokens`` tokens (when set). Planning calls :meth:`assign` once per chunk of
    rows, so the per-row work is one loop iteration over plain ints.
    """

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._max_requests = limits.max_requests
        self._max_inputs = limits.max_inputs
        self._max_bytes = limits.max_bytes
        self._max_tokens = limits.max_enqueued_tokens if limits.max_enqueued_tokens is not None else 1 << 62
        self.batch = -1
        self.requests = self._max_requests  # forces a first batch
        self.inputs = 0
        self.bytes = 0
        self.tokens = 0
        self.closed: list[tuple[int, int, int, int]] = []

    def totals(self) -> list[tuple[int, int, int, int]]:
        """(requests, inputs, bytes, tokens) of every batch so far, the open one last."""
        if self.batch < 0:
            return []
        return [*self.closed, (self.requests, self.inputs, self.bytes, self.tokens)]

    def add(self, size: RequestSize) -> int:
        """Account for one request; return the 0-based batch index it goes to.

        Raises:
            LimitError: the request alone exceeds a limit.
        """
        return self.add_request(size.n_bytes, size.n_inputs, size.tokens)

    def add_request(self, n_bytes: int, n_inputs: int, tokens: int) -> int:
        """:meth:`add` without the :class:`RequestSize` object (bytes, inputs, queue tokens)."""
        return self.assign((n_bytes,), (tokens,), (n_inputs,))[0]

    def assign(self, n_bytes: Sequence[int], tokens: Sequence[int], n_inputs: Sequence[int] | None = None) -> list[int]:
        """Account for a chunk of requests, in order; return the 0-based batch index of each.

        Args:
            n_bytes: bytes of each request line (newline included).
            tokens: queue tokens of each request.
            n_inputs: embedding inputs of each request (default: 1 each).

        Raises:
            LimitError: a request alone exceeds a limit (the requests before it are counted).
        """
        max_requests, max_inputs, max_bytes, max_tokens = (
            self._max_requests,
            self._max_inputs,
            self._max_bytes,
            self._max_tokens,
        )
        batch, requests, inputs, size, queued = self.batch, self.requests, self.inputs, self.bytes, self.tokens
        closed = self.closed
        out: list[int] = []
        append = out.append
        try:
            for nb, tk, ni in zip(n_bytes, tokens, n_inputs if n_inputs is not None else repeat(1), strict=False):
                if (
                    requests >= max_requests
                    or inputs + ni > max_inputs
                    or size + nb > max_bytes
                    or queued + tk > max_tokens
                ):
                    self._check_alone(nb, ni, tk)
                    if batch >= 0:
                        closed.append((requests, inputs, size, queued))
                    batch += 1
                    requests = inputs = size = queued = 0
                requests += 1
                inputs += ni
                size += nb
                queued += tk
                append(batch)
        finally:
            self.batch, self.requests, self.inputs, self.bytes, self.tokens = batch, requests, inputs, size, queued
        return out

    def _check_alone(self, n_bytes: int, n_inputs: int, tokens: int) -> None:
        lim = self.limits
        if n_bytes > lim.max_bytes:
            raise LimitError(f"a request line of {n_bytes} bytes exceeds --max-bytes-per-batch {lim.max_bytes}")
        if n_inputs > lim.max_inputs:
            raise LimitError(f"a request of {n_inputs} inputs exceeds the {lim.max_inputs}-input batch limit")
        if tokens > self._max_tokens:
            raise LimitError(f"a request of {tokens} tokens exceeds --max-enqueued-tokens {lim.max_enqueued_tokens}")


def assign_batches(sizes: Iterable[RequestSize], limits: BatchLimits) -> Iterator[int]:
    """The batch index of each request, in order (pure; see :class:`BatchSplitter`)."""
    splitter = BatchSplitter(limits)
    for size in sizes:
        yield splitter.add(size)


# ---- the records sidecar --------------------------------------------------------------------

RECORDS_FILE = "records.parquet"
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
        table = _read_records_table(batch_dir, None)
        meta = table.schema.metadata or {}
        out = cls(orjson.loads(meta[_SHARED_META_KEY]) if _SHARED_META_KEY in meta else None)
        cols = table.to_pydict()
        out.ids, out.splits, out.n_tokens = cols["id"], cols["split"], cols["n_tokens"]
        out.lines, out.metadata = cols["line"], cols["metadata"]
        return out


def read_record_ids(batch_dir: Path) -> list[str]:
    """Only the ``id`` column of a batch's records, in input order.

    Raises:
        StateError: the file is missing or unreadable.
    """
    ids: list[str] = _read_records_table(batch_dir, ["id"]).column("id").to_pylist()
    return ids


def _read_records_table(batch_dir: Path, columns: list[str] | None) -> Any:
    path = batch_dir / RECORDS_FILE
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise StateError(f"{path}: cannot read the batch's records ({exc})") from exc
