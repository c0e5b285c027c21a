"""The Batch endpoints of ``embedbatch serve`` and the batch life cycle."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from embedbatch.server.embeddings import EmbeddingsMixin
from embedbatch.server.state import (
    MAX_EMBEDDING_INPUTS,
    MAX_REQUESTS,
    TERMINAL,
    error_response,
    json_response,
)


class BatchesMixin(EmbeddingsMixin):
    """``/v1/batches``: create, list, retrieve, cancel, and the life of a batch on the worker
    (validating → in_progress → finalizing → completed, or failed / expired / cancelled)."""

    # ---- batches ----------------------------------------------------------------------------
    async def create_batch(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        if endpoint not in {"/v1/embeddings", "/v1/chat/completions", "/v1/responses", "/v1/completions"}:
            return error_response(400, f"Invalid endpoint {endpoint!r}.")
        if window != "24h":
            return error_response(400, "Invalid completion_window: only '24h' is supported.")
        if file_id not in self.files:
            return error_response(400, f"Invalid 'input_file_id': '{file_id}'.", code="invalid_file_id")
        metadata = body.get("metadata") or {}
        out_expiry = body.get("output_expires_after")
        if out_expiry is not None:
            anchored = isinstance(out_expiry, dict) and out_expiry.get("anchor") == "created_at"
            seconds = out_expiry.get("seconds") if anchored else None
            if not isinstance(seconds, int) or not 3600 <= seconds <= 2_592_000:
                return error_response(
                    400, "Invalid 'output_expires_after': anchor 'created_at', seconds 3600 to 2592000."
                )
        if len(metadata) > 16 or any(len(str(k)) > 64 or len(str(v)) > 512 for k, v in metadata.items()):
            return error_response(400, "Invalid metadata: at most 16 pairs, keys ≤ 64 and values ≤ 512 characters.")
        now = int(time.time())
        bid = self._new_id("batch")
        batch: dict[str, Any] = {
            "id": bid,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
            "model": None,
            "usage": None,
        }
        self.batches[bid] = batch
        if out_expiry is not None:
            self.output_expiry_s[bid] = out_expiry["seconds"]
        fate = "ok"
        if self.faults.fail_batches > 0:
            self.faults.fail_batches -= 1
            fate = "fail"
        elif self.faults.expire_batches > 0:
            self.faults.expire_batches -= 1
            fate = "expire"
        task = asyncio.get_running_loop().create_task(self._run_batch(bid, fate))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if self.faults.create_delay_s:
            await asyncio.sleep(self.faults.create_delay_s)
        return json_response(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        items = sorted(self.batches.values(), key=lambda b: (b["created_at"], b["id"]), reverse=True)
        return json_response(self._page(request, items, default_limit=20))

    async def get_batch(self, request: web.Request) -> web.Response:
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return error_response(404, "No such Batch object", code="not_found")
        return json_response(b)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return error_response(404, "No such Batch object", code="not_found")
        if b["status"] in TERMINAL:
            return error_response(409, f"Cannot cancel a batch with status '{b['status']}'.")
        b["status"] = "cancelling"
        b["cancelling_at"] = int(time.time())
        return json_response(b)

    def _enqueued(self, model: str, exclude: str) -> int:
        return sum(
            t
            for bid, t in self.batch_tokens.items()
            if bid != exclude
            and self.batches[bid]["status"] in ("validating", "in_progress", "finalizing")
            and self.batches[bid].get("model") == model
        )

    def _fail(self, b: dict[str, Any], code: str, message: str, line: int | None = None) -> None:
        b["status"] = "failed"
        b["failed_at"] = int(time.time())
        b["errors"] = {
            "object": "list",
            "data": [{"code": code, "message": message, "param": None, "line": line}],
        }

    def _read_requests(
        self, path: Path, endpoint: str
    ) -> tuple[list[dict[str, Any]], int] | tuple[str, str, int | None]:
        """Parse and validate an input file (on the batch worker): ``(requests, tokens)``, or
        ``(code, message, line)`` when the batch fails validation."""
        requests: list[dict[str, Any]] = []
        n_inputs = 0
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    req = orjson.loads(raw)
                    assert isinstance(req, dict) and {"custom_id", "method", "url", "body"} <= req.keys()
                except (orjson.JSONDecodeError, AssertionError):
                    return "invalid_json_line", f"Line {lineno} is not a valid request.", lineno
                if req["url"] != endpoint:
                    return "mismatched_endpoint", f"Line {lineno}: url does not match the batch endpoint.", lineno
                inp = req["body"].get("input")
                n_inputs += len(inp) if isinstance(inp, list) else 1
                requests.append(req)
        ids = [r["custom_id"] for r in requests]
        if len(set(ids)) != len(ids):
            return "duplicate_custom_id", "The input file contains duplicate custom_id values.", None
        if len(requests) > MAX_REQUESTS:
            return "too_many_requests", f"The input file has more than {MAX_REQUESTS} requests.", None
        if n_inputs > MAX_EMBEDDING_INPUTS:
            return "too_many_inputs", f"The batch has more than {MAX_EMBEDDING_INPUTS} embedding inputs.", None
        return requests, sum(self._tokens(r["body"].get("input")) for r in requests)

    async def _run_batch(self, bid: str, fate: str) -> None:
        b = self.batches[bid]
        step = self.faults.step_s
        await asyncio.sleep(step)
        f = self.files[b["input_file_id"]]
        parsed = await self._on_worker(self._read_requests, f.path, b["endpoint"])
        if isinstance(parsed[0], str):
            code, message, line = parsed
            self._fail(b, code, message, line)
            return
        requests, tokens = parsed
        if fate == "fail":
            self._fail(b, "invalid_request", "Injected validation failure.")
            return
        model = requests[0]["body"].get("model") if requests else None
        b["model"] = model
        limit = self.faults.enqueued_token_limit
        forced = self.faults.token_limit_batches > 0
        if forced or (limit is not None and model is not None and self._enqueued(model, bid) + tokens > limit):
            self.faults.token_limit_batches -= forced
            self._fail(
                b,
                "token_limit_exceeded",
                f"Enqueued token limit reached for {model} in organization. Limit: {limit} enqueued tokens.",
            )
            return
        self.batch_tokens[bid] = tokens
        b["request_counts"]["total"] = len(requests)
        if b["status"] == "cancelling":
            return await self._finish(bid, [], [], cancelled=True, pending=requests)
        b["status"] = "in_progress"
        b["in_progress_at"] = int(time.time())
        await asyncio.sleep(step)
        stop_at = int(len(requests) * self.faults.expire_fraction) if fate == "expire" else len(requests)
        out: list[bytes] = []
        errs: list[bytes] = []
        usage = 0
        chunk = 256
        for start in range(0, stop_at, chunk):
            if b["status"] == "cancelling":
                return await self._finish(bid, out, errs, cancelled=True, pending=requests[start:])
            part = requests[start : min(stop_at, start + chunk)]
            ok_lines, err_lines, used = await self._on_worker(self._process, part)
            out.extend(ok_lines)
            errs.extend(err_lines)
            usage += used
            b["request_counts"]["completed"] += len(ok_lines)
            b["request_counts"]["failed"] += len(err_lines)
            await asyncio.sleep(0)
        if b["status"] == "cancelling":  # cancelled while the last chunk was embedding
            return await self._finish(bid, out, errs, cancelled=True, pending=requests[stop_at:])
        b["usage"] = {
            "input_tokens": usage,
            "output_tokens": 0,
            "total_tokens": usage,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        if fate == "expire":
            for req in requests[stop_at:]:
                errs.append(
                    orjson.dumps(
                        {
                            "id": self._new_id("batch_req"),
                            "custom_id": req["custom_id"],
                            "response": None,
                            "error": {
                                "code": "batch_expired",
                                "message": "This request could not be executed before the completion window expired.",
                            },
                        }
                    )
                    + b"\n"
                )
            b["request_counts"]["failed"] += len(requests) - stop_at
            await self._finish(bid, out, errs, expired=True)
            return
        await self._finish(bid, out, errs)

    def _tokens(self, inp: Any) -> int:
        texts = inp if isinstance(inp, list) else [inp]
        return sum(len(self.tokenizer.encode(t)) if isinstance(t, str) else len(t) for t in texts)

    def _process(self, requests: list[dict[str, Any]]) -> tuple[list[bytes], list[bytes], int]:
        ok: list[bytes] = []
        bad: list[bytes] = []
        used = 0
        good_reqs = []
        for req in requests:
            if self.faults.line_error_rate and self.rng.random() < self.faults.line_error_rate:
                bad.append(
                    orjson.dumps(
                        {
                            "id": self._new_id("batch_req"),
                            "custom_id": req["custom_id"],
                            "response": {
                                "status_code": 500,
                                "request_id": secrets.token_hex(16),
                                "body": {
                                    "error": {
                                        "message": "Injected per-line failure.",
                                        "type": "server_error",
                                        "param": None,
                                        "code": None,
                                    }
                                },
                            },
                            "error": None,
                        }
                    )
                    + b"\n"
                )
            else:
                good_reqs.append(req)
        vectors = self._embed_together([r["body"] for r in good_reqs])
        for req, vecs in zip(good_reqs, vectors, strict=True):
            result, status = self.embeddings_result(req["body"], vectors=vecs)
            resp = {"status_code": status, "request_id": secrets.token_hex(16), "body": result}
            line = {
                "id": self._new_id("batch_req"),
                "custom_id": req["custom_id"],
                "response": resp,
                "error": None,
            }
            if status == 200:
                used += result["usage"]["total_tokens"]
                ok.append(orjson.dumps(line) + b"\n")
            else:
                bad.append(orjson.dumps(line) + b"\n")
        return ok, bad, used

    def _embed_together(self, bodies: list[dict[str, Any]], chunk: int = 512) -> list[np.ndarray | None]:
        """The vectors of many request bodies, embedded in chunks of texts of one (model,
        dimensions) (a local model runs full batches instead of a text at a time); None for a
        body whose input is not a list of non-empty strings (it is answered with its error)."""
        out: list[np.ndarray | None] = [None] * len(bodies)
        groups: dict[tuple[str, int | None], list[tuple[int, list[str]]]] = {}
        for i, body in enumerate(bodies):
            inp = body.get("input")
            texts = inp if isinstance(inp, list) else [inp]
            if isinstance(body.get("model"), str) and texts and all(isinstance(t, str) and t for t in texts):
                groups.setdefault((body["model"], body.get("dimensions")), []).append((i, [str(t) for t in texts]))
        for (model, dims), items in groups.items():
            flat = [t for _, texts in items for t in texts]
            vecs = np.concatenate(
                [self.backend.embed(flat[k : k + chunk], model, dims) for k in range(0, len(flat), chunk)]
            )
            at = 0
            for i, texts in items:
                out[i] = vecs[at : at + len(texts)]
                at += len(texts)
        return out

    async def _finish(
        self,
        bid: str,
        out: list[bytes],
        errs: list[bytes],
        *,
        expired: bool = False,
        cancelled: bool = False,
        pending: list[dict[str, Any]] | None = None,
    ) -> None:
        b = self.batches[bid]
        if not cancelled:
            b["status"] = "finalizing"
            b["finalizing_at"] = int(time.time())
            await asyncio.sleep(self.faults.step_s)
        # Output order differs from input order, as the real API does not promise it.
        self.rng.shuffle(out)
        if out:
            expiry = self.output_expiry_s.get(bid)
            b["output_file_id"] = (await self._write_file(out, f"{bid}_output.jsonl", "batch_output", expiry)).id
            if self.faults.lose_outputs > 0:  # an output file gone at the provider (expired, deleted)
                self.faults.lose_outputs -= 1
                self.files.pop(b["output_file_id"]).path.unlink(missing_ok=True)
        if errs:
            b["error_file_id"] = (
                await self._write_file(errs, f"{bid}_error.jsonl", "batch_output", self.output_expiry_s.get(bid))
            ).id
        now = int(time.time())
        if cancelled:
            b["status"] = "cancelled"
            b["cancelled_at"] = now
        elif expired:
            b["status"] = "expired"
            b["expired_at"] = now
        else:
            b["status"] = "completed"
            b["completed_at"] = now
