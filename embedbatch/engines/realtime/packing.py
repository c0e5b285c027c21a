"""Rows → requests for ``/v1/embeddings``, and the run's row spool.

:func:`pack` fills each request up to ``max_inputs`` inputs and ``max_tokens`` tokens summed over
its inputs (the API's limits are 2,048 and 300,000, Embeddings API reference, checked 2026-11),
in source order. The spool (``rows.jsonl``, ``failed_rows.jsonl``) holds prepared records, one
JSON object per line, so the embedding pass sends exactly the text that intake checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import orjson

from embedbatch.records import Record

__all__ = ["pack", "read_rows", "write_rows"]


def pack(records: Iterable[Record], *, max_inputs: int, max_tokens: int | Callable[[], int]) -> Iterator[list[Record]]:
    """Consecutive records grouped into requests of at most ``max_inputs`` inputs and
    ``max_tokens`` tokens (``Record.n_tokens``; a callable is asked before each record, so the
    cap can follow a rate limit learned meanwhile); a record alone over the cap is a request of
    its own."""
    cap = max_tokens if callable(max_tokens) else (lambda: max_tokens)
    req: list[Record] = []
    tokens = 0
    for rec in records:
        if req and (len(req) >= max_inputs or tokens + rec.n_tokens > cap()):
            yield req
            req, tokens = [], 0
        req.append(rec)
        tokens += rec.n_tokens
    if req:
        yield req


def write_rows(path: Path, records: Iterable[Record]) -> int:
    """Write records to ``path`` (one JSON object per line); returns the count."""
    n = 0
    with open(path, "wb") as fh:
        for r in records:
            fh.write(
                orjson.dumps(
                    {
                        "id": r.id,
                        "source": r.source,
                        "dataset": r.dataset,
                        "split": r.split,
                        "text": r.text,
                        "n_tokens": r.n_tokens,
                        "metadata": r.metadata,
                    }
                )
                + b"\n"
            )
            n += 1
    return n


def read_rows(path: Path) -> Iterator[Record]:
    """The records of a file written by :func:`write_rows` (none when it does not exist)."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for line in fh:
            d = orjson.loads(line)
            yield Record(
                id=d["id"],
                source=d["source"],
                dataset=d["dataset"],
                split=d["split"],
                text=d["text"],
                n_tokens=d["n_tokens"],
                metadata=d["metadata"],
            )
