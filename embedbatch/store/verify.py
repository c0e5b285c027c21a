"""Verify shards against the manifest, and list what a workspace holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from embedbatch.runs import RunState, load_batches, shown_runs
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.index import IdIndex, id_key, text_keys
from embedbatch.store.manifest import Manifest, file_sha256, superseded_ids
from embedbatch.store.quant import FLOAT_COLUMN, Codec, codec_from_metadata
from embedbatch.store.shards import best_vectors, vector_columns
from embedbatch.workspace import RunPaths, Workspace

__all__ = ["VerifyReport", "list_workspace", "run_row", "verify_dataset"]


@dataclass
class VerifyReport:
    """Problems found in one dataset's shards (empty: all good)."""

    model: str
    dataset: str
    shards: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(
    ws: Workspace, model: str, dataset: str, *, repair: bool = False, quick: int | None = None
) -> VerifyReport:
    """Re-read every shard: sha256 and size match the manifest, row counts match, one constant
    dimension, no NaN/inf, ids unique across shards (a row replaced by a later shard's
    ``supersedes`` is not a duplicate), no unlisted shard files, and each shard's id index file
    agrees with it (ids, id keys and text keys, row for row).

    Memory: one shard at a time, plus 8 bytes per current row for the uniqueness check.

    Args:
        repair: first rebuild every id index file from the shards (under the dataset lock).
        quick: only the manifest, unlisted files, and the size and sha256 of the last ``quick``
            shards (for cron: cost bounded by ``quick``, not by the dataset).
    """
    if quick is not None:
        return _quick(ws, model, dataset, quick)
    if repair:
        DatasetStore(ws, model, dataset).repair_index()
    manifest = Manifest.load(ws, model, dataset)
    rep = VerifyReport(model, dataset)
    base = ws.shards_dir(model, dataset)
    if not manifest.path.exists():
        rep.problems.append(f"no manifest at {manifest.path}")
        return rep
    gone = superseded_ids(manifest)
    keys: list[np.ndarray] = []  # the current ids' 64-bit keys, per shard: 8 bytes a row
    dims: set[int] = set()
    listed = {s["file"] for s in manifest.shards}
    if base.is_dir():
        for p in base.iterdir():
            if p.name not in listed and not p.name.startswith("."):  # .tmp: a live writer's staged shard
                rep.problems.append(f"{p.name}: file not listed in the manifest")
    index_dir = ws.index_dir(model, dataset)
    for s in manifest.shards:
        rep.shards += 1
        table = _read_shard(base / s["file"], s, rep.problems)
        if table is None:
            continue
        dims.add(codec_from_metadata(table.schema).dim)
        rep.problems.extend(_check_index(index_dir / s["file"], table))
        drop = gone.get(s["file"], set())
        current = [rid for rid in table.column("id").to_pylist() if rid not in drop]
        keys.append(np.fromiter((id_key(r) for r in current), np.uint64, count=len(current)))
        rep.rows += len(current)
    rep.problems.extend(_duplicates(ws, manifest, keys, gone))
    rep.problems.extend(_check_id_db(ws, manifest))
    if len(dims) > 1:
        rep.problems.append(f"dimensions differ across shards: {sorted(dims)}")
    if manifest.dimensions is not None and dims and dims != {manifest.dimensions}:
        rep.problems.append(f"shard dimension {sorted(dims)} != manifest {manifest.dimensions}")
    return rep


def _read_shard(path: Any, entry: dict[str, Any], problems: list[str]) -> Any:
    """One shard against its manifest entry (present, size, sha256, rows, finite vectors); its
    ``id``, ``text`` and ``embedding`` columns, or None when it cannot be read. Problems are
    appended to ``problems``."""
    name = entry["file"]
    if not path.exists():
        problems.append(f"{name}: missing")
        return None
    if path.stat().st_size != entry["bytes"]:
        problems.append(f"{name}: size {path.stat().st_size} != manifest {entry['bytes']}")
    if file_sha256(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    try:
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=["id", "text", *vector_columns(schema)])
        codec = codec_from_metadata(schema)
    except Exception as exc:
        problems.append(f"{name}: unreadable ({exc})")
        return None
    if len(table) != entry["rows"]:
        problems.append(f"{name}: {len(table)} rows != manifest {entry['rows']}")
    problems.extend(_check_codec(name, entry, codec, table))
    if codec.dtype != "binary" and not np.isfinite(codec.decode(table.column("embedding"))).all():
        problems.append(f"{name}: NaN or inf in embeddings")
    if FLOAT_COLUMN in table.column_names and not np.isfinite(best_vectors(table, schema)).all():
        problems.append(f"{name}: NaN or inf in the kept float vectors")
    return table


def _check_codec(name: str, entry: dict[str, Any], codec: Codec, table: Any) -> list[str]:
    """A compressed shard against its entry: the dtype it says, int8 ranges present and
    ordered, binary bytes per row matching the dimension."""
    out = []
    if entry.get("dtype", codec.dtype) != codec.dtype:
        out.append(f"{name}: stored as {codec.dtype}, the manifest says {entry.get('dtype')}")
    if codec.dtype == "int8" and (codec.lo is None or codec.hi is None or not (codec.hi > codec.lo).all()):
        out.append(f"{name}: int8 shard without valid calibration ranges")
    width = {"binary": (codec.dim + 7) // 8, "int8": codec.dim}.get(codec.dtype)
    if width is not None and table.schema.field("embedding").type.byte_width != width:
        out.append(f"{name}: {codec.dtype} vectors of the wrong width for {codec.dim} dimensions")
    return out


def _quick(ws: Workspace, model: str, dataset: str, last: int) -> VerifyReport:
    manifest = Manifest.load(ws, model, dataset)
    rep = VerifyReport(model, dataset)
    if not manifest.path.exists():
        rep.problems.append(f"no manifest at {manifest.path}")
        return rep
    base = ws.shards_dir(model, dataset)
    for s in manifest.shards[-last:] if last > 0 else []:
        rep.shards += 1
        path = base / s["file"]
        if not path.exists():
            rep.problems.append(f"{s['file']}: missing")
        elif path.stat().st_size != s["bytes"]:
            rep.problems.append(f"{s['file']}: size {path.stat().st_size} != manifest {s['bytes']}")
        elif file_sha256(path) != s["sha256"]:
            rep.problems.append(f"{s['file']}: sha256 differs from the manifest")
        rep.rows += int(s["rows"])
    return rep


def _duplicates(ws: Workspace, manifest: Manifest, keys: list[np.ndarray], gone: dict[str, set[str]]) -> list[str]:
    """Current ids found in two shards. Memory: the keys (8 bytes a row) and one sort; the
    shards are read again only when there is a duplicate to name."""
    if not keys:
        return []
    ordered = np.concatenate(keys)
    keys.clear()  # one copy of the keys at a time, sorted in place
    ordered.sort()
    dup = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    del ordered
    if not dup:
        return []
    first: dict[int, str] = {}
    problems: list[str] = []
    base = ws.shards_dir(manifest.model, manifest.dataset)
    for s in manifest.shards:
        path = base / s["file"]
        if not path.exists():
            continue
        drop = gone.get(s["file"], set())
        for rid in pq.read_table(path, columns=["id"]).column("id").to_pylist():
            k = id_key(rid)
            if rid in drop or k not in dup:
                continue
            if k in first:
                problems.append(f"id {rid!r} in both {first[k]} and {s['file']}")
            else:
                first[k] = s["file"]
    return problems


def _check_id_db(ws: Workspace, manifest: Manifest) -> list[str]:
    """The look-up database holds one row per current id of the shards it has taken in."""
    import sqlite3

    from embedbatch.store.index import db_path

    path = db_path(ws, manifest.model, manifest.dataset)
    if not path.exists() or not manifest.shards:
        return []
    index = IdIndex.load(ws, manifest)
    try:
        n = index.db_rows()
        if n is not None and n != manifest.current_rows:
            return [f"{path.name}: {n} ids != {manifest.current_rows} current rows (run verify --repair)"]
    except sqlite3.DatabaseError as exc:
        return [f"{path.name}: unreadable ({exc}; run verify --repair)"]
    finally:
        index.close()
    return []


def _check_index(path: Any, table: Any) -> list[str]:
    """Problems of one shard's id index file against the shard's ids and texts."""
    name = path.name
    if not path.exists():
        return [f"{name}: id index file missing (run verify --repair)"]
    try:
        idx = pq.read_table(path)
    except Exception as exc:
        return [f"{name}: id index unreadable ({exc}; run verify --repair)"]
    ids = table.column("id").to_pylist()
    if idx.column("id").to_pylist() != ids:
        return [f"{name}: id index does not match the shard's ids (run verify --repair)"]
    keys = np.fromiter((id_key(r) for r in ids), np.uint64, count=len(ids))
    if not np.array_equal(idx.column("id_key").to_numpy(), keys) or not np.array_equal(
        idx.column("text_key").to_numpy(), text_keys(table.column("text").to_pylist())
    ):
        return [f"{name}: id index keys do not match the shard (run verify --repair)"]
    return []


def _mtime(path: Any) -> str | None:
    import datetime as dt

    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except OSError:
        return None


def run_row(run: RunPaths) -> dict[str, Any]:
    """One run as ``list``, ``status`` and ``report`` show it: ids, kind, status as people read it
    (:attr:`RunState.outcome`), failed rows and reasons, batch states, rows planned, skipped
    (already stored) and stored, usage tokens, cost in USD estimated at planning and from the usage (Batch API
    prices for batch runs, standard prices for realtime runs, None for local runs), and the
    seconds from creation to the last save. ``{"run_dir", "error"}`` for an unreadable run."""
    try:
        rs = RunState.load(run)
    except Exception as exc:
        return {"run_dir": str(run.root), "error": str(exc)}
    states: dict[str, int] = {}
    for bs in load_batches(run):
        states[bs.status] = states.get(bs.status, 0) + 1
    price = "cost_batch_usd" if rs.kind == "batchapi" else "cost_standard_usd"
    wall = None
    if rs.updated_at:
        wall = (datetime.fromisoformat(rs.updated_at) - datetime.fromisoformat(rs.created_at)).total_seconds()
    return {
        "run_id": rs.run_id,
        "model": rs.model,
        "dataset": rs.dataset,
        "kind": rs.kind,
        "status": rs.outcome + (" (failing)" if rs.failure and rs.status == "active" else ""),
        "failure": rs.failure,
        "failed": rs.failed_rows,
        "failed_reasons": rs.failed_reasons,
        "batches": states,
        "planned": rs.counts.get("planned", 0),
        "skipped_existing": rs.counts.get("skipped_existing", rs.local.get("skipped_existing", 0)),
        "rows": rs.counts.get("succeeded", rs.local.get("rows", 0)),
        "tokens": rs.actual.get("usage_tokens", rs.local.get("real_tokens")),
        "cost_estimated_usd": rs.estimate.get(price) if rs.kind != "local" else None,
        "cost_usd": rs.actual.get(price) if rs.kind != "local" else None,
        "created_at": rs.created_at,
        "wall_s": wall,
        "run_dir": str(run.root),
    }


def list_workspace(ws: Workspace, *, last: int | None = 20) -> dict[str, Any]:
    """Datasets (model, rows, shards) and runs (status, batch states) in the workspace: every
    open run and the newest ``last`` others (all when None); ``runs_not_shown`` counts the
    older ones left out (see :func:`embedbatch.runs.shown_runs`)."""
    datasets = []
    for model, dataset in ws.datasets():
        m = Manifest.load(ws, model, dataset)
        datasets.append(
            {
                "model": model,
                "dataset": dataset,
                "rows": sum(s["rows"] for s in m.shards),
                "shards": len(m.shards),
                "dimensions": m.dimensions,
                "runs": sorted(m.runs),
                "updated_at": _mtime(ws.manifest_path(model, dataset)),
            }
        )
    shown, hidden = shown_runs(ws, last=last)
    runs = [run_row(run) for run in shown]
    return {"datasets": datasets, "runs": runs, "runs_not_shown": hidden}
