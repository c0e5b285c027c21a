"""What the report shows, gathered from the workspace with bounded work.

Runs come from :func:`embedbatch.store.verify.run_row` (the function ``list`` uses), for the
open runs and the newest ``last`` others (:func:`embedbatch.runs.shown_runs`); batches from
those runs' batch.json; datasets from their manifests (row counts, shards, bytes, per-shard
norms), plus a sample of at most ``sample`` current rows for the norm histogram and the 2-D
map (the first row groups of at most ``MAP_SHARDS`` shards spread over the dataset, so a
100M-row dataset costs what a small one does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq

from embedbatch.runs import RunState, load_batches, shown_runs
from embedbatch.store.index import IdIndex
from embedbatch.store.manifest import Manifest
from embedbatch.store.shards import best_vectors
from embedbatch.store.verify import run_row
from embedbatch.workspace import RunPaths, Workspace, utc_now

__all__ = ["MAP_SHARDS", "ReportData", "collect"]

STAGES = ("loader", "encoder", "writer")  # a local run's pipeline stages
MAP_SHARDS = 16  # shards read (one row group each) for a dataset's sample
# The OpenAI batch object's timestamps (Unix seconds), in the order a batch moves through them.
PHASES = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelled_at")


@dataclass
class ReportData:
    """Everything the page draws (plain JSON-able values).

    Attributes:
        runs: one :func:`run_row` per run shown, oldest first; runs_not_shown: older ones left out.
        batches: per Batch API batch: run_id, batch, status, remote_status (the provider's
            last: completed, failed, expired...), requests, succeeded, failed, attempt, retry (a
            retry batch), and ``phases``: ``[state, ISO time]`` in order (batch.json history).
        failures: reason → rows still failed, over the runs shown.
        datasets: model, dataset, rows (current), shards, dimensions, dtype, bytes,
            superseded (rows replaced by later shards), skipped_existing (rows the runs shown
            did not send again: already stored), ``shard_norms`` (file, rows,
            min_norm, max_norm) and the sample: ``norm_hist`` (edges, counts) and ``map``
            (x, y, id, text (≤ 200 characters), split, source, run_id; PCA of the sample).
        local_runs: run_id, rows_per_s, tokens_per_s, padding_ratio and each stage's busy and
            idle seconds (loader, encoder, writer).
    """

    generated_at: str
    workspace: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    runs_not_shown: int = 0
    batches: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    local_runs: list[dict[str, Any]] = field(default_factory=list)


def _iso(value: Any) -> str | None:
    if isinstance(value, int | float) and value > 0:
        return datetime.fromtimestamp(value, UTC).isoformat()
    return value if isinstance(value, str) else None


def _batches(paths: RunPaths, run_id: str) -> list[dict[str, Any]]:
    out = []
    for bs in load_batches(paths):
        # Our own transitions (planned, uploaded, submitted, in_progress, ..., ingested), to the
        # microsecond; the provider's timestamps (whole seconds) for a state without them.
        phases = [[status, at] for status, at in bs.history]
        if not phases:
            remote = bs.remote or {}
            stamps = {p.removesuffix("_at"): _iso(remote.get(p)) for p in PHASES}
            phases = [[state, at] for state, at in stamps.items() if at is not None]
        out.append(
            {
                "run_id": run_id,
                "batch": bs.name,
                "status": bs.status,
                "remote_status": bs.remote_status,
                "requests": bs.requests,
                "succeeded": bs.succeeded,
                "failed": bs.failed,
                "attempt": bs.attempt,
                "retry": bool(bs.retry_of),
                "phases": phases,
            }
        )
    return out


def _sample(ws: Workspace, manifest: Manifest, n: int, seed: int) -> dict[str, Any]:
    """Up to ``n`` current rows: the first row groups (``n / MAP_SHARDS`` rows or so) of up to
    MAP_SHARDS shards spread evenly over the dataset."""
    shards = manifest.shards
    if not shards or n <= 0:
        return {}
    picks = sorted({int(i) for i in np.linspace(0, len(shards) - 1, min(MAP_SHARDS, len(shards)))})
    base = ws.shards_dir(manifest.model, manifest.dataset)
    columns = ["id", "text", "embedding", "embedding_float", "split", "source", "run_id"]
    parts = []
    index = IdIndex.load(ws, manifest)
    try:
        quota = -(-n // len(picks))  # rows wanted from each picked shard
        for i in picks:
            pf = pq.ParquetFile(base / shards[i]["file"])
            names = [c for c in columns if c in pf.schema_arrow.names]
            got = 0
            for g in range(pf.metadata.num_row_groups):  # the first row groups, up to the quota
                t = pf.read_row_group(g, columns=names)
                where = [index.locate(rid) for rid in t.column("id").to_pylist()]
                t = t.filter([w is not None and w[0] == shards[i]["file"] for w in where])  # not superseded
                parts.append(t)
                got += len(t)
                if got >= quota:
                    break
    finally:
        index.close()
    rng = np.random.default_rng(seed)
    rows = sum(len(p) for p in parts)
    keep = np.sort(rng.choice(rows, size=min(n, rows), replace=False)) if rows else np.empty(0, np.int64)
    import pyarrow as pa

    table = pa.concat_tables(parts, promote_options="default").take(pa.array(keep)) if rows else None
    if table is None or len(table) == 0:
        return {}
    vecs = best_vectors(table, pq.read_schema(base / shards[picks[0]]["file"]))
    norms = np.linalg.norm(vecs, axis=1)
    xy, method = _project(vecs)
    lo, hi = float(norms.min()), float(norms.max())
    span = (lo - 0.01, hi + 0.01) if hi - lo < 1e-6 else (lo, hi)  # unit vectors: every norm is 1
    counts, edges = np.histogram(norms, bins=min(40, max(1, len(norms) // 5)), range=span)

    def col(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in table.column_names else [None] * len(table)

    return {
        "norm_hist": {"edges": edges.round(6).tolist(), "counts": counts.tolist()},
        "map": {
            "x": xy[:, 0].round(5).tolist(),
            "y": (xy[:, 1] if xy.shape[1] > 1 else np.zeros(len(xy))).round(5).tolist(),
            "id": col("id"),
            "text": [(t or "")[:200] for t in col("text")],
            "split": col("split"),
            "source": col("source"),
            "run_id": col("run_id"),
            "method": method,
        },
    }


def _project(vecs: np.ndarray) -> tuple[np.ndarray, str]:
    """``(n, 2)`` coordinates of ``(n, dim)`` vectors: UMAP (cosine) when ``umap-learn`` is
    installed and there are enough rows, else PCA (an SVD of the centred sample)."""
    if len(vecs) >= 50:
        try:
            import umap

            xy: np.ndarray = umap.UMAP(n_components=2, metric="cosine", random_state=0).fit_transform(vecs)
            return xy, "UMAP"
        except ImportError:
            pass
    centred = vecs - vecs.mean(axis=0)
    if len(vecs) < 2:
        return np.zeros((len(vecs), 2), np.float32), "PCA"
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "PCA"


def _dataset(ws: Workspace, model: str, dataset: str, sample: int) -> dict[str, Any]:
    m = Manifest.load(ws, model, dataset)
    return {
        "model": model,
        "dataset": dataset,
        "rows": m.current_rows,
        "shards": len(m.shards),
        "dimensions": m.dimensions,
        "dtype": m.dtype,
        "bytes": sum(int(s.get("bytes") or 0) for s in m.shards),
        "superseded": m.rows - m.current_rows,
        "shard_norms": [
            {"file": s["file"], "rows": s["rows"], "min_norm": s.get("min_norm"), "max_norm": s.get("max_norm")}
            for s in m.shards
        ],
        **_sample(ws, m, sample, seed=len(m.shards)),
    }


def collect(
    ws: Workspace, *, dataset: str | None = None, run: str | None = None, last: int = 200, sample: int = 2000
) -> ReportData:
    """Gather the report of the workspace, of one dataset (``dataset``), or of one run (``run``:
    a run id or run folder; its dataset is shown too).

    Raises:
        UsageError: no such run or dataset.
    """
    from embedbatch.errors import UsageError

    data = ReportData(generated_at=utc_now().isoformat(timespec="seconds"), workspace=str(ws.root))
    if run is not None:
        from pathlib import Path

        paths = [ws.resolve_run(Path(run)) if "/" in run else _find_run(ws, run)]
        hidden = 0
    else:
        paths, hidden = shown_runs(ws, last=last)
    rows = [run_row(p) for p in paths]
    if dataset is not None:
        keep = [i for i, r in enumerate(rows) if r.get("dataset") == dataset]
        paths, rows = [paths[i] for i in keep], [rows[i] for i in keep]
    data.runs, data.runs_not_shown = rows, hidden
    for p, r in zip(paths, rows, strict=True):
        if "error" in r:
            continue
        data.batches += _batches(p, r["run_id"])
        for reason, count in (r.get("failed_reasons") or {}).items():
            data.failures[reason] = data.failures.get(reason, 0) + int(count)
        if r["kind"] == "local":
            local = RunState.load(p).local
            data.local_runs.append(
                {
                    "run_id": r["run_id"],
                    "rows_per_s": local.get("rows_per_s"),
                    "tokens_per_s": local.get("tokens_per_s"),
                    "padding_ratio": local.get("padding_ratio"),
                    **{
                        f"{s}_{k}": (local.get(s) or {}).get(f"{k}_s")
                        for s in ("loader", "encoder", "writer")
                        for k in ("busy", "idle")
                    },
                }
            )
    wanted = {(r["model"], r["dataset"]) for r in rows if "error" not in r} if run is not None else None
    named = [
        (m, d) for m, d in ws.datasets() if (dataset is None or d == dataset) and (wanted is None or (m, d) in wanted)
    ]
    if dataset is not None and not named:
        raise UsageError(f"no dataset {dataset!r} in the workspace (see `embedbatch list`)")
    data.datasets = [_dataset(ws, m, d, sample) for m, d in named]
    for d in data.datasets:  # duplicates not sent again, over the runs shown
        d["skipped_existing"] = sum(
            int(r.get("skipped_existing") or 0)
            for r in rows
            if "error" not in r and (r["model"], r["dataset"]) == (d["model"], d["dataset"])
        )
    return data


def _find_run(ws: Workspace, run_id: str) -> RunPaths:
    from embedbatch.errors import UsageError

    found = [p.parent for p in (ws.root / "batches").glob(f"*/*/{run_id}/run.json")]
    if len(found) != 1:
        raise UsageError(f"no run {run_id!r} in the workspace (see `embedbatch list`)")
    return RunPaths(found[0])


def to_json(data: ReportData) -> bytes:
    """The report data as JSON (embedded in the page for scripts and tests)."""
    return orjson.dumps(data.__dict__, option=orjson.OPT_SERIALIZE_NUMPY)
