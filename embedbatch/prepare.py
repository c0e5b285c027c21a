"""Text preparation: fields or template → prefix/suffix → lowercase → char cut → token cut."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from embedbatch.config import PrepareConfig
from embedbatch.errors import InputError, UsageError
from embedbatch.tokens import Tokenizer

__all__ = ["PreparedText", "Preparer", "format_value"]

# Characters kept before tokenizing (see Preparer.prepare): the tokenizer refuses more
# than 200,000 tokens in one call (bpe-openai 0.1, 2026), and one character is at most one
# token in ASCII, four (its UTF-8 bytes) otherwise.
MAX_CHARS_ASCII = 100_000
MAX_CHARS_OTHER = 49_000


def format_value(value: Any) -> str | None:
    """A field value as text: lists joined with ", ", chat messages as ``role: content`` lines,
    None and empty lists as None, bytes decoded as UTF-8.

    Raises:
        ValueError: bytes that are not UTF-8 (binary data is not text).
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"binary value ({len(value)} bytes) that is not UTF-8 text") from exc
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and "content" in v for v in value):
            return "\n".join(f"{m.get('role', 'unknown')}: {m['content']}" for m in value)
        parts = [p for p in (format_value(v) for v in value) if p]
        return ", ".join(parts) if parts else None
    if isinstance(value, dict):
        import orjson

        return orjson.dumps(value).decode()
    return str(value)


@dataclass(slots=True)
class PreparedText:
    """The result of preparing one row.

    Attributes:
        text: the text to embed ('' means the row is rejected as empty).
        n_tokens: tokens in ``text``.
        fields_used: the fields that contributed.
        truncated_tokens: tokens cut by ``max_tokens`` (0: none).
        truncated_chars: characters cut by ``truncate_chars`` (0: none).
        missing_field: set when the row had none of the fields (a bad row).
        problem: set when the row cannot become text (a binary value that is not UTF-8, a lone
            surrogate): a bad row with this reason.
    """

    text: str
    n_tokens: int
    fields_used: list[str]
    truncated_tokens: int = 0
    truncated_chars: int = 0
    missing_field: str | None = None
    problem: str | None = None

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "fields": self.fields_used,
            "truncated": bool(self.truncated_tokens or self.truncated_chars),
        }
        if self.truncated_tokens:
            meta["truncated_tokens"] = self.truncated_tokens
        if self.truncated_chars:
            meta["truncated_chars"] = self.truncated_chars
        return meta


class Preparer:
    """Builds the embedded text of a row.

    Args:
        config: the preparation options.
        tokenizer: counts tokens and cuts at a token boundary; None leaves both to the caller
            (the local worker tokenizes in batches).

    Raises:
        UsageError: the template is malformed.
    """

    def __init__(self, config: PrepareConfig, tokenizer: Tokenizer | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.rows = 0
        self.missing: dict[str, int] = {}  # field -> rows that lack it (absent or null)
        self.keys: set[str] = set()  # the fields rows have (from the first rows; for messages)
        self.textless = 0  # rows that lack every field (no text at all: bad rows)
        self._template_fields: list[str] = []
        if config.template is not None:
            try:
                parsed = list(string.Formatter().parse(config.template))
            except ValueError as exc:
                raise UsageError(f"bad --template: {exc}") from exc
            self._template_fields = [f for _, f, _, _ in parsed if f]
            if not self._template_fields:
                raise UsageError("--template names no field, e.g. 'Title: {title}'")
        if config.max_tokens < 1:
            raise UsageError("--max-tokens must be at least 1")
        if config.truncate_chars is not None and config.truncate_chars < 1:
            raise UsageError(f"--truncate-chars must be at least 1, got {config.truncate_chars}")
        self._fields = self._template_fields or list(config.fields)

    @property
    def source_fields(self) -> list[str]:
        """The row fields preparation reads."""
        return self._template_fields or list(self.config.fields)

    def _build(self, row: dict[str, Any]) -> tuple[str, list[str], str | None]:
        cfg = self.config
        if cfg.template is not None:
            values = {f: format_value(row.get(f)) for f in self._template_fields}
            used = [f for f, v in values.items() if v is not None]
            if not used:
                return "", [], ",".join(self._template_fields)
            return cfg.template.format_map({k: v or "" for k, v in values.items()}), used, None
        parts: list[str] = []
        used = []
        for f in cfg.fields:
            v = format_value(row.get(f))
            if v is not None and v != "":
                parts.append(v)
                used.append(f)
        if not used and all(row.get(f) is None for f in cfg.fields):
            return "", [], ",".join(cfg.fields)
        return cfg.delimiter.join(parts), used, None

    def check_fields(self, where: str, *, strict: bool) -> None:
        """After the last row: every field must exist in some row, and (``strict``, unless
        ``allow_missing_fields``) no row may lack one.

        Raises:
            InputError: naming the field, the fields the rows do have (with a "did you mean"),
                or how many rows lack it.
        """
        import difflib

        kind = "placeholder" if self.config.template is not None else "field"
        for f in self.source_fields:
            lacking = self.missing.get(f, 0)
            if self.rows and lacking == self.rows:
                have = sorted(self.keys)
                close = difflib.get_close_matches(f, have, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InputError(f"{kind} {f!r} is in no row of {where}{hint}; the rows have: {', '.join(have)}")
        # A row that lacks every field has no text: it was a bad row already (rejected, or the
        # run stopped there), so only rows that still had text count as partial here.
        partial = {f: n - self.textless for f, n in self.missing.items() if n > self.textless}
        if strict and partial and not self.config.allow_missing_fields:
            counts = ", ".join(f"{n:,} of {self.rows:,} rows lack {f!r}" for f, n in partial.items())
            raise InputError(
                f"{where}: {counts}; pass --allow-missing-fields to embed those rows without it (nothing was sent)"
            )

    def _count(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if self.rows <= 1000:
            self.keys.update(row)
        for f in self._fields:
            if row.get(f) is None:
                self.missing[f] = self.missing.get(f, 0) + 1

    def prepare(self, row: dict[str, Any]) -> PreparedText:
        """Prepare one row; see :class:`PreparedText` for what comes back."""
        cfg = self.config
        self._count(row)
        try:
            body, used, missing = self._build(row)
        except ValueError as exc:
            return PreparedText("", 0, [], problem=str(exc))
        if missing is not None:
            self.textless += 1
            return PreparedText("", 0, [], missing_field=missing)
        text = f"{cfg.prefix}{body}{cfg.suffix}" if body.strip() else ""
        if cfg.lowercase:
            text = text.lower()
        cut_chars = 0
        if cfg.truncate_chars is not None and len(text) > cfg.truncate_chars:
            cut_chars = len(text) - cfg.truncate_chars
            text = text[: cfg.truncate_chars]
        if not text.strip():
            return PreparedText("", 0, used)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                return PreparedText("", 0, used, problem=f"invalid Unicode (a lone surrogate at character {exc.start})")
        if self.tokenizer is None:  # counted and cut later, in batches (the local worker)
            return PreparedText(text, 0, used, 0, cut_chars)
        # Cut very long texts before tokenizing, so any length works and the tokenizer's own
        # limit (200,000 tokens a call, bpe-openai) is never met: a byte-level BPE token holds at
        # least one UTF-8 byte, so ASCII text gives at most one token a character and any other
        # text at most four (emoji). 100,000 ASCII or 49,000 other characters stay under the
        # limit and far above 8,191 tokens of real text. truncated_tokens counts from this cut.
        limit_chars = MAX_CHARS_ASCII if text[:MAX_CHARS_ASCII].isascii() else MAX_CHARS_OTHER
        if len(text) > limit_chars:
            cut_chars += len(text) - limit_chars
            text = text[:limit_chars]
        n_tokens = len(self.tokenizer.encode(text))
        cut_tokens = 0
        if n_tokens > cfg.max_tokens:
            text = self.tokenizer.cut(text, cfg.max_tokens)
            cut_tokens = n_tokens - cfg.max_tokens
            n_tokens = len(self.tokenizer.encode(text))
        return PreparedText(text, n_tokens, used, cut_tokens, cut_chars)
