"""Parquet reader, streamed by record batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.errors import InputError
from embedbatch.records import RawRow

__all__ = ["iter_rows"]

BATCH_ROWS = 16_384


def iter_rows(path: Path) -> Iterator[RawRow]:
    """Every row as a dict; ``line`` is the 0-based row index across row groups.

    Raises:
        InputError: the file is not readable Parquet.
    """
    name = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {exc}", path=name) from exc
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                yield RawRow(name, index, row)
                index += 1
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read row group: {exc}", path=name, line=index) from exc
