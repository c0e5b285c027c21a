"""The provider boundary: ``openai.AsyncOpenAI`` with tenacity retries and error translation.

The SDK's own retries are off (``max_retries=0``) so one policy owns them: transient failures
(429 honouring Retry-After, 5xx, timeouts, connection resets, a body cut mid-stream) become
:class:`RetryLater` and are retried with exponential backoff and jitter; other 4xx become
:class:`ProviderError` with the API's message. The API key lives only in the SDK client; it is
never logged or stored.

Calls that create something (an upload, a batch) are idempotent: a provider may commit the
request and still answer 5xx, 429 or time out, so before each retry the client looks the object
up (the file by its name, the batch by its metadata) and adopts it instead of sending again.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import openai
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from embedbatch.config import Settings
from embedbatch.errors import DiskError, ProviderError, RetryLater, UsageError

__all__ = ["BatchClient", "EmbeddingAnswer", "RetryPolicy", "embeddings_once", "new_sdk_client"]

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Backoff for transient provider errors: attempts in total, first and largest wait (s).

    ``requeue_s`` is the first wait (doubling per attempt, at most 1 h) before a batch that the
    provider refused with ``token_limit_exceeded`` is created again; ``max_requeues`` caps how
    often that happens before the batch is failed with the reason.
    """

    attempts: int = 8
    initial_s: float = 1.0
    max_s: float = 60.0
    requeue_s: float = 60.0
    max_requeues: int = 12
    unreachable_attempts: int = 4  # connection refused / no DNS: give up after ~7 s, not ~2 min


class _WaitRetryAfter(wait_base):
    """Exponential backoff with jitter, but never shorter than the server's Retry-After."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.backoff = wait_exponential_jitter(multiplier=policy.initial_s, max=policy.max_s, jitter=policy.initial_s)
        self.max_s = policy.max_s

    def __call__(self, retry_state: Any) -> float:
        wait = float(self.backoff(retry_state))
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RetryLater) and exc.retry_after_s is not None:
            wait = max(wait, min(exc.retry_after_s, self.max_s))
        return wait


def _translate(exc: Exception) -> Exception:
    """Map an openai SDK exception to ours (most specific first); answers keep their headers."""
    response = getattr(exc, "response", None)
    headers = dict(response.headers) if response is not None and hasattr(response, "headers") else None
    if isinstance(exc, openai.APITimeoutError):
        return RetryLater(f"request timed out: {exc}")
    if isinstance(exc, openai.APIConnectionError):
        return RetryLater(f"connection failed: {exc}", unreachable=_never_reached(exc))
    if isinstance(exc, openai.RateLimitError):
        retry_after = None
        header = exc.response.headers.get("retry-after") if exc.response is not None else None
        if header:
            try:
                retry_after = float(header)
            except ValueError:
                retry_after = None
        return RetryLater(_message(exc), status_code=429, retry_after_s=retry_after, headers=headers)
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500 or (exc.status_code in (408, 409) and "lock" in _message(exc).lower()):
            return RetryLater(_message(exc), status_code=exc.status_code, headers=headers)
        return ProviderError(_message(exc), status_code=exc.status_code, headers=headers)
    return exc


def _never_reached(exc: BaseException) -> bool:
    """True when the request never reached a server: connection refused or a name that does
    not resolve (seen anywhere in the exception's chain)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError | socket.gaierror):
            return True
        text = str(seen).lower()
        if "connection refused" in text or "name or service not known" in text or "nodename nor servname" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _StopUnreachable(stop_base):
    """Stop early when the provider cannot be reached at all (offline, wrong URL)."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts

    def __call__(self, retry_state: Any) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return bool(getattr(exc, "unreachable", False)) and retry_state.attempt_number >= self.attempts


def _is_transport_error(exc: Exception) -> bool:
    """A network error from the SDK's HTTP stack (httpx/httpcore or their successors) or the OS,
    raised outside the SDK's own error types, e.g. while a response body streams."""
    module = type(exc).__module__.split(".")[0]
    if isinstance(exc, OSError) and exc.errno in DiskError.ERRNOS:  # our own disk, not the network
        return False
    return isinstance(exc, OSError) or module.startswith(("httpx", "httpcore", "h11", "anyio"))


def _message(exc: openai.APIError) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc.message)


def new_sdk_client(api_key: str, settings: Settings) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` for ``api_key`` at the settings' base URL and timeout, SDK retries off."""
    return openai.AsyncOpenAI(
        api_key=api_key, base_url=settings.openai_base_url, timeout=settings.openai_timeout_s, max_retries=0
    )


@dataclass(frozen=True)
class EmbeddingAnswer:
    """One ``/v1/embeddings`` answer.

    Attributes:
        vectors: ``(n, dim) float32``, row i for input i.
        prompt_tokens: ``usage.prompt_tokens`` (what is billed).
        headers: the HTTP headers (``x-ratelimit-*``), lower-case names.
    """

    vectors: np.ndarray
    prompt_tokens: int
    headers: dict[str, str]


async def embeddings_once(
    client: openai.AsyncOpenAI, texts: list[str], *, model: str, dimensions: int | None = None
) -> EmbeddingAnswer:
    """One ``POST /v1/embeddings`` with ``encoding_format=base64``, no retry (the caller owns
    retries and rate limits).

    Raises:
        RetryLater: 429 (``status_code`` 429, with the answer's headers), 5xx, timeouts and
            broken connections.
        ProviderError: other 4xx (with the API's message), or an answer that does not match
            the inputs.
    """
    kwargs: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "base64"}
    if dimensions is not None:
        kwargs["dimensions"] = dimensions
    try:
        raw = await client.embeddings.with_raw_response.create(**kwargs)
        resp = raw.parse()
    except openai.APIError as exc:
        raise _translate(exc) from exc
    except Exception as exc:
        if _is_transport_error(exc):
            raise RetryLater(f"embeddings: connection broke: {exc!r}", unreachable=_never_reached(exc)) from exc
        raise
    data = sorted(resp.data, key=lambda d: d.index)
    if len(data) != len(texts):
        raise ProviderError(f"embeddings: {len(data)} vectors for {len(texts)} inputs")
    rows = [
        np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
        if isinstance(d.embedding, str)
        else np.asarray(d.embedding, dtype=np.float32)
        for d in data
    ]
    if len({len(r) for r in rows}) != 1:
        raise ProviderError("embeddings: vectors of different lengths in one answer")
    return EmbeddingAnswer(
        vectors=np.vstack(rows).astype(np.float32, copy=False),
        prompt_tokens=int(resp.usage.prompt_tokens) if resp.usage else 0,
        headers={k.lower(): v for k, v in raw.headers.items()},
    )


class BatchClient:
    """The calls embedbatch makes, each retried under :class:`RetryPolicy`.

    Args:
        settings: key, base URL and timeout.
        policy: retry policy.
        client: an existing ``AsyncOpenAI`` (tests), else one is built from ``settings``.

    Raises:
        UsageError: no API key is configured.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        policy: RetryPolicy | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        if client is None:
            if not settings.openai_api_key:
                raise UsageError("OPENAI_API_KEY is not set (put it in the environment or .env)")
            client = openai.AsyncOpenAI(
                api_key=settings.openai_api_key,
                base_url=settings.openai_base_url,
                timeout=settings.openai_timeout_s,
                max_retries=0,
            )
        self.client = client
        self.policy = policy or RetryPolicy(
            attempts=settings.retry_attempts, initial_s=settings.retry_initial_s, requeue_s=settings.requeue_s
        )
        self.retries = 0

    async def close(self) -> None:
        await self.client.close()

    async def _call(
        self,
        what: str,
        fn: Callable[[], Awaitable[T]],
        *,
        lookup: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """Run ``fn`` under the retry policy.

        Args:
            lookup: for calls that create something: run before every retry; when it finds the
                object (the failed attempt was committed), that object is the result.
        """
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(RetryLater),
                stop=stop_after_attempt(self.policy.attempts) | _StopUnreachable(self.policy.unreachable_attempts),
                wait=_WaitRetryAfter(self.policy),
                reraise=True,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.retries += 1
                        log.info("retrying", call=what, attempt=attempt.retry_state.attempt_number)
                        if lookup is not None and (found := await lookup()) is not None:
                            log.info("adopted a committed object instead of sending again", call=what)
                            return found
                    try:
                        return await fn()
                    except openai.APIError as exc:
                        raise _translate(exc) from exc
                    except Exception as exc:
                        if _is_transport_error(exc):
                            raise RetryLater(f"{what}: connection broke: {exc!r}") from exc
                        raise
        except RetryLater as exc:
            if exc.unreachable:
                raise ProviderError(
                    f"cannot reach the provider at {self.client.base_url} ({exc}); check the network, "
                    "or OPENAI_BASE_URL if this is not the address you meant"
                ) from exc
            raise
        raise AssertionError("not reached")

    async def upload(self, path: Path, filename: str, *, expires_after_s: int | None = None) -> dict[str, Any]:
        """Upload a batch input file (``purpose=batch``); returns the file object.

        Args:
            expires_after_s: the provider deletes the file this many seconds after upload.
        """

        async def go() -> dict[str, Any]:
            extra: dict[str, Any] = {}
            if expires_after_s is not None:
                extra["expires_after"] = {"anchor": "created_at", "seconds": expires_after_s}
            with open(path, "rb") as fh:
                obj = await self.client.files.create(file=(filename, fh), purpose="batch", **extra)
            return obj.model_dump()

        return await self._call("files.create", go, lookup=lambda: self.find_file(filename))

    async def delete_file(self, file_id: str) -> bool:
        """Delete a file at the provider; False when it is already gone (404)."""

        async def go() -> bool:
            await self.client.files.delete(file_id)
            return True

        try:
            return await self._call("files.delete", go)
        except ProviderError as exc:
            if exc.status_code == 404:
                return False
            raise

    async def find_file(self, filename: str) -> dict[str, Any] | None:
        """The newest uploaded ``purpose=batch`` file named ``filename``, or None."""
        return await self._call("files.list", self._find_file(filename))

    def _find_file(self, filename: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
        async def go() -> dict[str, Any] | None:
            async for f in self.client.files.list(purpose="batch"):
                if f.filename == filename:
                    return f.model_dump()
            return None

        return go

    async def create_batch(
        self, file_id: str, *, window: str, metadata: dict[str, str], output_expires_after_s: int | None = None
    ) -> dict[str, Any]:
        """Create an embeddings batch for an uploaded input file; returns the batch object.

        Args:
            output_expires_after_s: the provider deletes the batch's output and error files
                this many seconds after they are made (``output_expires_after``).
        """

        async def go() -> dict[str, Any]:
            extra: dict[str, Any] = {}
            if output_expires_after_s is not None:
                extra["output_expires_after"] = {"anchor": "created_at", "seconds": output_expires_after_s}
            obj = await self.client.batches.create(
                input_file_id=file_id,
                endpoint="/v1/embeddings",
                completion_window=window,  # type: ignore[arg-type]
                metadata=metadata,
                **extra,
            )
            return obj.model_dump()

        return await self._call("batches.create", go, lookup=lambda: self.find_batch(metadata))

    async def find_batch(self, match: dict[str, str]) -> dict[str, Any] | None:
        """The newest batch whose metadata contains every pair of ``match``, or None."""

        async def go() -> dict[str, Any] | None:
            async for b in self.client.batches.list(limit=100):
                meta = b.metadata or {}
                if all(meta.get(k) == v for k, v in match.items()):
                    return b.model_dump()
            return None

        return await self._call("batches.list", go)

    async def retrieve_batch(self, batch_id: str) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            return (await self.client.batches.retrieve(batch_id)).model_dump()

        return await self._call("batches.retrieve", go)

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            return (await self.client.batches.cancel(batch_id)).model_dump()

        return await self._call("batches.cancel", go)

    async def download(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest`` atomically (never whole in memory); returns bytes.
        A body cut short is retried; a partial file is never left at ``dest``.

        Raises:
            ProviderError: the file does not exist (404) or another terminal error.
        """
        from embedbatch.workspace import atomic_open

        async def go() -> int:
            n = 0
            async with self.client.files.with_streaming_response.content(file_id) as resp:
                with atomic_open(dest) as fh:
                    async for chunk in resp.iter_bytes(1 << 20):
                        fh.write(chunk)
                        n += len(chunk)
            return n

        return await self._call("files.content", go)

    async def embed(self, texts: list[str], *, model: str, dimensions: int | None = None) -> list[list[float]]:
        """Embed texts synchronously through /v1/embeddings (for ``search`` queries)."""

        async def go() -> list[list[float]]:
            kwargs: dict[str, Any] = {"model": model, "input": texts}
            if dimensions is not None:
                kwargs["dimensions"] = dimensions
            resp = await self.client.embeddings.create(**kwargs)
            return [list(d.embedding) for d in sorted(resp.data, key=lambda d: d.index)]

        return await self._call("embeddings.create", go)
