"""embedbatch: datasets to embeddings, through the OpenAI Batch API or local models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
