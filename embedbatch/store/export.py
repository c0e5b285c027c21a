"""Export a dataset's vectors for other tools: row-aligned vectors and ids, with checksums.

Formats: ``npy`` (a NumPy ``(n, dim)`` array, float32 or float16), ``arrow`` (an Arrow IPC file
with ``id`` and ``embedding`` columns), ``f16`` (raw little-endian float16, row-major, ``n × dim``).
``ids.txt`` holds one id per line in the same order (TAB, LF, CR and backslash escaped as in
PostgreSQL's COPY text format); ``export.json`` holds model, dataset, dimension, count, dtype
and each file's sha256. Memory: one chunk of rows at a time.

The export is written into a hidden sibling folder and renamed into place when complete, so
a reader (or a killed re-export) never sees old and new files mixed: ``out`` is either the
whole old export, absent for an instant, or the whole new one. ``out`` must be new, empty, or
an earlier export (only the files an export writes); anything else is refused, never deleted.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.errors import StateError, UsageError
from embedbatch.failures import tsv_escape
from embedbatch.store.manifest import Manifest, file_sha256
from embedbatch.store.shards import iter_vector_chunks, vector_source
from embedbatch.workspace import Workspace, atomic_write_json, fsync_dir

__all__ = ["FORMATS", "export_dataset"]

FORMATS = ("npy", "arrow", "f16")


def export_dataset(
    ws: Workspace, model: str, dataset: str, out: Path, *, fmt: str = "npy", dtype: str = "float32"
) -> dict[str, Any]:
    """Write the current rows' vectors and ids into ``out`` (module doc); returns export.json.

    Raises:
        UsageError: an unknown format or dtype; an empty dataset.
        StateError: the shards and the id index disagree on the row count.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in ("float32", "float16"):
        raise UsageError(f"--dtype must be float32 or float16, got {dtype!r}")
    np_dtype = np.dtype("<f2") if fmt == "f16" or dtype == "float16" else np.dtype("<f4")
    manifest = Manifest.load(ws, model, dataset)
    n = manifest.current_rows
    dim = manifest.dimensions or 0
    if not n:
        raise UsageError(f"dataset {model}/{dataset} has no rows to export")
    _check_replaceable(out)
    final = out
    out = final.with_name(f".{final.name}.partial")
    shutil.rmtree(out, ignore_errors=True)  # a killed export's leftovers
    out.mkdir(parents=True)
    name = {"npy": "vectors.npy", "arrow": "vectors.arrow", "f16": "vectors.f16"}[fmt]
    vec_path, ids_path = out / name, out / "ids.txt"
    written = 0
    arrow_type = pa.list_(pa.float16() if np_dtype.itemsize == 2 else pa.float32(), dim)
    schema = pa.schema([("id", pa.string()), ("embedding", arrow_type)])
    mm = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np_dtype, shape=(n, dim)) if fmt == "npy" else None
    raw = open(vec_path, "wb") if fmt == "f16" else None  # noqa: SIM115
    ipc = pa.ipc.new_file(str(vec_path), schema) if fmt == "arrow" else None
    try:
        with open(ids_path, "w", encoding="utf-8", newline="\n") as ids_fh:
            for _, _, ids, vecs, live in iter_vector_chunks(ws, manifest):
                keep_ids = [rid for rid, ok in zip(ids.to_pylist(), live.tolist(), strict=True) if ok]
                block = vecs[live].astype(np_dtype)
                if written + len(block) > n:
                    raise StateError(f"{model}/{dataset}: the shards hold more current rows than the id index ({n})")
                if mm is not None:
                    mm[written : written + len(block)] = block
                elif raw is not None:
                    raw.write(block.tobytes())
                elif ipc is not None:
                    flat = pa.array(block.reshape(-1), type=arrow_type.value_type)
                    ipc.write_batch(
                        pa.record_batch(
                            [pa.array(keep_ids, pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)],
                            schema=schema,
                        )
                    )
                ids_fh.writelines(tsv_escape(r) + "\n" for r in keep_ids)
                written += len(block)
    finally:
        if mm is not None:
            mm.flush()
            del mm
        if raw is not None:
            raw.close()
        if ipc is not None:
            ipc.close()
    if written != n:
        raise StateError(f"{model}/{dataset}: {written} current rows in the shards, {n} in the id index")
    report = {
        "model": model,
        "dataset": dataset,
        "format": fmt,
        "dtype": np_dtype.name,
        "dimensions": dim,
        "count": n,
        "vectors_from": _sources(ws, manifest),
        "files": {vec_path.name: file_sha256(vec_path), ids_path.name: file_sha256(ids_path)},
    }
    atomic_write_json(out / "export.json", report)
    _swap_into_place(out, final)
    return report


def _sources(ws: Workspace, manifest: Manifest) -> list[str]:
    """What the exported vectors were read from (``float32``, ``int8 (dequantised)``, …), once
    per kind among the shards (int8/binary shards are dequantised unless float16 was kept)."""
    base = ws.shards_dir(manifest.model, manifest.dataset)
    kinds = {(s.get("dtype", "float32"), s.get("keep_float")): s["file"] for s in manifest.shards if s.get("rows")}
    return sorted({vector_source(pq.read_schema(base / f)) for f in kinds.values()})


_EXPORT_FILES = frozenset({"export.json", "ids.txt", "vectors.npy", "vectors.arrow", "vectors.f16"})


def _check_replaceable(out: Path) -> None:
    """``out`` may be new, empty or an earlier export; anything else is the user's, not ours.

    Raises:
        UsageError: ``out`` is a file, or a folder holding other files.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_FILES)
        if others:
            raise UsageError(f"--out {out} holds other files ({', '.join(others[:3])}…); give a new or empty folder")


def _swap_into_place(partial: Path, final: Path) -> None:
    """Rename the finished export to ``final``, moving an earlier export aside first and
    deleting it after; a kill in between leaves ``final`` absent or whole, never mixed."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
