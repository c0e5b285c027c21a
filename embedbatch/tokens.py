"""Tokenizers, prices and cost estimates.

OpenAI embedding models use the ``cl100k_base`` encoding (tiktoken's ``encoding_for_model``
table, 2026); we load it offline from ``bpe-openai``, which ships the ranks.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Protocol

from embedbatch.errors import UsageError

__all__ = [
    "MODEL_DIMENSIONS",
    "PRICES",
    "PRICES_AS_OF",
    "HFTokenizer",
    "ModelPrice",
    "Tokenizer",
    "check_model_options",
    "cost_usd",
    "get_tokenizer",
    "queue_tokens",
]

PRICES_AS_OF = "2026-11"


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M input tokens at standard and at Batch API prices."""

    standard_per_m: float
    batch_per_m: float


# Source: OpenAI pricing page, embeddings section (Batch API is 50% off), as of 2026.
PRICES: dict[str, ModelPrice] = {
    "text-embedding-3-small": ModelPrice(0.02, 0.01),
    "text-embedding-3-large": ModelPrice(0.13, 0.065),
    "text-embedding-ada-002": ModelPrice(0.10, 0.05),
}

# Default output dimensions (OpenAI embeddings guide, 2026). Only text-embedding-3-* accept
# the ``dimensions`` parameter.
MODEL_DIMENSIONS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


def supports_dimensions(model: str) -> bool:
    """True for models that accept ``dimensions`` (text-embedding-3-*)."""
    return model.startswith("text-embedding-3")


def check_model_options(model: str, dimensions: int | None) -> None:
    """Check ``dimensions`` for ``model`` before anything is planned or sent: only
    text-embedding-3-* take it (embeddings API reference, 2026), at most the model's own size.

    Raises:
        UsageError: dimensions below 1, for a model that does not take them, or above its size.
    """
    if dimensions is None:
        return
    if dimensions < 1:
        raise UsageError(f"--dimensions must be positive, got {dimensions}")
    if not supports_dimensions(model) and model.startswith("text-embedding-"):
        raise UsageError(f"--dimensions is only supported by text-embedding-3 models, not {model}")
    most = MODEL_DIMENSIONS.get(model) if supports_dimensions(model) else None
    if most is not None and dimensions > most:
        raise UsageError(f"--dimensions {dimensions} is more than {model} gives ({most}); nothing was planned")


def cost_usd(model: str, tokens: int) -> tuple[float | None, float | None]:
    """(standard, batch) cost in USD for ``tokens`` input tokens; (None, None) for unpriced models."""
    price = PRICES.get(model)
    if price is None:
        return None, None
    return tokens * price.standard_per_m / 1e6, tokens * price.batch_per_m / 1e6


def queue_tokens(n_tokens: int, n_bytes: int) -> int:
    """Tokens to count against the enqueued-token limit for one input.

    OpenAI's server-side estimate can exceed a local tokenizer count, so take the larger of the
    tokenizer count and UTF-8 bytes / 4 (rounded up).
    """
    return max(n_tokens, -(-n_bytes // 4))


class Tokenizer(Protocol):
    """What preparation needs of a tokenizer: count tokens, and cut a text at a token boundary."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def cut(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` (original characters) that is at most ``max_tokens`` tokens."""
        ...


class _Cl100k:
    """cl100k_base via bpe-openai; special-token text is treated as plain text."""

    name = "cl100k_base"

    def __init__(self) -> None:
        import bpe_openai

        self._enc = bpe_openai.get_encoding("cl100k_base")

    def encode(self, text: str) -> list[int]:
        return list(self._enc.encode_ordinary(text))

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """``(start, end)`` character span of each token (tokens that share a character, the
        bytes of one emoji, are one span), in windows the tokenizer accepts."""
        spans: list[tuple[int, int]] = []
        for base in range(0, len(text), 40_000):
            window = text[base : base + 40_000]
            decoded, starts = self._enc.decode_with_offsets(self._enc.encode_ordinary(window))
            if decoded != window:  # not expected for ordinary text; fall back to one span
                spans.append((base, base + len(window)))
                continue
            bounds = [*sorted(set(starts)), len(window)]
            spans += [(base + a, base + b) for a, b in itertools.pairwise(bounds) if b > a]
        return spans

    def cut(self, text: str, max_tokens: int) -> str:
        tokens = self.encode(text)
        if len(tokens) <= max_tokens:
            return text
        # Byte-level BPE: decode the kept tokens; a cut inside a multi-byte character leaves
        # U+FFFD at the end, which is dropped. Re-tokenising can merge differently, so re-check.
        keep = max_tokens
        while True:
            out = str(self._enc.decode(tokens[:keep])).rstrip("\ufffd")
            if len(self.encode(out)) <= max_tokens or keep == 0:
                return out
            keep -= 1


class HFTokenizer:
    """A Hugging Face fast tokenizer (local models), counting without special tokens.

    Args:
        name_or_path: load with ``AutoTokenizer`` from here, unless ``tokenizer`` is given.
        tokenizer: an existing tokenizer instance (not shared across threads).
    """

    def __init__(self, name_or_path: str, tokenizer: Any = None) -> None:
        self.name = name_or_path
        if tokenizer is None:
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:
                from embedbatch.errors import MissingExtraError

                raise MissingExtraError("transformers", "local") from exc
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """``(start, end)`` character span of each token."""
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return [(int(a), int(b)) for a, b in enc["offset_mapping"] if b > a]

    def cut(self, text: str, max_tokens: int) -> str:
        # Cut at the character offset where the last kept token ends, so the text keeps its
        # original characters (decoding WordPiece would lowercase and re-space it).
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_tokens:
            return text
        return text[: offsets[max_tokens - 1][1]] if max_tokens > 0 else ""


@functools.lru_cache(maxsize=8)
def get_tokenizer(model: str) -> Tokenizer:
    """The tokenizer for ``model``: cl100k_base for OpenAI embedding models and unknown API
    models, the model's own tokenizer for a local path.

    Raises:
        UsageError: the tokenizer cannot be loaded.
    """
    import os

    if model in PRICES or not os.path.isdir(model):
        return _Cl100k()
    try:
        return HFTokenizer(model)
    except OSError as exc:
        raise UsageError(f"cannot load the tokenizer of {model!r}: {exc}") from exc
