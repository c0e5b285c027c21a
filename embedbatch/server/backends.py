"""The embedding models ``serve`` answers with: any :class:`EmbeddingBackend`, by default
the deterministic :class:`HashBackend`."""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np

from embedbatch.tokens import MODEL_DIMENSIONS


class EmbeddingBackend(Protocol):
    """Turns texts into vectors: ``embed(texts, model, dimensions) -> (n, dim) float32``."""

    def embed(self, texts: list[str], model: str, dimensions: int | None) -> np.ndarray: ...


class HashBackend:
    """A deterministic stand-in model: a unit vector seeded by sha256(model, dims, text).

    Equal texts give equal vectors; different texts give (near-)orthogonal ones. Dimensions:
    the model's default (1536 for text-embedding-3-small) or ``dimensions``.
    """

    def __init__(self, default_dim: int = 1536) -> None:
        self.default_dim = default_dim

    def dim_for(self, model: str, dimensions: int | None) -> int:
        return dimensions or MODEL_DIMENSIONS.get(model, self.default_dim)

    def embed(self, texts: list[str], model: str, dimensions: int | None) -> np.ndarray:
        dim = self.dim_for(model, dimensions)
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = hashlib.sha256(f"{model}\x00{dim}\x00{text}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
            v = rng.standard_normal(dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out
