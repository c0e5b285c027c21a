"""Output files: decode output and error lines of a downloaded batch, mapped back by ``custom_id``.

Per batch: the input's ids are indexed (8 bytes of state per row plus the id), the output file
is streamed line by line and each vector decoded (base64 little-endian float32, or a float
list), validated (HTTP 200, dimension, finite). Error-file lines (both shapes) and ids absent
from every file are failed with their reason.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pybase64
import structlog

from embedbatch.engines.batchapi.batchfiles import RECORDS_FILE, BatchRecords
from embedbatch.errors import StateError

__all__ = ["BatchReader", "BatchResult", "decode_vector", "majority_dim", "read_batch_results"]

log = structlog.get_logger(__name__)
CHUNK_ROWS = 8192


def decode_vector(value: Any) -> np.ndarray:
    """A vector from an output line: base64 of little-endian float32, or a list of floats.

    Returns:
        ``(dim,)`` float32.

    Raises:
        ValueError: not decodable.
    """
    if isinstance(value, str):
        # pybase64 decodes with SIMD: 6x the stdlib's rate on 8 KiB vectors (bench/ingest.py),
        # where the stdlib decoder was the largest cost of an ingest.
        raw = pybase64.b64decode(value, validate=True)
        if len(raw) % 4:
            raise ValueError(f"base64 payload of {len(raw)} bytes is not float32")
        return np.frombuffer(raw, dtype="<f4")
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float32)
    raise ValueError(f"embedding is a {type(value).__name__}")


@dataclass
class BatchResult:
    """Decoded results of one batch.

    Attributes:
        vectors: ``(n, dim)`` float32 in input order (rows with ``ok`` False are garbage).
        ok: ``(n,)`` bool.
        failed: (id, reason, line) — line is the output/error file line, 0 if absent.
        usage_tokens: ``usage.total_tokens`` summed over successful lines.
    """

    ids: list[str]
    vectors: np.ndarray
    ok: np.ndarray
    failed: list[tuple[str, str, int]] = field(default_factory=list)
    usage_tokens: int = 0
    dim: int | None = None


def _error_reason(line: dict[str, Any]) -> str:
    """Why a line failed, from either error shape; never raises on a malformed line."""
    err = line.get("error")
    if isinstance(err, dict):
        return f"{err.get('code') or 'error'}: {err.get('message', '')}".strip()
    if err:
        return f"error: {str(err)[:200]}"
    resp = line.get("response")
    if not isinstance(resp, dict):
        return f"malformed line: response is {type(resp).__name__}"
    body = resp.get("body")
    e = body.get("error") if isinstance(body, dict) else None
    if isinstance(e, dict):
        code = e.get("code") or e.get("type") or "error"
        return f"http {resp.get('status_code')} {code}: {e.get('message', '')}".strip()
    return f"http {resp.get('status_code')}"


def _line_vector(line: dict[str, Any]) -> tuple[np.ndarray, int]:
    """The vector of a successful output line and its ``usage.total_tokens``.

    Raises:
        ValueError: anything malformed (the request fails with this reason; ingest goes on).
    """
    try:
        body = line["response"]["body"]
        data = body["data"]
        item = data[0] if len(data) == 1 else next(d for d in data if d.get("index", 0) == 0)
        vec = decode_vector(item["embedding"])
        usage = int((body.get("usage") or {}).get("total_tokens") or 0)
    except (KeyError, TypeError, AttributeError, IndexError, StopIteration, ValueError, binascii.Error) as exc:
        raise ValueError(f"undecodable embedding: {type(exc).__name__}: {exc}") from exc
    if vec.ndim != 1 or len(vec) == 0:
        raise ValueError(f"undecodable embedding: shape {vec.shape}")
    return vec, usage


def majority_dim(out: Path) -> int | None:
    """The most common vector length among an output file's good lines (None: no vector).

    For a model whose dimension is not known beforehand: one odd vector must not decide it.
    """
    counts: dict[int, int] = {}
    with open(out, "rb") as fh:
        for raw in fh:
            try:
                vec, _ = _line_vector(orjson.loads(raw))
            except (orjson.JSONDecodeError, ValueError, TypeError):
                continue
            counts[len(vec)] = counts.get(len(vec), 0) + 1
    return max(counts, key=lambda d: counts[d]) if counts else None


class BatchReader:
    """Streams one downloaded batch: ok rows in output order, chunk by chunk.

    The batch's records (``records.parquet``: ids, splits, metadata) are read first and
    ``input.jsonl`` is indexed (the byte offset of every line: 8 bytes each), so a row's text is
    read back by offset when its vector arrives; the output file is never held whole and no
    ``(n, dim)`` array is built.

    After :meth:`chunks` is exhausted, ``failed`` lists (id, reason, line) for every input id that
    is not ok (error lines of both shapes, invalid vectors, and ids absent from every file),
    ``usage_tokens`` sums ``usage.total_tokens``, and ``dim`` is the vectors' dimension.
    """

    def __init__(
        self,
        batch_dir: Path,
        *,
        expected_dim: int | None,
        remote_status: str | None,
        chunk_rows: int = CHUNK_ROWS,
        missing_reason: str | None = None,
    ) -> None:
        self.dir = batch_dir
        self.dim = expected_dim
        self.remote_status = remote_status
        self.missing_reason = missing_reason or f"missing from output (batch {remote_status or 'unknown'})"
        self.chunk_rows = chunk_rows
        self.records = BatchRecords.read(batch_dir)
        self.ids: list[str] = self.records.ids
        inp_off = [0]
        with open(batch_dir / "input.jsonl", "rb") as fh:
            for line in fh:
                inp_off.append(inp_off[-1] + len(line))
        if len(inp_off) - 1 != len(self.ids):
            raise StateError(
                f"{batch_dir}: {RECORDS_FILE} has {len(self.ids)} rows but input.jsonl {len(inp_off) - 1} lines"
            )
        self.inp_off = np.asarray(inp_off, dtype=np.int64)
        self.pos = {rid: i for i, rid in enumerate(self.ids)}
        self.ok = np.zeros(len(self.ids), dtype=bool)
        self.failed_at: dict[int, tuple[str, int]] = {}
        self.usage_tokens = 0
        self.failed: list[tuple[str, str, int]] = []

    @property
    def n_ok(self) -> int:
        return int(self.ok.sum())

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions (m,) int64, vectors (m, dim) float32)`` of valid rows, in output order."""
        out = self.dir / "output.jsonl"
        if out.exists():
            if self.dim is None:
                self.dim = majority_dim(out)
            yield from self._output_chunks(out)
        self._read_errors()
        for i in range(len(self.ids)):
            if not self.ok[i]:
                reason, lineno = self.failed_at.get(i, (self.missing_reason, 0))
                self.failed.append((self.ids[i], reason, lineno))

    def _output_chunks(self, out: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pos_get = self.pos.get
        positions: list[int] = []
        lines: list[int] = []
        usages: list[int] = []
        buf: np.ndarray | None = np.empty((self.chunk_rows, self.dim), np.float32) if self.dim else None
        with open(out, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = orjson.loads(raw)
                    i = pos_get(line["custom_id"])
                except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
                    if raw.strip():
                        log.warning("unreadable output line", batch=self.dir.name, line=lineno)
                    continue
                if i is None or self.ok[i]:
                    log.warning("output line for an unknown or repeated custom_id", batch=self.dir.name, line=lineno)
                    continue
                resp = line.get("response")
                if not isinstance(resp, dict) or resp.get("status_code") != 200 or line.get("error"):
                    self.failed_at[i] = (_error_reason(line), lineno)
                    continue
                try:
                    vec, usage = _line_vector(line)
                except ValueError as exc:
                    self.failed_at[i] = (str(exc), lineno)
                    continue
                if self.dim is None:
                    self.dim = len(vec)
                if buf is None:
                    buf = np.empty((self.chunk_rows, self.dim), np.float32)
                if len(vec) != self.dim:
                    self.failed_at[i] = (f"dimension {len(vec)} != expected {self.dim}", lineno)
                    continue
                buf[len(positions)] = vec
                positions.append(i)
                lines.append(lineno)
                usages.append(usage)
                self.ok[i] = True
                self.failed_at.pop(i, None)
                if len(positions) == self.chunk_rows:
                    yield self._finish_chunk(buf, positions, lines, usages)
                    buf = np.empty((self.chunk_rows, self.dim), np.float32)
                    positions, lines, usages = [], [], []
        if positions and buf is not None:
            yield self._finish_chunk(buf, positions, lines, usages)

    def _finish_chunk(
        self, buf: np.ndarray, positions: list[int], lines: list[int], usages: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        vecs = buf[: len(positions)]
        pos = np.asarray(positions, dtype=np.int64)
        self.usage_tokens += sum(usages)
        # Finiteness in one vectorised pass (a per-row check costs a ufunc call per line).
        finite = np.isfinite(vecs).all(axis=1)
        if not finite.all():
            for k in np.nonzero(~finite)[0]:
                self.ok[pos[k]] = False
                self.failed_at[int(pos[k])] = ("non-finite values in embedding", lines[k])
                self.usage_tokens -= usages[k]  # an invalid row counts as failed, as before
            vecs, pos = vecs[finite], pos[finite]
        return pos, vecs

    def _read_errors(self) -> None:
        err = self.dir / "errors.jsonl"
        if not err.exists():
            return
        with open(err, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = orjson.loads(raw)
                    i = self.pos.get(line.get("custom_id"))
                except (orjson.JSONDecodeError, AttributeError, TypeError):
                    continue
                if i is not None and not self.ok[i]:
                    self.failed_at[i] = (_error_reason(line), lineno)

    def rows_at(self, positions: np.ndarray) -> tuple[list[str], list[str], list[str], list[str | None]]:
        """(ids, texts, metadata JSON, splits) of input rows, read back by byte offset."""
        recs = self.records
        ids, texts, metas, splits = [], [], [], []
        off = self.inp_off
        with open(self.dir / "input.jsonl", "rb") as inf:
            ifd = inf.fileno()
            for i in positions.tolist():
                req = orjson.loads(os.pread(ifd, int(off[i + 1] - off[i]), int(off[i])))
                rid = recs.ids[i]
                if req["custom_id"] != rid:
                    raise StateError(f"{self.dir}: {RECORDS_FILE} and input.jsonl disagree at row {i} (id {rid})")
                ids.append(rid)
                texts.append(req["body"]["input"])
                metas.append(recs.metadata_json(i))
                splits.append(recs.splits[i])
        return ids, texts, metas, splits


def read_batch_results(batch_dir: Path, *, expected_dim: int | None, remote_status: str | None) -> BatchResult:
    """The whole batch decoded into input order (``(n, dim)`` float32); for inspection and tests.
    Ingest itself streams with :class:`BatchReader`."""
    reader = BatchReader(batch_dir, expected_dim=expected_dim, remote_status=remote_status)
    parts = list(reader.chunks())
    dim = reader.dim or 0
    vectors = np.zeros((len(reader.ids), dim), np.float32)
    for pos, vecs in parts:
        vectors[pos] = vecs
    return BatchResult(reader.ids, vectors, reader.ok, reader.failed, reader.usage_tokens, reader.dim)
