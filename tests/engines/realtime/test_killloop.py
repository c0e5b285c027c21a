"""Kill loop (#23): `embed` into pgvector and libSQL, SIGKILLed again and again, ends with every
id exactly once in the shards and in each target, with its exact vector."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedbatch.server import HashBackend, ServerThread
from embedbatch.store.shards import read_vectors
from embedbatch.workspace import Workspace
from tests.conftest import cli_env, pg_exec, write_jsonl

MODEL = "text-embedding-3-small"


def test_embed_killed_at_random_then_rerun_lands_every_id_once_everywhere(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """Six SIGKILLs at random moments (and one right after a commit), each followed by the same
    command; then: shards, the pgvector table and the libSQL table each hold all 600 ids once,
    with the vector the provider gives for the text."""
    pytest.importorskip("libsql", reason="libsql (the libsql extra) is not installed")
    data = [{"id": f"r{i:04d}", "text": f"row {i} about {i % 17} things"} for i in range(600)]
    src = write_jsonl(tmp_path / "d.jsonl", data)
    db = tmp_path / "vectors.db"
    env = cli_env(server, ws, DATABASE_URL=pg_dsn)
    server.state.faults.latency_s = 0.05  # a request takes a moment: kills land mid-run
    cmd = [sys.executable, "-m", "embedbatch", "embed", str(src), "--fields", "text", "--max-inputs", "20"]
    cmd += ["--commit-rows", "40", "--pg-table", "docs", "--pg-mode", "insert"]
    cmd += ["--libsql-url", str(db), "--libsql-table", "docs", "--libsql-mode", "insert"]
    pick = random.Random(11)
    subprocess.run(
        cmd, env={**env, "EMBEDBATCH_CRASH_AT": "realtime_after_commit"}, cwd=tmp_path, capture_output=True, check=False
    )
    kills = 1
    for _ in range(6):
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(pick.uniform(0.5, 3.0))  # a random moment; the outcome must not depend on it
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=600)
    assert 0 == final.returncode, final.stderr
    ids, texts, vectors = read_vectors(ws, MODEL, "d")
    assert sorted(ids) == [r["id"] for r in data]
    want = dict(zip(ids, HashBackend().embed(texts, MODEL, None), strict=True))
    np.testing.assert_array_equal(vectors, np.stack([want[i] for i in ids]))
    (pg_rows,) = asyncio.run(pg_exec(pg_dsn, "SELECT id, embedding::text FROM docs"))
    assert sorted(r[0] for r in pg_rows) == [r["id"] for r in data]
    for rid, text in pg_rows:
        np.testing.assert_allclose(np.array(orjson_vec(text), np.float32), want[rid], rtol=1e-6)
    import libsql

    conn = libsql.connect(str(db))
    lite = conn.execute("SELECT id, embedding FROM docs").fetchall()
    assert sorted(r[0] for r in lite) == [r["id"] for r in data]
    for rid, blob in lite:
        np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), want[rid])
    assert kills >= 2


def orjson_vec(text: str) -> list[float]:
    """pgvector's text form ``[1,2,3]`` (re-read as text to prove the binary path)."""
    return [float(x) for x in text.strip("[]").split(",")]
