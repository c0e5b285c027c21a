"""An asyncio server speaking the subset of the OpenAI HTTP API that embedbatch uses.

Endpoints: POST/GET/DELETE ``/v1/files``, GET ``/v1/files/{id}/content``, POST/GET
``/v1/batches``, GET ``/v1/batches/{id}``, POST ``/v1/batches/{id}/cancel``, POST
``/v1/embeddings``. Objects, status transitions and limits follow the API reference (2026):
validating → in_progress → finalizing → completed; failed (validation, token_limit_exceeded);
expired with partial output; cancelling → cancelled. Output lines come back in an order that
differs from the input; error-file lines use both shapes the API uses.

Faults (``FaultConfig``) make it the test peer: HTTP 429/500/503 on calls, per-line errors,
failed/expired/slow batches, an enqueued-token limit, a delayed batch create.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

from aiohttp import web

from embedbatch.server.admin import AdminMixin
from embedbatch.server.backends import EmbeddingBackend, HashBackend
from embedbatch.server.batches import BatchesMixin
from embedbatch.server.faults import FaultConfig
from embedbatch.server.files import FilesMixin
from embedbatch.server.state import MAX_FILE_BYTES, TERMINAL

if TYPE_CHECKING:
    from embedbatch.report.live import LivePage

__all__ = ["EmbeddingBackend", "FakeOpenAI", "FaultConfig", "HashBackend", "ServerThread", "build_app"]


class FakeOpenAI(FilesMixin, BatchesMixin, AdminMixin):
    """Server state: files on disk, batches in memory, a background task per batch.

    Args:
        root: where uploaded and produced files are stored.
        api_key: the bearer token clients must send (None: any non-empty token); several keys
            separated by commas are all accepted, each with its own rate limits.
        backend: the embedding model.
        limits: rate limits per key on ``/v1/embeddings`` (``serve --rpm/--tpm``).
    """


def build_app(state: FakeOpenAI, *, ui: LivePage | None = None) -> web.Application:
    """The aiohttp application serving ``state`` under ``/v1`` (and, with ``ui``, the live
    report page at ``/``, read-only, behind the same keys as the API)."""
    app = web.Application(middlewares=[state.middleware], client_max_size=MAX_FILE_BYTES + (1 << 20))
    r = app.router
    r.add_post("/v1/files", state.create_file)
    r.add_get("/v1/files", state.list_files)
    r.add_get("/v1/files/{file_id}", state.get_file)
    r.add_delete("/v1/files/{file_id}", state.delete_file)
    r.add_get("/v1/files/{file_id}/content", state.file_content)
    r.add_post("/v1/batches", state.create_batch)
    r.add_get("/v1/batches", state.list_batches)
    r.add_get("/v1/batches/{batch_id}", state.get_batch)
    r.add_post("/v1/batches/{batch_id}/cancel", state.cancel_batch)
    r.add_post("/v1/embeddings", state.embeddings)
    r.add_get("/_admin/counts", state.admin_counts)
    r.add_get("/_admin/keys", state.admin_keys)
    r.add_get("/metrics", state.metrics)
    if ui is not None:
        page = ui

        async def report_page(request: web.Request) -> web.Response:
            if not page.allowed(request.headers, request.query_string):
                return web.Response(status=401, text="give the key: Authorization: Bearer KEY, or ?key=KEY")
            body = await asyncio.to_thread(page.html)
            return web.Response(body=body, content_type="text/html", charset="utf-8")

        r.add_get("/", report_page)
    return app


class ServerThread:
    """Runs a :class:`FakeOpenAI` on 127.0.0.1 in a background thread (tests, demos).

    Attributes:
        base_url: ``http://127.0.0.1:{port}/v1`` once started.
    """

    def __init__(self, state: FakeOpenAI, port: int = 0) -> None:
        self.state = state
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(build_app(self.state), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("server did not start")
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        async def shutdown() -> None:
            for t in list(self.state.tasks):
                t.cancel()
            if self._runner is not None:
                await self._runner.cleanup()
            self.state.worker.shutdown(wait=False, cancel_futures=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Block until no batch is in a non-terminal state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(b["status"] in TERMINAL for b in list(self.state.batches.values())):
                return
            time.sleep(0.02)
        raise TimeoutError("batches still running")
