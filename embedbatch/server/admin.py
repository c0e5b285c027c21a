"""Auth, injected HTTP faults, admin and metrics endpoints of ``embedbatch serve``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from embedbatch.server.embeddings import EmbeddingsMixin
from embedbatch.server.state import error_response, json_response


class AdminMixin(EmbeddingsMixin):
    """Auth and HTTP faults on every call (the middleware), ``/_admin/counts``,
    ``/_admin/keys`` and Prometheus ``/metrics``."""

    # ---- middleware: auth and HTTP faults -------------------------------------------------------
    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        if request.path in ("/metrics", "/"):  # scraped without a key; the report page checks its own
            return await handler(request)
        if request.path.startswith("/_admin"):  # with --api-key, the admin endpoints need it too
            if self.api_keys is not None and token not in self.api_keys:
                return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
            return await handler(request)
        if not auth.startswith("Bearer ") or not token or (self.api_keys is not None and token not in self.api_keys):
            return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
        f = self.faults
        if not f.paths or any(p in request.path for p in f.paths):
            status = None
            if f.next_statuses:
                status = f.next_statuses.pop(0)
            else:
                r = self.rng.random()
                if r < f.rate_429:
                    status = 429
                elif r < f.rate_429 + f.rate_500:
                    status = 500
                elif r < f.rate_429 + f.rate_500 + f.rate_503:
                    status = 503
            if status is not None:
                self.calls.append((request.method, request.path, status))
                if status == 429:
                    return error_response(
                        429,
                        "Rate limit reached. Please try again later.",
                        type_="requests",
                        code="rate_limit_exceeded",
                        headers={"Retry-After": str(f.retry_after_s)},
                    )
                return error_response(
                    status, "The server had an error while processing your request.", type_="server_error"
                )
        response = await handler(request)
        self.calls.append((request.method, request.path, response.status))
        hit = next((p for p in f.fail_after_commit if request.method == "POST" and request.path.endswith(p)), None)
        if hit is not None and response.status == 200:
            f.fail_after_commit.remove(hit)
            return error_response(500, "The server had an error while processing your request.", type_="server_error")
        return response

    async def admin_counts(self, request: web.Request) -> web.Response:
        return json_response(self.counts())

    async def admin_keys(self, request: web.Request) -> web.Response:
        return json_response(self.key_usage())

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: calls by path and status, batches by status, tokens and 429s per key."""
        try:
            from prometheus_client import CollectorRegistry, generate_latest
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        except ImportError:
            return web.Response(status=404, text="install the metrics extra: pip install 'embedbatch[metrics]'\n")
        state = self

        class _Collector:
            def describe(self) -> list[Any]:
                return []

            def collect(self) -> Any:
                calls = CounterMetricFamily("embedbatch_server_requests", "Calls answered", labels=["path", "status"])
                counted: dict[tuple[str, str], int] = {}
                for _, path, status in list(state.calls):
                    kind = path.split("/")[2] if path.count("/") >= 2 else path
                    counted[(kind, str(status))] = counted.get((kind, str(status)), 0) + 1
                for key, n in counted.items():
                    calls.add_metric(list(key), n)
                batches = GaugeMetricFamily("embedbatch_server_batches", "Batches by status", labels=["status"])
                by_status: dict[str, int] = {}
                for b in list(state.batches.values()):
                    by_status[b["status"]] = by_status.get(b["status"], 0) + 1
                for st, n in by_status.items():
                    batches.add_metric([st], n)
                tokens = CounterMetricFamily("embedbatch_server_tokens", "Embedding tokens let through", labels=["key"])
                limited = CounterMetricFamily("embedbatch_server_rate_limited", "429s answered", labels=["key"])
                for fp, use in state.key_usage().items():
                    tokens.add_metric([fp], use["tokens"])
                    limited.add_metric([fp], use["rate_limited"])
                yield from (calls, batches, tokens, limited)

        registry = CollectorRegistry()
        registry.register(_Collector())  # type: ignore[arg-type]
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")
