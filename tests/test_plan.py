"""Planning: request lines and splitting under every limit, including edge sizes."""

from __future__ import annotations

import orjson
import pytest

from embedbatch.batchapi.plan import RequestSize, assign_batches, check_model_options, request_line
from embedbatch.config import BatchLimits
from embedbatch.errors import LimitError, UsageError
from embedbatch.tokens import queue_tokens


def test_request_line_shape() -> None:
    line = request_line("doc-1", "hello", model="text-embedding-3-small", dimensions=256)
    assert line.endswith(b"\n")
    assert {"custom_id": "doc-1", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": "hello", "encoding_format": "base64",
                     "dimensions": 256}} == orjson.loads(line)


def test_dimensions_only_for_v3() -> None:
    check_model_options("text-embedding-3-large", 1024)
    with pytest.raises(UsageError, match="text-embedding-3"):
        check_model_options("text-embedding-ada-002", 512)


def test_split_by_requests_exactly_at_limit() -> None:
    limits = BatchLimits(max_requests=3)
    assert [0, 0, 0, 1, 1, 1, 2] == list(assign_batches([RequestSize(10)] * 7, limits))


def test_split_by_bytes_edge() -> None:
    """A batch may reach exactly max_bytes; one byte more starts a new one."""
    limits = BatchLimits(max_bytes=2048)
    assert [0, 0, 1] == list(assign_batches([RequestSize(1024), RequestSize(1024), RequestSize(1)], limits))
    assert [0, 1] == list(assign_batches([RequestSize(1025), RequestSize(1024)], limits))


def test_split_by_inputs() -> None:
    limits = BatchLimits(max_inputs=5)
    sizes = [RequestSize(10, n_inputs=2)] * 4
    assert [0, 0, 1, 1] == list(assign_batches(sizes, limits))


def test_split_by_enqueued_tokens() -> None:
    limits = BatchLimits(max_enqueued_tokens=100)
    sizes = [RequestSize(10, tokens=t) for t in (60, 40, 1, 100, 99)]
    assert [0, 0, 1, 2, 3] == list(assign_batches(sizes, limits))


def test_single_request_over_a_limit_is_an_error() -> None:
    with pytest.raises(LimitError):
        list(assign_batches([RequestSize(5000)], BatchLimits(max_bytes=4096)))
    with pytest.raises(LimitError):
        list(assign_batches([RequestSize(10, tokens=101)], BatchLimits(max_enqueued_tokens=100)))


def test_queue_tokens_conservative() -> None:
    """The queue counts max(tokenizer count, ceil(bytes / 4))."""
    assert (10, 26) == (queue_tokens(10, 40), queue_tokens(3, 101))


def test_record_lines_short_and_full_round_trip() -> None:
    """Rows sharing the batch's metadata are short arrays; others are self-contained; both decode
    to the same shape, and a short line without the batch's defaults is refused."""
    from embedbatch.batchapi.plan import decode_record_line, encode_record_line, record_defaults, record_line_id
    from embedbatch.errors import StateError

    first = {"fields": ["title"], "truncated": False, "path": "/data/a.jsonl", "line": 1}
    defaults = record_defaults(first)
    same = encode_record_line("a", "train", {**first, "line": 7}, 12, defaults)
    cut = {"fields": ["title"], "truncated": True, "truncated_tokens": 3, "path": "/data/a.jsonl", "line": 8}
    other = encode_record_line("b", None, cut, 8191, defaults)
    assert b'["a","train",7,12]\n' == same
    assert {"id": "a", "split": "train", "metadata": {**first, "line": 7}, "n_tokens": 12} == decode_record_line(
        same, defaults)
    assert {"id": "b", "split": None, "metadata": cut, "n_tokens": 8191} == decode_record_line(other, None)
    assert ("a", "b") == (record_line_id(same), record_line_id(other))
    with pytest.raises(StateError):
        decode_record_line(same, None)
