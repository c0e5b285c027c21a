"""Failed rows, shared by every engine: the ``failed_ids.tsv`` codec, and what a reason means.

``failed_ids.tsv`` has a header ``id\treason\tbatch\tline`` and one row per failed id; ids and
reasons are escaped as PostgreSQL's COPY text format does (:func:`tsv_escape`), so every id reads
back exactly. A reason is *permanent* when sending the same row again cannot change the outcome
(the provider answered 400 for that input, or the vector has the wrong dimension for the
dataset); ``retry`` leaves those alone unless forced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "is_permanent",
    "read_failed_ids",
    "top_reasons",
    "tsv_escape",
    "tsv_unescape",
]

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}

# Reason prefixes that name the row itself, not the moment: the provider refused this input
# (HTTP 400, in a batch output line or a realtime answer for that row alone), or the vector
# cannot join the dataset (its dimension differs from the dataset's).
_PERMANENT_PREFIXES = ("http 400", "dimension ", "rejected by the provider (400)")


def tsv_escape(s: str) -> str:
    """A field for ``failed_ids.tsv``, escaped as PostgreSQL's COPY text format does: backslash,
    TAB, LF and CR become ``\\``, ``\t``, ``\n``, ``\r``; nothing else changes (quotes stay)."""
    return "".join(_ESCAPES.get(ch, ch) for ch in s) if any(ch in s for ch in _ESCAPES) else s


def tsv_unescape(s: str) -> str:
    """The inverse of :func:`tsv_escape`."""
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            out.append(_UNESCAPES.get(s[i + 1], s[i + 1]))
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def read_failed_ids(path: Path) -> dict[str, str]:
    """id → reason from a ``failed_ids.tsv`` (every id exactly as it was, see :func:`tsv_escape`)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").split("\n")[1:]:
        if line:
            rid, _, rest = line.partition("\t")
            out[tsv_unescape(rid)] = tsv_unescape(rest.partition("\t")[0])
    return out


def is_permanent(reason: str) -> bool:
    """True when sending the row again cannot change the outcome (see the module docstring)."""
    return reason.startswith(_PERMANENT_PREFIXES)


def top_reasons(reasons: Iterable[str], n: int = 5) -> dict[str, int]:
    """The ``n`` most common reasons with their row counts, most common first (reasons over
    200 characters are cut, so one long message cannot swell run.json)."""
    counts = Counter(r[:200] for r in reasons)
    return dict(counts.most_common(n))
