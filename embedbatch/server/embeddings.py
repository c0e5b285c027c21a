"""The Embeddings endpoint of ``embedbatch serve`` (and how a batch line is embedded)."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import asdict
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from embedbatch.server.state import ServerState, fingerprint, json_response
from embedbatch.tokens import MODEL_DIMENSIONS


class EmbeddingsMixin(ServerState):
    """``/v1/embeddings`` under per-key rate limits; batch lines are answered the same way."""

    # ---- embeddings -------------------------------------------------------------------------
    def key_usage(self) -> dict[str, dict[str, int]]:
        """Per key (by fingerprint, never the key): requests and tokens let through, 429s."""
        return {fingerprint(k): asdict(u) for k, u in self.limits.usage.items()}

    def embeddings_result(
        self, body: dict[str, Any], tokens: list[int] | None = None, *, vectors: np.ndarray | None = None
    ) -> tuple[dict[str, Any], int]:
        """The /v1/embeddings answer for ``body`` and its HTTP status (``tokens``: per input, when
        already counted; ``vectors``: the inputs' vectors, when already embedded)."""
        model = body.get("model")
        inp = body.get("input")
        if not isinstance(model, str) or not model:
            return {
                "error": {
                    "message": "you must provide a model parameter",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": None,
                }
            }, 400
        texts = inp if isinstance(inp, list) else [inp]
        if not texts or not all(isinstance(t, str) and t for t in texts):
            return {
                "error": {
                    "message": "'input' must be a non-empty string or array of strings",
                    "type": "invalid_request_error",
                    "param": "input",
                    "code": None,
                }
            }, 400
        dims = body.get("dimensions")
        if dims is not None and not model.startswith("text-embedding-3") and model in MODEL_DIMENSIONS:
            return {
                "error": {
                    "message": f"This model does not support specifying dimensions: {model}",
                    "type": "invalid_request_error",
                    "param": "dimensions",
                    "code": None,
                }
            }, 400
        if tokens is None or len(tokens) != len(texts):
            tokens = [len(self.tokenizer.encode(str(t))) for t in texts]
        if self.faults.reject_text and any(self.faults.reject_text in str(t) for t in texts):
            return {
                "error": {
                    "message": "'input' contains content that cannot be processed",
                    "type": "invalid_request_error",
                    "param": "input",
                    "code": None,
                }
            }, 400
        if max(tokens) > 8192:
            return {
                "error": {
                    "message": "This model's maximum context length is 8192 tokens.",
                    "type": "invalid_request_error",
                    "param": "input",
                    "code": None,
                }
            }, 400
        vecs = vectors if vectors is not None else self.backend.embed([str(t) for t in texts], model, dims)
        fmt = body.get("encoding_format", "float")
        data = []
        for i, v in enumerate(vecs):
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)},
        }, 200

    async def embeddings(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        loop = asyncio.get_running_loop()
        headers: dict[str, str] = {}
        counted: list[int] | None = None
        if self.limits.enabled:
            inp = body.get("input")
            texts = inp if isinstance(inp, list) else [inp]
            counted = await loop.run_in_executor(None, lambda: [len(self.tokenizer.encode(str(t))) for t in texts])
            key = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            headers, refused = self.limits.admit(key, sum(counted), str(body.get("model")))
            if refused is not None:
                resp = json_response(refused, 429)
                resp.headers.update(headers)
                return resp
        result, status = await loop.run_in_executor(None, self.embeddings_result, body, counted)
        if self.faults.latency_s:
            await asyncio.sleep(self.faults.latency_s)
        resp = json_response(result, status)
        resp.headers.update(headers)
        return resp
