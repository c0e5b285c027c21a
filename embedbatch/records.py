"""The record that flows through every stage."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RawRow", "Record", "text_sha256"]


def text_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 text: the content hash that decides whether a row is re-embedded."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(slots=True)
class RawRow:
    """One row as a reader found it, with where it came from.

    Attributes:
        path: the file (or ``postgres:table``).
        line: 1-based line (JSONL, CSV) or 0-based row index (Parquet, JSON array, postgres).
        data: the row's fields, or None when the row could not be parsed.
        error: why the row could not be parsed (then ``data`` is None).
        split: the split the reader knows the row is in (Hugging Face datasets), else None.
        meta: provenance the reader adds to the record's metadata (dataset name, revision).
        partial: for a row that could not be parsed whole (a ragged CSV row), the fields that
            could be read, so the rejected row is named by its id.
    """

    path: str
    line: int
    data: dict[str, Any] | None
    error: str | None = None
    split: str | None = None
    meta: dict[str, Any] | None = None
    partial: dict[str, Any] | None = None


@dataclass(slots=True)
class Record:
    """One prepared record: what will be embedded and where it came from.

    Attributes:
        id: the record id, the batch ``custom_id``.
        text: exactly the text that is embedded (after preparation and truncation).
        n_tokens: tokens of ``text`` with the model's tokenizer.
        metadata: provenance (file, line), fields used, truncation; JSON-serialisable; a
            chunk's ``chunk`` (parent id, index, start/end character offsets into the prepared
            parent text, count, policy).
        parent_id / chunk_index: the document and position of a chunk (None: not chunked).
    """

    id: str
    source: str
    dataset: str
    split: str | None
    text: str
    n_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)
    stratum: str | None = None
    parent_id: str | None = None
    chunk_index: int | None = None

    @property
    def sha256(self) -> str:
        return text_sha256(self.text)
