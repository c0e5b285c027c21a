"""Intake throughput and memory: estimate over the 886k-row PyPI Parquet file, over JSONL
files of 1× and 10× the arXiv rows, and over a Hugging Face ``save_to_disk`` DatasetDict of 1×
and 10× the SGD dialogues (conversation units, ids ``{split}/{dialogue_id}``). Prints rows/s
and peak RSS; RSS at 10× should stay within 1.3× of RSS at 1× (memory flat in dataset size).

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
hf = id_field.startswith("{")
t = time.perf_counter()
source = SourceConfig(path=path, id_template=id_field) if hf else SourceConfig(path=path, id_field=id_field)
prepare = PrepareConfig(detect_messages=True) if hf else PrepareConfig(fields=fields)
e = estimate(source=source, prepare=prepare, sample=SampleConfig(p=0.5), model="text-embedding-3-small")
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


def make_sgd(dest: Path, times: int) -> Path | None:
    """The SGD DatasetDict with ``times`` copies of each split (dialogue ids made unique)."""
    import tarfile

    try:
        import datasets
    except ImportError:
        return None
    tar = DATA / "sgd_dialogues_hf_saved.tar.gz"
    unpacked = dest.parent / "sgd"
    if not unpacked.exists():
        with tarfile.open(tar) as t:
            t.extractall(unpacked, filter="data")
    datasets.disable_progress_bars()
    dd = datasets.load_from_disk(str(unpacked / "sgd_dialogues_hf"))
    copies = {
        split: datasets.concatenate_datasets(
            [ds.map(lambda r, k=k: {"dialogue_id": f"{r['dialogue_id']}-{k}"}) for k in range(times)]
        )
        for split, ds in dd.items()
    }
    datasets.DatasetDict(copies).save_to_disk(str(dest))
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
    sgd1, sgd10 = make_sgd(tmp / "sgd1", 1), make_sgd(tmp / "sgd10", 10)
    if sgd1 and sgd10:
        results["sgd 1x (hf save_to_disk)"] = run_child(CHILD, str(sgd1), "{split}/{dialogue_id}", "")
        results["sgd 10x (hf save_to_disk)"] = run_child(CHILD, str(sgd10), "{split}/{dialogue_id}", "")
    print(f"{'input':<24}{'rows':>10}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}")
    for name, r in results.items():
        print(f"{name:<24}{r['rows']:>10,.0f}{r['seconds']:>10.1f}{r['rows_per_s']:>12,.0f}{r['rss_mib']:>14.0f}")
    ratio = results["arxiv 10x (jsonl)"]["rss_mib"] / results["arxiv 1x (jsonl)"]["rss_mib"]
    print(f"RSS 10x / 1x (jsonl) = {ratio:.2f} (target <= 1.3)")
    if "sgd 10x (hf save_to_disk)" in results:
        ratio = results["sgd 10x (hf save_to_disk)"]["rss_mib"] / results["sgd 1x (hf save_to_disk)"]["rss_mib"]
        print(f"RSS 10x / 1x (hf) = {ratio:.2f} (target <= 1.3)")
    else:
        print("hf rows skipped: the hf extra (datasets) is not installed")


if __name__ == "__main__":
    main()
