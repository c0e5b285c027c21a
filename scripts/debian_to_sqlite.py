"""Load the shared Debian package descriptions into a SQLite file, as a user's own database
would hold them: ``packages(id INTEGER PRIMARY KEY, package, section, synopsis, description,
embedding F32_BLOB(DIM))`` with every embedding NULL.

Usage: python scripts/debian_to_sqlite.py OUT.db [--dim 384] [--limit N] [--data PATH]
"""

from __future__ import annotations

import argparse
import gzip
import sqlite3
from pathlib import Path

import orjson

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debian_bookworm_packages.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--dim", type=int, default=384, help="the F32_BLOB dimension of the embedding column")
    ap.add_argument("--limit", type=int, default=None, help="only the first N packages")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    conn = sqlite3.connect(args.out)
    conn.execute(
        "CREATE TABLE packages (id INTEGER PRIMARY KEY, package TEXT UNIQUE, section TEXT, synopsis TEXT, "
        f"description TEXT, embedding F32_BLOB({args.dim}))"
    )
    rows = []
    with gzip.open(args.data, "rb") as fh:
        for i, line in enumerate(fh, 1):
            if args.limit is not None and i > args.limit:
                break
            p = orjson.loads(line)
            rows.append((i, p["package"], p["section"], p["synopsis"], p["description"]))
    conn.executemany("INSERT INTO packages VALUES (?, ?, ?, ?, ?, NULL)", rows)
    conn.commit()
    conn.close()
    print(f"{len(rows):,} packages in {args.out}")


if __name__ == "__main__":
    main()
