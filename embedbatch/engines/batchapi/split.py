"""Splitting: request lines and the batch they go to, under the API limits (pure).

One request per input: ``custom_id`` is the record id, ``url`` is ``/v1/embeddings``, and the
body asks for ``encoding_format: "base64"`` (about 4× smaller output than float JSON and no
float parsing on ingest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat

import orjson

from embedbatch.config import BatchLimits
from embedbatch.errors import LimitError

__all__ = [
    "BatchSplitter",
    "RequestSize",
    "assign_batches",
    "request_encoder",
    "request_line",
]

EMBEDDINGS_URL = "/v1/embeddings"


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

    def keep_together(self, n_requests: int, n_bytes: int, n_inputs: int, tokens: int) -> None:
        """Before :meth:`assign` of requests that must share a batch (a document's chunks under
        ``--chunk-aggregate``): start a new batch unless the open one can take all of them.

        Raises:
            LimitError: they exceed an empty batch's limits.
        """
        lim = self.limits
        if (
            n_requests > self._max_requests
            or n_inputs > self._max_inputs
            or n_bytes > self._max_bytes
            or tokens > self._max_tokens
        ):
            raise LimitError(
                f"a document of {n_requests} chunks ({n_bytes} bytes, {tokens} tokens) does not fit one batch "
                f"(limits: {lim.max_requests} requests, {lim.max_bytes} bytes, {lim.max_enqueued_tokens} tokens); "
                "--chunk-aggregate keeps a document's chunks in one batch: raise --chunk-tokens"
            )
        if self.batch < 0:
            return  # the first assign opens the first batch
        if (
            self.requests + n_requests > self._max_requests
            or self.inputs + n_inputs > self._max_inputs
            or self.bytes + n_bytes > self._max_bytes
            or self.tokens + tokens > self._max_tokens
        ):
            self.closed.append((self.requests, self.inputs, self.bytes, self.tokens))
            self.batch += 1
            self.requests = self.inputs = self.bytes = self.tokens = 0

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
