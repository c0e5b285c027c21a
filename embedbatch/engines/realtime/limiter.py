"""Client-side rate limiting for ``/v1/embeddings``: a token bucket per key for requests and
tokens per minute, kept in step with the provider's ``x-ratelimit-*`` headers.

OpenAI's limits (rate-limits guide, checked 2026-11) are per organization/project and model,
in requests and tokens per minute, and behave as buckets that refill continuously; each
answer carries ``x-ratelimit-limit-{requests,tokens}``, ``x-ratelimit-remaining-*`` and
``x-ratelimit-reset-*`` (durations such as ``1s``, ``6m0s``, ``20ms``), and a 429 may carry
``retry-after`` (seconds) or ``retry-after-ms``.

The bucket spends locally when a request is sent, so it never runs ahead of the provider's
count (which spends on arrival); headers only ever lower it (another client on the same key)
or replace an unknown or wrong limit.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["Bucket", "KeyLimiter", "fingerprint", "parse_duration_s"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(text: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value (``"6m0s"``, ``"1.5s"``, ``"20ms"``) or a bare
    number of seconds; None when absent or unreadable."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def fingerprint(key: str) -> str:
    """A short, stable name for an API key that is safe to log: ``key:`` + 8 hex digits of its
    sha256 (the key itself never reaches logs or files)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass
class Bucket:
    """A per-minute limit as a bucket of ``limit`` units refilling at ``limit / 60`` per second.

    Attributes:
        limit: units per minute (requests or tokens); None: unknown (no limit enforced).
        level: units available now (float, may be fractional).
    """

    limit: float | None
    level: float = 0.0
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.limit is not None and not self.level:
            self.level = self.limit

    def refill(self, now: float) -> None:
        if self.limit is not None and now > self.updated:
            self.level = min(self.limit, self.level + (now - self.updated) * self.limit / 60.0)
        self.updated = max(self.updated, now)

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` units are available (an amount over the limit waits for a
        full bucket); 0 when they are now."""
        self.refill(now)
        if self.limit is None:
            return 0.0
        need = min(amount, self.limit) - self.level
        return 0.0 if need <= 0 else need * 60.0 / self.limit

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        if self.limit is not None:
            self.level -= min(amount, self.limit)

    def sync(self, limit: float | None, remaining: float | None, now: float) -> None:
        """Adopt the provider's limit, and lower the level to what it says remains."""
        self.refill(now)
        if limit is not None and limit > 0 and limit != self.limit:
            if self.limit is None:
                self.level = limit if remaining is None else remaining
            else:
                self.level = self.level * limit / self.limit
            self.limit = limit
        if remaining is not None and self.limit is not None:
            self.level = min(self.level, remaining)


def _number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


@dataclass
class KeyLimiter:
    """The requests and tokens buckets of one API key, plus what the key has done.

    Args:
        rpm / tpm: the limits to start from (None: unknown until the first answer's headers;
            until then one request at a time is sent on this key; an answer without such
            headers means the provider does not limit).
        clock: seconds, monotonic (tests pass their own).
    """

    rpm: float | None = None
    tpm: float | None = None
    clock: Callable[[], float] = time.monotonic
    requests: Bucket = field(init=False)
    tokens: Bucket = field(init=False)
    blocked_until: float = 0.0
    in_flight: int = 0
    learned: bool = False
    sent: int = 0
    tokens_sent: int = 0
    answered_429: int = 0

    def __post_init__(self) -> None:
        now = self.clock()
        self.requests = Bucket(self.rpm, updated=now)
        self.tokens = Bucket(self.tpm, updated=now)
        self.learned = self.rpm is not None or self.tpm is not None

    def wait_s(self, tokens: int) -> float | None:
        """Seconds until a request of ``tokens`` may be sent on this key; None: wait for an
        answer first (limits unknown and a request in flight)."""
        if not self.learned and self.in_flight:
            return None
        now = self.clock()
        return max(self.blocked_until - now, self.requests.wait_s(1, now), self.tokens.wait_s(tokens, now), 0.0)

    def take(self, tokens: int) -> None:
        """Spend one request and ``tokens`` now (the request is being sent)."""
        now = self.clock()
        self.requests.take(1, now)
        self.tokens.take(tokens, now)
        self.in_flight += 1
        self.sent += 1
        self.tokens_sent += tokens

    def answered(self, headers: Mapping[str, str]) -> None:
        """A request on this key was answered (any status): follow its ``x-ratelimit-*`` headers."""
        self.in_flight -= 1
        now = self.clock()
        limit_r = _number(headers, "x-ratelimit-limit-requests")
        limit_t = _number(headers, "x-ratelimit-limit-tokens")
        self.requests.sync(limit_r, _number(headers, "x-ratelimit-remaining-requests"), now)
        self.tokens.sync(limit_t, _number(headers, "x-ratelimit-remaining-tokens"), now)
        self.learned = True  # an answer without x-ratelimit-* headers means no limits to follow

    def rate_limited(self, headers: Mapping[str, str], fallback_s: float = 1.0) -> float:
        """A 429 on this key: block it until the provider's reset; returns the wait (seconds).

        The wait is ``retry-after-ms``, else ``retry-after``, else the later of the
        ``x-ratelimit-reset-*`` values, else ``fallback_s``.
        """
        self.answered_429 += 1
        wait = None
        if (ms := _number(headers, "retry-after-ms")) is not None:
            wait = ms / 1000.0
        elif (s := _number(headers, "retry-after")) is not None:
            wait = s
        else:
            resets = [
                parse_duration_s(headers.get(f"x-ratelimit-reset-{k}"))
                for k in ("requests", "tokens")
                if headers.get(f"x-ratelimit-reset-{k}")
            ]
            wait = max((r for r in resets if r is not None), default=None)
        wait = fallback_s if wait is None else wait
        now = self.clock()
        self.blocked_until = max(self.blocked_until, now + wait)
        return wait
