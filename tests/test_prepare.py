"""Text preparation: fields, lists, templates, options, config files, token truncation."""

from __future__ import annotations

from pathlib import Path

import bpe_openai
import pytest

from embedbatch.config import PrepareConfig
from embedbatch.errors import UsageError
from embedbatch.prepare import Preparer
from embedbatch.tokens import get_tokenizer

TOK = get_tokenizer("text-embedding-3-small")


def prep(**kw: object) -> Preparer:
    return Preparer(PrepareConfig(**kw), TOK)  # type: ignore[arg-type]


def test_fields_lists_and_missing() -> None:
    """Fields join with the delimiter, lists with ', ', null fields are skipped."""
    out = prep(fields=("title", "authors", "comment")).prepare({"title": "T", "authors": ["A", "B"], "comment": None})
    assert ("T\n\nA, B", ["title", "authors"]) == (out.text, out.fields_used)


def test_chat_messages_layout() -> None:
    out = prep(fields=("messages",)).prepare(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    assert "user: hi\nassistant: hello" == out.text


def test_template_prefix_suffix_lowercase_chars() -> None:
    p = prep(
        template="Title: {title}\nAbstract: {abstract}", prefix="P ", suffix=" S", lowercase=True, truncate_chars=20
    )
    out = p.prepare({"title": "Hello", "abstract": "World of Things"})
    full = "p title: hello\nabstract: world of things s"
    assert (full[:20], len(full) - 20) == (out.text, out.truncated_chars)


def test_bad_template() -> None:
    with pytest.raises(UsageError):
        prep(template="no fields here")


def test_token_truncation_matches_tokenizer() -> None:
    """Text over --max-tokens is cut at a token boundary to exactly max_tokens tokens."""
    enc = bpe_openai.get_encoding("cl100k_base")
    text = " ".join(f"word{i} ünïcode" for i in range(500))
    total = len(enc.encode(text))
    out = prep(fields=("t",), max_tokens=100).prepare({"t": text})
    assert (100, total - 100, True) == (len(enc.encode(out.text)), out.truncated_tokens, out.metadata()["truncated"])
    assert text.startswith(out.text)
    assert out.n_tokens == 100


def test_known_token_count() -> None:
    """cl100k_base gives the known count for a fixed sentence ('hello world' is 2 tokens)."""
    assert 2 == prep(fields=("t",)).prepare({"t": "hello world"}).n_tokens


def test_empty_text_is_empty() -> None:
    assert "" == prep(fields=("t",)).prepare({"t": "   "}).text


def test_config_file(tmp_path: Path) -> None:
    for name, body in [
        ("c.yaml", "fields: [a, b]\ndelimiter: ' | '\nlowercase: true\ntruncate: 50\n"),
        ("c.json", '{"fields": "a,b", "delimiter": " | ", "lowercase": true, "truncate": 50}'),
        ("c.toml", 'fields = ["a", "b"]\ndelimiter = " | "\nlowercase = true\ntruncate = 50\n'),
    ]:
        path = tmp_path / name
        path.write_text(body)
        cfg = PrepareConfig.from_file(path)
        assert (("a", "b"), " | ", True, 50) == (cfg.fields, cfg.delimiter, cfg.lowercase, cfg.truncate_chars)
    bad = tmp_path / "bad.yaml"
    bad.write_text("felds: [a]\n")
    with pytest.raises(UsageError, match="unknown config keys"):
        PrepareConfig.from_file(bad)
