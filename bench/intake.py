"""Intake throughput and memory: estimate over the 886k-row PyPI Parquet file and over JSONL
files of 1× and 10× the arXiv rows. Prints rows/s and peak RSS; RSS at 10× should stay within
1.3× of RSS at 1× (memory flat in file size).

Usage: python bench/intake.py
"""

from __future__ import annotations

import gzip
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, PEAK_RSS, run_child

CHILD = (
    PEAK_RSS
    + """
import json, sys, time
from embedbatch.config import PrepareConfig, SampleConfig, SourceConfig
from embedbatch.engines.batchapi.estimate import estimate
path, id_field, fields = sys.argv[1], sys.argv[2], tuple(sys.argv[3].split(","))
t = time.perf_counter()
e = estimate(source=SourceConfig(path=path, id_field=id_field), prepare=PrepareConfig(fields=fields),
             sample=SampleConfig(p=0.5), model="text-embedding-3-small")
s = time.perf_counter() - t
print(json.dumps({"rows": e.stats.rows_read, "seconds": s, "rows_per_s": e.stats.rows_read / s, "rss_mib": _rss()}))
"""
)


def make_copies(src: Path, dest: Path, times: int) -> Path:
    """JSONL with ``times`` copies of the arXiv rows, ids made unique per copy."""
    import orjson

    with gzip.open(src, "rb") as fh:
        rows = [orjson.loads(line) for line in fh]
    with open(dest, "wb") as out:
        for k in range(times):
            for r in rows:
                r2 = dict(r, id=f"{r['id']}-{k}")
                out.write(orjson.dumps(r2) + b"\n")
    return dest


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    arxiv = DATA / "arxiv_cs_daily_2025.jsonl.gz"
    one = make_copies(arxiv, tmp / "x1.jsonl", 1)
    ten = make_copies(arxiv, tmp / "x10.jsonl", 10)
    results = {
        "pypi (886k, parquet)": run_child(CHILD, str(DATA / "pypi_package_summaries.parquet"), "name", "summary"),
        "arxiv 1x (jsonl)": run_child(CHILD, str(one), "id", "title,summary"),
        "arxiv 10x (jsonl)": run_child(CHILD, str(ten), "id", "title,summary"),
    }
    print(f"{'input':<24}{'rows':>10}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}")
    for name, r in results.items():
        print(f"{name:<24}{r['rows']:>10,.0f}{r['seconds']:>10.1f}{r['rows_per_s']:>12,.0f}{r['rss_mib']:>14.0f}")
    ratio = results["arxiv 10x (jsonl)"]["rss_mib"] / results["arxiv 1x (jsonl)"]["rss_mib"]
    print(f"RSS 10x / 1x = {ratio:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
