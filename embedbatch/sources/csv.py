"""CSV reader (pyarrow streaming), every column read as text."""

from __future__ import annotations

import csv as pycsv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from embedbatch.errors import InputError
from embedbatch.records import RawRow
from embedbatch.sources import open_maybe_gzip

__all__ = ["iter_rows"]


def iter_rows(path: Path) -> Iterator[RawRow]:
    """Every data row as a dict of strings (empty cells are null); ``line`` is the 1-based
    line of a row assuming one line per row (the header is line 1).

    Raises:
        InputError: bad UTF-8 or a malformed CSV.
    """
    name = str(path)
    with open_maybe_gzip(path) as fh:
        head = fh.readline()
    try:
        header = next(pycsv.reader(io.StringIO(head.decode("utf-8-sig"))))
    except UnicodeDecodeError as exc:
        raise InputError(f"header is not valid UTF-8: {exc.reason}", path=name, line=1) from exc
    except StopIteration as exc:
        raise InputError("empty CSV file", path=name, line=1) from exc
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in header}, strings_can_be_null=True)
    ragged: list[RawRow] = []

    def bad_row(row: Any) -> str:
        # A row with the wrong number of fields is a bad row like any other (recorded with
        # --skip-bad-rows), not the end of the file.
        where = int(row.number) if row.number is not None else 0
        reason = f"ragged CSV row: expected {row.expected_columns} fields, got {row.actual_columns}"
        try:
            values = next(pycsv.reader(io.StringIO(row.text)))
        except (StopIteration, pycsv.Error):
            values = []
        ragged.append(RawRow(name, where, None, reason, partial=dict(zip(header, values, strict=False))))
        return "skip"

    parse = pacsv.ParseOptions(invalid_row_handler=bad_row)
    read = pacsv.ReadOptions(use_threads=False)  # one thread: a bad row's number is its line
    line = 1
    with open_maybe_gzip(path) as fh:
        try:
            reader = pacsv.open_csv(fh, read_options=read, convert_options=convert, parse_options=parse)
            for batch in reader:
                yield from ragged
                ragged.clear()
                for row in batch.to_pylist():
                    line += 1
                    yield RawRow(name, line, row)
            yield from ragged
        except pa.ArrowInvalid as exc:
            msg = str(exc)
            if "UTF8" in msg or "utf8" in msg.lower():
                msg = f"invalid UTF-8 in a cell: {msg}"
            raise InputError(f"malformed CSV after line {line}: {msg}", path=name, line=line + 1) from exc
