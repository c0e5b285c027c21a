"""Deterministic sampling by a seeded hash of the record id.

A row's fate depends only on (seed, id): the same seed and data give the same sample whatever
the file order, and appending rows never changes whether an existing row is chosen by ``--p``.
With ``--n`` the n smallest hashes win, so an appended row can only displace a chosen one by
having a smaller hash (the sample stays a uniform one of the larger dataset).
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Iterable, Iterator
from typing import Any

from embedbatch.config import SampleConfig
from embedbatch.errors import UsageError
from embedbatch.records import Record

__all__ = ["IdFilter", "Sampler", "id_hash"]

_HASH_SPACE = 1 << 64


def id_hash(record_id: str, seed: int) -> int:
    """A 64-bit unsigned hash of ``record_id`` under ``seed`` (blake2b, stable across runs)."""
    digest = hashlib.blake2b(record_id.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "big")


class IdFilter:
    """An ``--ids`` filter such as ``"1,5,10-20,abc"``: exact ids, or integer ranges.

    Raises:
        UsageError: a range whose ends are not integers or are reversed.
    """

    def __init__(self, spec: str) -> None:
        self.exact: set[str] = set()
        self.ranges: list[tuple[int, int]] = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise UsageError(f"--ids range {part!r} is reversed")
                self.ranges.append((lo, hi))
            else:
                self.exact.add(part)
        if not self.exact and not self.ranges:
            raise UsageError("--ids is empty")

    def __contains__(self, record_id: str) -> bool:
        if record_id in self.exact:
            return True
        if self.ranges:
            try:
                value = int(record_id)
            except ValueError:
                return False
            return any(lo <= value <= hi for lo, hi in self.ranges)
        return False


class Sampler:
    """Applies :class:`SampleConfig` to a stream of records.

    ``select`` yields chosen records: streaming for ``--p`` / ``--ids`` (O(1) memory), at the
    end of the stream for ``--n`` (O(n) memory, O(n × strata) with ``--stratify-by``), sorted by
    hash so the order is independent of file order.
    """

    def __init__(self, config: SampleConfig) -> None:
        self.config = config
        self.ids = IdFilter(config.ids) if config.ids else None
        self.seen = 0
        self.selected = 0
        self.strata_counts: dict[str, int] = {}
        self.strata_selected: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        """Criteria and outcome, for run.json and the manifest."""
        out = self.config.describe()
        out.update({"rows_considered": self.seen, "rows_selected": self.selected})
        if self.config.stratify_by:
            out["strata"] = {
                "population": dict(sorted(self.strata_counts.items())),
                "selected": dict(sorted(self.strata_selected.items())),
            }
        return out

    def select(self, records: Iterable[Record]) -> Iterator[Record]:
        cfg = self.config
        threshold = int(cfg.p * _HASH_SPACE) if cfg.p is not None else None
        heaps: dict[str, list[tuple[int, str, int, Record]]] = {}
        for seq, rec in enumerate(records):
            if self.ids is not None and rec.id not in self.ids:
                continue
            self.seen += 1
            stratum = rec.stratum if cfg.stratify_by else ""
            stratum = stratum if stratum is not None else "<null>"
            if cfg.stratify_by:
                self.strata_counts[stratum] = self.strata_counts.get(stratum, 0) + 1
            if cfg.n is None:
                if threshold is None or id_hash(rec.id, cfg.seed) < threshold:
                    self._count(stratum)
                    yield rec
                continue
            h = id_hash(rec.id, cfg.seed)
            heap = heaps.setdefault(stratum, [])
            # A max-heap of the n smallest (negated hash); ties broken by id.
            item = (-h, _neg_key(rec.id), -seq, rec)
            if len(heap) < cfg.n:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
        if cfg.n is None:
            return
        quotas = self._quotas(cfg.n) if cfg.stratify_by else {"": cfg.n}
        chosen: list[tuple[int, str, Record]] = []
        for stratum, heap in heaps.items():
            best = sorted(((-nh, rec.id, rec) for nh, _, _, rec in heap), key=lambda t: (t[0], t[1]))
            chosen.extend(best[: quotas.get(stratum, 0)])
        chosen.sort(key=lambda t: (t[0], t[1]))
        for _, _, rec in chosen:
            self._count(rec.stratum if cfg.stratify_by else "")
            yield rec

    def _count(self, stratum: str | None) -> None:
        self.selected += 1
        if self.config.stratify_by:
            key = stratum if stratum is not None else "<null>"
            self.strata_selected[key] = self.strata_selected.get(key, 0) + 1

    def _quotas(self, n: int) -> dict[str, int]:
        """Proportional allocation of n over strata (largest remainder, ties by name)."""
        total = sum(self.strata_counts.values())
        if total <= n:
            return dict(self.strata_counts)
        exact = {s: n * c / total for s, c in self.strata_counts.items()}
        quotas = {s: int(v) for s, v in exact.items()}
        left = n - sum(quotas.values())
        for s in sorted(exact, key=lambda s: (-(exact[s] - quotas[s]), s))[:left]:
            quotas[s] += 1
        return quotas


class _neg_key(str):
    """Reverses string order so the heap keeps the smallest ids among equal hashes."""

    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)

    def __gt__(self, other: str) -> bool:
        return str.__lt__(self, other)
