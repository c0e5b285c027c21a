"""Token-length bucketing (pure): group token sequences by length, size batches by a token budget.

Sorting by length was worth 2.6× over unsorted batches on this CPU with all-MiniLM-L6-v2, while
padding every batch to a power of two cost 25–35% in eager mode; so by default a batch is padded
to its longest row, and to the bucket edge only for fixed-shape (compiled) runs.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Bucketer", "Item", "bucket_edges", "bucket_index"]


def bucket_edges(min_tokens: int, max_tokens: int) -> list[int]:
    """Power-of-two edges from ``min_tokens`` up to ``max_tokens`` (the last edge is
    ``max_tokens`` itself when it is not a power of two). E.g. (128, 512) → [128, 256, 512]."""
    if min_tokens < 1 or max_tokens < 1:
        raise ValueError("bucket bounds must be positive")
    edges = []
    edge = 1
    while edge < min_tokens:
        edge *= 2
    while edge < max_tokens:
        edges.append(edge)
        edge *= 2
    edges.append(max_tokens)
    return edges


def bucket_index(length: int, edges: list[int]) -> int:
    """The first bucket whose edge is ≥ ``length`` (the last bucket for longer ones)."""
    return min(bisect.bisect_left(edges, length), len(edges) - 1)


@dataclass(slots=True)
class Item:
    """One sequence waiting to be encoded: its token ids and whatever the caller attaches."""

    ids: list[int]
    payload: Any = None

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass
class Bucketer:
    """Holds items in length buckets and hands out batches of about ``tokens_per_batch`` padded
    tokens, taking from the fullest bucket.

    Args:
        edges: bucket edges (see :func:`bucket_edges`).
        tokens_per_batch: padded tokens per batch; a batch has ``tokens_per_batch // padded_len``
            rows (at least one).
        pad_to: ``longest`` (pad to the batch's longest row) or ``bucket`` (to the bucket edge).
    """

    edges: list[int]
    tokens_per_batch: int
    pad_to: Literal["longest", "bucket"] = "longest"
    buckets: list[list[Item]] = field(init=False)
    pending: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.buckets = [[] for _ in self.edges]

    def add(self, item: Item) -> None:
        self.buckets[bucket_index(item.length, self.edges)].append(item)
        self.pending += 1

    def _rows_for(self, b: int, longest: int) -> int:
        width = self.edges[b] if self.pad_to == "bucket" else longest
        return max(1, self.tokens_per_batch // max(1, width))

    def _fullness(self, b: int) -> float:
        items = self.buckets[b]
        if not items:
            return 0.0
        return len(items) / self._rows_for(b, self.edges[b])

    def pad_width(self, batch: list[Item]) -> int | None:
        """The length to pad ``batch`` to: None (longest row) or the bucket edge."""
        if self.pad_to == "longest":
            return None
        return self.edges[bucket_index(max(i.length for i in batch), self.edges)]

    def take(self, *, force: bool = False) -> list[Item] | None:
        """A batch from the fullest bucket if one is full (or any batch with ``force``)."""
        best = max(range(len(self.buckets)), key=self._fullness)
        if not self.buckets[best] or (self._fullness(best) < 1.0 and not force):
            return None
        items = self.buckets[best]
        items.sort(key=lambda i: i.length, reverse=True)
        n = self._rows_for(best, items[0].length)
        batch, self.buckets[best] = items[:n], items[n:]
        self.pending -= len(batch)
        return batch

    def drain(self) -> Iterator[list[Item]]:
        """Every remaining item, in batches."""
        while self.pending:
            batch = self.take(force=True)
            assert batch is not None
            yield batch
