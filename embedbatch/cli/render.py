"""Rendering for the CLI: rich tables on a terminal, JSON for scripts, progress on stderr.

Commands compute; these functions only print. Output below a terminal is never wrapped or cut
(``soft_wrap``), so cron logs and pipes keep whole run directories and ids.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
        ("records prepared (rows, or messages with --unit message)", f"{s.prepared:,}"),
        ("records sampled (chunks, when chunking)", f"{s.sampled:,}"),
        *([("documents chunked / chunks", f"{s.documents:,} / {s.chunks:,}")] if s.documents else []),
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
    """Rows done so far: a rich progress line on a terminal; below one (cron logs, pipes) a
    ``progress`` log line at most every ``log_every_s`` seconds (None: none), with rows, rows/s
    and elapsed seconds."""

    def __init__(self, what: str, *, log_every_s: float | None = None) -> None:
        import structlog
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.what = what
        self.log_every_s = None if err_console.is_terminal else log_every_s
        self.log = structlog.get_logger("embedbatch.progress")
        self.started = self.logged_at = time.monotonic()

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
        if self.log_every_s is not None and time.monotonic() - self.logged_at >= self.log_every_s:
            self.logged_at = now = time.monotonic()
            elapsed = now - self.started
            rate = round(rows / elapsed, 1) if elapsed > 0 else None
            self.log.info("progress", stage=self.what, rows=rows, rows_per_s=rate, elapsed_s=round(elapsed, 1))


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
    t = Table(title=Text(title), show_header=False)  # Text: ids and texts are data, never markup
    for k, v in rows:
        t.add_row(Text(k), Text(v))
    console.print(t)


def status_table(rs: Any, batches: list[Any], totals: dict[str, Any]) -> Table:
    t = Table(title=f"{rs.model} / {rs.dataset} / {rs.run_id}  [{rs.outcome}]")
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
    if rs.pg.pending_indexes:
        names = ", ".join(d["name"] for d in rs.pg.pending_indexes)
        t.caption += f"\nindex rebuild pending: {names} (the next ingest of this run recreates it)"
    if rs.failure:
        f = rs.failure
        t.caption += f"\nlast pass failed ({_failure_when(f)}): {f.get('error')}"
    for reason, n in rs.failed_reasons.items():
        t.caption += f"\nfailed rows: {n:,} × {reason}"
    return t


def _failure_when(f: dict[str, Any]) -> str:
    """How often and until when a run's recorded failure holds it (a realtime run's failure
    records only when it happened)."""
    if "attempts" in f:
        return f"{f['attempts']}×, next try after {f.get('retry_after')}"
    return f"at {f.get('at')}"


def print_status_lines(run_dir: str, rs: Any, batches: list[Any], totals: dict[str, Any]) -> None:
    """``status`` below a terminal (cron logs, pipes): one plain line per run and per batch,
    whole run directories, no table to wrap or cut."""
    out = [
        f"run {rs.run_id} {rs.outcome} model={rs.model} dataset={rs.dataset} batches={totals['batches']} "
        f"requests={totals['requests']} succeeded={totals['succeeded']} failed={totals['failed']} "
        f"enqueued_tokens={totals['enqueued_tokens']} dir={run_dir}"
    ]
    if rs.failure:
        out.append(f"  failing: {rs.failure.get('error')} ({_failure_when(rs.failure)})")
    out += [f"  failed rows: {n} × {reason}" for reason, n in rs.failed_reasons.items()]
    if rs.pg.pending_indexes:
        names = ", ".join(d["name"] for d in rs.pg.pending_indexes)
        out.append(f"  index rebuild pending: {names} (the next ingest of this run recreates it)")
    for bs in batches:
        out.append(
            f"  batch {bs.name} {bs.status} requests={bs.requests} succeeded={bs.succeeded or 0} "
            f"failed={bs.failed or 0} batch_id={bs.batch_id or '-'}"
        )
    sys.stdout.write("\n".join(out) + "\n")


def print_failed_rows(run_dir: str, failed: int, reasons: dict[str, int]) -> None:
    """A run that ended with failed rows says so, on stderr: how many, the most common
    reasons, where the ids are and how to send them again."""
    lines = [f"finished with failures: {failed:,} row(s) failed in {run_dir}"]
    lines += [f"  {n:,} × {reason}" for reason, n in reasons.items()]
    lines.append(f"  the ids and reasons: {run_dir}/failed_ids.tsv")
    lines.append(
        f"  send them again: embedbatch retry --run-dir {run_dir} (rows whose failure cannot change, a 400 "
        "for that input or a wrong dimension, need --force)"
    )
    err_console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


_SINK_FLAGS = ("--pg-", "--libsql-", "--rebuild-index", "--concurrently", "--update-chunk-size", "--overwrite")
_SINK_SWITCHES = ("--rebuild-index", "--concurrently", "--overwrite", "--libsql-index")  # flags without a value


def print_sink_not_filled(run_dir: str, skipped: int, argv: list[str]) -> None:
    """Rows already in the dataset are not sent again, so this run does not write them into a
    database target either: say so, and give the command that writes them from the store (an
    ``ingest`` of each earlier run of the dataset with the same sink flags; no provider call)."""
    flags: list[str] = []
    for i, a in enumerate(argv):
        if a.startswith(_SINK_FLAGS):
            flags.append(a)
            takes_value = "=" not in a and a not in (
                "--rebuild-index",
                "--concurrently",
                "--overwrite",
                "--libsql-index",
            )
            if takes_value and i + 1 < len(argv):
                flags.append(argv[i + 1])
    here = Path(run_dir)
    earlier = sorted(p for p in here.parent.glob("run_*") if p != here and (p / "run.json").exists())
    lines = [
        f"{skipped:,} row(s) were already embedded in this dataset, so they were not sent and are not written "
        "into the database target by this run. To write them from the stored vectors (no provider call):"
    ]
    lines += ["  " + shlex.join(["embedbatch", "ingest", "--run-dir", str(p), *flags]) for p in earlier[-5:]]
    if len(earlier) > 5:
        lines.append(f"  … and the same for the {len(earlier) - 5} other run(s) in {here.parent}")
    err_console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def print_held_rows(held_by: dict[str, int]) -> None:
    """Rows not sent because an unfinished Batch API run has them planned (nothing is paid
    twice): name each run and how to finish or release it."""
    for run_dir, rows in held_by.items():
        err_console.print(
            f"{rows:,} row(s) were not sent: the unfinished Batch API run {run_dir} has them planned. "
            f"Finish it (`embedbatch submit --resume {run_dir}`, then `embedbatch poll --ingest`), or release "
            f"them with `embedbatch cancel --run-dir {run_dir}` and run this command again.",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


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
            Text(d["model"]),
            Text(d["dataset"]),
            f"{d['rows']:,}",
            str(d["shards"]),
            str(d["dimensions"]),
            str(len(d["runs"])),
        )
    console.print(t)
    t = Table(title="runs")
    for c in ("run", "model", "dataset", "kind", "status", "batches"):
        t.add_column(c)
    for r in data["runs"]:
        t.add_row(
            r.get("run_id", "?"),
            Text(r.get("model", "")),
            Text(r.get("dataset", "")),
            r.get("kind", ""),
            Text(r.get("status", r.get("error", ""))),
            ", ".join(f"{k}: {v}" for k, v in r.get("batches", {}).items()),
        )
    console.print(t)
    if data.get("runs_not_shown"):
        console.print(f"{data['runs_not_shown']:,} older finished run(s) not shown (--last N, --all)")


def print_chunks(parent: str, chunks: list[dict[str, Any]]) -> None:
    """``get PARENT --chunks``: index, id, character span in the document, the text's start."""
    t = Table(title=Text(f"{parent}: {len(chunks)} chunks"))
    for name in ("k", "id", "chars", "text"):
        t.add_column(name)
    for c in chunks:
        t.add_row(
            str(c["chunk_index"]), Text(c["id"]), f"{c['start']}-{c['end']}", Text(c["text"][:100].replace("\n", " "))
        )
    console.print(t)


def print_hits(query: str, hits: list[dict[str, Any]]) -> None:
    """Search results: score, id, the text's first 160 characters."""
    t = Table(title=Text(f"nearest to {query!r}"))
    for c in ("score", "id", "text"):
        t.add_column(c)
    for h in hits:
        label = f"{h['id']} #{h['chunk']}" if h.get("chunk") is not None else str(h["id"])
        t.add_row(f"{h['score']:.4f}", Text(label), Text((h.get("text") or "")[:160].replace("\n", " ")))
    console.print(t)
    via = next((h["via"] for h in hits if h.get("via")), None)  # search --id: the row itself has none
    if via:
        err_console.print(f"searched with: {via}", markup=False, highlight=False)
