"""The API keys of a realtime run: one SDK client and one :class:`KeyLimiter` each, and the
adaptive cap on requests in flight.

:meth:`KeyPool.acquire` hands out the key whose buckets have room soonest (round-robin among
keys that have room now) and spends the request's tokens there before it is sent. All callers
run on one event loop, so checking and spending a bucket is atomic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedbatch.engines.realtime.limiter import KeyLimiter, fingerprint
from embedbatch.errors import ProviderError

__all__ = ["ConcurrencyWindow", "Key", "KeyPool"]


@dataclass
class Key:
    """One API key: its fingerprint (safe to log), SDK client and limiter. The key itself is only
    inside ``client``."""

    name: str
    client: Any
    limiter: KeyLimiter

    def stats(self) -> dict[str, Any]:
        lim = self.limiter
        return {
            "requests": lim.sent,
            "tokens": lim.tokens_sent,
            "answered_429": lim.answered_429,
            "rpm": lim.requests.limit,
            "tpm": lim.tokens.limit,
        }


class KeyPool:
    """Keys with room for the next request.

    Args:
        keys: the API keys (at least one; duplicates are dropped).
        make_client: builds the SDK client of a key.
        rpm / tpm: the per-key limits to start from (None: learned from headers).
        clock: monotonic seconds (tests).
    """

    def __init__(
        self,
        keys: list[str] | tuple[str, ...],
        make_client: Callable[[str], Any],
        *,
        rpm: int | None,
        tpm: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        unique = list(dict.fromkeys(keys))
        if not unique:
            raise ValueError("no API key")
        self.keys = [Key(fingerprint(k), make_client(k), KeyLimiter(rpm, tpm, clock)) for k in unique]
        self.retired: list[Key] = []  # keys the provider refused (401/403): no more requests
        self._turn = 0
        self._changed = asyncio.Event()

    def max_tokens(self) -> int | None:
        """The smallest known tokens-per-minute limit: no request may carry more."""
        limits = [k.limiter.tokens.limit for k in self.keys if k.limiter.tokens.limit is not None]
        return int(min(limits)) if limits else None

    def retire(self, key: Key, reason: str = "") -> None:
        """Take a key the provider refuses (401/403) out of the pool; the others carry on.

        Args:
            reason: the provider's answer (named in the error when no key is left).

        Raises:
            ProviderError: no key is left.
        """
        if key in self.keys:
            self.keys.remove(key)
            self.retired.append(key)
            self._turn = 0
        self._changed.set()
        if not self.keys:
            names = ", ".join(k.name for k in self.retired)
            last = f": {reason}" if reason else ""
            raise ProviderError(f"every API key was refused by the provider ({names}){last}; check OPENAI_API_KEY(S)")

    async def known(self) -> None:
        """Wait while no key's limits are known and every key has its probe request in flight
        (so the next request is packed under the limits its answer brings)."""
        while self.keys and not any(k.limiter.learned or not k.limiter.in_flight for k in self.keys):
            self._changed.clear()
            await self._changed.wait()

    async def acquire(self, tokens: int) -> Key:
        """Wait until a key has room for one request of ``tokens``, spend it there, return the key.

        Raises:
            ProviderError: every key was retired.
        """
        while True:
            n = len(self.keys)
            if not n:
                raise ProviderError("every API key was refused by the provider; check OPENAI_API_KEY(S)")
            best: tuple[float, int] | None = None
            for j in range(n):
                i = (self._turn + j) % n
                wait = self.keys[i].limiter.wait_s(tokens)
                if wait is not None and (best is None or wait < best[0]):
                    best = (wait, i)
            if best is not None and best[0] <= 0:
                key = self.keys[best[1]]
                key.limiter.take(tokens)
                self._turn = (best[1] + 1) % n
                return key
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), None if best is None else best[0])
            except TimeoutError:
                pass

    def answered(self, key: Key, headers: dict[str, str]) -> None:
        """Record an answer on ``key`` (any status) and wake waiters."""
        key.limiter.answered(headers)
        self._changed.set()

    def rate_limited(self, key: Key, headers: dict[str, str]) -> float:
        """Record a 429 on ``key`` (after :meth:`answered`); returns the wait it imposes (s)."""
        wait = key.limiter.rate_limited(headers)
        self._changed.set()
        return wait

    def sent_failed(self, key: Key) -> None:
        """A request on ``key`` got no answer at all (connection broke)."""
        key.limiter.in_flight -= 1
        self._changed.set()

    async def close(self) -> None:
        for key in self.keys + self.retired:
            await key.client.close()


class ConcurrencyWindow:
    """How many requests may be in flight: additive increase while the window is the bottleneck,
    halved on a 429 or a server error (AIMD), between 1 and ``maximum``."""

    def __init__(self, maximum: int, start: int = 4) -> None:
        self.maximum = max(1, maximum)
        self.size = min(self.maximum, start)
        self.in_flight = 0
        self._cond = asyncio.Condition()

    async def __aenter__(self) -> ConcurrencyWindow:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < self.size)
            self.in_flight += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def grow(self) -> None:
        if self.in_flight >= self.size - 1:
            self.size = min(self.maximum, self.size + 1)

    def shrink(self) -> None:
        self.size = max(1, self.size // 2)
