"""Readers: each yields :class:`~embedbatch.records.RawRow` lazily, memory flat in file size.

Formats are detected by content, not by name: gzip by its magic bytes (then the inner stream
again), Parquet by ``PAR1``, JSON array by a leading ``[``, JSONL by ``{``, CSV otherwise.
"""

from __future__ import annotations

import glob
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from embedbatch.errors import InputError, UsageError
from embedbatch.records import RawRow

__all__ = [
    "SQLITE_HEADER",
    "detect_format",
    "expand_paths",
    "is_sqlite_source",
    "iter_raw_rows",
    "open_maybe_gzip",
    "sqlite_path",
]

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"


def expand_paths(spec: str) -> list[Path]:
    """A file, a directory (its files, recursively, hidden ones skipped) or a glob, sorted.

    Raises:
        UsageError: nothing matches.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
    else:
        found = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
    if not found:
        raise UsageError(f"no input files at {spec!r}")
    return found


def open_maybe_gzip(path: Path) -> IO[bytes]:
    """Open ``path`` for binary reading, decompressing when it starts with the gzip magic."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == GZIP_MAGIC:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _binary(head: bytes) -> bool:
    """True when the first bytes cannot be text: they hold a NUL byte (as git decides). Text
    that is merely not UTF-8 is read, and its bad rows are named with their line."""
    return b"\x00" in head


def detect_format(path: Path) -> str:
    """``parquet``, ``json``, ``jsonl`` or ``csv`` from the (decompressed) first bytes."""
    with open(path, "rb") as fh:
        if fh.read(4) == PARQUET_MAGIC:
            return "parquet"
    with open_maybe_gzip(path) as fh:
        try:
            head = fh.read(4096)
        except (OSError, EOFError) as exc:
            raise UsageError(f"{path}: cannot read ({exc})") from exc
    if _binary(head):
        raise InputError(
            "neither Parquet nor UTF-8 text (JSONL, JSON, CSV): its first bytes are binary", path=str(path), line=1
        )
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{") or not stripped:
        return "jsonl"
    return "csv"


def iter_raw_rows(spec: str, *, fmt: str = "auto") -> Iterator[RawRow]:
    """Every row of every file named by ``spec``, in file order.

    Args:
        spec: a file, directory or glob.
        fmt: ``auto`` (detect per file) or a fixed format.

    Raises:
        UsageError: no files, or an unreadable file.
    """
    from embedbatch.sources import csv as csv_reader
    from embedbatch.sources import jsonl, parquet

    for path in expand_paths(spec):
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "parquet":
            yield from parquet.iter_rows(path)
        elif kind == "json":
            yield from jsonl.iter_json_array(path)
        elif kind == "jsonl":
            yield from jsonl.iter_jsonl(path)
        elif kind == "csv":
            yield from csv_reader.iter_rows(path)
        else:
            raise UsageError(f"unknown format {kind!r}; valid: auto, jsonl, json, parquet, csv")


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def sqlite_path(spec: str) -> Path:
    """The file of a ``sqlite:PATH`` or plain path spec."""
    return Path(spec.removeprefix("sqlite:"))


def is_sqlite_source(spec: str) -> bool:
    """True for ``sqlite:PATH``, a ``.db``/``.sqlite``/``.sqlite3`` file, or a file that starts
    with the SQLite header."""
    if spec.startswith("sqlite:"):
        return True
    path = Path(spec)
    if path.suffix.lower() in _SQLITE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(16) == SQLITE_HEADER
    except OSError:
        return False
