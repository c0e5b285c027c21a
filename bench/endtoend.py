"""An end-to-end Batch API run at size, through ``embedbatch serve`` over loopback.

Builds a Parquet source of ``--rows`` real-looking rows (the PyPI summaries of the shared data,
repeated with new ids ``pypi-0003-requests``), then runs each stage as a user would, each in a
fresh process timed by GNU time (wall seconds, peak RSS):

1. ``plan``: ``submit --dry-run`` (read, prepare, count tokens, split and write the batch input
   files) in a scratch workspace;
2. ``submit``: ``submit`` (the same planning, then upload every input file and create every
   batch) in the bench workspace; upload + create = ``submit`` − ``plan``;
3. ``wait``: ``poll`` passes (cron's command: refresh, download) until every batch is
   downloaded; ``serve``'s hash model embeds meanwhile (its speed, not ours, sets this figure);
4. ``ingest``: ``ingest --run-dir`` (map output lines by ``custom_id`` into shards, manifest and
   id index);
5. ``verify --quick 3`` and the row count of the dataset (every row once).

Prints rows/s and peak RSS per stage, the bytes on disk per row (batch files, shards, id
index), and an extrapolation to 100M rows (linear in rows for time and disk; memory is the
measured size's: run two sizes to see what grows; planning does, ~50 bytes a row). Model
``text-embedding-3-small`` with ``--dimensions`` (64 by default) so the output stays small.

Usage: python bench/endtoend.py [--rows 2000000] [--dimensions 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, timed_cli

MODEL = "text-embedding-3-small"


def build_source(path: Path, rows: int) -> int:
    """``rows`` rows (id, summary) from the PyPI summaries, repeated with new ids. Returns bytes."""
    table = pq.read_table(DATA / "pypi_package_summaries.parquet", columns=["name", "summary"])
    table = table.filter(pa.compute.greater(pa.compute.utf8_length(table["summary"]), 0))
    names, texts = table["name"], table["summary"]
    writer = pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("summary", pa.string())]))
    done, rep = 0, 0
    while done < rows:
        n = min(len(table), rows - done)
        prefix = pa.scalar(f"pypi-{rep:04d}-")
        ids = pa.compute.binary_join_element_wise(prefix, names.slice(0, n), "")
        writer.write_table(pa.table({"id": ids, "summary": texts.slice(0, n)}), row_group_size=100_000)
        done, rep = done + n, rep + 1
    writer.close()
    return path.stat().st_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def du(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dimensions", type=int, default=64)
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir, removed)")
    args = ap.parse_args()
    if not (DATA / "pypi_package_summaries.parquet").is_file():
        raise SystemExit(f"needs the shared data: {DATA / 'pypi_package_summaries.parquet'}")
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="eb-e2e-"))
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "source.parquet"
    t = time.perf_counter()
    src_bytes = build_source(src, args.rows)
    print(f"source: {args.rows:,} rows, {src_bytes / 1e6:,.0f} MB Parquet, built in {time.perf_counter() - t:.1f} s")

    port = free_port()
    base = {**os.environ, "OPENAI_API_KEY": "sk-bench", "EMBEDBATCH_LOG_FORMAT": "json"}
    base["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", "serve", "--port", str(port), "--data-dir", str(tmp / "serve")],
        cwd=tmp,
        env=base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    figures: dict[str, tuple[float, float]] = {}
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        submit = ["submit", str(src), "--fields", "summary", "--dataset", "e2e", "--model", MODEL]
        submit += ["--dimensions", str(args.dimensions)]
        scratch = {**base, "EMBEDBATCH_WORKSPACE": str(tmp / "ws-plan")}
        s, rss, _ = timed_cli([*submit, "--dry-run"], scratch, tmp)
        figures["plan"] = (s, rss)
        shutil.rmtree(tmp / "ws-plan", ignore_errors=True)
        env = {**base, "EMBEDBATCH_WORKSPACE": str(tmp / "ws")}
        figures["submit"] = timed_cli(submit, env, tmp)[:2]
        (run_dir,) = [p.parent for p in (tmp / "ws" / "batches").glob("*/*/run_*/run.json")]
        batch_bytes = du(run_dir, "batches/*/input.jsonl")
        started, passes, peak = time.perf_counter(), 0, 0.0
        while True:
            s, rss, _ = timed_cli(["poll"], env, tmp)
            passes, peak = passes + 1, max(peak, rss)
            states = [orjson.loads(p.read_bytes())["status"] for p in run_dir.glob("batches/*/batch.json")]
            if states and all(st == "downloaded" for st in states):
                break
            if any(st in ("failed", "expired", "cancelled") for st in states):
                raise SystemExit(f"a batch ended {states}")
            time.sleep(2)
        figures["wait (poll passes)"] = (time.perf_counter() - started, peak)
        output_bytes = du(run_dir, "batches/*/output.jsonl")
        figures["ingest"] = timed_cli(["ingest", "--run-dir", str(run_dir)], env, tmp)[:2]
        figures["verify --quick 3"] = timed_cli(["verify", "--quick", "3"], env, tmp)[:2]
        listed = orjson.loads(timed_cli(["list-datasets", "--json"], env, tmp)[2])
    finally:
        server.terminate()
        server.wait()
    embedded = [d for d in listed["embedded"] if d["dataset"] == "e2e"]
    rows = int(embedded[0]["rows"]) if embedded else 0
    shard_bytes = du(tmp / "ws" / "embeddings")
    index_bytes = du(tmp / "ws" / "indexes")
    n = args.rows
    print(f"\nrows stored: {rows:,} of {n:,} ({'every row once' if rows == n else 'ROWS MISSING'})")
    print(f"batches: {len(states)}; poll passes: {passes}")
    print(f"\n{'stage':<22}{'seconds':>10}{'rows/s':>12}{'peak RSS':>12}")
    for name, (s, rss) in figures.items():
        print(f"{name:<22}{s:>10.1f}{n / s:>12,.0f}{rss:>9,.0f} MiB")
    upload = figures["submit"][0] - figures["plan"][0]
    print(f"{'upload + create':<22}{upload:>10.1f}{n / max(upload, 1e-9):>12,.0f}  (submit - plan)")
    per_row = {"batch input": batch_bytes, "batch output": output_bytes, "shards": shard_bytes}
    per_row["id index + manifest"] = index_bytes
    print("\nbytes per row: " + ", ".join(f"{k} {v / n:,.0f}" for k, v in per_row.items()))
    scale = 100_000_000 / n
    ours = figures["submit"][0] + figures["ingest"][0]
    print(f"\nextrapolated to 100M rows (x{scale:.0f}; time and disk linear in rows):")
    hours = {k: figures[k][0] * scale / 3600 for k in ("submit", "ingest")}
    print(f"  plan + upload + create: {hours['submit']:.1f} h; ingest: {hours['ingest']:.1f} h")
    print(f"  ours in all (submit + ingest): {ours * scale / 3600:.1f} h")
    kept, cleaned = sum(per_row.values()) * scale / 1e9, (shard_bytes + index_bytes) * scale / 1e9
    print(f"  disk: {kept:,.0f} GB with batch files kept, {cleaned:,.0f} GB after clean")
    print(f"  peak RSS at this size: {max(r for _, r in figures.values()):,.0f} MiB (run two sizes to see growth)")
    print(f"  batches: {len(states) * scale:,.0f} (at 50,000 requests each)")
    if args.keep is None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
