"""The report as one self-contained HTML page: Plotly's JavaScript inline (no network request,
works from ``file://``), tables for the numbers, plots for the shapes, and the data itself as
JSON in ``<script id="report-data">`` for scripts.

Element ids other tools and tests rely on: ``runs`` (a table; each row ``data-run-id``, cells
with classes ``rows``, ``failed``, ``tokens``, ``cost``, ``cost-estimated``), ``cost-over-time``,
``batch-timeline``, ``failures``, ``datasets`` (a table), ``norms-N`` and ``map-N`` (dataset N),
``local`` (a table) and ``local-stages``.
"""

from __future__ import annotations

import html
import itertools
from functools import lru_cache
from typing import Any

from embedbatch.errors import MissingExtraError
from embedbatch.report.data import ReportData, to_json

__all__ = ["render"]

# the runs table's columns, and the datasets table's
RUN_COLUMNS = [
    "run",
    "engine",
    "model",
    "dataset",
    "status",
    "rows",
    "failed",
    "tokens",
    "cost est. (USD)",
    "cost (USD)",
    "wall",
]
DATASET_COLUMNS = ("model", "dataset", "rows", "dim", "dtype", "shards", "MB", "replaced rows", "skipped (stored)")

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 8px; border-bottom: 1px solid #e4e6ee; }
th { text-align: left; background: #f3f4f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b3261e; font-weight: 600; } .muted { color: #667; } .plot { min-height: 320px; }
"""


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError as exc:
        raise MissingExtraError("plotly", "report") from exc
    js: str = get_plotlyjs()
    return js


def _figure_html(fig: Any, div_id: str) -> str:
    import plotly.io as pio

    fig.update_layout(margin={"l": 60, "r": 20, "t": 40, "b": 40}, template="plotly_white")
    out: str = pio.to_html(
        fig, full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False, "responsive": True}
    )
    return out


def _num(value: Any, fmt: str = "{:,}") -> str:
    return "" if value is None else fmt.format(value)


def _runs_table(data: ReportData) -> str:
    head = "".join(f"<th>{h}</th>" for h in RUN_COLUMNS)
    rows = []
    for r in data.runs:
        if "error" in r:
            rows.append(
                f'<tr><td colspan="11" class="bad">{html.escape(r["run_dir"])}: {html.escape(r["error"])}</td></tr>'
            )
            continue
        wall = r.get("wall_s")
        rows.append(
            f'<tr data-run-id="{html.escape(r["run_id"])}"><td>{html.escape(r["run_id"])}</td>'
            f"<td>{html.escape(r['kind'])}</td><td>{html.escape(r['model'])}</td><td>{html.escape(r['dataset'])}</td>"
            f'<td class="status{" bad" if r["failed"] else ""}">{html.escape(r["status"])}</td>'
            f'<td class="num rows">{_num(r.get("rows"))}</td>'
            f'<td class="num failed">{_num(r.get("failed"))}</td>'
            f'<td class="num tokens">{_num(r.get("tokens"))}</td>'
            f'<td class="num cost-estimated">{_num(r.get("cost_estimated_usd"), "{:.6f}")}</td>'
            f'<td class="num cost">{_num(r.get("cost_usd"), "{:.6f}")}</td>'
            f'<td class="num">{"" if wall is None else f"{wall:,.0f} s"}</td></tr>'
        )
    more = (
        f'<p class="muted">{data.runs_not_shown:,} older finished runs not shown (embedbatch report --last N)</p>'
        if data.runs_not_shown
        else ""
    )
    return f'<table id="runs"><tr>{head}</tr>{"".join(rows)}</table>{more}'


def _cost_figure(data: ReportData) -> str:
    import plotly.graph_objects as go

    runs = [r for r in data.runs if "error" not in r]
    fig = go.Figure()
    when = [f"{r['created_at'][:16].replace('T', ' ')} {r['run_id'][-6:]}" for r in runs]  # in creation order
    fig.add_bar(x=when, y=[r.get("cost_estimated_usd") for r in runs], name="cost estimated (USD)", opacity=0.5)
    fig.add_bar(x=when, y=[r.get("cost_usd") for r in runs], name="cost (USD)")
    fig.add_scatter(x=when, y=[r.get("tokens") for r in runs], name="tokens", yaxis="y2", mode="lines+markers")
    fig.update_layout(
        title="cost and tokens per run", barmode="group", yaxis={"title": "USD"},
        yaxis2={"title": "tokens", "overlaying": "y", "side": "right", "rangemode": "tozero"}, height=360,
        xaxis={"type": "category"}, legend={"orientation": "h", "y": -0.2},
    )  # fmt: skip
    return _figure_html(fig, "cost-over-time")


STATE_COLOURS = {
    "planned": "#c9ced6", "uploaded": "#aab3bf", "submitted": "#8d99a8", "validating": "#8d99a8",
    "in_progress": "#3f7fbf", "finalizing": "#7b5ea7", "completed": "#2e8b57", "downloaded": "#3aa3a3",
    "ingested": "#1f6f43", "failed": "#c62828", "expired": "#ef8f00", "cancelled": "#777", "cancelling": "#999",
}  # fmt: skip


def _timeline_figure(data: ReportData) -> str:
    from datetime import datetime

    import plotly.graph_objects as go

    segments: dict[str, dict[str, list[Any]]] = {}
    ends: dict[str, dict[str, list[Any]]] = {}
    for b in data.batches:
        label = f"{b['run_id'][-13:]} {b['batch']}"
        phases = b["phases"]
        for (state, start), (_, end) in itertools.pairwise(phases):
            seg = segments.setdefault(state, {"y": [], "base": [], "x": []})
            ms = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() * 1000
            seg["y"].append(label)
            seg["base"].append(start)
            seg["x"].append(max(ms, 1.0))
        if phases:
            last = ends.setdefault(phases[-1][0], {"y": [], "x": []})
            last["y"].append(label)
            last["x"].append(phases[-1][1])
    fig = go.Figure()
    for state, seg in segments.items():
        fig.add_bar(orientation="h", name=state, marker_color=STATE_COLOURS.get(state), legendgroup=state, **seg)
    for state, pts in ends.items():
        fig.add_scatter(
            mode="markers", name=f"{state} (now)", marker={"symbol": "diamond", "size": 10,
            "color": STATE_COLOURS.get(state)}, legendgroup=state, **pts,
        )  # fmt: skip
    outcomes = sorted({str(b["remote_status"]) for b in data.batches if b["remote_status"]})
    fig.update_layout(
        title=f"batch timeline ({len(data.batches)} batches; at the provider: {', '.join(outcomes) or 'none yet'})",
        barmode="overlay", xaxis={"type": "date"}, height=max(300, 26 * len(data.batches) + 140),
    )  # fmt: skip
    return _figure_html(fig, "batch-timeline")


def _failures_figure(data: ReportData) -> str:
    import plotly.graph_objects as go

    reasons = sorted(data.failures.items(), key=lambda kv: -kv[1])[:20]
    retries = sum(1 for b in data.batches if b["retry"] or b["batch"].startswith("retry_"))
    if not reasons:
        return f'<p id="failures">no rows still failed (retry batches: {retries})</p>'
    fig = go.Figure(go.Bar(x=[c for _, c in reasons], y=[r[:80] for r, _ in reasons], orientation="h"))
    fig.update_layout(title=f"rows still failed, by reason (retry batches: {retries})", height=320)
    return _figure_html(fig, "failures")


def _datasets(data: ReportData) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    head = "".join(
        f"<th>{h}</th>" for h in ("model", "dataset", "rows", "dim", "dtype", "shards", "MB", "replaced rows")
    )
    rows = "".join(
        f'<tr data-dataset="{html.escape(d["dataset"])}"><td>{html.escape(d["model"])}</td>'
        f'<td>{html.escape(d["dataset"])}</td><td class="num rows">{d["rows"]:,}</td>'
        f'<td class="num">{d["dimensions"]}</td>'
        f'<td>{d["dtype"]}</td><td class="num">{d["shards"]}</td><td class="num">{d["bytes"] / 1e6:,.1f}</td>'
        f'<td class="num">{d["superseded"]:,}</td><td class="num skipped">{d["skipped_existing"]:,}</td></tr>'
        for d in data.datasets
    )
    parts = [f'<table id="datasets"><tr>{head}</tr>{rows}</table>']
    for i, d in enumerate(data.datasets):
        parts.append(f"<h3>{html.escape(d['model'])} / {html.escape(d['dataset'])}</h3>")
        fig = make_subplots(rows=1, cols=2, subplot_titles=("norms of a sample", "min / max norm per shard"))
        hist = d.get("norm_hist") or {"edges": [], "counts": []}
        mids = [(a + b) / 2 for a, b in zip(hist["edges"], hist["edges"][1:], strict=False)]
        fig.add_bar(x=mids, y=hist["counts"], name="rows", row=1, col=1)
        shards = d["shard_norms"]
        for key in ("min_norm", "max_norm"):
            fig.add_scatter(
                x=[s["file"] for s in shards], y=[s[key] for s in shards], name=key, mode="markers+lines", row=1, col=2
            )
        fig.update_layout(height=320, showlegend=False)
        parts.append(_figure_html(fig, f"norms-{i}"))
        m = d.get("map")
        if m:
            colour_by = next((c for c in ("split", "source", "run_id") if len(set(m[c])) > 1), "run_id")
            fig = go.Figure()
            for value in sorted({str(v) for v in m[colour_by]}):
                pick = [j for j, v in enumerate(m[colour_by]) if str(v) == value]
                fig.add_scattergl(
                    x=[m["x"][j] for j in pick], y=[m["y"][j] for j in pick], mode="markers",
                    name=f"{colour_by}={value}", text=[f"{m['id'][j]}: {m['text'][j]}" for j in pick],
                    hoverinfo="text", marker={"size": 5},
                )  # fmt: skip
            fig.update_layout(
                title=f"2-D map of {len(m['x']):,} sampled rows ({m['method']}), colour by {colour_by}", height=480
            )
            parts.append(_figure_html(fig, f"map-{i}"))
    return "".join(parts)


def _local(data: ReportData) -> str:
    import plotly.graph_objects as go

    if not data.local_runs:
        return '<p class="muted" id="local">no local runs</p>'
    head = "".join(f"<th>{h}</th>" for h in ("run", "rows/s", "tokens/s", "padding ratio"))
    rows = "".join(
        f'<tr data-run-id="{html.escape(r["run_id"])}"><td>{html.escape(r["run_id"])}</td>'
        f'<td class="num">{_num(r["rows_per_s"])}</td>'
        f'<td class="num">{_num(r["tokens_per_s"])}</td><td class="num">{_num(r["padding_ratio"])}</td></tr>'
        for r in data.local_runs
    )
    fig = go.Figure()
    for stage in ("loader", "encoder", "writer"):
        for kind in ("busy", "idle"):
            fig.add_bar(
                x=[r["run_id"][-12:] for r in data.local_runs], y=[r[f"{stage}_{kind}"] for r in data.local_runs],
                name=f"{stage} {kind}", offsetgroup=stage, opacity=1.0 if kind == "busy" else 0.4,
            )  # fmt: skip
    fig.update_layout(title="local runs: seconds busy and idle per stage", barmode="relative", height=340)
    return f'<table id="local"><tr>{head}</tr>{rows}</table>' + _figure_html(fig, "local-stages")


def render(data: ReportData, *, refresh_s: float | None = None) -> str:
    """The page (a string of HTML). ``refresh_s``: the live page reloads itself this often.

    Raises:
        MissingExtraError: plotly (the ``report`` extra) is not installed.
    """
    js = _plotly_js()
    meta = f'<meta http-equiv="refresh" content="{refresh_s:g}">' if refresh_s else ""
    payload = to_json(data).decode().replace("</", "<\\/")
    title = f"embedbatch report: {html.escape(data.workspace)}"
    body = [
        f"<h1>{title}</h1><p class='muted'>generated {data.generated_at}; numbers from the same functions as"
        " <code>embedbatch list</code> and <code>status</code></p>",
        "<h2>Runs</h2>",
        _runs_table(data),
        _cost_figure(data),
        "<h2>Batches</h2>",
        _timeline_figure(data),
        _failures_figure(data),
        "<h2>Datasets</h2>",
        _datasets(data),
        "<h2>Local runs</h2>",
        _local(data),
    ]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}<title>{title}</title>'
        '<link rel="icon" href="data:,">'
        f"<style>{CSS}</style><script>{js}</script></head><body>{''.join(body)}"
        f'<script type="application/json" id="report-data">{payload}</script></body></html>'
    )
