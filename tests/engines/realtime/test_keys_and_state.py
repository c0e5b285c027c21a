"""Realtime runs (#23): a refused key is retired, retry reaches the run's database, and a
stopped run's state reads back."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import orjson

from embedbatch.engines.realtime.limiter import fingerprint
from embedbatch.runs import RunState
from embedbatch.server import ServerThread
from embedbatch.workspace import RunPaths, Workspace
from tests.conftest import API_KEY, Paused, cli_env, pg_exec, run_cli, sample_rows, write_jsonl

REVOKED = "sk-revoked-SECRET-0000"


def test_a_revoked_key_is_retired_and_the_others_finish(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """OPENAI_API_KEYS=good,revoked: the revoked key's 401 retires it with a warning naming its
    fingerprint (never the key); every row is embedded through the good key; all keys revoked
    is one clear error (exit 6)."""
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(60))
    env = cli_env(server, ws, OPENAI_API_KEYS=f"{API_KEY},{REVOKED}")
    r = run_cli(["embed", str(src), "--fields", "title,body", "--max-inputs", "5", "--json"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    out = orjson.loads(r.stdout)
    assert (60, 0) == (out["rows"], out["failed"])
    assert fingerprint(REVOKED) in r.stderr and "retired" in r.stderr and REVOKED not in r.stderr
    env = cli_env(server, ws, OPENAI_API_KEYS=f"{REVOKED},sk-also-revoked-1111")
    r = run_cli(
        ["embed", str(write_jsonl(tmp_path / "e.jsonl", sample_rows(3, start=100))), "--fields", "title"], env, tmp_path
    )
    assert 6 == r.returncode and "every API key was refused" in r.stderr


def test_realtime_retry_reaches_the_database_through_database_url(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """A realtime run into pgvector with refused rows; `retry --force` with only DATABASE_URL
    set writes the retried rows into the table too."""
    rows = sample_rows(10)
    rows[3]["body"] += " POISON"
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    env = cli_env(server, ws, DATABASE_URL=pg_dsn)
    server.state.faults.reject_text = "POISON"
    r = run_cli(
        ["embed", str(src), "--fields", "title,body", "--pg-table", "docs", "--pg-mode", "insert"], env, tmp_path
    )
    assert 8 == r.returncode, r.stderr
    assert [[9]] == asyncio.run(pg_exec(pg_dsn, "SELECT count(*) FROM docs"))[0]
    server.state.faults.reject_text = ""
    (run_dir,) = [d for d in (ws.root / "batches").glob("*/*/run_*")]
    r = run_cli(["retry", "--run-dir", str(run_dir), "--force"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert [[10]] == asyncio.run(pg_exec(pg_dsn, "SELECT count(*) FROM docs"))[0]


def test_status_reads_a_stopped_realtime_run(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """A realtime run stopped by Ctrl-C is `interrupted`; `status` and `status --offline`
    show it (its failure has no poll attempts), and the next `embed` records that it resumed it."""
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(40))
    env = cli_env(server, ws)
    args = ["embed", str(src), "--fields", "title,body", "--commit-rows", "10", "--max-inputs", "10"]
    p = Paused(args, env, tmp_path, "realtime_after_commit")
    p.proc.send_signal(signal.SIGINT)
    (p.dir / f"{p.point}.go").touch()
    p.proc.communicate(timeout=120)
    assert 130 == p.proc.returncode
    for extra in ([], ["--offline"]):
        r = run_cli(["status", *extra], env, tmp_path)
        assert 0 == r.returncode, r.stderr
        assert " interrupted " in r.stdout
    assert 0 == run_cli(args, env, tmp_path).returncode
    (first, _) = sorted(ws.all_runs(), key=lambda x: x.root.name)
    state = RunState.load(RunPaths(first.root))
    assert state.outcome.startswith("interrupted, resumed by run_")
