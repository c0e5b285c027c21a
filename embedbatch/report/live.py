"""The report served live at ``/`` (``poll --watch N --ui-port P``, ``serve --ui``): read-only,
rebuilt from the workspace at most once per ``refresh_s`` seconds, and the page reloads
itself as often. Loopback by default; on any other address a key is required (``Bearer`` header
or ``?key=``), as ``serve`` requires one for its API."""

from __future__ import annotations

import hmac
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from embedbatch.workspace import Workspace

__all__ = ["LivePage", "start_ui"]


class LivePage:
    """The workspace's report page, cached for ``refresh_s`` seconds (one build at a time)."""

    def __init__(self, ws: Workspace, *, refresh_s: float = 10.0, keys: list[str] | None = None) -> None:
        self.ws, self.refresh_s, self.keys = ws, refresh_s, keys
        self._lock = threading.Lock()
        self._page: tuple[float, bytes] | None = None

    def html(self) -> bytes:
        """The page (UTF-8), rebuilt when older than ``refresh_s``."""
        from embedbatch.report.data import collect
        from embedbatch.report.page import render

        with self._lock:
            now = time.monotonic()
            if self._page is None or now - self._page[0] >= self.refresh_s:
                self._page = (now, render(collect(self.ws), refresh_s=self.refresh_s).encode())
            return self._page[1]

    def allowed(self, headers: Any, query: str) -> bool:
        """Whether a request may see the page: any, without keys; else one that carries a key
        (``headers``: anything with ``.get``, the stdlib's or aiohttp's)."""
        if not self.keys:
            return True
        given = [headers.get("Authorization", "").removeprefix("Bearer ").strip()]
        given += parse_qs(query).get("key", [])
        return any(hmac.compare_digest(g.encode(), k.encode()) for g in given if g for k in self.keys)


def start_ui(page: LivePage, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``page`` at ``http://host:port/`` from a daemon thread; returns the server (its
    ``server_address`` has the port when ``port`` is 0)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/":
                self.send_error(404)
                return
            if not page.allowed(self.headers, url.query):
                self.send_error(401, "give the key: Authorization: Bearer KEY, or ?key=KEY")
                return
            body = page.html()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # no access log on the terminal

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="embedbatch-ui", daemon=True).start()
    return server
