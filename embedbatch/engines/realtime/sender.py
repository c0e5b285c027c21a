"""Requests to ``/v1/embeddings``: packing, keys with room, retries, and isolating bad rows.

:class:`Sender` packs records into requests (:func:`.packing.pack`), takes a key with room
(:class:`.keys.KeyPool`), and sends through the SDK (:func:`embeddings_once`). A 429 blocks the
key until the provider's reset and the request waits for a key again (not counted as an
attempt); 5xx and transport errors are retried by tenacity with exponential backoff and jitter;
a 400 splits the request in halves until the refused rows are alone, and those fail with the
provider's message. Requests in flight are capped by an AIMD window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from embedbatch.api.openai import EmbeddingAnswer, embeddings_once, new_sdk_client
from embedbatch.config import RealtimeConfig, Settings
from embedbatch.engines.realtime.keys import ConcurrencyWindow, KeyPool
from embedbatch.engines.realtime.packing import pack
from embedbatch.errors import ProviderError, RetryLater
from embedbatch.records import Record

__all__ = ["SendStats", "Sender"]

log = structlog.get_logger(__name__)

REQUEST_SHARE_OF_TPM = 20  # a request carries at most 1/20 of a minute's tokens (3 s of budget)
PROBE_TOKENS = 16_384  # requests sent before any answer has told the limits are at most this


class _RateLimited(Exception):
    """A 429 seen by one attempt (the key is blocked until its reset; try again)."""


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, RetryLater) and exc.status_code != 429 and not exc.unreachable


@dataclass
class SendStats:
    """Requests answered 200, 429 answers, 5xx/transport retries, requests split in two."""

    requests: int = 0
    answered_429: int = 0
    retries: int = 0
    splits: int = 0


class Sender:
    """Sends records as packed requests over the keys, at their rate limits, and hands each
    answer to ``deliver``; rows that cannot be embedded end in :attr:`failed` with the reason.

    Args:
        settings: base URL and timeout.
        keys: the API keys (each gets a limiter).
        cfg: limits, packing, retries.
        deliver: ``await deliver(records, answer)`` for each answered request (in completion
            order; ``answer.vectors`` is ``(len(records), dim) float32``).

    A key the provider refuses (401, 403) is retired with a warning naming its fingerprint and
    the run goes on with the others.

    Raises (from :meth:`run`):
        ProviderError: the provider is unreachable, refuses every key, or refuses the model
            (404): every request would fail the same way.
    """

    def __init__(
        self,
        settings: Settings,
        keys: tuple[str, ...] | list[str],
        cfg: RealtimeConfig,
        deliver: Callable[[list[Record], EmbeddingAnswer], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.cfg = cfg
        self.deliver = deliver
        self.pool = KeyPool(keys, lambda k: new_sdk_client(k, settings), rpm=cfg.max_rpm, tpm=cfg.max_tpm)
        self.failed: list[tuple[Record, str]] = []
        self.stats = SendStats()

    async def run(self, records: Iterator[Record]) -> None:
        """Send every record (read from ``records`` on a worker thread) and wait for all answers."""
        window = ConcurrencyWindow(self.cfg.max_concurrency)
        packs = pack(records, max_inputs=self.cfg.max_inputs, max_tokens=self.request_tokens)
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    await window.__aenter__()
                    await self.pool.known()
                    req = await asyncio.to_thread(next, packs, None)
                    if req is None:
                        await window.__aexit__(None, None, None)
                        break
                    tg.create_task(self._one(req, window))
        except BaseExceptionGroup as group:  # the first real error, not the group (Ctrl-C passes as is)
            errors = [e for e in group.exceptions if not isinstance(e, asyncio.CancelledError)]
            raise (errors or list(group.exceptions))[0] from None
        finally:
            await self.pool.close()

    def request_tokens(self) -> int:
        """Tokens per request: the configured cap, but at most 1/20 of the smallest known
        tokens-per-minute limit, so a request never waits for more than ~3 s of budget and the
        rate stays smooth (the provider's per-request limit is still 300,000); small probes
        while no answer has told the limits yet."""
        if not any(k.limiter.learned for k in self.pool.keys):
            return min(self.cfg.max_request_tokens, PROBE_TOKENS)
        tpm = self.pool.max_tokens()
        if tpm is None:
            return self.cfg.max_request_tokens
        return max(1, min(self.cfg.max_request_tokens, tpm // REQUEST_SHARE_OF_TPM))

    async def _one(self, records: list[Record], window: ConcurrencyWindow) -> None:
        try:
            await self._request(records, window)
        finally:
            await window.__aexit__(None, None, None)

    async def _request(self, records: list[Record], window: ConcurrencyWindow) -> None:
        """Embed ``records`` in one request; split it when it is too large for the key or when
        the provider refuses it (HTTP 400), so only the offending rows fail."""
        tokens = sum(r.n_tokens for r in records)
        if tokens > self.request_tokens() and len(records) > 1:  # packed before the limits were known
            await self._split(records, window)
            return
        try:
            answer = await self._attempts(records, tokens, window)
        except _TooLarge:
            if len(records) > 1:
                await self._split(records, window)
            else:
                self._fail(records, "larger than the tokens-per-minute limit")
            return
        except ProviderError as exc:
            if isinstance(exc, RetryLater) and exc.unreachable:
                raise ProviderError(
                    f"cannot reach the provider at {self.settings.openai_base_url or 'api.openai.com'} ({exc})"
                ) from exc
            if exc.status_code == 400 and len(records) > 1:
                await self._split(records, window)
            elif exc.status_code == 400:  # this row alone: sending it again cannot help
                self._fail(records, f"rejected by the provider (400): {exc}")
            elif exc.status_code == 429 or isinstance(exc, RetryLater):
                self._fail(records, str(exc))
            else:  # 401, 403, 404: the key or model is wrong; every request would fail
                raise
            return
        window.grow()
        await self.deliver(records, answer)

    async def _split(self, records: list[Record], window: ConcurrencyWindow) -> None:
        self.stats.splits += 1
        half = len(records) // 2
        await self._request(records[:half], window)
        await self._request(records[half:], window)

    async def _attempts(self, records: list[Record], tokens: int, window: ConcurrencyWindow) -> EmbeddingAnswer:
        """Tenacity retries 5xx and transport errors; 429s wait for the key's reset and do not
        count as attempts (up to ``max_429`` of them)."""
        n429 = 0

        def count_retry(_: Any) -> None:
            self.stats.retries += 1
            window.shrink()

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self.cfg.attempts),
            wait=wait_exponential_jitter(multiplier=self.cfg.retry_initial_s, max=30, jitter=self.cfg.retry_initial_s),
            before_sleep=count_retry,
            reraise=True,
        ):
            with attempt:
                while True:
                    try:
                        return await self._send(records, tokens)
                    except _KeyRefused:
                        continue  # that key is retired; another one takes the request
                    except _RateLimited as exc:
                        n429 += 1
                        window.shrink()
                        if "too large" in str(exc).lower():
                            raise _TooLarge from exc
                        if n429 > self.cfg.max_429:
                            raise ProviderError(f"rate limited {n429} times: {exc}", status_code=429) from exc
        raise AssertionError("not reached")

    async def _send(self, records: list[Record], tokens: int) -> EmbeddingAnswer:
        key = await self.pool.acquire(tokens)
        try:
            answer = await embeddings_once(
                key.client, [r.text for r in records], model=self.cfg.model, dimensions=self.cfg.dimensions
            )
        except ProviderError as exc:
            if exc.status_code is None:
                self.pool.sent_failed(key)
                raise
            self.pool.answered(key, exc.headers)
            if exc.status_code == 429:
                self.stats.answered_429 += 1
                wait = self.pool.rate_limited(key, exc.headers)
                log.info("rate limited", key=key.name, wait_s=round(wait, 3))
                raise _RateLimited(str(exc)) from exc
            if exc.status_code in (401, 403):  # this key, not the request: the others carry on
                log.warning("API key refused; it is retired for this run", key=key.name, status=exc.status_code)
                self.pool.retire(key, str(exc))
                raise _KeyRefused from exc
            raise
        self.pool.answered(key, answer.headers)
        self.stats.requests += 1
        return answer

    def _fail(self, records: list[Record], reason: str) -> None:
        log.warning("rows failed", rows=len(records), first_id=records[0].id, reason=reason)
        self.failed += [(r, reason) for r in records]


class _KeyRefused(Exception):
    """The key was refused (401/403) and retired; the request goes to another key."""


class _TooLarge(Exception):
    """The request has more tokens than the key's tokens-per-minute limit."""
