"""SQLite source and libSQL sink, on real SQLite files and the in-process libSQL engine."""

from __future__ import annotations

import signal
import sqlite3
import struct
from pathlib import Path

import numpy as np
import orjson
import pytest

from embedbatch.config import PrepareConfig, SampleConfig, SourceConfig
from embedbatch.intake import Intake
from embedbatch.server import HashBackend, ServerThread
from embedbatch.workspace import Workspace
from tests.conftest import cli_env, run_cli, sample_rows, write_jsonl

pytest.importorskip("libsql", reason="the libsql package (dev extra) runs the libSQL engine")

MODEL = "text-embedding-3-small"


def _chunks_db(path: Path, n: int, *, dim: int = 1536, id_type: str = "INTEGER") -> Path:
    conn = sqlite3.connect(path)
    conn.execute(
        f"CREATE TABLE chunks (id {id_type} PRIMARY KEY, family TEXT, content TEXT, embedding F32_BLOB({dim}))"
    )
    conn.executemany(
        "INSERT INTO chunks VALUES (?, ?, ?, NULL)",
        [(i, f"fam{i % 2}", f"chunk {i} about topic {i % 5}") for i in range(1, n + 1)],
    )
    conn.commit()
    conn.close()
    return path


def _vectors(path: Path, table: str = "chunks") -> dict[object, list[float] | None]:
    conn = sqlite3.connect(path)
    out = {
        r[0]: None if r[1] is None else list(struct.unpack(f"<{len(r[1]) // 4}f", r[1]))
        for r in conn.execute(f'SELECT id, embedding FROM "{table}"')
    }
    conn.close()
    return out


RUN = ["run", "--table", "chunks", "--id-column", "id", "--text-column", "content", "--poll-seconds", "0.2"]


def test_sqlite_source_ids_filters_and_null_selection(tmp_path: Path) -> None:
    """Integer, text and blob ids come out as text (blob as hex); --where with $1 selects; with
    --vector-column only rows whose vector is NULL are read; the file is opened read-only."""
    db = tmp_path / "x.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (id, body TEXT, fam TEXT, emb BLOB)")
    conn.executemany(
        "INSERT INTO t VALUES (?, ?, ?, ?)",
        [
            (1, "one", "a", None),
            ("k2", "two", "a", None),
            (b"\x01\xff", "three", "a", None),
            (4, "four", "b", None),
            (5, "five", "a", b"\x00" * 8),
        ],
    )
    conn.commit()
    conn.close()

    def ids(**kw: object) -> list[str]:
        src = SourceConfig(path=str(db), id_field="id", pg_table="t", pg_text_column="body", **kw)  # type: ignore[arg-type]
        intake = Intake(source=src, prepare=PrepareConfig(fields=("body",)), sample=SampleConfig(), tokenizer=None)
        return [r.id for r in intake.records()]

    assert ["1", "k2", "01ff", "4", "5"] == ids()
    assert ["1", "k2", "01ff", "5"] == ids(pg_where="fam = $1", pg_params=("a",))
    assert ["1", "k2", "01ff"] == ids(pg_where="fam = $1", pg_params=("a",), pg_vector_column="emb")
    assert "sqlite" == SourceConfig(path=f"sqlite:{db}").kind


def test_sqlite_rows_to_libsql_blobs_null_only_then_overwrite(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """One family of a SQLite table through the Batch API back into its F32_BLOB column: a plain
    sqlite3 reader unpacks exactly the provider's vectors; the other family stays NULL; a row
    that already had a vector keeps it unless --overwrite."""
    db = _chunks_db(tmp_path / "chunks.db", 10)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE chunks SET embedding = ? WHERE id = 1", (struct.pack("<1536f", *([0.5] * 1536)),))
    conn.commit()
    conn.close()
    env = cli_env(server, ws)
    args = [*RUN, "--where", "family = $1", "--param", "fam1", "--vector-column", "embedding", "--json"]
    r = run_cli([args[0], str(db), *args[1:]], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert 4 == orjson.loads(r.stdout)["embedded"]  # ids 3, 5, 7, 9 (1 already has a vector)
    got = _vectors(db)
    backend = HashBackend()
    for i in (3, 5, 7, 9):
        expect = backend.embed([f"chunk {i} about topic {i % 5}"], MODEL, None)[0]
        assert expect.tolist() == got[i]
    assert [0.5] * 1536 == got[1]
    assert all(got[i] is None for i in (2, 4, 6, 8, 10))
    r = run_cli([args[0], str(db), *args[1:], "--overwrite"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert [0.5] * 1536 != _vectors(db)[1]


def test_dimension_mismatch_refused_before_upload(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """An F32_BLOB(384) column for a 1536-d model: exit 7 naming both, nothing uploaded."""
    db = _chunks_db(tmp_path / "small.db", 3, dim=384)
    env = cli_env(server, ws)
    r = run_cli(["submit", str(db), *RUN[1:-2], "--vector-column", "embedding"], env, tmp_path)
    assert 7 == r.returncode
    assert "F32_BLOB(384) but the model gives 1536-d vectors" in r.stderr
    assert ([], {}) == (list(server.state.files), server.state.batches)


def test_kill_after_first_chunk_then_resume(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Killed after the first committed chunk of 2 rows: `ingest` resumes at the next chunk and
    every selected row ends with its vector, once; text ids map back to TEXT keys."""
    db = _chunks_db(tmp_path / "t.db", 7, id_type="TEXT")
    env = cli_env(server, ws)
    args = [str(db), *RUN[1:], "--vector-column", "embedding", "--update-chunk-size", "2"]
    r = run_cli(["run", *args], {**env, "EMBEDBATCH_CRASH_AT": "libsql_after_chunk"}, tmp_path)
    assert -signal.SIGKILL == r.returncode
    assert 2 == sum(v is not None for v in _vectors(db).values())
    (run_dir,) = [x.root for x in ws.all_runs()]
    r = run_cli(["ingest", "--run-dir", str(run_dir)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    got = _vectors(db)
    assert 7 == sum(v is not None for v in got.values())
    state = orjson.loads((run_dir / "run.json").read_bytes())["libsql"]
    assert ("done", 7) == (state["status"], state["totals"]["written"])  # both processes' rows (#23)


def test_insert_mode_index_and_top_k_search(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Insert mode creates the table; --libsql-index builds a libsql_vector_idx; `search` then
    answers through vector_top_k and finds a row by its own text first."""
    path = write_jsonl(tmp_path / "docs.jsonl", sample_rows(12))
    out = tmp_path / "vectors.db"
    env = cli_env(server, ws)
    args = ["run", str(path), "--fields", "title,body", "--libsql-url", str(out), "--libsql-table", "emb"]
    args += ["--libsql-mode", "insert", "--libsql-index", "--poll-seconds", "0.2"]
    r = run_cli(args, env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert 12 == sum(v is not None for v in _vectors(out, "emb").values())
    text = "Title 7\n\nBody text number 7 about topic 0."
    r = run_cli(
        ["search", text, "--libsql-url", str(out), "--libsql-table", "emb", "--libsql-text-column", "model", "--json"],
        env,
        tmp_path,
    )
    assert 0 == r.returncode, r.stderr
    hits = orjson.loads(r.stdout)
    assert ("doc-7", "index emb_embedding_idx") == (hits[0]["id"], hits[0]["via"])
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_hostile_names_stay_names(tmp_path: Path) -> None:
    """A table called ``x"; DROP TABLE y; --`` is quoted as one name: writing into it works and
    the other table survives."""
    from embedbatch.config import LibsqlTarget
    from embedbatch.sinks.libsql import write_vectors

    db = tmp_path / "h.db"
    name = 'x"; DROP TABLE y; --'
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE y (a)")
    conn.execute(f'CREATE TABLE "{name.replace(chr(34), chr(34) * 2)}" (id TEXT PRIMARY KEY, embedding F32_BLOB(2))')
    conn.execute(f"INSERT INTO \"{name.replace(chr(34), chr(34) * 2)}\" VALUES ('a', NULL)")
    conn.commit()
    conn.close()
    target = LibsqlTarget(url=str(db), table=name)
    rep = write_vectors(str(db), None, target, iter([(["a"], np.array([[1.0, 2.0]], np.float32))]), dim=2)
    assert (1, 0, 0) == (rep.written, rep.missing_ids, rep.refused)
    conn = sqlite3.connect(db)
    assert [("y",)] == conn.execute("SELECT name FROM sqlite_master WHERE name = 'y'").fetchall()
    conn.close()


def test_blob_ids_map_back_to_blob_keys(tmp_path: Path) -> None:
    """A BLOB id read by the SQLite source as hex is written back to the row with those bytes."""
    from embedbatch.config import LibsqlTarget
    from embedbatch.sinks.libsql import write_vectors

    db = tmp_path / "b.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (id BLOB PRIMARY KEY, embedding F32_BLOB(2))")
    conn.execute("INSERT INTO t VALUES (?, NULL)", (b"\x01\xff",))
    conn.commit()
    conn.close()
    src = SourceConfig(path=str(db), id_field="id", pg_table="t", pg_text_column="id", pg_vector_column="embedding")
    from embedbatch.sources.sqlite import iter_rows

    (rid,) = [raw.data["id"] for raw in iter_rows(src) if raw.data]
    assert "01ff" == rid
    target = LibsqlTarget(url=str(db), table="t")
    rep = write_vectors(str(db), None, target, iter([([rid], np.array([[3.0, 4.0]], np.float32))]), dim=2)
    assert (1, 0, 0) == (rep.written, rep.missing_ids, rep.refused)
    assert [3.0, 4.0] == _vectors(db, "t")[b"\x01\xff"]


def test_untyped_id_column_ids_are_written_back_by_their_storage_class(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """#23: ids in a column without a declared type keep their storage class (INTEGER, REAL,
    BLOB, TEXT, and the INTEGER 2^63-1): every row gets its vector; a second run finds none
    left to embed."""
    db = tmp_path / "untyped.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE chunks (id, content TEXT, embedding F32_BLOB(1536))")
    ids: list[object] = [7, 2.5, b"\x01\xff", "text-id", 2**63 - 1]
    conn.executemany("INSERT INTO chunks VALUES (?, ?, NULL)", [(v, f"content {j}") for j, v in enumerate(ids)])
    conn.commit()
    conn.close()
    env = cli_env(server, ws)
    args = [*RUN, "--vector-column", "embedding", "--json"]
    r = run_cli([args[0], str(db), *args[1:]], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    conn = sqlite3.connect(db)
    got = conn.execute("SELECT typeof(id), embedding IS NOT NULL FROM chunks ORDER BY rowid").fetchall()
    conn.close()
    assert [("integer", 1), ("real", 1), ("blob", 1), ("text", 1), ("integer", 1)] == got
    r = run_cli([args[0], str(db), *args[1:]], env, tmp_path)
    assert 0 == r.returncode and 0 == orjson.loads(r.stdout)["embedded"]


def test_libsql_targets_that_cannot_work_fail_before_upload_or_not_at_all(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """#23: a table name with a space, quote, dot and bracket takes a vector index; a reserved
    sqlite_* table is refused before any upload; a text id for an INTEGER id column is refused
    (counted), never a crash."""
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(4))
    env = cli_env(server, ws)
    out = tmp_path / "v.db"
    base = ["run", str(src), "--fields", "title,body", "--libsql-url", str(out), "--poll-seconds", "0.05"]
    r = run_cli(
        [*base, "--libsql-table", 'my "odd".[table]', "--libsql-mode", "insert", "--libsql-index"], env, tmp_path
    )
    assert 0 == r.returncode, r.stderr
    assert 4 == sum(v is not None for v in _vectors(out, 'my ""odd"".[table]').values())
    sent = server.state.counts()
    r = run_cli([*base, "--libsql-table", "sqlite_sequence", "--libsql-mode", "insert"], env, tmp_path)
    assert 7 == r.returncode and "reserves" in r.stderr
    assert sent == server.state.counts()  # refused before any upload: no new file, no new batch
    conn = sqlite3.connect(out)
    conn.execute("CREATE TABLE ints (id INTEGER PRIMARY KEY, embedding F32_BLOB(1536))")
    conn.commit()
    conn.close()
    src2 = write_jsonl(tmp_path / "e.jsonl", sample_rows(2, start=50))
    r = run_cli([*base[:1], str(src2), *base[2:], "--libsql-table", "ints", "--libsql-mode", "insert"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert "fewer rows written than embedded" in r.stderr
    assert {} == _vectors(out, "ints")
