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
import base64
import hashlib
import os
import random
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson
from aiohttp import BodyPartReader, web

from embedbatch.server.ratelimit import ProviderLimits
from embedbatch.tokens import MODEL_DIMENSIONS, get_tokenizer

__all__ = ["EmbeddingBackend", "FakeOpenAI", "FaultConfig", "HashBackend", "ServerThread", "build_app"]

MAX_FILE_BYTES = 200 * 1024 * 1024  # Batch input file limit, Batch API guide (2026)
MAX_REQUESTS = 50_000  # requests per batch, Batch API guide (2026)
MAX_EMBEDDING_INPUTS = 50_000  # embedding inputs per batch, Batch API guide (2026)
TERMINAL = ("completed", "failed", "expired", "cancelled")


class EmbeddingBackend(Protocol):
    """Turns texts into vectors: ``embed(texts, model, dimensions) -> (n, dim) float32``."""

    def embed(self, texts: list[str], model: str, dimensions: int | None) -> np.ndarray: ...


class HashBackend:
    """A deterministic stand-in model: a unit vector seeded by sha256(model, dims, text).

    Equal texts give equal vectors; different texts give (near-)orthogonal ones. Dimensions:
    the model's default (1536 for text-embedding-3-small) or ``dimensions``.
    """

    def __init__(self, default_dim: int = 1536) -> None:
        self.default_dim = default_dim

    def dim_for(self, model: str, dimensions: int | None) -> int:
        return dimensions or MODEL_DIMENSIONS.get(model, self.default_dim)

    def embed(self, texts: list[str], model: str, dimensions: int | None) -> np.ndarray:
        dim = self.dim_for(model, dimensions)
        out = np.empty((len(texts), dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = hashlib.sha256(f"{model}\x00{dim}\x00{text}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
            v = rng.standard_normal(dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


@dataclass
class FaultConfig:
    """Injected faults. Rates are probabilities per call or per line, drawn from ``seed``.

    Attributes:
        rate_429 / rate_500 / rate_503: chance a call answers that status (429 with Retry-After).
        next_statuses: statuses answered by the next calls, in order (deterministic faults).
        line_error_rate: chance an output line becomes an error-file line (HTTP 500 shape: a retry can succeed).
        fail_batches: how many of the next created batches fail validation.
        expire_batches: how many of the next created batches expire after ``expire_fraction``.
        enqueued_token_limit: fail a new batch with token_limit_exceeded when the model's enqueued
            tokens would exceed it.
        token_limit_batches: how many of the next created batches fail with token_limit_exceeded
            whatever the queue holds (deterministic re-queue tests).
        fail_after_commit: path parts (``/files``, ``/batches``): the next POST to each is carried
            out, then answered 500, as a provider that commits and then fails does (one per item).
        cut_downloads: how many of the next file downloads send half the body and drop the connection.
        lose_outputs: how many of the next completed batches lose their output file (404 later).
        step_s: seconds each status step takes (slow batches).
        create_delay_s: the batch is created, then the answer waits this long.
        retry_after_s: the Retry-After a 429 carries.
        reject_text: ``/v1/embeddings`` answers 400 for a request with an input containing this.
        latency_s: every ``/v1/embeddings`` answer waits this long (a provider's answer time).
        paths: only calls whose path contains one of these get HTTP faults (empty: all).
    """

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    next_statuses: list[int] = field(default_factory=list)
    line_error_rate: float = 0.0
    fail_batches: int = 0
    expire_batches: int = 0
    expire_fraction: float = 0.5
    enqueued_token_limit: int | None = None
    token_limit_batches: int = 0
    fail_after_commit: list[str] = field(default_factory=list)
    cut_downloads: int = 0
    lose_outputs: int = 0
    step_s: float = 0.05
    create_delay_s: float = 0.0
    retry_after_s: float = 0.05
    reject_text: str = ""
    latency_s: float = 0.0
    paths: list[str] = field(default_factory=list)
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> FaultConfig:
        """Parse ``"rate_429=0.1,line_error_rate=0.05,expire_batches=1"``."""
        cfg = cls()
        types = {f.name: f.type for f in fields(cls)}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, eq, value = part.partition("=")
            if key not in types:
                raise ValueError(f"unknown fault {key!r}; valid: {', '.join(sorted(types))}")
            if not eq:
                raise ValueError(f"{key} needs a value ({key}=…)")
            current = getattr(cfg, key)
            if isinstance(current, list):
                setattr(
                    cfg,
                    key,
                    [type(current[0])(v) if current else int(v) for v in value.split("|")]
                    if key == "next_statuses"
                    else value.split("|"),
                )
            elif key == "enqueued_token_limit":
                cfg.enqueued_token_limit = int(value)
            else:
                setattr(cfg, key, type(current)(value))
        return cfg


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: Path
    expires_at: int | None = None

    def obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


def _fingerprint(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _err(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers, dumps=lambda o: orjson.dumps(o).decode())


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


class FakeOpenAI:
    """Server state: files on disk, batches in memory, a background task per batch.

    Args:
        root: where uploaded and produced files are stored.
        api_key: the bearer token clients must send (None: any non-empty token); several keys
            separated by commas are all accepted, each with its own rate limits.
        backend: the embedding model.
        limits: rate limits per key on ``/v1/embeddings`` (``serve --rpm/--tpm``).
    """

    def __init__(
        self,
        root: Path,
        *,
        api_key: str | None = None,
        backend: EmbeddingBackend | None = None,
        faults: FaultConfig | None = None,
        limits: ProviderLimits | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.api_keys = {k.strip() for k in api_key.split(",") if k.strip()} if api_key else None
        self.limits = limits or ProviderLimits()
        self.backend: EmbeddingBackend = backend or HashBackend()
        self.faults = faults or FaultConfig()
        self.rng = random.Random(self.faults.seed)
        self.files: dict[str, _File] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_tokens: dict[str, int] = {}
        self.output_expiry_s: dict[str, int] = {}  # batch id → its output files' expires_after seconds
        self.calls: list[tuple[str, str, int]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.tokenizer = get_tokenizer("text-embedding-3-small")
        # Batch work runs here, one batch step at a time, never on the request loop.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedbatch-batch-worker")

    # ---- helpers ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """How many files and batches exist, and how many were made twice: input files with the
        same name, batches with the same ``embedbatch_run/batch/attempt`` metadata."""
        names = [f.filename for f in self.files.values() if f.purpose == "batch"]
        keys = [
            "/".join(
                (b.get("metadata") or {}).get(k, "")
                for k in ("embedbatch_run", "embedbatch_batch", "embedbatch_attempt")
            )
            for b in self.batches.values()
        ]
        return {
            "files": len(self.files),
            "input_files": len(names),
            "batches": len(self.batches),
            "duplicate_uploads": len(names) - len(set(names)),
            "duplicate_batches": len(keys) - len(set(keys)),
            "embedding_requests": sum(u.requests for u in self.limits.usage.values()),
            "rate_limited": sum(u.rate_limited for u in self.limits.usage.values()),
        }

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(12)}"

    def _store(self, data_path: Path, filename: str, purpose: str) -> _File:
        fid = self._new_id("file")
        final = self.root / fid
        os.replace(data_path, final)
        f = _File(fid, filename, purpose, final.stat().st_size, int(time.time()), final)
        self.files[fid] = f
        return f

    def _write_lines(self, lines: list[bytes]) -> Path:
        """Write lines to a temporary file (on the batch worker); :meth:`_store` files it."""
        tmp = self.root / f".{secrets.token_hex(6)}.tmp"
        with open(tmp, "wb") as fh:
            for line in lines:
                fh.write(line)
        return tmp

    async def _write_file(self, lines: list[bytes], filename: str, purpose: str, expires_s: int | None = None) -> _File:
        f = self._store(await self._on_worker(self._write_lines, lines), filename, purpose)
        if expires_s is not None:
            f.expires_at = f.created_at + expires_s
        return f

    # ---- middleware: auth and HTTP faults -------------------------------------------------------
    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        if request.path == "/metrics":  # scraped without a key, like any exporter
            return await handler(request)
        if request.path.startswith("/_admin"):  # with --api-key, the admin endpoints need it too
            if self.api_keys is not None and token not in self.api_keys:
                return _err(401, "Incorrect API key provided.", code="invalid_api_key")
            return await handler(request)
        if not auth.startswith("Bearer ") or not token or (self.api_keys is not None and token not in self.api_keys):
            return _err(401, "Incorrect API key provided.", code="invalid_api_key")
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
                    return _err(
                        429,
                        "Rate limit reached. Please try again later.",
                        type_="requests",
                        code="rate_limit_exceeded",
                        headers={"Retry-After": str(f.retry_after_s)},
                    )
                return _err(status, "The server had an error while processing your request.", type_="server_error")
        response = await handler(request)
        self.calls.append((request.method, request.path, response.status))
        hit = next((p for p in f.fail_after_commit if request.method == "POST" and request.path.endswith(p)), None)
        if hit is not None and response.status == 200:
            f.fail_after_commit.remove(hit)
            return _err(500, "The server had an error while processing your request.", type_="server_error")
        return response

    # ---- files ------------------------------------------------------------------------------
    async def create_file(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        purpose = None
        filename = "upload.jsonl"
        expires_s: int | None = None
        tmp = self.root / f".{secrets.token_hex(6)}.upload"
        got_file = False
        size = 0
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "expires_after[seconds]":
                expires_s = int((await part.text()).strip())
            elif part.name == "file":
                got_file = True
                filename = part.filename or filename
                with open(tmp, "wb") as fh:
                    while chunk := await part.read_chunk(1 << 20):
                        size += len(chunk)
                        if size > MAX_FILE_BYTES:
                            fh.close()
                            tmp.unlink(missing_ok=True)
                            return _err(400, f"File exceeds the maximum size of {MAX_FILE_BYTES} bytes.")
                        fh.write(chunk)
        if not got_file:
            return _err(400, "Missing required parameter: 'file'.")
        if purpose not in {"batch", "batch_output", "assistants", "fine-tune", "user_data"}:
            tmp.unlink(missing_ok=True)
            return _err(400, f"Invalid value for 'purpose': {purpose!r}.")
        stored = self._store(tmp, filename, purpose)
        if expires_s is not None:
            stored.expires_at = stored.created_at + expires_s
        return _json(stored.obj())

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        items = sorted(self.files.values(), key=lambda f: (f.created_at, f.id), reverse=True)
        if purpose:
            items = [f for f in items if f.purpose == purpose]
        return _json(self._page(request, [f.obj() for f in items], default_limit=10_000))

    def _page(self, request: web.Request, objs: list[dict[str, Any]], *, default_limit: int) -> dict[str, Any]:
        limit = int(request.query.get("limit", default_limit))
        after = request.query.get("after")
        if after:
            ids = [o["id"] for o in objs]
            objs = objs[ids.index(after) + 1 :] if after in ids else []
        page = objs[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(objs) > limit,
        }

    async def get_file(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return _err(404, "No such File object", code="not_found")
        return _json(f.obj())

    async def delete_file(self, request: web.Request) -> web.Response:
        f = self.files.pop(request.match_info["file_id"], None)
        if f is None:
            return _err(404, "No such File object", code="not_found")
        f.path.unlink(missing_ok=True)
        return _json({"id": f.id, "object": "file", "deleted": True})

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return _err(404, "No such File object", code="not_found")
        if self.faults.cut_downloads > 0:
            self.faults.cut_downloads -= 1
            data = f.path.read_bytes()
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()  # the client sees a body cut short
            return resp
        return web.FileResponse(f.path, headers={"Content-Type": "application/octet-stream"})

    # ---- batches ----------------------------------------------------------------------------
    async def create_batch(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        if endpoint not in {"/v1/embeddings", "/v1/chat/completions", "/v1/responses", "/v1/completions"}:
            return _err(400, f"Invalid endpoint {endpoint!r}.")
        if window != "24h":
            return _err(400, "Invalid completion_window: only '24h' is supported.")
        if file_id not in self.files:
            return _err(400, f"Invalid 'input_file_id': '{file_id}'.", code="invalid_file_id")
        metadata = body.get("metadata") or {}
        out_expiry = body.get("output_expires_after")
        if out_expiry is not None:
            anchored = isinstance(out_expiry, dict) and out_expiry.get("anchor") == "created_at"
            seconds = out_expiry.get("seconds") if anchored else None
            if not isinstance(seconds, int) or not 3600 <= seconds <= 2_592_000:
                return _err(400, "Invalid 'output_expires_after': anchor 'created_at', seconds 3600 to 2592000.")
        if len(metadata) > 16 or any(len(str(k)) > 64 or len(str(v)) > 512 for k, v in metadata.items()):
            return _err(400, "Invalid metadata: at most 16 pairs, keys ≤ 64 and values ≤ 512 characters.")
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
        return _json(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        items = sorted(self.batches.values(), key=lambda b: (b["created_at"], b["id"]), reverse=True)
        return _json(self._page(request, items, default_limit=20))

    async def get_batch(self, request: web.Request) -> web.Response:
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return _err(404, "No such Batch object", code="not_found")
        return _json(b)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return _err(404, "No such Batch object", code="not_found")
        if b["status"] in TERMINAL:
            return _err(409, f"Cannot cancel a batch with status '{b['status']}'.")
        b["status"] = "cancelling"
        b["cancelling_at"] = int(time.time())
        return _json(b)

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

    async def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking batch work (parsing, tokenizing, embedding, writing files) on the batch
        worker thread, so the request loop keeps answering while batches run."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

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

    # ---- embeddings -------------------------------------------------------------------------
    def key_usage(self) -> dict[str, dict[str, int]]:
        """Per key (by fingerprint, never the key): requests and tokens let through, 429s."""
        return {_fingerprint(k): asdict(u) for k, u in self.limits.usage.items()}

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
                resp = _json(refused, 429)
                resp.headers.update(headers)
                return resp
        result, status = await loop.run_in_executor(None, self.embeddings_result, body, counted)
        if self.faults.latency_s:
            await asyncio.sleep(self.faults.latency_s)
        resp = _json(result, status)
        resp.headers.update(headers)
        return resp

    async def admin_counts(self, request: web.Request) -> web.Response:
        return _json(self.counts())

    async def admin_keys(self, request: web.Request) -> web.Response:
        return _json(self.key_usage())

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


def build_app(state: FakeOpenAI) -> web.Application:
    """The aiohttp application serving ``state`` under ``/v1``."""
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
