"""The quality guard: before a run with a non-default backend, dtype or quantization, a fixed
probe set is embedded with the reference (torch, float32, CPU) and with the chosen path; the run
is refused when the lowest cosine similarity is under ``min_cosine``.

Default thresholds: 0.999 for float16/bfloat16 and the onnx backend, 0.98 for int8.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embedbatch.errors import UsageError

__all__ = ["PROBE_TEXTS", "default_min_cosine", "needs_guard", "probe"]

# Short and long, technical and plain, several scripts: where reduced precision shows first.
PROBE_TEXTS = (
    "A cat sits on the mat.",
    "Graph neural networks for molecular property prediction.",
    "How do I reset my password if I no longer have access to my email?",
    "The refund policy covers purchases made within the last 30 days, provided the item is unused.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Transformers use self-attention to weigh the importance of each token in a sequence. " * 6,
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "SELECT id, text FROM embeddings WHERE dataset = 'papers' ORDER BY created_at DESC LIMIT 10;",
    "ok",
    "Book a table for two in San Jose tonight at seven.",
    "Quantum error correction with surface codes and lattice surgery.",
    "The mitochondria is the powerhouse of the cell.",
    "Patient presents with acute chest pain radiating to the left arm.",
    "Stock markets fell sharply after the central bank raised interest rates by 50 basis points.",
)


def needs_guard(backend: str, dtype: str, quantize: str | None) -> bool:
    """True for anything but torch float32."""
    return backend != "torch" or dtype != "float32" or quantize is not None


def default_min_cosine(dtype: str, quantize: str | None) -> float:
    return 0.98 if quantize == "int8" else 0.999


def probe(reference: Any, candidate: Any, *, min_cosine: float) -> dict[str, Any]:
    """Embed :data:`PROBE_TEXTS` with both encoders; returns ``{"min_cosine", "mean_cosine",
    "threshold", "texts", "backend", "dtype"}``.

    Raises:
        UsageError: the minimum cosine is under ``min_cosine`` (names the backend, dtype and
            both numbers, and what to do).
    """
    texts = list(PROBE_TEXTS)
    a = reference.encode_texts(texts)
    b = candidate.encode_texts(texts)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    result = {
        "min_cosine": round(float(cos.min()), 6),
        "mean_cosine": round(float(cos.mean()), 6),
        "threshold": min_cosine,
        "texts": len(texts),
        "backend": candidate.backend,
        "dtype": candidate.dtype,
    }
    if result["min_cosine"] < min_cosine:
        raise UsageError(
            f"quality check failed: {candidate.backend}/{candidate.dtype} gives a minimum cosine of "
            f"{result['min_cosine']} against torch float32 on {len(texts)} probe texts (--min-cosine {min_cosine}); "
            "use --backend torch --dtype float32, or lower --min-cosine if that is acceptable"
        )
    return result
