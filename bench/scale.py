"""Cost proportional to the work: every command at 300 thousand rows and at 10× or 100× that.

For each size, a workspace gets one dataset built through ``embedbatch import`` (ids
``doc-000000042``, 8-d random vectors, 100,000-row shards) and a flat Faiss index; then each
command runs in a fresh process, and its wall time and peak RSS (``wait4``) are recorded:
``--version``, ``list``, ``list-datasets``, ``status``, ``get``, ``search --id`` (through the
flat index), ``submit --dry-run`` of 1,000 new rows, one ``poll`` pass with nothing to do, and
``verify``. The ratios of the largest size against the smallest are printed, same run.
Targets: time ≤ 1.5× and peak RSS ≤ 1.3× for every command but ``verify`` (linear in time, flat
in memory: ≤ 1 GB); ``--version`` under 0.5 s; ``status`` on an empty workspace under 1 s.

Then one ``poll`` pass with nothing to do in a workspace with 10 finished runs and in one with
1,000 (each of 3 ingested batches, written through ``Run.create`` as an engine writes them, plus
one active run): target ≤ 1.5× in time.

Usage: python bench/scale.py [--rows 300000 3000000] [--repeat 3] [--runs 10 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import timed_cli

MODEL = "m"
COMMANDS: dict[str, list[str]] = {
    "--version": ["--version"],
    "list": ["list"],
    "list-datasets": ["list-datasets"],
    "status": ["status"],
    "get": ["get", "doc-000000042", "--dataset", "scale", "--model", MODEL, "--json"],
    "search --id": ["search", "--id", "doc-000000042", "--dataset", "scale", "--model", MODEL, "-k", "5", "--json"],
    "submit --dry-run": ["submit", "{new}", "--fields", "text", "--dataset", "scale", "--model", MODEL, "--dry-run"],
    "poll": ["poll"],
    "verify": ["verify", "--dataset", "scale"],
}


def run(ws: Path, args: list[str], cwd: Path) -> tuple[float, float]:
    """One command in a fresh process: (seconds, peak RSS MiB)."""
    env = {**os.environ, "EMBEDBATCH_WORKSPACE": str(ws), "OPENAI_API_KEY": "sk-bench", "EMBEDBATCH_LOG_FORMAT": "json"}
    env["OPENAI_BASE_URL"] = "http://127.0.0.1:9/v1"  # nothing to call: a pass with nothing to do calls nobody
    seconds, rss, _ = timed_cli(args, env, cwd)
    return seconds, rss


def build(ws: Path, rows: int, tmp: Path) -> float:
    """A Parquet source of ``rows`` rows, imported; then a flat index. Returns the import's seconds."""
    src = tmp / f"src-{rows}"
    src.mkdir()
    rng = np.random.default_rng(0)
    step = 1_000_000
    for n, lo in enumerate(range(0, rows, step)):
        hi = min(rows, lo + step)
        vecs = rng.standard_normal((hi - lo, 8)).astype(np.float32)
        table = pa.table(
            {
                "id": pa.array([f"doc-{i:09d}" for i in range(lo, hi)], pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 8),
            }
        )
        pq.write_table(table, src / f"part-{n:04d}.parquet")
    started = time.perf_counter()
    run(ws, ["import", str(src), "--dataset", "scale", "--model", MODEL], tmp)
    seconds = time.perf_counter() - started
    run(ws, ["index", "build", "--dataset", "scale", "--model", MODEL, "--kind", "flat"], tmp)
    shutil.rmtree(src)
    return seconds


def finished_runs(ws: Path, n: int) -> None:
    """``n`` finished Batch API runs of 3 ingested batches, and one active run with a planned
    batch held back until tomorrow (so the pass opens it and has nothing to send)."""
    from datetime import timedelta

    from embedbatch.runs import BatchState, Run, RunState
    from embedbatch.workspace import Workspace, utc_now

    w = Workspace(ws)
    for _ in range(n):
        paths = w.new_run(MODEL, "old")
        state = RunState(run_id=paths.run_id, model=MODEL, dataset="old", source="file", source_path="x")
        state.status = "finished"
        Run.create(paths, state, batches=[BatchState(name=f"batch_{i:03d}", status="ingested") for i in range(3)])
    paths = w.new_run(MODEL, "live")
    state = RunState(run_id=paths.run_id, model=MODEL, dataset="live", source="file", source_path="x")
    later = (utc_now() + timedelta(days=1)).isoformat()
    Run.create(paths, state, batches=[BatchState(name="batch_001", status="uploaded", not_before=later)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[300_000, 3_000_000])
    ap.add_argument("--repeat", type=int, default=3, help="runs per command; medians are reported")
    ap.add_argument("--runs", type=int, nargs=2, default=[10, 1000], help="finished runs, fewer and more")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="embedbatch-scale-"))
    try:
        new = tmp / "new.jsonl"
        new.write_bytes(
            b"".join(orjson.dumps({"id": f"new-{i}", "text": f"a new row {i}"}) + b"\n" for i in range(1000))
        )
        empty = tmp / "empty"
        t, _ = run(empty, ["status"], tmp)
        print(f"status on an empty workspace: {t:.2f} s (target < 1 s)")
        results: dict[int, dict[str, tuple[float, float]]] = {}
        for rows in args.rows:
            ws = tmp / f"ws-{rows}"
            took = build(ws, rows, tmp)
            print(f"{rows:,} rows imported in {took:.1f} s ({rows / took:,.0f} rows/s)")
            per: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
            for _ in range(args.repeat):
                for name, cmd in COMMANDS.items():
                    per[name].append(run(ws, [str(new) if a == "{new}" else a for a in cmd], tmp))
                    if name == "submit --dry-run":
                        for d in (ws / "batches").glob(f"{MODEL}/scale/run_*"):
                            shutil.rmtree(d)  # the next dry run starts from the same state
            results[rows] = {
                n: (statistics.median(s for s, _ in v), statistics.median(r for _, r in v)) for n, v in per.items()
            }
        small, large = min(results), max(results)
        print(f"\n{'command':18} " + " ".join(f"{f'{r:,} rows':>22}" for r in sorted(results)) + "   time ×   RSS ×")
        for name in COMMANDS:
            cells = " ".join(f"{results[r][name][0]:>9.2f} s {results[r][name][1]:>6.0f} MiB" for r in sorted(results))
            t_ratio = results[large][name][0] / results[small][name][0]
            r_ratio = results[large][name][1] / results[small][name][1]
            print(f"{name:18} {cells}   {t_ratio:6.2f} {r_ratio:6.2f}")
        polls: dict[int, float] = {}
        for n in args.runs:
            ws = tmp / f"runs-{n}"
            finished_runs(ws, n)
            run(ws, ["poll"], tmp)  # a workspace written before the index is indexed once, here
            polls[n] = statistics.median(run(ws, ["poll"], tmp)[0] for _ in range(args.repeat))
        few, many = args.runs
        print(
            f"\npoll pass, nothing to do: {polls[few]:.2f} s with {few:,} finished runs, {polls[many]:.2f} s with "
            f"{many:,}: {polls[many] / polls[few]:.2f}× (target <= 1.5)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
