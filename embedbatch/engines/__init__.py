"""Engines on the shared core: ``batchapi`` (OpenAI Batch API) and ``local`` (SentenceTransformer).

No engine imports another; engines import the core, never the reverse.
"""
