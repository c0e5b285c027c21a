"""Engines on the shared core: ``batchapi`` (OpenAI Batch API), ``realtime`` (``/v1/embeddings`` at
the rate limit) and ``local`` (SentenceTransformer, one process or Ray).

Engines import the core, never the reverse. One arrow still runs between engines: ``realtime``
uses the Batch API's planning checks (``skip_done_or_planned``, ``check_model_options``), which
belong in the core (the state-layer issue moves them).
"""
