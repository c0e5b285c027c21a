"""Planning: request lines and splitting under every limit, including edge sizes."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from embedbatch.config import BatchLimits
from embedbatch.engines.batchapi.split import RequestSize, assign_batches, request_line
from embedbatch.errors import LimitError, UsageError
from embedbatch.tokens import check_model_options, queue_tokens


def test_request_line_shape() -> None:
    line = request_line("doc-1", "hello", model="text-embedding-3-small", dimensions=256)
    assert line.endswith(b"\n")
    assert {
        "custom_id": "doc-1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": "hello", "encoding_format": "base64", "dimensions": 256},
    } == orjson.loads(line)


@pytest.mark.parametrize("dimensions", [None, 512])
def test_request_encoder_matches_orjson_byte_for_byte(dimensions: int | None) -> None:
    """The templated line is exactly orjson's encoding of the request object, for ids and texts
    that need escaping (quotes, backslashes, control characters, non-ASCII, astral plane)."""
    from embedbatch.engines.batchapi.split import request_encoder

    encode = request_encoder(model='m"odel', dimensions=dimensions)
    cases = [
        ("a", "plain"),
        ('q"uote', 'say "hi"\\'),
        ("tab\t", "line\nbreak\r\x00\x1f"),
        ("é", "naïve café ☕ 𝔘𝔫𝔦"),
        ("", ""),
        ('","', '"}},{"'),
    ]
    for cid, text in cases:
        body: dict[str, object] = {"model": 'm"odel', "input": text, "encoding_format": "base64"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        expected = orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body}) + b"\n"
        assert expected == encode(cid, text)


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


def test_batch_records_shared_and_own_metadata_round_trip(tmp_path: Path) -> None:
    """Rows sharing the batch's file/fields/truncated store only their line; other rows keep their
    whole metadata; both read back to the same rows, and a missing file is a StateError."""
    from embedbatch.engines.batchapi.batchfiles import BatchRecords, read_record_ids
    from embedbatch.errors import StateError

    first = {"fields": ["title"], "truncated": False, "path": "/data/a.jsonl", "line": 1}
    recs = BatchRecords(BatchRecords.shared_from(first))
    cut = {"fields": ["title"], "truncated": True, "truncated_tokens": 3, "path": "/data/a.jsonl", "line": 8}
    other_file = {"fields": ["title"], "truncated": False, "path": "/data/b.jsonl", "line": 2}
    recs.append("a", "train", {**first, "line": 7}, 12)
    recs.append("b", None, cut, 8191)
    recs.append("c", None, other_file, 5)
    recs.append("d", "test", {"db": "pg"}, 1)
    assert [7, None, None, None] == recs.lines
    recs.write(tmp_path / "records.parquet")
    back = BatchRecords.read(tmp_path)
    assert [
        {"id": "a", "split": "train", "metadata": {**first, "line": 7}, "n_tokens": 12},
        {"id": "b", "split": None, "metadata": cut, "n_tokens": 8191},
        {"id": "c", "split": None, "metadata": other_file, "n_tokens": 5},
        {"id": "d", "split": "test", "metadata": {"db": "pg"}, "n_tokens": 1},
    ] == [back.row(i) for i in range(len(back))]
    expected_meta = [first | {"line": 7}, cut, other_file, {"db": "pg"}]
    assert expected_meta == [orjson.loads(back.metadata_json(i)) for i in range(len(back))]
    assert ["a", "b", "c", "d"] == read_record_ids(tmp_path)
    with pytest.raises(StateError, match=r"records\.parquet"):
        BatchRecords.read(tmp_path / "nowhere")


def test_batch_file_writer_replaces_debris_of_a_crashed_plan(tmp_path: Path) -> None:
    """A batch folder without batch.json (a plan killed before it finished) is never submitted;
    the next plan with the same name replaces it instead of failing."""
    from embedbatch.engines.batchapi.batchfiles import BatchFileWriter, BatchRecords
    from embedbatch.engines.batchapi.split import BatchSplitter, request_line
    from embedbatch.records import Record

    debris = tmp_path / "batches" / "retry_001"
    debris.mkdir(parents=True)
    (debris / "input.jsonl").write_bytes(b"stale\n")
    writer = BatchFileWriter(tmp_path, BatchSplitter(BatchLimits(max_requests=2)), prefix="retry")
    for i in range(3):
        rec = Record(
            id=f"r{i}",
            source="file",
            dataset="d",
            split=None,
            text=f"t{i}",
            n_tokens=2,
            metadata={"path": "x", "line": i + 1},
        )
        writer.add_record(rec, request_line(rec.id, rec.text, model="m", dimensions=None))
    states = writer.finish()
    assert [("retry_001", 2), ("retry_002", 1)] == [(bs.name, bs.requests) for bs in states]
    lines = (debris / "input.jsonl").read_bytes().splitlines()
    assert ["r0", "r1"] == [orjson.loads(line)["custom_id"] for line in lines]
    assert ["r0", "r1"] == BatchRecords.read(debris).ids
    # The writer leaves batch.json to the run's owner (embedbatch.runs), who writes it under the lock.
    assert not (debris / "batch.json").exists()
