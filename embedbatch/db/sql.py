"""SQL text shared by every database adapter: standard identifier quoting."""

from __future__ import annotations

from embedbatch.errors import UsageError

__all__ = ["quote_ident"]


def quote_ident(name: str) -> str:
    """``name`` as one double-quoted SQL identifier (PostgreSQL, SQLite and libSQL alike): a
    name like ``x; DROP TABLE y`` stays a literal name.

    Raises:
        UsageError: empty or containing a NUL byte.
    """
    if not name or "\x00" in name:
        raise UsageError(f"invalid SQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'
