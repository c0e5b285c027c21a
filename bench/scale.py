"""Cost proportional to the run: plan 1,000 new rows into a dataset that already holds 500,000
embedded rows, against planning the same rows into an empty dataset, in the same run.

The rows are real PyPI package summaries (shared data): 500,000 of them are committed through
the dataset store (8-d random vectors: planning never reads vectors, only the id index), and
1,000 others are planned (``submit --dry-run``: files written, nothing sent). Each plan runs in
a fresh process, so peak RSS is that plan's own. Targets: time ratio <= 1.5, RSS ratio <= 1.3.

Usage: python bench/scale.py [--repeat 5] [--rows 500000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, PEAK_RSS, run_child

from embedbatch.store.dataset import DatasetStore
from embedbatch.workspace import Workspace

MODEL = "text-embedding-3-small"
PLAN = (
    PEAK_RSS
    + """
import json, sys, time
from pathlib import Path
from embedbatch.config import PrepareConfig, SampleConfig, SourceConfig, SubmitConfig
from embedbatch.engines.batchapi.plan import plan_run
from embedbatch.workspace import Workspace
t = time.perf_counter()
p = plan_run(Workspace(Path(sys.argv[1])), source=SourceConfig(path=sys.argv[2], id_field="name"),
             prepare=PrepareConfig(fields=("summary",)), sample=SampleConfig(),
             submit=SubmitConfig(model="text-embedding-3-small", dry_run=True))
assert p.state.counts["planned"] == 1000, p.state.counts
print(json.dumps({"s": time.perf_counter() - t, "rss": _rss()}))
"""
)


def build_dataset(ws: Workspace, names: list[str], texts: list[str]) -> float:
    """Commit ``names``/``texts`` into dataset ``scale`` through the store; returns seconds."""
    started = time.perf_counter()
    store = DatasetStore(ws, MODEL, "scale")
    rng = np.random.default_rng(0)
    step = 100_000
    for start in range(0, len(names), step):
        writer = store.writer(dim=8, rows_per_shard=step)
        ids, part = names[start : start + step], texts[start : start + step]
        writer.write(
            ids=ids,
            texts=part,
            metadata=["{}"] * len(ids),
            splits=[None] * len(ids),
            vectors=rng.standard_normal((len(ids), 8)).astype(np.float32),
            source="file",
            dataset="scale",
            model=MODEL,
            run_id="run_bench",
        )
        writer.add_source(f"run_bench/batch_{start // step:03d}")
        store.commit(writer, run_id="run_bench", run_info={"kind": "bench"})
    return time.perf_counter() - started


def plan_once(ws_root: Path, source: Path) -> dict[str, float]:
    result: dict[str, float] = run_child(PLAN, str(ws_root), str(source))
    runs = ws_root / "batches"
    if runs.exists():
        shutil.rmtree(runs)  # each plan starts from the same state
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5, help="plans per workspace; medians are reported")
    ap.add_argument("--rows", type=int, default=500_000, help="rows already embedded")
    args = ap.parse_args()
    table = pq.read_table(DATA / "pypi_package_summaries.parquet", columns=["name", "summary"])
    pairs = [(n, s) for n, s in zip(table["name"].to_pylist(), table["summary"].to_pylist(), strict=True) if s]
    embedded, new = pairs[: args.rows], pairs[args.rows : args.rows + 1000]
    tmp = Path(tempfile.mkdtemp(prefix="embedbatch-scale-"))
    try:
        source = tmp / "scale.jsonl"
        source.write_bytes(b"".join(orjson.dumps({"name": n, "summary": s}) + b"\n" for n, s in new))
        empty, full = Workspace(tmp / "empty"), Workspace(tmp / "full")
        built = build_dataset(full, [n for n, _ in embedded], [s for _, s in embedded])
        print(f"dataset: {len(embedded):,} rows committed in {built:.1f} s")
        plan_once(full.root, source)  # warm the page cache for both sides alike
        plan_once(empty.root, source)
        runs: dict[str, list[dict[str, float]]] = {"empty": [], "full": []}
        for _ in range(args.repeat):  # interleaved, so machine noise hits both sides
            runs["empty"].append(plan_once(empty.root, source))
            runs["full"].append(plan_once(full.root, source))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("s", "rss")} for k, v in runs.items()}
        for k in ("empty", "full"):
            print(f"plan 1,000 rows into {k:5} dataset: {med[k]['s']:.3f} s, peak RSS {med[k]['rss']:.0f} MiB")
        t_ratio = med["full"]["s"] / med["empty"]["s"]
        r_ratio = med["full"]["rss"] / med["empty"]["rss"]
        print(f"time ratio {t_ratio:.2f} (target <= 1.5), peak RSS ratio {r_ratio:.2f} (target <= 1.3)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
