"""Rendering for the CLI: rich tables on a terminal, JSON for scripts, progress on stderr.

Commands compute; these functions only print. Output below a terminal is never wrapped or cut
(``soft_wrap``), so cron logs and pipes keep whole run directories and ids.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

__all__ = [
    "RowProgress",
    "RunProgress",
    "console",
    "err_console",
    "fmt_usd",
    "print_estimate",
    "print_hits",
    "print_json",
    "print_kv",
    "print_local_result",
    "print_run_summary",
    "print_status_lines",
    "print_verify",
    "print_workspace",
    "status_table",
]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")


def fmt_usd(v: float | None) -> str:
    return "n/a" if v is None else f"${v:,.4f}"


def print_estimate(est: Any) -> None:
    s = est.stats
    t = Table(title=f"Estimate: {est.dataset} with {est.model}", show_header=False)
    for k, v in [
        ("rows read", f"{s.rows_read:,}"),
        ("rejected", f"{s.rejected:,} ({s.rejected_empty:,} empty text)"),
        ("sampled", f"{s.sampled:,}"),
        ("tokens total", f"{s.tokens_total:,}"),
        ("tokens mean / max", f"{s.tokens_mean:,.1f} / {s.tokens_max:,}"),
        ("truncated rows", f"{s.truncated:,}"),
        *[(f"rows lacking {f!r}", f"{n:,}") for f, n in s.missing_fields.items()],
        ("batch files", f"{est.batches:,}"),
        ("queue tokens (conservative)", f"{est.queue_tokens:,}"),
        ("cost at standard price", fmt_usd(est.cost_standard_usd)),
        ("cost at Batch API price", fmt_usd(est.cost_batch_usd)),
    ]:
        t.add_row(k, v)
    console.print(t)


class RowProgress:
    """A rich progress line counting rows read (only on a TTY)."""

    def __init__(self, what: str) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.completed:,} rows"),
            TimeElapsedColumn(),
            console=err_console,
            disable=not err_console.is_terminal,
            transient=True,
        )
        self.task = self.progress.add_task(what, total=None)

    def __enter__(self) -> RowProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def __call__(self, rows: int) -> None:
        self.progress.update(self.task, completed=rows)


class RunProgress:
    """``embedbatch run`` while it waits: after every poll pass, batches by state, rows done and
    failed, enqueued tokens, cost so far and elapsed time, as a live line on a terminal and as
    a ``run progress`` log line otherwise (cron logs, pipes)."""

    def __init__(self, paths: Any) -> None:
        import structlog

        self.paths = paths
        self.started = time.monotonic()
        self.log = structlog.get_logger("embedbatch.run")
        self.status = err_console.status("waiting for the first poll pass") if err_console.is_terminal else None

    def __enter__(self) -> RunProgress:
        if self.status is not None:
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(None, None, None)

    def __call__(self, passes: int) -> None:
        from embedbatch.runs import Run

        run = Run.read(self.paths)
        t = run.totals()
        cost = run.state.actual.get("cost_batch_usd")
        fields = {
            "pass": passes,
            "batches": t["by_status"],
            "rows_done": t["succeeded"],
            "rows_failed": t["failed"],
            "enqueued_tokens": t["enqueued_tokens"],
            "cost_batch_usd": cost,
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }
        if self.status is None:
            self.log.info("run progress", **fields)
            return
        states = ", ".join(f"{n} {s}" for s, n in t["by_status"].items())
        self.status.update(
            f"pass {passes}: {states} · rows {t['succeeded']:,} done, {t['failed']:,} failed · "
            f"enqueued tokens {t['enqueued_tokens']:,} · cost {fmt_usd(cost)} · {fields['elapsed_s']:.0f} s"
        )


def print_kv(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column table (a summary)."""
    t = Table(title=title, show_header=False)
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def status_table(rs: Any, batches: list[Any], totals: dict[str, Any]) -> Table:
    t = Table(title=f"{rs.model} / {rs.dataset} / {rs.run_id}  [{rs.status}]")
    for col in (
        "batch",
        "status",
        "requests",
        "done",
        "failed",
        "tokens",
        "batch id",
        "input file",
        "output file",
        "error file",
        "age",
    ):
        t.add_column(col)
    now = time.time()
    for bs in batches:
        remote = bs.remote or {}
        counts = remote.get("request_counts") or {}
        created = remote.get("created_at")
        age = f"{(now - created) / 60:.1f} min" if created else ""
        t.add_row(
            bs.name,
            bs.status + (f" ({bs.remote_status})" if bs.remote_status and bs.remote_status != bs.status else ""),
            f"{bs.requests:,}",
            f"{counts.get('completed', bs.succeeded or 0):,}",
            f"{counts.get('failed', bs.failed or 0):,}",
            f"{bs.tokens:,}",
            bs.batch_id or "",
            bs.file_id or "",
            bs.output_file_id or "",
            bs.error_file_id or "",
            age,
        )
    est = rs.estimate.get("cost_batch_usd")
    t.caption = (
        f"requests {totals['requests']:,} · succeeded {totals['succeeded']:,} · failed {totals['failed']:,}"
        f" · enqueued tokens {totals['enqueued_tokens']:,} · estimated cost {fmt_usd(est)}"
    )
    if rs.pg.get("pending_indexes"):
        names = ", ".join(d["name"] for d in rs.pg["pending_indexes"])
        t.caption += f"\nindex rebuild pending: {names} (the next ingest of this run recreates it)"
    if rs.failure:
        f = rs.failure
        t.caption += f"\nlast pass failed ({f['attempts']}×, next try after {f['retry_after']}): {f['error']}"
    return t


def print_status_lines(run_dir: str, rs: Any, batches: list[Any], totals: dict[str, Any]) -> None:
    """``status`` below a terminal (cron logs, pipes): one plain line per run and per batch,
    whole run directories, no table to wrap or cut."""
    out = [
        f"run {rs.run_id} {rs.status} model={rs.model} dataset={rs.dataset} batches={totals['batches']} "
        f"requests={totals['requests']} succeeded={totals['succeeded']} failed={totals['failed']} "
        f"enqueued_tokens={totals['enqueued_tokens']} dir={run_dir}"
    ]
    if rs.failure:
        out.append(f"  failing: {rs.failure['error']} (attempts {rs.failure['attempts']})")
    if rs.pg.get("pending_indexes"):
        names = ", ".join(d["name"] for d in rs.pg["pending_indexes"])
        out.append(f"  index rebuild pending: {names} (the next ingest of this run recreates it)")
    for bs in batches:
        out.append(
            f"  batch {bs.name} {bs.status} requests={bs.requests} succeeded={bs.succeeded or 0} "
            f"failed={bs.failed or 0} batch_id={bs.batch_id or '-'}"
        )
    sys.stdout.write("\n".join(out) + "\n")


def print_run_summary(summary: Any) -> None:
    """The end of ``embedbatch run`` (a :class:`RunSummary`)."""
    print_kv(
        "run summary",
        [
            ("run directory", summary.run_dir),
            ("rows embedded", f"{summary.embedded:,}"),
            ("rows failed", f"{summary.failed:,}"),
            ("tokens (usage)", f"{summary.usage_tokens:,}"),
            ("cost (batch price)", fmt_usd(summary.cost_batch_usd)),
            ("estimated cost", fmt_usd(summary.estimated_cost_batch_usd)),
            ("retried ids", f"{summary.retries:,}"),
            ("wall time", f"{summary.wall_s:.1f} s"),
            ("dataset rows / shards", f"{summary.extra['dataset_rows']:,} / {summary.extra['shards']}"),
        ],
    )


def _num(v: Any) -> str:
    return f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def print_local_result(result: Any) -> None:
    """The end of ``embedbatch local`` (a :class:`LocalResult`)."""
    data = result.to_json()
    keys = "run_dir rows skipped_existing rejected truncated real_tokens padded_tokens padding_ratio"
    keys += " batches rows_per_batch rows_per_s tokens_per_s wall_s shards"
    rows = [(k, _num(data[k])) for k in keys.split()]
    rows += [
        (f"{stage} busy / idle s", f"{data[stage]['busy_s']:.2f} / {data[stage]['idle_s']:.2f}")
        for stage in ("loader", "encoder", "writer")
    ]
    if result.quality:
        q = result.quality
        rows.append(("quality guard", f"min cosine {q['min_cosine']} (≥ {q['threshold']}) on {q['texts']} probe texts"))
    if result.calibration:
        c = result.calibration
        if c["cache_hit"]:
            rows.append(("backend auto", f"{c['chosen']} ({c['dtype']}), remembered from {c['calibrated_at']}"))
        else:
            rows.append(("backend auto", f"{c['chosen']} ({c['dtype']}), the fastest that passed"))
            for x in c["candidates"]:
                cos = f", min cosine {x['min_cosine']}" if x["min_cosine"] is not None else ""
                got = f"{x['rows_per_s']} rows/s{cos}" if x["ok"] else f"passed over: {x['reason']}"
                rows.append((f"  {x['backend']} ({x['dtype'] or '-'})", got))
    if result.cache_hit is not None:
        rows.append((f"{result.backend} export", "from the cache" if result.cache_hit else "exported now (cached)"))
    if result.ray:
        r = result.ray
        rows.append(("ray", f"{r['address']}: {r['nodes']} node(s), {r['cluster_cpus']:g} CPUs, "
                            f"{r['cluster_gpus']:g} GPUs; {r['actors']} actor(s)"))  # fmt: skip
        for worker, n in sorted(r.get("workers", {}).items()):
            rows.append((f"  {worker}", f"{n:,} rows"))
        if r["duplicates_dropped"]:
            rows.append(("  repeats dropped", f"{r['duplicates_dropped']:,} (blocks Ray ran again)"))
    if result.pg:
        rows.append(("postgres", str(result.pg)))
    print_kv(f"local run: {result.model} on {result.device} ({result.backend}, {result.dtype})", rows)


def print_realtime_result(result: Any) -> None:
    """The end of ``embedbatch embed`` (a :class:`RealtimeResult`)."""
    data = result.to_json()
    keys = "run_dir planned rows failed skipped_existing already_planned rejected truncated requests usage_tokens"
    keys += " answered_429 share_429 retries splits rows_per_s tokens_per_min wall_s shards"
    rows = [(k, _num(data[k])) for k in keys.split()]
    rows.append(("cost at standard price", fmt_usd(result.cost_usd)))
    for name, k in result.keys.items():
        rows.append((name, f"{k['requests']:,} requests, {k['tokens']:,} tokens, {k['answered_429']:,} × 429"))
    if result.interrupted_runs:
        rows.append(("resumed after", ", ".join(result.interrupted_runs)))
    if result.pg:
        rows.append(("postgres", str(result.pg)))
    if result.libsql:
        rows.append(("libsql", str(result.libsql)))
    print_kv(f"realtime run: {result.model} / {result.dataset}", rows)


def print_verify(reports: list[Any]) -> None:
    """One line per dataset, then its problems."""
    for r in reports:
        mark = "[green]OK[/]" if r.ok else "[red]FAILED[/]"
        console.print(f"{mark} {r.model}/{r.dataset}: {r.shards} shards, {r.rows:,} rows")
        for prob in r.problems:
            console.print(f"  - {prob}", highlight=False, markup=False)


def print_workspace(data: dict[str, Any]) -> None:
    """``embedbatch list``: datasets, then runs."""
    t = Table(title="datasets")
    for c in ("model", "dataset", "rows", "shards", "dim", "runs"):
        t.add_column(c)
    for d in data["datasets"]:
        t.add_row(
            d["model"], d["dataset"], f"{d['rows']:,}", str(d["shards"]), str(d["dimensions"]), str(len(d["runs"]))
        )
    console.print(t)
    t = Table(title="runs")
    for c in ("run", "model", "dataset", "kind", "status", "batches"):
        t.add_column(c)
    for r in data["runs"]:
        t.add_row(
            r.get("run_id", "?"),
            r.get("model", ""),
            r.get("dataset", ""),
            r.get("kind", ""),
            r.get("status", r.get("error", "")),
            ", ".join(f"{k}: {v}" for k, v in r.get("batches", {}).items()),
        )
    console.print(t)


def print_hits(query: str, hits: list[dict[str, Any]]) -> None:
    """Search results: score, id, the text's first 160 characters."""
    t = Table(title=f"nearest to {query!r}")
    for c in ("score", "id", "text"):
        t.add_column(c)
    for h in hits:
        t.add_row(f"{h['score']:.4f}", str(h["id"]), (h.get("text") or "")[:160].replace("\n", " "))
    console.print(t)
    if hits and hits[0].get("via"):
        err_console.print(f"searched with: {hits[0]['via']}", markup=False, highlight=False)
