"""The pgvector sink and the postgres source, on a real PostgreSQL 18 with pgvector."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from embedbatch.config import PgTarget
from embedbatch.db.pg import quote_ident
from embedbatch.errors import DatabaseError
from embedbatch.server import HashBackend, ServerThread
from embedbatch.sinks.pgvector import write_vectors
from embedbatch.workspace import Workspace
from tests.conftest import cli_env, pg_exec, run_cli

DIM = 8


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def parse_text_vector(text: str) -> list[float]:
    return [float(x) for x in text.strip("[]").split(",")]


async def write(dsn: str, target: PgTarget, ids: list[str], v: np.ndarray, chunk: int = 2) -> Any:
    chunks = ((ids[i : i + chunk], v[i : i + chunk], None) for i in range(0, len(ids), chunk))
    return await write_vectors(dsn, target, chunks, dim=DIM, total_rows=len(ids))


@pytest.mark.parametrize("id_type", ["bigint", "uuid", "text"])
async def test_update_by_id_binary_roundtrip(pg_dsn: str, id_type: str) -> None:
    """Vectors land by id for each id type; re-reading the text form proves the binary path
    carried exact float32 values."""
    raw_ids = [str(i + 1) if id_type != "uuid" else str(uuid.UUID(int=i + 1)) for i in range(5)]
    values = ", ".join(f"('{i}', NULL)" for i in raw_ids)
    await pg_exec(
        pg_dsn,
        f"CREATE TABLE items (id {id_type} PRIMARY KEY, embedding vector({DIM}))",
        f"INSERT INTO items VALUES {values}",
    )
    v = vecs(5)
    report = await write(pg_dsn, PgTarget(table="items"), raw_ids, v)
    (rows,) = await pg_exec(pg_dsn, "SELECT id::text, embedding::text FROM items ORDER BY id")
    got = {r[0]: parse_text_vector(str(r[1])) for r in rows}
    assert (5, 0) == (report.written, report.missing_ids)  # type: ignore[attr-defined]
    for i, rid in enumerate(raw_ids):
        assert v[i].tolist() == pytest.approx(got[rid], rel=1e-6)


async def test_null_only_then_overwrite_and_missing(pg_dsn: str) -> None:
    await pg_exec(
        pg_dsn,
        f"CREATE TABLE items (id bigint PRIMARY KEY, embedding vector({DIM}))",
        f"INSERT INTO items VALUES (1, NULL), (2, '[{','.join(['9'] * DIM)}]'), (3, NULL)",
    )
    v = vecs(4)
    rep = await write(pg_dsn, PgTarget(table="items"), ["1", "2", "3", "404"], v)
    assert (2, 1, 1) == (rep.written, rep.skipped_has_vector, rep.missing_ids)  # type: ignore[attr-defined]
    (rows,) = await pg_exec(pg_dsn, "SELECT embedding::text FROM items WHERE id = 2")
    assert [9.0] * DIM == parse_text_vector(str(rows[0][0]))
    again = await write(pg_dsn, PgTarget(table="items"), ["1", "2", "3"], v[:3])
    assert 0 == again.written  # type: ignore[attr-defined]
    over = await write(pg_dsn, PgTarget(table="items", overwrite=True), ["1", "2", "3"], v[:3])
    assert 3 == over.written  # type: ignore[attr-defined]
    (rows,) = await pg_exec(pg_dsn, "SELECT embedding::text FROM items WHERE id = 2")
    assert v[1].tolist() == pytest.approx(parse_text_vector(str(rows[0][0])), rel=1e-6)


async def test_dimension_mismatch_writes_nothing(pg_dsn: str) -> None:
    await pg_exec(
        pg_dsn, "CREATE TABLE items (id bigint PRIMARY KEY, embedding vector(4))", "INSERT INTO items VALUES (1, NULL)"
    )
    with pytest.raises(DatabaseError, match=r"vector\(4\) but the model gives 8-d"):
        await write(pg_dsn, PgTarget(table="items"), ["1"], vecs(1))
    (rows,) = await pg_exec(pg_dsn, "SELECT count(embedding) FROM items")
    assert [[0]] == rows


async def test_not_a_vector_column_and_missing_column(pg_dsn: str) -> None:
    await pg_exec(pg_dsn, "CREATE TABLE items (id bigint PRIMARY KEY, embedding float4[])")
    with pytest.raises(DatabaseError, match="not vector"):
        await write(pg_dsn, PgTarget(table="items"), ["1"], vecs(1))
    with pytest.raises(DatabaseError, match="'vec' does not exist"):
        await write(pg_dsn, PgTarget(table="items", vector_column="vec"), ["1"], vecs(1))


async def test_bad_identifiers_are_names_not_sql(pg_dsn: str) -> None:
    """A table name like `x; DROP TABLE y` is a literal name: an error, and y survives."""
    await pg_exec(pg_dsn, "CREATE TABLE y (id int)")
    with pytest.raises(DatabaseError, match="does not exist"):
        await write(pg_dsn, PgTarget(table="x; DROP TABLE y"), ["1"], vecs(1))
    with pytest.raises(DatabaseError):
        await write(pg_dsn, PgTarget(table="y", id_column='id" = 1; DROP TABLE y; --'), ["1"], vecs(1))
    (rows,) = await pg_exec(pg_dsn, "SELECT to_regclass('y') IS NOT NULL")
    assert [[True]] == rows
    assert '"a""b"' == quote_ident('a"b')


async def test_halfvec(pg_dsn: str) -> None:
    await pg_exec(
        pg_dsn,
        f"CREATE TABLE items (id text PRIMARY KEY, embedding halfvec({DIM}))",
        "INSERT INTO items VALUES ('a', NULL), ('b', NULL)",
    )
    v = vecs(2)
    rep = await write(pg_dsn, PgTarget(table="items"), ["a", "b"], v)
    (rows,) = await pg_exec(pg_dsn, "SELECT embedding::text FROM items ORDER BY id")
    assert 2 == rep.written  # type: ignore[attr-defined]
    assert v[0].astype(np.float16).astype(np.float32).tolist() == pytest.approx(
        parse_text_vector(str(rows[0][0])), rel=1e-3
    )


async def test_rebuild_index_same_definition(pg_dsn: str) -> None:
    """With --rebuild-index the HNSW index is dropped, rows written, and recreated identically."""
    await pg_exec(
        pg_dsn,
        f"CREATE TABLE items (id bigint PRIMARY KEY, embedding vector({DIM}))",
        "INSERT INTO items SELECT g, NULL FROM generate_series(1, 20) g",
        "CREATE INDEX items_hnsw ON items USING hnsw (embedding vector_cosine_ops) WITH (m = 8)",
    )
    (before,) = await pg_exec(pg_dsn, "SELECT indexdef FROM pg_indexes WHERE indexname = 'items_hnsw'")
    rep = await write(pg_dsn, PgTarget(table="items", rebuild_index=True), [str(i) for i in range(1, 21)], vecs(20))
    (after,) = await pg_exec(pg_dsn, "SELECT indexdef FROM pg_indexes WHERE indexname = 'items_hnsw'")
    (count,) = await pg_exec(pg_dsn, "SELECT count(embedding) FROM items")
    assert (before, ["items_hnsw"], [[20]]) == (after, rep.index_rebuilt, count)  # type: ignore[attr-defined]
    assert rep.expected_indexed_s is not None  # type: ignore[attr-defined]


async def test_insert_mode_copy(pg_dsn: str) -> None:
    await pg_exec(pg_dsn, f"CREATE TABLE fresh (id bigint PRIMARY KEY, body text, embedding vector({DIM}))")
    chunks = iter([(["1", "2"], vecs(2), ["one", "two"])])
    rep = await write_vectors(pg_dsn, PgTarget(table="fresh", mode="insert", text_column="body"), chunks, dim=DIM)
    (rows,) = await pg_exec(pg_dsn, "SELECT id, body FROM fresh ORDER BY id")
    assert (2, [[1, "one"], [2, "two"]]) == (rep.written, rows)


def _chunks_table(dsn: str, n: int) -> None:
    import asyncio

    values = ", ".join(f"({i}, 'fam{i % 2}', 'chunk number {i} of family {i % 2}', NULL)" for i in range(1, n + 1))
    asyncio.run(
        pg_exec(
            dsn,
            "CREATE TABLE knowledge_chunks (id bigint PRIMARY KEY, family_id text NOT NULL, content text NOT NULL, "
            "embedding vector(1536))",
            f"INSERT INTO knowledge_chunks VALUES {values}",
        )
    )


PG_RUN = [
    "run",
    "postgres",
    "--table",
    "knowledge_chunks",
    "--id-column",
    "id",
    "--text-column",
    "content",
    "--where",
    "family_id = $1",
    "--param",
    "fam1",
    "--vector-column",
    "embedding",
    "--poll-seconds",
    "0.05",
    "--json",
]


def test_run_postgres_family_only_and_rerun_changes_nothing(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """`run` over one family: exactly its rows get the server's vector for their text; again: nothing."""
    import asyncio

    _chunks_table(pg_dsn, 30)
    env = cli_env(server, ws)
    r = run_cli([*PG_RUN, "--dsn", pg_dsn], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert 15 == orjson.loads(r.stdout)["embedded"]
    (rows,) = asyncio.run(pg_exec(pg_dsn, "SELECT id, family_id, content, embedding::text FROM knowledge_chunks"))
    backend = HashBackend()
    for _, fam, content, emb in rows:
        if fam == "fam1":
            expect = backend.embed([str(content)], "text-embedding-3-small", None)[0]
            assert expect.tolist() == pytest.approx(parse_text_vector(str(emb)), rel=1e-6)
        else:
            assert emb is None
    (digest,) = asyncio.run(
        pg_exec(pg_dsn, "SELECT md5(string_agg(embedding::text, ',' ORDER BY id)) FROM knowledge_chunks")
    )
    r = run_cli([*PG_RUN, "--dsn", pg_dsn], env, tmp_path)
    assert 0 == orjson.loads(r.stdout)["embedded"]
    assert [digest] == asyncio.run(
        pg_exec(pg_dsn, "SELECT md5(string_agg(embedding::text, ',' ORDER BY id)) FROM knowledge_chunks")
    )
    leaked = [p for p in ws.root.rglob("*") if p.is_file() and pg_dsn.encode() in p.read_bytes()]
    assert [] == leaked


def test_crash_mid_pg_write_resumes(tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str) -> None:
    """Killed after the first committed chunk, `ingest` resumes at the next: all rows, once."""
    import asyncio

    _chunks_table(pg_dsn, 12)
    env = cli_env(server, ws)
    r = run_cli(
        [*PG_RUN, "--dsn", pg_dsn, "--update-chunk-size", "2"],
        {**env, "EMBEDBATCH_CRASH_AT": "pg_after_chunk"},
        tmp_path,
    )
    assert -signal.SIGKILL == r.returncode
    (count,) = asyncio.run(pg_exec(pg_dsn, "SELECT count(embedding) FROM knowledge_chunks"))
    assert [[2]] == count
    (run_dir,) = [x.root for x in ws.all_runs()]
    r = run_cli(["ingest", "--run-dir", str(run_dir), "--pg-dsn", pg_dsn], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    (count,) = asyncio.run(pg_exec(pg_dsn, "SELECT count(embedding) FROM knowledge_chunks"))
    run_json = orjson.loads((run_dir / "run.json").read_bytes())
    assert ([[6]], {"shard-00001.parquet": 6}) == (count, run_json["pg"]["progress"])
    assert 6 == run_json["pg"]["totals"]["written"]  # the killed process's chunk counts too (#23)
    assert pg_dsn not in (run_dir / "run.json").read_text()


def test_db_init_applies_migrations(tmp_path: Path, pg_dsn: str) -> None:
    """`db init` creates the example schema and its HNSW index (cosine ops)."""
    import asyncio
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EMBEDBATCH_"))}
    r = run_cli(["db", "init", "--dsn", pg_dsn], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    (cols, idx) = asyncio.run(
        pg_exec(
            pg_dsn,
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'knowledge_chunks'::regclass "
            "AND attname = 'embedding'",
            "SELECT indexdef LIKE '%hnsw (embedding vector_cosine_ops)%' FROM pg_indexes "
            "WHERE indexname = 'knowledge_chunks_embedding_hnsw'",
        )
    )
    assert ([["vector(1536)"]], [[True]]) == (cols, idx)


def test_postgres_source_uuid_ids_and_overwrite(tmp_path: Path, ws: Workspace, pg_dsn: str) -> None:
    """The source streams only NULL-vector rows unless --overwrite; uuid ids become their text form."""
    import asyncio

    from embedbatch.config import PrepareConfig, SampleConfig, SourceConfig
    from embedbatch.intake import Intake
    from embedbatch.tokens import get_tokenizer

    asyncio.run(
        pg_exec(
            pg_dsn,
            f"CREATE TABLE docs (id uuid PRIMARY KEY, body text, emb vector({DIM}))",
            f"INSERT INTO docs VALUES ('{uuid.UUID(int=1)}', 'one', NULL), "
            f"('{uuid.UUID(int=2)}', 'two', '[{','.join(['1'] * DIM)}]')",
        )
    )

    def ids(overwrite: bool) -> list[str]:
        src = SourceConfig(
            path="postgres",
            pg_dsn=pg_dsn,
            pg_table="docs",
            pg_id_column="id",
            id_field="id",
            pg_text_column="body",
            pg_vector_column="emb",
            pg_overwrite=overwrite,
        )
        it = Intake(
            source=src,
            prepare=PrepareConfig(fields=("body",)),
            sample=SampleConfig(),
            tokenizer=get_tokenizer("text-embedding-3-small"),
        )
        return [r.id for r in it.records()]

    assert [str(uuid.UUID(int=1))] == ids(False)
    assert [str(uuid.UUID(int=1)), str(uuid.UUID(int=2))] == ids(True)


def test_sink_that_cannot_take_the_vectors_is_refused_before_upload(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """A vector(384) column for text-embedding-3-small (1536-d): submit exits 7 naming the
    column and the dimensions, and nothing reaches the provider."""
    import asyncio

    from tests.conftest import sample_rows, write_jsonl

    asyncio.run(pg_exec(pg_dsn, "CREATE TABLE items (id text PRIMARY KEY, embedding vector(384))"))
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    env = cli_env(server, ws)
    r = run_cli(
        ["submit", str(path), "--fields", "title,body", "--pg-table", "items", "--pg-dsn", pg_dsn], env, tmp_path
    )
    assert 7 == r.returncode
    assert "items.embedding is vector(384) but the model gives 1536-d vectors" in r.stderr
    assert ([], {}) == (list(server.state.files), server.state.batches)
    assert [] == ws.all_runs()


def test_kill_after_index_drop_recreates_it_on_resume(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """`--rebuild-index`, killed right after the HNSW index was dropped: the dropped definition
    was saved first, status says a rebuild is pending, and the resumed ingest recreates it."""
    import asyncio

    _chunks_table(pg_dsn, 6)
    asyncio.run(
        pg_exec(pg_dsn, "CREATE INDEX chunks_hnsw ON knowledge_chunks USING hnsw (embedding vector_cosine_ops)")
    )
    env = cli_env(server, ws)
    r = run_cli(
        [*PG_RUN, "--dsn", pg_dsn, "--rebuild-index"], {**env, "EMBEDBATCH_CRASH_AT": "pg_after_index_drop"}, tmp_path
    )
    assert -signal.SIGKILL == r.returncode
    index = "SELECT count(*) FROM pg_indexes WHERE indexname = 'chunks_hnsw'"
    assert [[[0]]] == [asyncio.run(pg_exec(pg_dsn, index))[0]]
    (run_dir,) = [x.root for x in ws.all_runs()]
    r = run_cli(["status", "--offline", "--run-dir", str(run_dir)], env, tmp_path)
    assert "index rebuild pending: chunks_hnsw" in r.stdout
    r = run_cli(["ingest", "--run-dir", str(run_dir), "--pg-dsn", pg_dsn], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    (count, idx) = asyncio.run(pg_exec(pg_dsn, "SELECT count(embedding) FROM knowledge_chunks", index))
    assert ([[3]], [[1]]) == (count, idx)


def test_sink_failure_after_payment_leaves_other_runs_and_resumes(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """The target table disappears after submit checked it: the poll pass records the sink
    failure on that run only (its shards are committed, a healthy run finishes in the same
    passes), and once the table is back, `ingest --run-dir D` finishes the sink and the run."""
    import asyncio

    from embedbatch.runs import Run
    from tests.conftest import sample_rows, write_jsonl

    asyncio.run(pg_exec(pg_dsn, "CREATE TABLE items (id text PRIMARY KEY, embedding vector(1536))"))
    env = {**cli_env(server, ws), "DATABASE_URL": pg_dsn}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    broken = write_jsonl(tmp_path / "a" / "a.jsonl", sample_rows(4))
    healthy = write_jsonl(tmp_path / "b" / "b.jsonl", sample_rows(5))
    r = run_cli(["submit", str(broken), "--fields", "title,body", "--pg-table", "items"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    broken_run = Path(r.stdout.strip().splitlines()[-1])
    asyncio.run(pg_exec(pg_dsn, "DROP TABLE items"))
    r = run_cli(["submit", str(healthy), "--fields", "title,body"], env, tmp_path)
    healthy_run = Path(r.stdout.strip().splitlines()[-1])
    for _ in range(100):
        assert 0 == run_cli(["poll", "--ingest"], env, tmp_path).returncode
        if Run.read(ws.resolve_run(healthy_run)).state.status == "finished":
            break
    state = Run.read(ws.resolve_run(broken_run)).state
    assert ("active", "failed") == (state.status, state.pg.status)
    assert state.failure is not None and "items" in state.failure["error"]
    assert {"ingested"} == {b.status for b in Run.read(ws.resolve_run(broken_run)).batches}
    asyncio.run(
        pg_exec(
            pg_dsn,
            "CREATE TABLE items (id text PRIMARY KEY, embedding vector(1536))",
            "INSERT INTO items SELECT 'doc-' || g, NULL FROM generate_series(0, 3) g",
        )
    )
    r = run_cli(["ingest", "--run-dir", str(broken_run)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    (count,) = asyncio.run(pg_exec(pg_dsn, "SELECT count(embedding) FROM items"))
    assert [[4]] == count
    assert 0 == run_cli(["poll", "--ingest"], env, tmp_path).returncode
    assert "finished" == Run.read(ws.resolve_run(broken_run)).state.status
