"""Server state shared by the endpoints of ``embedbatch serve``, and its small HTTP helpers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from embedbatch.server.backends import EmbeddingBackend, HashBackend
from embedbatch.server.faults import FaultConfig
from embedbatch.server.ratelimit import ProviderLimits
from embedbatch.tokens import get_tokenizer

MAX_FILE_BYTES = 200 * 1024 * 1024  # Batch input file limit, Batch API guide (2026)
MAX_REQUESTS = 50_000  # requests per batch, Batch API guide (2026)
MAX_EMBEDDING_INPUTS = 50_000  # embedding inputs per batch, Batch API guide (2026)
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class StoredFile:
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


def fingerprint(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers, dumps=lambda o: orjson.dumps(o).decode())


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


class ServerState:
    """What every endpoint shares: files on disk, batches in memory, the batch worker, faults,
    limits and the call log (the endpoint mixins of :class:`embedbatch.server.app.FakeOpenAI`
    build on it)."""

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
        self.files: dict[str, StoredFile] = {}
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

    def _store(self, data_path: Path, filename: str, purpose: str) -> StoredFile:
        fid = self._new_id("file")
        final = self.root / fid
        os.replace(data_path, final)
        f = StoredFile(fid, filename, purpose, final.stat().st_size, int(time.time()), final)
        self.files[fid] = f
        return f

    def _write_lines(self, lines: list[bytes]) -> Path:
        """Write lines to a temporary file (on the batch worker); :meth:`_store` files it."""
        tmp = self.root / f".{secrets.token_hex(6)}.tmp"
        with open(tmp, "wb") as fh:
            for line in lines:
                fh.write(line)
        return tmp

    async def _write_file(
        self, lines: list[bytes], filename: str, purpose: str, expires_s: int | None = None
    ) -> StoredFile:
        f = self._store(await self._on_worker(self._write_lines, lines), filename, purpose)
        if expires_s is not None:
            f.expires_at = f.created_at + expires_s
        return f

    async def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking batch work (parsing, tokenizing, embedding, writing files) on the batch
        worker thread, so the request loop keeps answering while batches run."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

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
