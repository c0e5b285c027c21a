"""Planning throughput: plan + write the JSONL batch files for the 886k-row PyPI file, against a
baseline in the same run that only serialises the same request lines with orjson (no limits,
no files per batch). Target: at least half the baseline's rate.

Usage: python bench/plan.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA

from embedbatch.config import BatchLimits
from embedbatch.engines.batchapi.batchfiles import BatchFileWriter
from embedbatch.engines.batchapi.split import BatchSplitter, request_encoder
from embedbatch.records import Record

MODEL = "text-embedding-3-small"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5, help="runs per path; the median is reported")
    args = ap.parse_args()
    table = pq.read_table(DATA / "pypi_package_summaries.parquet", columns=["name", "summary"])
    pairs = [(n, s) for n, s in zip(table["name"].to_pylist(), table["summary"].to_pylist(), strict=True) if s]
    records = [
        Record(
            id=n,
            source="file",
            dataset="pypi",
            split=None,
            text=s,
            n_tokens=len(s) // 4 + 1,
            metadata={"fields": ["summary"], "truncated": False, "path": "pypi.parquet", "line": i},
        )
        for i, (n, s) in enumerate(pairs)
    ]
    tmp = Path(tempfile.mkdtemp())
    # The 841k input records live for the whole benchmark; keep the cyclic GC from re-walking
    # them on every collection (it would tax whichever side allocates more, not the work itself).
    gc.collect()
    gc.freeze()

    def baseline() -> int:
        n_bytes = 0
        with open(tmp / "baseline.jsonl", "wb") as fh:
            for r in records:
                line = (
                    orjson.dumps(
                        {
                            "custom_id": r.id,
                            "method": "POST",
                            "url": "/v1/embeddings",
                            "body": {"model": MODEL, "input": r.text, "encoding_format": "base64"},
                        }
                    )
                    + b"\n"
                )
                fh.write(line)
                n_bytes += len(line)
        return n_bytes

    def ours() -> int:
        writer = BatchFileWriter(tmp / "run", BatchSplitter(BatchLimits()))
        writer.add_all(records, request_encoder(model=MODEL, dimensions=None))
        return len(writer.finish())

    base_runs, our_runs = [], []
    for _ in range(args.repeat):  # interleaved, so drift in machine speed hits both alike
        shutil.rmtree(tmp / "run", ignore_errors=True)
        t = time.perf_counter()
        n_bytes = baseline()
        base_runs.append(time.perf_counter() - t)
        shutil.rmtree(tmp / "run", ignore_errors=True)
        t = time.perf_counter()
        batches = ours()
        our_runs.append(time.perf_counter() - t)
    shutil.rmtree(tmp, ignore_errors=True)
    base_s, ours_s = statistics.median(base_runs), statistics.median(our_runs)
    n = len(records)
    print(f"medians of {args.repeat} interleaved runs each (this VM's timings vary by ±30% from run to run)")
    print(f"{'':<28}{'rows/s':>12}{'MB/s':>10}{'seconds':>10}")
    print(f"{'baseline (orjson only)':<28}{n / base_s:>12,.0f}{n_bytes / base_s / 1e6:>10.1f}{base_s:>10.2f}")
    print(f"{'plan + write batch files':<28}{n / ours_s:>12,.0f}{n_bytes / ours_s / 1e6:>10.1f}{ours_s:>10.2f}")
    print(f"single-run ratios: {', '.join(f'{b / o:.2f}' for b, o in zip(base_runs, our_runs, strict=True))}")
    print(f"rows: {n:,}  batches: {batches}  ratio ours/baseline = {base_s / ours_s:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
