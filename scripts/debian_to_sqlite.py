"""Load the shared Debian package descriptions into a SQLite file, as a user's own database
would hold them: ``packages(id INTEGER PRIMARY KEY, package, section, synopsis, description,
embedding F32_BLOB(DIM))`` with every embedding NULL.

Usage: python scripts/debian_to_sqlite.py OUT.db --data PACKAGES.jsonl.gz [--dim 384] [--limit N]

PACKAGES is a (gzipped) JSONL of ``{"package", "section", "synopsis", "description"}`` rows, such
as the Debian bookworm package list the project's benchmarks use (beside the repository in
``../shared/data/``, the default when it is there). OUT.db is written under a temporary name and
renamed at the end, so a failure leaves no half-made database; an existing OUT.db is refused.
"""

from __future__ import annotations

import argparse
import gzip
import sqlite3
import sys
from pathlib import Path

import orjson

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debian_bookworm_packages.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--dim", type=int, default=384, help="the F32_BLOB dimension of the embedding column")
    ap.add_argument("--limit", type=int, default=None, help="only the first N packages")
    ap.add_argument("--data", type=Path, default=DATA if DATA.exists() else None, help="the packages JSONL")
    args = ap.parse_args()
    if args.data is None or not args.data.is_file():
        sys.exit(f"error: no packages file{f' at {args.data}' if args.data else ''}: pass --data PACKAGES.jsonl.gz")
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; choose another name or remove it")
    rows = []
    opener = gzip.open if args.data.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(args.data, "rb") as fh:
        for i, line in enumerate(fh, 1):
            if args.limit is not None and i > args.limit:
                break
            try:
                p = orjson.loads(line)
                rows.append((i, p["package"], p.get("section"), p.get("synopsis"), p.get("description")))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                sys.exit(f"error: {args.data}:{i}: not a package row ({type(exc).__name__}: {exc})")
    tmp = args.out.with_name(f".{args.out.name}.partial")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.execute(
            "CREATE TABLE packages (id INTEGER PRIMARY KEY, package TEXT UNIQUE, section TEXT, synopsis TEXT, "
            f"description TEXT, embedding F32_BLOB({args.dim}))"
        )
        conn.executemany("INSERT INTO packages VALUES (?, ?, ?, ?, ?, NULL)", rows)
        conn.commit()
    finally:
        conn.close()
    tmp.replace(args.out)
    print(f"{len(rows):,} packages in {args.out}")


if __name__ == "__main__":
    main()
