"""Planning: records → request lines → batch input files under the API limits (pure).

One request per input: ``custom_id`` is the record id, ``url`` is ``/v1/embeddings``, and the
body asks for ``encoding_format: "base64"`` (about 4× smaller output than float JSON and no
float parsing on ingest).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from embedbatch.config import BatchLimits
from embedbatch.errors import LimitError, UsageError
from embedbatch.tokens import supports_dimensions

__all__ = ["BatchSplitter", "RequestSize", "assign_batches", "check_model_options", "request_line"]

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


def request_line(custom_id: str, text: str, *, model: str, dimensions: int | None) -> bytes:
    """One JSONL request line (with its trailing newline) for one input."""
    body: dict[str, object] = {"model": model, "input": text, "encoding_format": "base64"}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": EMBEDDINGS_URL, "body": body}) + b"\n"


@dataclass(frozen=True, slots=True)
class RequestSize:
    """What one request weighs against the limits: bytes of its line, inputs, queue tokens."""

    n_bytes: int
    n_inputs: int = 1
    tokens: int = 0


class BatchSplitter:
    """Decides where one batch ends and the next begins, request by request.

    Each batch stays within ``max_requests`` lines, ``max_inputs`` inputs, ``max_bytes`` bytes and
    ``max_enqueued_tokens`` tokens (when set). This runs once per row on the planning hot path,
    so the limits are kept as plain ints.
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
        if (
            self.requests >= self._max_requests
            or self.inputs + n_inputs > self._max_inputs
            or self.bytes + n_bytes > self._max_bytes
            or self.tokens + tokens > self._max_tokens
        ):
            self._check_alone(n_bytes, n_inputs, tokens)
            if self.batch >= 0:
                self.closed.append((self.requests, self.inputs, self.bytes, self.tokens))
            self.batch += 1
            self.requests = self.inputs = self.bytes = self.tokens = 0
        self.requests += 1
        self.inputs += n_inputs
        self.bytes += n_bytes
        self.tokens += tokens
        return self.batch

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


# ---- records.jsonl lines ----------------------------------------------------------------------
# ``records.jsonl`` holds, line for line with ``input.jsonl``, what the API does not carry back:
# split, provenance metadata, token count. Most rows of a batch share their metadata but for the
# line number (same file, same fields, not truncated), so a batch stores those shared values once
# (``batch.json`` ``record_defaults``) and such a row is a short array
# ``[id, split, line, n_tokens]``; any other row is a self-contained object
# ``{"id", "split", "metadata", "n_tokens"}``. The short form halves the cost of planning.

_SHARED_KEYS = ("fields", "truncated", "path")


def record_defaults(metadata: dict[str, object]) -> dict[str, object]:
    """The shared part of a row's metadata, taken from the first row of a batch."""
    return {k: metadata[k] for k in _SHARED_KEYS if k in metadata}


def encode_record_line(
    rid: str, split: str | None, metadata: dict[str, Any], n_tokens: int, defaults: dict[str, Any]
) -> bytes:
    """One records.jsonl line (with its newline): short when the row's metadata is ``defaults``
    plus a line number, else self-contained. (Runs once per row: a plain loop, no generator.)"""
    if len(metadata) == len(defaults) + 1 and "line" in metadata:
        for key, value in defaults.items():
            if metadata.get(key) != value:
                break
        else:
            return orjson.dumps([rid, split, metadata["line"], n_tokens]) + b"\n"
    return orjson.dumps({"id": rid, "split": split, "metadata": metadata, "n_tokens": n_tokens}) + b"\n"


def decode_record_line(raw: bytes, defaults: dict[str, Any] | None) -> dict[str, Any]:
    """A records.jsonl line as ``{"id", "split", "metadata", "n_tokens"}`` whichever its form.

    Raises:
        StateError: a short line without the batch's defaults.
    """
    obj = orjson.loads(raw)
    if isinstance(obj, dict):
        return obj
    if defaults is None:
        from embedbatch.errors import StateError

        raise StateError("a short records.jsonl line needs the batch's record_defaults (batch.json)")
    rid, split, line, n_tokens = obj
    return {"id": rid, "split": split, "metadata": {**defaults, "line": line}, "n_tokens": n_tokens}


def record_line_id(raw: bytes) -> str:
    """Only the id of a records.jsonl line (either form)."""
    obj = orjson.loads(raw)
    return str(obj[0] if isinstance(obj, list) else obj["id"])
