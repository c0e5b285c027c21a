"""Readers: every format, gzip by magic bytes, and each bad-input case."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedbatch.config import PrepareConfig, SampleConfig, SourceConfig
from embedbatch.errors import DuplicateIdError, InputError, UsageError
from embedbatch.intake import Intake
from embedbatch.sources import detect_format, iter_raw_rows
from embedbatch.tokens import get_tokenizer
from tests.conftest import sample_rows, write_jsonl


def intake(
    path: Path, *, skip: bool = False, rejected: Path | None = None, allow_missing: bool = True, **src: Any
) -> Intake:
    return Intake(
        source=SourceConfig(path=str(path), skip_bad_rows=skip, **src),  # type: ignore[arg-type]
        prepare=PrepareConfig(fields=("title", "body"), allow_missing_fields=allow_missing),
        sample=SampleConfig(),
        tokenizer=get_tokenizer("text-embedding-3-small"),
        rejected_path=rejected,
    )


def ids_of(path: Path, **src: Any) -> list[str]:
    return [r.id for r in intake(path, **src).records()]


def test_jsonl_plain_and_gzip_renamed(tmp_path: Path) -> None:
    """gzip is detected by magic bytes, whatever the file is called."""
    rows = sample_rows(5)
    plain = write_jsonl(tmp_path / "a.jsonl", rows)
    disguised = write_jsonl(tmp_path / "b.txt", rows, gz=True)
    assert detect_format(disguised) == "jsonl"
    assert ids_of(plain) == [r["id"] for r in rows]
    assert ids_of(disguised) == [r["id"] for r in rows]


def test_json_array_streams_elements(tmp_path: Path) -> None:
    """A JSON array (also gzipped) yields each object, with its element index."""
    rows = sample_rows(300)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "b.data").write_bytes(gzip.compress(json.dumps(rows).encode()))
    assert ids_of(tmp_path / "a.json") == [r["id"] for r in rows]
    raw = list(iter_raw_rows(str(tmp_path / "b.data")))
    assert [r.line for r in raw[:3]] == [0, 1, 2]
    assert len(raw) == 300


def test_parquet_and_csv(tmp_path: Path) -> None:
    rows = sample_rows(50)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet", row_group_size=7)
    with open(tmp_path / "x.csv", "w", encoding="utf-8") as fh:
        fh.write("id,title,body,split\n")
        for r in rows:
            fh.write(f'{r["id"]},{r["title"]},"{r["body"]}",{r["split"]}\n')
    assert ids_of(tmp_path / "x.parquet") == [r["id"] for r in rows]
    assert ids_of(tmp_path / "x.csv") == [r["id"] for r in rows]


def test_directory_and_glob(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "1.jsonl", sample_rows(3))
    write_jsonl(d / "2.jsonl.gz", sample_rows(2, start=3), gz=True)
    assert len(ids_of(d)) == 5
    assert len(ids_of(Path(str(d / "*.jsonl")))) == 3


@pytest.mark.parametrize(
    ("content", "line", "field", "fragment"),
    [
        (b'{"id": "a", "title": "x"}\n{"id": "b", "title": \n', 2, None, "malformed JSON"),
        (b'{"id": "a", "title": "x"}\n[1, 2]\n', 2, None, "not an object"),
        (b'{"id": "a", "title": "x"}\n{"title": "y"}\n', 2, "id", "missing id"),
        (b'{"id": "a", "title": "x"}\n{"id": "b", "other": 1}\n', 2, "title,body", "missing text field"),
        (b'{"id": "a", "title": "x"}\n{"id": "b", "title": "caf\xe9"}\n', 2, None, "invalid UTF-8"),
    ],
)
def test_bad_rows_stop_with_file_line_field(
    tmp_path: Path, content: bytes, line: int, field: str | None, fragment: str
) -> None:
    """Each bad-input case stops the intake naming file, line and field."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        list(intake(path).records())
    err = info.value
    assert (str(path), line, field) == (err.path, err.line, err.field)
    assert fragment in str(err)


def test_skip_bad_rows_records_reasons(tmp_path: Path) -> None:
    """--skip-bad-rows writes each bad row with its reason to rejected.jsonl and goes on."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"id": "a", "title": "x"}\nnot json\n{"title": "no id"}\n{"id": "c", "title": ""}\n'
        b'{"id": "d", "body": "ok"}\n'
    )
    rejected = tmp_path / "rejected.jsonl"
    it = intake(path, skip=True, rejected=rejected)
    assert [r.id for r in it.records()] == ["a", "d"]
    reasons = [orjson.loads(x) for x in rejected.read_bytes().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in reasons] == [
        (2, "malformed JSON"),
        (3, "missing id"),
        (4, "empty text"),
    ]
    assert it.stats.rejected == 3


def test_duplicate_ids_named(tmp_path: Path) -> None:
    rows = [*sample_rows(5), {"id": "doc-2", "title": "again"}]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(DuplicateIdError) as info:
        list(intake(path).records())
    assert "'doc-2'" in str(info.value)
    assert f"{path}:3" in str(info.value) and f"{path}:6" in str(info.value)


def test_no_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        list(iter_raw_rows(str(tmp_path / "nothing-*.jsonl")))


def test_misspelled_field_is_named_with_the_fields_that_exist(tmp_path: Path) -> None:
    """A field that no row has stops intake before anything is sent, suggesting the near miss
    and listing the fields the rows do have."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    it = Intake(
        source=SourceConfig(path=str(path)),
        prepare=PrepareConfig(fields=("title", "bdy")),
        sample=SampleConfig(),
        tokenizer=None,
    )
    with pytest.raises(InputError) as info:
        list(it.records())
    assert "field 'bdy' is in no row of" in str(info.value)
    assert "(did you mean 'body'?); the rows have: body, id, split, title" in str(info.value)


def test_rows_lacking_a_field_stop_unless_allowed(tmp_path: Path) -> None:
    """Rows that lack one of the fields are counted; without --allow-missing-fields intake
    stops with the count, with it they are embedded without that field."""
    rows = [*sample_rows(3), {"id": "x", "title": "only a title"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match="1 of 4 rows lack 'body'; pass --allow-missing-fields"):
        list(intake(path, allow_missing=False).records())
    it = intake(path, allow_missing=True)
    assert ["doc-0", "doc-1", "doc-2", "x"] == [r.id for r in it.records()]
    assert {"body": 1} == it.stats.missing_fields


def test_one_policy_for_awkward_inputs(tmp_path: Path) -> None:
    """A JSONL BOM is skipped; a lone surrogate (JSON array) and a non-UTF-8 binary Parquet value
    are bad rows with a reason; a UTF-8 binary value is text; a 100,000-character CJK row is cut
    to --max-tokens; a ragged CSV row is a bad row that --skip-bad-rows records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + orjson.dumps({"id": "a", "title": "x", "body": "y"}) + b"\n")
    assert ["a"] == ids_of(bom)

    arr = tmp_path / "sur.json"
    arr.write_text(
        '[{"id": "a", "title": "ok", "body": ""}, {"id": "b", "title": "bad \\ud800 here", "body": ""}]',
        encoding="utf-8",
    )
    with pytest.raises(InputError, match="lone surrogate"):
        ids_of(arr)
    assert ["a"] == [r.id for r in intake(arr, skip=True).records()]

    pqf = tmp_path / "bin.parquet"
    pq.write_table(
        pa.table({"id": ["t", "b"], "title": pa.array([b"text", b"\xff\xfe"], pa.binary()), "body": ["", ""]}), pqf
    )
    it = intake(pqf, skip=True)
    assert [("t", "text")] == [(r.id, r.text) for r in it.records()]
    assert {"binary value (2 bytes) that is not UTF-8 text": 1} == it.stats.reasons

    cjk = write_jsonl(tmp_path / "cjk.jsonl", [{"id": "c", "title": "漢字" * 50_000, "body": ""}])
    (rec,) = list(intake(cjk).records())
    assert (True, True) == (8000 < rec.n_tokens <= 8191, rec.metadata["truncated"])

    rag = tmp_path / "rag.csv"
    rag.write_text("id,title,body\na,one,x\nb,two,x,extra\nc,three,x\n", encoding="utf-8")
    rejected = tmp_path / "rejected.jsonl"
    assert ["a", "c"] == [r.id for r in intake(rag, skip=True, rejected=rejected).records()]
    (entry,) = [orjson.loads(x) for x in rejected.read_bytes().splitlines()]
    assert entry["reason"].startswith("ragged CSV row: expected 3 fields, got 4")
