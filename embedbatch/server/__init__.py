"""``embedbatch serve``: an OpenAI-compatible HTTP server on loopback (files, batches, embeddings)."""

from embedbatch.server.app import FakeOpenAI, FaultConfig, HashBackend, ServerThread, build_app

__all__ = ["FakeOpenAI", "FaultConfig", "HashBackend", "ServerThread", "build_app"]
