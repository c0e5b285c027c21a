"""One vector per document (``--chunk-aggregate mean``): a document's chunk vectors → one row.

With ``chunk_aggregate="mean"`` every engine embeds a document's chunks as usual, and the store
receives one row per document instead: id = the document's id, text = its whole prepared text,
vector = the token-weighted mean of its chunk vectors, L2-normalised, and ``metadata.chunks`` =
the chunk count and the chunking policy (``aggregate: "mean"``). A row becomes whole only once
every chunk of its document has a vector, so :class:`ChunkAggregator` holds partial documents
(one running sum per document, not their chunks) until the last chunk arrives.

Where the chunks come from decides how partial documents are bounded:

- the Batch API path keeps a document's chunk requests in one batch (planning and retry), so
  one batch's output completes every document whose chunks all succeeded; a document with a
  failed chunk is reported failed whole (its other chunk ids too), so a retry sends all of its
  chunks again together;
- the realtime and local engines feed the aggregator as vectors arrive; documents still partial
  when the run ends had a chunk fail. A crash loses only the partial documents' sums: their
  documents are not stored, so the next run embeds them again.

Every chunk of this mode says so itself (``metadata.chunk.aggregate == "mean"``, see
:func:`is_aggregated`), so the consumers need no run configuration: ingest and the streaming
committer aggregate exactly those rows, also in a retry. The document's text travels with its
first chunk (``metadata.chunk.parent_text``), so the stored row holds exactly the prepared text
and a later run recognises an unchanged document without chunking it again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

__all__ = ["AGGREGATES", "INCOMPLETE_DOCUMENT", "ChunkAggregator", "Parent", "is_aggregated", "parent_of_chunk"]

AGGREGATES = ("mean",)
# The failure reason of a chunk whose own vector came but whose document's did not all.
INCOMPLETE_DOCUMENT = "chunk_aggregate: another chunk of this document failed; the document is sent again whole"


def is_aggregated(metadata: dict[str, Any] | str) -> bool:
    """Whether a row (its metadata, as a dict or JSON text) is a chunk to aggregate."""
    if isinstance(metadata, str):
        return '"aggregate"' in metadata and is_aggregated(orjson.loads(metadata))
    chunk = metadata.get("chunk")
    return isinstance(chunk, dict) and chunk.get("aggregate") == "mean"


@dataclass
class Parent:
    """A document being aggregated: its chunks seen so far and their weighted vector sum."""

    count: int
    total: np.ndarray
    weight: float = 0.0
    seen: set[int] = field(default_factory=set)
    chunk_ids: list[str] = field(default_factory=list)
    text: str | None = None
    split: str | None = None
    metadata: dict[str, Any] | None = None


class ChunkAggregator:
    """Collects chunk vectors until each document is complete; :meth:`add` returns the
    documents it completed, as one row each.

    Memory: one float64 vector of ``dim`` per partial document.
    """

    def __init__(self) -> None:
        self.partial: dict[str, Parent] = {}

    def add(
        self, ids: Sequence[str], metadata: Sequence[dict[str, Any]], splits: Sequence[str | None], vectors: np.ndarray
    ) -> tuple[list[str], list[str], list[dict[str, Any]], list[str | None], np.ndarray]:
        """Add chunk rows (their ``metadata.chunk`` names the document, index, count and token
        count; ``vectors`` is ``(n, dim)`` float32). Returns the completed documents as
        ``(ids, texts, metadata, splits, (m, dim) float32 unit vectors)``. A chunk seen twice
        counts once.

        Raises:
            ValueError: a row is not a chunk (no ``metadata.chunk``), or its document's first
                chunk carried no text.
        """
        done: list[tuple[str, Parent]] = []
        for i, rid in enumerate(ids):
            chunk = metadata[i].get("chunk")
            if not isinstance(chunk, dict):
                raise ValueError(f"row {rid!r} is not a chunk (no metadata.chunk): nothing to aggregate")
            pid, k, count = str(chunk["parent_id"]), int(chunk["index"]), int(chunk["count"])
            p = self.partial.get(pid)
            if p is None:
                p = self.partial[pid] = Parent(count=count, total=np.zeros(vectors.shape[1], np.float64))
            if k in p.seen:
                continue
            w = float(max(1, int(chunk.get("n_tokens") or 1)))
            p.total += w * vectors[i].astype(np.float64)
            p.weight += w
            p.seen.add(k)
            p.chunk_ids.append(rid)
            if k == 0:
                p.text, p.split = chunk.get("parent_text"), splits[i]
                p.metadata = _parent_metadata(metadata[i], chunk)
            if len(p.seen) == p.count:
                done.append((pid, self.partial.pop(pid)))
        return _rows(done, vectors.shape[1] if len(vectors.shape) == 2 else 0)

    def incomplete(self) -> dict[str, list[str]]:
        """Documents still partial → the chunk ids received for them."""
        return {pid: list(p.chunk_ids) for pid, p in self.partial.items()}

    def drop(self) -> dict[str, list[str]]:
        """Forget every partial document (the caller reports them failed); returns what
        :meth:`incomplete` returned."""
        out = self.incomplete()
        self.partial.clear()
        return out


def _parent_metadata(chunk_meta: dict[str, Any], chunk: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in chunk_meta.items() if k != "chunk"}  # (the document's own metadata)
    policy = {k: v for k, v in chunk.items() if k in ("chunker", "tokens", "overlap", "tokenizer")}
    meta["chunks"] = {"count": int(chunk["count"]), "aggregate": "mean", **policy}
    return meta


def _rows(
    done: list[tuple[str, Parent]], dim: int
) -> tuple[list[str], list[str], list[dict[str, Any]], list[str | None], np.ndarray]:
    ids, texts, metas, splits = [], [], [], []
    vecs = np.empty((len(done), dim), np.float32)
    for j, (pid, p) in enumerate(done):
        if p.text is None or p.metadata is None:
            raise ValueError(f"document {pid!r}: its first chunk carried no parent_text")
        mean = p.total / max(p.weight, 1e-12)
        norm = float(np.linalg.norm(mean))
        vecs[j] = mean / norm if norm > 0 else mean
        ids.append(pid)
        texts.append(p.text)
        metas.append(p.metadata)
        splits.append(p.split)
    return ids, texts, metas, splits, vecs


def parent_of_chunk(template: str) -> Callable[[str], str | None]:
    """The inverse of a chunk id template: chunk id → document id (None: not a chunk id of
    this template). ``{k}`` matches digits; the document id is the longest match."""
    out, named = [], False
    for part in re.split(r"(\{parent_id\}|\{k\})", template):
        if part == "{parent_id}":
            out.append("(?P=p)" if named else "(?P<p>.+)")
            named = True
        else:
            out.append(r"\d+" if part == "{k}" else re.escape(part))
    pattern = "".join(out)
    rx = re.compile(f"^{pattern}$", re.DOTALL)

    def parent(chunk_id: str) -> str | None:
        m = rx.match(chunk_id)
        return m.group("p") if m else None

    return parent
