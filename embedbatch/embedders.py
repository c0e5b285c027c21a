"""Embed a list of strings directly from Python: the :class:`Embedder` protocol and its two
implementations, OpenAI's ``/v1/embeddings`` (the realtime engine's sender: rate limits, several
keys, retries) and a local SentenceTransformer (the local engine's bucketed encoder).

>>> from embedbatch.embedders import OpenAIEmbedder
>>> vectors = OpenAIEmbedder().embed(["a sentence", "another"])   # (2, 1536) float32
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from embedbatch.config import DEFAULT_MODEL, RealtimeConfig, Settings
from embedbatch.errors import ProviderError, UsageError

__all__ = ["Embedder", "LocalEmbedder", "OpenAIEmbedder"]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors: ``embed(texts) -> (len(texts), dim) float32``, row i for text i."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class OpenAIEmbedder:
    """``/v1/embeddings`` through the realtime engine's sender.

    Texts are cut to the model's 8,192 input tokens (cl100k_base), packed into requests of at
    most 2,048 inputs and 300,000 tokens, and sent at the keys' rate limits.

    Args:
        model / dimensions: the embedding model and optional shortened dimension.
        settings: keys (``OPENAI_API_KEYS`` or ``OPENAI_API_KEY``) and base URL; default: the
            environment (:meth:`Settings.from_env`).
        config: rate limits and packing (default: learned from the answers' headers).

    Raises:
        UsageError: no API key.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dimensions: int | None = None,
        settings: Settings | None = None,
        config: RealtimeConfig | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        if not self.settings.api_keys():
            raise UsageError("OPENAI_API_KEY (or OPENAI_API_KEYS) is not set (environment or .env)")
        self.config = config or RealtimeConfig(model=model, dimensions=dimensions)
        self.usage_tokens = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns ``(len(texts), dim) float32``.

        Raises:
            ProviderError: a text was refused (its index and the provider's message), or the
                provider is unreachable or refuses the key or model.
        """
        import anyio

        from embedbatch.api.openai import EmbeddingAnswer
        from embedbatch.engines.realtime.sender import Sender
        from embedbatch.records import Record
        from embedbatch.tokens import get_tokenizer

        if not texts:
            return np.zeros((0, 0), np.float32)
        tok = get_tokenizer(self.config.model)
        records = []
        for i, text in enumerate(texts):
            cut = tok.cut(text, 8192)
            records.append(Record(str(i), "python", "python", None, cut, len(tok.encode(cut))))
        out: list[np.ndarray | None] = [None] * len(records)

        async def deliver(batch: list[Record], answer: EmbeddingAnswer) -> None:
            self.usage_tokens += answer.prompt_tokens
            for rec, vec in zip(batch, answer.vectors, strict=True):
                out[int(rec.id)] = vec

        sender = Sender(self.settings, self.settings.api_keys(), self.config, deliver)
        anyio.run(sender.run, iter(records))
        if sender.failed:
            rec, reason = sender.failed[0]
            raise ProviderError(f"{len(sender.failed)} text(s) not embedded; text {rec.id}: {reason}")
        return np.vstack([v for v in out if v is not None]).astype(np.float32, copy=False)


class LocalEmbedder:
    """A SentenceTransformer on this machine (GPU or CPU), through the local engine's encoder
    (token-length batches, no padding waste).

    Args:
        model: a SentenceTransformer path or hub name (offline: a local directory or a model
            shipped in a package).
        device / dtype: as for ``embedbatch local``.

    Raises:
        MissingExtraError: the ``local`` extra is not installed.
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "float32") -> None:
        from embedbatch.engines.local.model import LocalBackend

        self.backend = LocalBackend(model, device=device, dtype=dtype)

    @property
    def dim(self) -> int:
        return self.backend.dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns ``(len(texts), dim) float32`` (unit length)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.backend.embed(list(texts), "", None)
