"""Chunking: the splitters on the same texts, and what chunking costs a plan.

1. Chunks/s and tokens/s of ``semantic-text-splitter`` (our ``recursive`` and ``markdown``
   chunkers, and our ``tokens`` chunker) against ``langchain-text-splitters``'
   ``RecursiveCharacterTextSplitter`` and ``chonkie``'s ``RecursiveChunker``, each counting
   cl100k_base tokens through the same function, on arXiv abstracts joined into documents of
   ~20 abstracts (several thousand tokens each); chunk size 512, overlap 64 (chonkie: none, it
   has no overlap in its recursive chunker). Also the largest chunk each produced, in tokens.
2. ``submit --dry-run`` of the arXiv file (one abstract a row) with and without
   ``--chunk-tokens 512``, same run, fresh processes: the ratio (target ≤ 1.3).

Usage: python bench/chunking.py [--docs 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA, timed_cli

from embedbatch.chunking import Chunker
from embedbatch.tokens import get_tokenizer

ARXIV = DATA / "arxiv_cs_daily_2025.jsonl.gz"
SIZE, OVERLAP = 512, 64


def _texts(chunker: Chunker) -> Callable[[str], list[str]]:
    return lambda text: [x.text for x in chunker.split(text)]


def splitters(count: Callable[[str], int]) -> dict[str, Callable[[str], list[str]]]:
    tok = get_tokenizer("text-embedding-3-small")
    out: dict[str, Callable[[str], list[str]]] = {}
    for kind in ("recursive", "markdown", "tokens"):
        chunker = Chunker(tok, tokens=SIZE, overlap=OVERLAP, chunker=kind)
        out[f"semantic-text-splitter {kind}" if kind != "tokens" else "ours: tokens"] = _texts(chunker)
    try:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        lc = RecursiveCharacterTextSplitter(chunk_size=SIZE, chunk_overlap=OVERLAP, length_function=count)
        out["langchain RecursiveCharacterTextSplitter"] = lc.split_text
    except ImportError:
        print("langchain-text-splitters not installed: left out")
    try:
        from chonkie import RecursiveChunker

        counter: Any = count  # chonkie accepts a token-counting callable
        ch = RecursiveChunker(tokenizer=counter, chunk_size=SIZE)
        out["chonkie RecursiveChunker"] = lambda text: [c.text for c in ch.chunk(text)]
    except Exception as exc:  # chonkie's optional parts vary by version
        print(f"chonkie left out: {exc}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not ARXIV.is_file():
        raise SystemExit(f"needs the shared data: {ARXIV}")
    with gzip.open(ARXIV) as fh:
        rows = [orjson.loads(line) for line in fh.read().splitlines()]
    docs = ["\n\n".join(f"{r['title']}\n{r['summary']}" for r in rows[i * 20 : (i + 1) * 20]) for i in range(args.docs)]
    tok = get_tokenizer("text-embedding-3-small")

    def count(text: str) -> int:
        return len(tok.encode(text))

    total_tokens = sum(count(d) for d in docs)
    print(f"{len(docs)} documents, {total_tokens:,} tokens (cl100k_base), chunks of {SIZE} tokens, overlap {OVERLAP}")
    print(f"{'splitter':<44}{'chunks':>8}{'chunks/s':>10}{'tokens/s':>12}{'max tokens':>12}")
    for name, split in splitters(count).items():
        runs, chunks = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            chunks = [c for d in docs for c in split(d)]
            runs.append(time.perf_counter() - t)
        s = statistics.median(runs)
        biggest = max(count(c) for c in chunks)
        print(f"{name:<44}{len(chunks):>8,}{len(chunks) / s:>10,.0f}{total_tokens / s:>12,.0f}{biggest:>12,}")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "arxiv.jsonl"
        src.write_bytes(
            b"".join(orjson.dumps({"id": r["id"], "text": f"{r['title']}\n{r['summary']}"}) + b"\n" for r in rows)
        )
        env = {**os.environ, "EMBEDBATCH_LOG_FORMAT": "json"}
        times: dict[str, list[float]] = {"plain": [], "chunked": []}
        for i in range(args.repeat):  # interleaved, so drift hits both alike
            for label, extra in (("plain", []), ("chunked", ["--chunk-tokens", str(SIZE)])):
                env["EMBEDBATCH_WORKSPACE"] = str(Path(tmp) / f"ws-{label}-{i}")
                cmd = ["submit", str(src), "--dataset", "arxiv", "--dry-run", *extra]
                times[label].append(timed_cli(cmd, env, Path(tmp))[0])
        plain, chunked = statistics.median(times["plain"]), statistics.median(times["chunked"])
        print(
            f"\nsubmit --dry-run of {len(rows):,} arXiv rows: {plain:.2f} s plain, {chunked:.2f} s with --chunk-tokens"
        )
        print(f"{SIZE}: {chunked / plain:.2f}x (target <= 1.3)")


if __name__ == "__main__":
    main()
