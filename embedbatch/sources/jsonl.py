"""JSONL and JSON-array readers (each optionally gzip), streaming."""

from __future__ import annotations

import codecs
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson

from embedbatch.errors import InputError
from embedbatch.records import RawRow
from embedbatch.sources import open_maybe_gzip

__all__ = ["iter_json_array", "iter_jsonl"]

_READ_BYTES = 1 << 20
_MAX_OBJECT_BYTES = 256 << 20


def _utf8_problem(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start} of the line (0x{raw[exc.start]:02x})"
    return None


def iter_jsonl(path: Path) -> Iterator[RawRow]:
    """One :class:`RawRow` per non-blank line; a bad line is a RawRow with ``error`` set.

    Raises:
        InputError: the file is truncated or corrupt gzip.
    """
    name = str(path)
    with open_maybe_gzip(path) as fh:
        lineno = 0
        try:
            for raw in fh:
                lineno += 1
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM, as the CSV and JSON readers allow
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    problem = _utf8_problem(raw) or f"malformed JSON: {exc}"
                    yield RawRow(name, lineno, None, problem)
                    continue
                if not isinstance(obj, dict):
                    yield RawRow(name, lineno, None, f"row is a JSON {type(obj).__name__}, not an object")
                    continue
                yield RawRow(name, lineno, obj)
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(f"cannot read past line {lineno}: {exc}", path=name, line=lineno + 1) from exc


def iter_json_array(path: Path) -> Iterator[RawRow]:
    """Each element of a top-level JSON array, parsed incrementally (memory bounded by the
    largest element, not the file). ``line`` is the 0-based element index.

    Raises:
        InputError: the array is malformed (the rest cannot be located), an element exceeds
            256 MiB, or the bytes are not UTF-8.
    """
    name = str(path)
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    pos = 0
    index = 0
    started = False
    eof = False
    with open_maybe_gzip(path) as fh:

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = fh.read(_READ_BYTES)
            try:
                text = utf8.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise InputError(f"invalid UTF-8 near element {index}: {exc.reason}", path=name, line=index) from exc
            buf = buf[pos:] + text
            pos = 0
            if not chunk:
                eof = True
            return bool(chunk)

        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff,":
                if buf[pos] == "," and not started:
                    raise InputError("malformed JSON array: ',' before '['", path=name, line=index)
                pos += 1
            if pos >= len(buf):
                if eof or not fill():
                    raise InputError("unexpected end of file inside the JSON array", path=name, line=index)
                continue
            ch = buf[pos]
            if not started:
                if ch != "[":
                    raise InputError("expected a JSON array", path=name, line=0)
                started = True
                pos += 1
                continue
            if ch == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if not eof and len(buf) - pos < _MAX_OBJECT_BYTES:
                    fill()
                    continue
                raise InputError(f"malformed JSON array element: {exc.msg}", path=name, line=index) from exc
            if end == len(buf) and not eof:
                # A number or literal might continue in the next chunk.
                fill()
                continue
            pos = end
            if isinstance(obj, dict):
                yield RawRow(name, index, obj)
            else:
                yield RawRow(name, index, None, f"element is a JSON {type(obj).__name__}, not an object")
            index += 1
