"""Engines on the shared core: ``batchapi`` (OpenAI Batch API), ``realtime`` (``/v1/embeddings`` at
the rate limit) and ``local`` (SentenceTransformer, one process or Ray).

Engines import the core, never the reverse, and no engine imports another: what they share
(which rows are done or planned, model option checks, the failed-id codec, starting and saving
a run, checking and writing the database targets) is in the core (``planned.py``,
``tokens.py``, ``failures.py``, ``runs.py``, ``sinks/runner.py``). ``tests/test_layout.py``
checks it.
"""
