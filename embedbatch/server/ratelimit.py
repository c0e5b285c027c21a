"""Rate limits as the provider enforces them, for ``serve --rpm/--tpm`` (per API key).

Each key has two buckets, requests and tokens per minute, holding at most one minute's limit
and refilling continuously (OpenAI rate-limits guide, checked 2026-11). A request is counted
on arrival with the tokens of its inputs (cl100k_base); when a bucket lacks room the answer is
a 429 with the provider's body (``type`` ``requests`` or ``tokens``, ``code``
``rate_limit_exceeded``) and every answer carries ``x-ratelimit-limit-*``,
``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (time until the bucket is full); a
429 also carries ``retry-after-ms`` (time until the request would fit). A request with more tokens than the
per-minute limit can never pass and is refused as "Request too large".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KeyUsage", "ProviderLimits", "format_duration"]


def format_duration(seconds: float) -> str:
    """The provider's reset notation: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


@dataclass
class _Window:
    limit: int
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.at) * self.limit / 60.0)
        self.at = now

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.limit - self.level) * 60.0 / self.limit


@dataclass
class KeyUsage:
    """What one key did: requests and tokens let through, 429s answered."""

    requests: int = 0
    tokens: int = 0
    rate_limited: int = 0


@dataclass
class ProviderLimits:
    """Per-key requests/tokens per minute (None: not limited)."""

    rpm: int | None = None
    tpm: int | None = None
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, tuple[_Window | None, _Window | None]] = field(default_factory=dict)
    usage: dict[str, KeyUsage] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _get(self, key: str, now: float) -> tuple[_Window | None, _Window | None]:
        if key not in self._windows:
            self._windows[key] = (
                _Window(self.rpm, float(self.rpm), now) if self.rpm else None,
                _Window(self.tpm, float(self.tpm), now) if self.tpm else None,
            )
        for w in self._windows[key]:
            if w is not None:
                w.refill(now)
        return self._windows[key]

    def admit(self, key: str, tokens: int, model: str) -> tuple[dict[str, str], dict[str, Any] | None]:
        """Count a request of ``tokens`` on ``key``; returns (headers, None) when it may run, or
        (headers, 429 error body) when it may not."""
        now = self.clock()
        req_w, tok_w = self._get(key, now)
        use = self.usage.setdefault(key, KeyUsage())
        error = None
        wait = 0.0
        if tok_w is not None and tokens > tok_w.limit:
            error = self._body(
                f"Request too large for {model} on tokens per min (TPM): Limit {tok_w.limit}, "
                f"Requested {tokens}. The input or output tokens must be reduced in order to run successfully.",
                "tokens",
            )
        elif req_w is not None and req_w.level < 1:
            wait = (1 - req_w.level) * 60.0 / req_w.limit
            error = self._body(
                f"Rate limit reached for {model} in organization org-embedbatch on requests per min (RPM): "
                f"Limit {req_w.limit}, Used {req_w.limit}, Requested 1. Please try again in {format_duration(wait)}.",
                "requests",
            )
        elif tok_w is not None and tok_w.level < tokens:
            wait = (tokens - tok_w.level) * 60.0 / tok_w.limit
            used = round(tok_w.limit - tok_w.level)
            error = self._body(
                f"Rate limit reached for {model} in organization org-embedbatch on tokens per min (TPM): "
                f"Limit {tok_w.limit}, Used {used}, Requested {tokens}. Please try again in {format_duration(wait)}.",
                "tokens",
            )
        if error is None:
            if req_w is not None:
                req_w.level -= 1
            if tok_w is not None:
                tok_w.level -= tokens
            use.requests += 1
            use.tokens += tokens
        else:
            use.rate_limited += 1
        headers = self._headers(req_w, tok_w)
        if error is not None and wait:
            headers["retry-after-ms"] = str(max(1, round(wait * 1000)))
        return headers, error

    @staticmethod
    def _headers(req_w: _Window | None, tok_w: _Window | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, w in (("requests", req_w), ("tokens", tok_w)):
            if w is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(w.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, int(w.level)))
                headers[f"x-ratelimit-reset-{name}"] = format_duration(w.reset_s())
        return headers

    @staticmethod
    def _body(message: str, kind: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": "rate_limit_exceeded"}}
