"""A SentenceTransformer model as an embedding backend (``serve --model``, ``search --local-model``).

Needs the ``local`` extra (torch, sentence-transformers). Loads from a local path offline when
``HF_HUB_OFFLINE=1``; a hub name downloads as sentence-transformers does.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from embedbatch.errors import MissingExtraError, UsageError

__all__ = ["LocalBackend"]


class LocalBackend:
    """Embeds with one SentenceTransformer; ``embed`` returns ``(n, dim)`` float32, L2-normalised
    (cosine-ready, like OpenAI's embeddings). Thread-safe: one forward pass at a time.

    Args:
        name_or_path: a local model directory or a hub name.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or None (sentence-transformers picks).

    Raises:
        MissingExtraError: torch or sentence-transformers is missing.
        UsageError: the model cannot be loaded.
    """

    def __init__(self, name_or_path: str, *, device: str | None = None, batch_size: int = 32) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise MissingExtraError("sentence-transformers", "local") from exc
        try:
            self.model: Any = SentenceTransformer(name_or_path, device=device)
        except OSError as exc:
            raise UsageError(f"cannot load model {name_or_path!r}: {exc}") from exc
        self.name = name_or_path
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def embed(self, texts: list[str], model: str, dimensions: int | None) -> np.ndarray:
        """Embed ``texts``; ``model`` is ignored (the loaded model answers for every name), and
        ``dimensions`` truncates the (Matryoshka-style) output and renormalises."""
        with self._lock:
            vecs = self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        out = np.asarray(vecs, dtype=np.float32)
        if dimensions is not None and dimensions < out.shape[1]:
            out = out[:, :dimensions]
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out
