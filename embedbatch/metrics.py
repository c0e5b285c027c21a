"""Prometheus metrics of a workspace, derived from its files (so every process agrees).

Families (``prometheus-client``, the ``metrics`` extra):

- ``embedbatch_records_total{model,dataset}``: current rows in the dataset's shards.
- ``embedbatch_tokens_total{model,dataset,kind}``: billed tokens summed over the runs.
- ``embedbatch_cost_usd_total{model,dataset,kind}``: their cost in USD (Batch price for Batch API
  runs, standard price for realtime runs; local runs cost nothing here).
- ``embedbatch_batch_seconds``: histogram of Batch API batches' time from created to completed
  (the provider's timestamps), seconds.
- ``embedbatch_batches{state}``: batches by local state (planned … ingested, failed).
- ``embedbatch_runs{kind,status}``: runs by engine and status.
- ``embedbatch_errors_total{kind}``: rows failed (``failed_rows``), rows rejected at intake
  (``rejected_rows``), runs whose last pass failed (``run_failures``).

Each run's contribution is cached in ``workspace/metrics/runs-cache.json`` by its run.json's
modification time, size and inode, so the metrics step after every command costs a ``stat`` per
finished run. :func:`write_metrics` writes them to ``workspace/metrics/embedbatch.prom`` for
node_exporter's textfile collector (after every command, for cron); :func:`serve_metrics`
serves ``/metrics`` (``poll --watch --metrics-port``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from embedbatch.errors import MissingExtraError
from embedbatch.runs import Run
from embedbatch.store.manifest import Manifest
from embedbatch.workspace import RunPaths, Workspace, atomic_write_json

__all__ = ["BATCH_SECONDS_BUCKETS", "WorkspaceCollector", "metrics_path", "serve_metrics", "write_metrics"]

# Batch API batches complete within 24 h (Batch API guide, checked 2026-11): buckets up to a day.
BATCH_SECONDS_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)


def _prom() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise MissingExtraError("prometheus-client", "metrics") from exc
    return prometheus_client


def metrics_path(ws: Workspace) -> Path:
    """``workspace/metrics/embedbatch.prom``."""
    return ws.root / "metrics" / "embedbatch.prom"


class WorkspaceCollector:
    """A prometheus_client collector reading the workspace on every collect."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        ws = self.ws
        records = CounterMetricFamily("embedbatch_records", "Current rows in a dataset", labels=["model", "dataset"])
        for model, dataset in ws.datasets():
            records.add_metric([model, dataset], float(Manifest.load(ws, model, dataset).current_rows))
        tokens = CounterMetricFamily("embedbatch_tokens", "Billed tokens", labels=["model", "dataset", "kind"])
        cost = CounterMetricFamily("embedbatch_cost_usd", "Cost in USD", labels=["model", "dataset", "kind"])
        runs = GaugeMetricFamily("embedbatch_runs", "Runs by engine and status", labels=["kind", "status"])
        batches = GaugeMetricFamily("embedbatch_batches", "Batch API batches by state", labels=["state"])
        errors = CounterMetricFamily("embedbatch_errors", "Rows and runs that failed", labels=["kind"])
        tok: dict[tuple[str, str, str], float] = {}
        usd: dict[tuple[str, str, str], float] = {}
        by_run: dict[tuple[str, str], int] = {}
        by_state: dict[str, int] = {}
        err = {"failed_rows": 0, "rejected_rows": 0, "run_failures": 0}
        buckets = [0] * len(BATCH_SECONDS_BUCKETS)
        n_batches, seconds = 0, 0.0
        for r in run_summaries(ws):
            key = (r["model"], r["dataset"], r["kind"])
            tok[key] = tok.get(key, 0.0) + r["tokens"]
            usd[key] = usd.get(key, 0.0) + r["usd"]
            by_run[(r["kind"], r["status"])] = by_run.get((r["kind"], r["status"]), 0) + 1
            for k in err:
                err[k] += r[k]
            for state, n in r["by_status"].items():
                by_state[state] = by_state.get(state, 0) + n
            buckets = [a + b for a, b in zip(buckets, r["buckets"], strict=True)]
            n_batches += r["batches_timed"]
            seconds += r["seconds"]
        for key, value in tok.items():
            tokens.add_metric(list(key), value)
        for key, value in usd.items():
            cost.add_metric(list(key), value)
        for (kind, status), n in by_run.items():
            runs.add_metric([kind, status], n)
        for state, n in by_state.items():
            batches.add_metric([state], n)
        for kind, n in err.items():
            errors.add_metric([kind], n)
        hist = HistogramMetricFamily("embedbatch_batch_seconds", "Batch created → completed, seconds")
        cumulative = [(str(b), float(n)) for b, n in zip(BATCH_SECONDS_BUCKETS, buckets, strict=True)]
        hist.add_metric([], [*cumulative, ("+Inf", float(n_batches))], sum_value=seconds)
        yield from (records, tokens, cost, runs, batches, errors, hist)


def _summary(paths: RunPaths) -> dict[str, Any] | None:
    """What one run adds to the metrics (from run.json; a run without stored batch totals, just
    planned or written by an older version, has its batches read)."""
    rs = Run.read_state(paths)
    if rs is None:
        return None
    totals: dict[str, Any] = {"by_status": {}, "batch_seconds": []}
    if rs.kind == "batchapi":
        stored = rs.actual.get("status_totals")
        totals = stored if stored and "batch_seconds" in stored else Run.read(paths).totals()
    durations = [float(d) for d in totals["batch_seconds"]]
    return {
        "model": rs.model,
        "dataset": rs.dataset,
        "kind": rs.kind,
        "status": rs.status,
        "tokens": float(rs.actual.get("usage_tokens") or 0),
        "usd": float(rs.actual.get("cost_batch_usd") or rs.actual.get("cost_standard_usd") or 0.0),
        "failed_rows": int(rs.counts.get("failed") or 0),
        "rejected_rows": int(rs.counts.get("rejected") or 0),
        "run_failures": 1 if rs.failure and rs.status in ("active", "failed") else 0,
        "by_status": {k: int(v) for k, v in totals["by_status"].items()},
        "buckets": [sum(1 for d in durations if d <= b) for b in BATCH_SECONDS_BUCKETS],
        "batches_timed": len(durations),
        "seconds": sum(durations),
    }


def run_summaries(ws: Workspace) -> list[dict[str, Any]]:
    """Every run's contribution to the metrics. A run whose run.json is unchanged since the last
    call (same modification time, size and inode: every save writes a new file) is taken from
    ``metrics/runs-cache.json``, so thousands of finished runs cost a ``stat`` each, not a read
    and a parse."""
    path = ws.root / "metrics" / "runs-cache.json"
    try:
        cache: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        cache = {}
    fresh: dict[str, Any] = {}
    out: list[dict[str, Any]] = []
    for paths in ws.all_runs():
        try:
            st = paths.run_json.stat()
        except OSError:
            continue
        key, stamp = str(paths.root.relative_to(ws.root)), [st.st_mtime_ns, st.st_size, st.st_ino]
        hit = cache.get(key)
        summary = hit["summary"] if hit and hit.get("stamp") == stamp else _summary(paths)
        if summary is None:
            continue
        fresh[key] = {"stamp": stamp, "summary": summary}
        out.append(summary)
    if fresh != cache:
        atomic_write_json(path, fresh)
    return out


def _registry(ws: Workspace) -> Any:
    prom = _prom()
    registry = prom.CollectorRegistry()
    registry.register(WorkspaceCollector(ws))
    return registry


def write_metrics(ws: Workspace) -> Path:
    """Write the workspace's metrics to :func:`metrics_path` (atomically, as node_exporter's
    textfile collector wants).

    Raises:
        MissingExtraError: prometheus-client is not installed.
    """
    prom = _prom()
    path = metrics_path(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    prom.write_to_textfile(str(path), _registry(ws))
    return path


def serve_metrics(ws: Workspace, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` on ``addr:port`` in a background thread; returns the server."""
    prom = _prom()
    server, _thread = prom.start_http_server(port, addr=addr, registry=_registry(ws))
    return server
