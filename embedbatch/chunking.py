"""Chunking: a long prepared text → chunks of at most N tokens of the model's tokenizer, each
with its character span in the text (``text[start:end] == chunk``).

Splitters (chosen by ``--chunker``; measured in ``bench/chunking.py``, reasons in
``docs/architecture.md``):

- ``recursive`` (default): ``semantic-text-splitter``'s ``TextSplitter`` — paragraph, then
  sentence, then word, then character boundaries, filled up to the capacity;
- ``markdown``: its ``MarkdownSplitter`` — headings, code blocks and lists as further levels;
- ``tokens``: cuts every ``N - overlap`` tokens at token boundaries (character offsets from the
  tokenizer), for text with no structure to respect.

Both splitters count tokens through the model's own :class:`~embedbatch.tokens.Tokenizer`
(cl100k_base for OpenAI models, the local model's tokenizer for ``local``), so a chunk is
never over the limit. Chunks are trimmed of surrounding whitespace: every non-blank character
of the text is in some chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedbatch.config import PrepareConfig
from embedbatch.errors import MissingExtraError, UsageError
from embedbatch.prepare import MAX_CHARS_ASCII
from embedbatch.records import Record
from embedbatch.tokens import Tokenizer

__all__ = ["CHUNKERS", "Chunk", "Chunker", "check_chunk_template", "chunk_records"]

CHUNKERS = ("tokens", "recursive", "markdown")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk: ``text == parent[start:end]`` (character offsets), ``n_tokens`` of the model's
    tokenizer."""

    start: int
    end: int
    text: str
    n_tokens: int


class Chunker:
    """Splits texts into chunks of at most ``tokens`` tokens, ``overlap`` tokens shared at most
    between neighbours.

    Raises:
        UsageError: an unknown chunker, ``tokens`` < 1, or ``overlap`` not below ``tokens``.
        MissingExtraError: semantic-text-splitter is not installed (recursive, markdown).
    """

    def __init__(self, tokenizer: Tokenizer, *, tokens: int, overlap: int = 0, chunker: str = "recursive") -> None:
        if chunker not in CHUNKERS:
            raise UsageError(f"--chunker must be one of {', '.join(CHUNKERS)}, got {chunker!r}")
        if tokens < 1:
            raise UsageError(f"--chunk-tokens must be at least 1, got {tokens}")
        if not 0 <= overlap < tokens:
            raise UsageError(f"--chunk-overlap must be 0 or more and below --chunk-tokens ({tokens}), got {overlap}")
        self.tokenizer, self.tokens, self.overlap, self.kind = tokenizer, tokens, overlap, chunker
        self._splitter: Any = None
        if chunker != "tokens":
            try:
                from semantic_text_splitter import MarkdownSplitter, TextSplitter
            except ImportError as exc:
                raise MissingExtraError("semantic-text-splitter", "chunking") from exc
            cls = MarkdownSplitter if chunker == "markdown" else TextSplitter
            self._splitter = cls.from_callback(self._count, tokens, overlap=overlap, trim=True)

    @classmethod
    def for_prepare(cls, prepare: PrepareConfig, tokenizer: Tokenizer | None) -> Chunker | None:
        """The chunker ``prepare`` asks for (None without ``chunk_tokens``).

        Raises:
            UsageError: no tokenizer, chunks over ``max_tokens``, or a bad id template.
        """
        if prepare.chunk_tokens is None:
            return None
        if tokenizer is None:
            raise UsageError("chunking needs the model's tokenizer")
        if prepare.chunk_tokens > prepare.max_tokens:
            raise UsageError(
                f"--chunk-tokens {prepare.chunk_tokens} is over the model's input limit (--max-tokens "
                f"{prepare.max_tokens})"
            )
        check_chunk_template(prepare.chunk_id_template)
        if prepare.chunk_aggregate not in (None, "mean"):
            raise UsageError(f"--chunk-aggregate must be mean, got {prepare.chunk_aggregate!r}")
        return cls(tokenizer, tokens=prepare.chunk_tokens, overlap=prepare.chunk_overlap, chunker=prepare.chunker)

    @property
    def policy(self) -> dict[str, Any]:
        """What a chunk's metadata records about how it was made."""
        return {"chunker": self.kind, "tokens": self.tokens, "overlap": self.overlap, "tokenizer": self.tokenizer.name}

    def _count(self, text: str) -> int:
        # A span too long to tokenize in one call (the tokenizer's own limit) is certainly over
        # the capacity; the splitter then splits it further and counts the parts.
        if len(text) > MAX_CHARS_ASCII:
            return self.tokens + 1
        return len(self.tokenizer.encode(text))

    def split(self, text: str) -> list[Chunk]:
        """The chunks of ``text``, in order (none for a blank text). A text that fits is one
        chunk, counted once (most rows of a corpus: the splitter is not called)."""
        stripped = text.strip()
        if not stripped:
            return []
        if len(stripped) <= MAX_CHARS_ASCII:
            n = len(self.tokenizer.encode(stripped))
            if n <= self.tokens:
                start = len(text) - len(text.lstrip())
                return [Chunk(start, start + len(stripped), stripped, n)]
        if self._splitter is None:
            return self._by_tokens(text)
        out = []
        for start, piece in self._splitter.chunk_indices(text):
            out.append(Chunk(start, start + len(piece), piece, len(self.tokenizer.encode(piece))))
        return out

    def _by_tokens(self, text: str) -> list[Chunk]:
        """Every ``tokens - overlap`` tokens; a cut inside a character moves to its end, and a
        chunk that re-tokenises longer (BPE merges across the cut) gives back a token."""
        spans = _token_spans(self.tokenizer, text)
        out: list[Chunk] = []
        step = self.tokens - self.overlap
        first = 0
        while first < len(spans):
            last = min(first + self.tokens, len(spans))
            while True:  # the trimmed piece is what is embedded: it must fit
                start, end = spans[first][0], spans[last - 1][1]
                piece = text[start:end]
                stripped = piece.strip()
                n = len(self.tokenizer.encode(stripped))
                if n <= self.tokens or last - first <= 1:
                    break
                last -= 1
            if stripped:
                lead = len(piece) - len(piece.lstrip())
                out.append(Chunk(start + lead, start + lead + len(stripped), stripped, n))
            if last >= len(spans):
                break
            first = max(first + 1, min(first + step, last))
        return out


def _token_spans(tokenizer: Tokenizer, text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character span of each token of ``text`` (a token that ends inside a
    character is merged with the next)."""
    offsets = getattr(tokenizer, "offsets", None)
    if offsets is not None:
        spans: list[tuple[int, int]] = offsets(text)
        return spans
    # Generic: grow a prefix token by token (only for tokenizers without offsets).
    ids = tokenizer.encode(text)
    out: list[tuple[int, int]] = []
    pos = 0
    for i in range(1, len(ids) + 1):
        end = len(tokenizer.cut(text, i))
        if end > pos:
            out.append((pos, end))
            pos = end
    if pos < len(text):
        out.append((pos, len(text)))
    return out


def check_chunk_template(template: str) -> None:
    """Refuse a chunk id template that cannot tell chunks apart (or fails to format).

    Raises:
        UsageError: the template lacks ``{k}`` or ``{parent_id}``, or names another field.
    """
    try:
        a, b = template.format(parent_id="p", k=0), template.format(parent_id="p", k=1)
        other = template.format(parent_id="q", k=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"--chunk-id-template {template!r}: use {{parent_id}} and {{k}} only ({exc})") from exc
    if a in (b, other):
        raise UsageError(f"--chunk-id-template {template!r} must contain both {{parent_id}} and {{k}}")


def chunk_records(
    doc: Record,
    chunker: Chunker,
    template: str,
    stored: Callable[[list[str]], Any] | None,
    *,
    with_parent_text: bool = False,
) -> tuple[list[Record], list[str]]:
    """A prepared document as chunk records (ids from ``template``; ``metadata.chunk`` holds
    parent id, index, start/end character offsets into ``doc.text``, count, the chunk's token
    count ``n_tokens`` and the policy), and the ids of its old chunks past the new count that
    the dataset still holds (``stored``: ``(ids) -> (n,) bool``; old chunks are numbered from 0
    without gaps, so probing stops at the first absent one). ``with_parent_text``
    (``--chunk-aggregate mean``): every chunk says ``aggregate: "mean"`` and the first one also
    carries ``doc.text`` as ``parent_text`` (see :mod:`embedbatch.aggregate`)."""
    pieces = chunker.split(doc.text)
    policy = chunker.policy
    out = []
    for k, piece in enumerate(pieces):
        meta = dict(doc.metadata) if len(pieces) > 1 else doc.metadata  # (one chunk: the doc's own)
        meta["chunk"] = {
            "parent_id": doc.id,
            "index": k,
            "start": piece.start,
            "end": piece.end,
            "count": len(pieces),
            "n_tokens": piece.n_tokens,
            **policy,
        }
        if with_parent_text:
            meta["chunk"]["aggregate"] = "mean"  # every consumer can tell, row by row
            if k == 0:
                meta["chunk"]["parent_text"] = doc.text
        out.append(
            Record(
                id=template.format(parent_id=doc.id, k=k),
                source=doc.source,
                dataset=doc.dataset,
                split=doc.split,
                text=piece.text,
                n_tokens=piece.n_tokens,
                metadata=meta,
                stratum=doc.stratum,
                parent_id=doc.id,
                chunk_index=k,
            )
        )
    stale: list[str] = []
    k = len(pieces)
    while stored is not None:
        probe = [template.format(parent_id=doc.id, k=j) for j in range(k, k + 8)]
        held = list(stored(probe))
        n = held.index(False) if False in held else len(held)
        stale += probe[:n]
        if n < len(probe):
            break
        k += len(probe)
    return out, stale
