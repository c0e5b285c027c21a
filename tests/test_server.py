"""The loopback provider (`embedbatch serve`) itself: it keeps answering while batches run."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openai
import orjson

from embedbatch.server import FakeOpenAI, FaultConfig, HashBackend, ServerThread
from tests.conftest import API_KEY


class _GatedBackend(HashBackend):
    """A model that blocks inside ``embed`` until the test opens the gate (a slow local model)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def embed(self, texts: list[str], model: str, dimensions: int | None) -> np.ndarray:
        self.entered.set()
        if not self.gate.wait(60):
            raise RuntimeError("the test never opened the gate")
        return super().embed(texts, model, dimensions)


def test_endpoints_answer_while_a_batch_embeds(tmp_path: Path) -> None:
    """While a batch's model call is under way, /v1/models-style reads, batch retrieve and
    cancel answer at once (batch work runs on a worker thread, never on the request loop)."""
    backend = _GatedBackend()
    state = FakeOpenAI(tmp_path / "srv", api_key=API_KEY, backend=backend, faults=FaultConfig(step_s=0.0))
    srv = ServerThread(state).start()
    try:
        # timeout: a blocked-loop detector, not a speed target (a blocked loop never answers until the gate opens).
        api = openai.OpenAI(api_key=API_KEY, base_url=srv.base_url, timeout=20, max_retries=0)
        lines = b"".join(
            orjson.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": "text-embedding-3-small", "input": f"text {i}"},
                }
            )
            + b"\n"
            for i in range(5)
        )
        f = api.files.create(file=("in.jsonl", lines), purpose="batch")
        b = api.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        assert backend.entered.wait(20), "the batch never reached the model"
        assert [f.id] == [x.id for x in api.files.list()]
        assert "in_progress" == api.batches.retrieve(b.id).status
        assert "cancelling" == api.batches.cancel(b.id).status
        backend.gate.set()
        srv.wait_idle()
        assert "cancelled" == api.batches.retrieve(b.id).status
    finally:
        backend.gate.set()
        srv.stop()
