"""``--backend auto``: measure the backends this machine has on this model, keep the fastest
that passes the quality guard, and remember the choice.

Candidates on a CPU: torch at the chosen dtype, onnx (float32) and openvino at the chosen dtype;
with ``--quantize int8`` only onnx int8 and openvino int8 (quantization changes the vectors, so
it is never chosen unasked). On a GPU only torch runs (the other runtimes are CPU builds here).
Each candidate embeds :data:`CALIBRATION_TEXTS` (64 texts, 6 to 400 tokens) twice after a warm-up
pass; its speed is the faster pass, in rows/s. A candidate whose runtime is not installed, or
whose probe cosine against torch float32 is under the threshold, is recorded and passed over.

The choice is written to ``{cache_dir}/{model label}/auto-{key}.json``; ``key`` hashes the
model, device, dtype, quantization, the CPU's model name and core count and the installed
runtimes' versions, so a second run on the same machine loads only the chosen backend.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from embedbatch.engines.local.model import LocalEncoder, choose_device, model_label, resolve_model
from embedbatch.engines.local.quality import PROBE_TEXTS, default_min_cosine, needs_guard, probe
from embedbatch.errors import MissingExtraError, UsageError
from embedbatch.workspace import atomic_write_json

__all__ = ["CALIBRATION_TEXTS", "choose_backend"]

CALIBRATION_TEXTS = tuple(
    " ".join(PROBE_TEXTS[(i + k) % len(PROBE_TEXTS)] for k in range(1 + i % 8)) for i in range(64)
)
_RUNTIMES = ("torch", "transformers", "onnxruntime", "openvino", "nncf")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def calibration_key(model: str, device: str, dtype: str, quantize: str | None) -> tuple[str, dict[str, Any]]:
    """(16 hex digits, the parts hashed): what makes a remembered choice valid."""
    parts: dict[str, Any] = {
        "model": os.path.abspath(model) if os.path.isdir(model) else model,
        "device": device,
        "dtype": dtype,
        "quantize": quantize,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "versions": {d: _version(d) for d in _RUNTIMES},
    }
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16], parts


def _rows_per_s(enc: LocalEncoder) -> float:
    texts = list(CALIBRATION_TEXTS)
    enc.encode_texts(texts[:8])  # warm-up: first-call allocations and lazy init
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        enc.encode_texts(texts)
        best = min(best, time.perf_counter() - t)
    return len(texts) / best


def choose_backend(
    model: str,
    *,
    device: str,
    dtype: str,
    quantize: str | None,
    cache_dir: Path,
    min_cosine: float | None,
    recalibrate: bool = False,
) -> tuple[LocalEncoder, dict[str, Any]]:
    """The fastest backend that passes the quality guard, loaded, with the calibration record.

    Returns:
        (encoder, record); ``record`` has ``chosen`` (backend), ``dtype``, ``cache_hit``,
        ``key``, ``candidates`` (per candidate: backend, dtype, rows_per_s, min_cosine, ok,
        reason) and ``quality`` (the chosen encoder's guard result, None for torch float32).

    Raises:
        UsageError: no candidate passes (each one's reason is named).
    """
    resolved = choose_device(device)
    key, parts = calibration_key(resolve_model(model), resolved, dtype, quantize)
    path = cache_dir / model_label(model) / f"auto-{key}.json"
    if path.is_file() and not recalibrate:
        record = orjson.loads(path.read_bytes())
        enc = LocalEncoder(
            model, device=resolved, dtype=dtype, backend=record["chosen"], quantize=quantize, cache_dir=cache_dir
        )
        return enc, {**record, "cache_hit": True}
    if resolved != "cpu":
        backends = ["torch"]
    elif quantize:
        backends = ["onnx", "openvino"]
    else:
        backends = ["torch", "onnx", "openvino"]
    reference = LocalEncoder(model, device="cpu", dtype="float32")
    candidates: list[dict[str, Any]] = []
    best: tuple[float, LocalEncoder, dict[str, Any] | None] | None = None
    for backend in backends:
        row: dict[str, Any] = {"backend": backend, "dtype": None, "rows_per_s": None, "min_cosine": None}
        candidates.append(row)
        try:
            # onnx computes in float32 only: with --dtype auto it is measured in float32.
            d = "auto" if backend == "onnx" and dtype == "auto" else dtype
            enc = (
                reference
                if (backend, resolved, d) == ("torch", "cpu", "float32")
                else LocalEncoder(
                    model, device=resolved, dtype=d, backend=backend, quantize=quantize, cache_dir=cache_dir
                )
            )
            row["dtype"] = enc.dtype
            quality = None
            if needs_guard(enc.backend, enc.dtype, enc.quantize):
                threshold = min_cosine if min_cosine is not None else default_min_cosine(enc.dtype, enc.quantize)
                quality = probe(reference, enc, min_cosine=threshold)
                row["min_cosine"] = quality["min_cosine"]
            row["rows_per_s"] = round(_rows_per_s(enc), 1)
        except (MissingExtraError, UsageError) as exc:
            row.update(ok=False, reason=str(exc))
            continue
        row.update(ok=True, reason=None)
        if best is None or row["rows_per_s"] > best[0]:
            best = (row["rows_per_s"], enc, quality)
    if best is None:
        reasons = "; ".join(f"{c['backend']}: {c['reason']}" for c in candidates)
        raise UsageError(f"--backend auto: no backend passes on this machine ({reasons})")
    _, enc, quality = best
    record = {
        "chosen": enc.backend,
        "dtype": enc.dtype,
        "key": key,
        "parts": parts,
        "candidates": candidates,
        "quality": quality,
        "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return enc, {**record, "cache_hit": False}
