"""Crash safety: kill -9 a real subprocess at every point; resume makes no duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedbatch.runs import load_batches
from embedbatch.server import ServerThread
from embedbatch.store.manifest import Manifest
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace
from tests.conftest import cli_env, run_cli, sample_rows, write_jsonl

POINTS = ["before_upload", "after_upload", "after_upload_state", "before_create", "after_create"]


def _finish(ws: Workspace, server: ServerThread, env: dict[str, str], cwd: Path, run_dir: Path) -> None:
    for _ in range(60):
        r = run_cli(["poll", "--ingest"], env, cwd)
        assert 0 == r.returncode, r.stderr
        if all(b.status == "ingested" for b in load_batches(ws.resolve_run(run_dir))):
            return
        time.sleep(0.05)
    raise AssertionError("run never finished")


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_point_then_resume(tmp_path: Path, ws: Workspace, server: ServerThread, point: str) -> None:
    """After SIGKILL at ``point``, `submit --resume` adopts what exists: one file and one batch
    per planned batch on the server, and every row exactly once in the shards."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(9))
    env = cli_env(server, ws)
    r = run_cli(
        ["submit", str(path), "--fields", "title,body", "--max-requests-per-batch", "3", "--concurrency", "1"],
        {**env, "EMBEDBATCH_CRASH_AT": point},
        tmp_path,
    )
    assert -signal.SIGKILL == r.returncode, r.stderr
    (run_dir,) = [r.root for r in ws.all_runs()]
    r = run_cli(["submit", "--resume", str(run_dir)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    _finish(ws, server, env, tmp_path, run_dir)
    input_files = [f for f in server.state.files.values() if f.purpose == "batch"]
    assert (3, 3) == (len(input_files), len(server.state.batches))
    m = Manifest.load(ws, "text-embedding-3-small", "d")
    assert 9 == sum(s["rows"] for s in m.shards)
    assert verify_dataset(ws, "text-embedding-3-small", "d").ok


def test_kill_during_create_then_poll_adopts(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Killed while the create call is in flight (the server created the batch but had not
    answered): the next `poll` finds it by metadata instead of creating a second one."""
    server.state.faults.create_delay_s = 3
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(4))
    env = cli_env(server, ws)
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", "submit", str(path), "--fields", "title,body"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not server.state.batches and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    server.state.faults.create_delay_s = 0
    (run_dir,) = [r.root for r in ws.all_runs()]
    assert "create" == load_batches(ws.resolve_run(run_dir))[0].pending
    _finish(ws, server, env, tmp_path, run_dir)
    assert len(server.state.batches) == 1


@pytest.mark.parametrize("point", ["before_manifest", "after_manifest"])
def test_kill_mid_ingest(tmp_path: Path, ws: Workspace, server: ServerThread, point: str) -> None:
    """A crash before or after the manifest write, then ingest again: each row exactly once."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(10))
    env = cli_env(server, ws)
    r = run_cli(["submit", str(path), "--fields", "title,body", "--max-requests-per-batch", "4"], env, tmp_path)
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    for _ in range(60):
        run_cli(["poll"], env, tmp_path)
        if all(b.status == "downloaded" for b in load_batches(ws.resolve_run(run_dir))):
            break
    r = run_cli(
        ["ingest", "--run-dir", str(run_dir), "--rows-per-shard", "4"], {**env, "EMBEDBATCH_CRASH_AT": point}, tmp_path
    )
    assert -signal.SIGKILL == r.returncode
    r = run_cli(["ingest", "--run-dir", str(run_dir), "--rows-per-shard", "4"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    r = run_cli(["ingest", "--run-dir", str(run_dir)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    rep = verify_dataset(ws, "text-embedding-3-small", "d")
    assert (True, 10) == (rep.ok, rep.rows), rep.problems
    shard_files = sorted(p.name for p in ws.shards_dir("text-embedding-3-small", "d").iterdir())
    assert [s["file"] for s in Manifest.load(ws, "text-embedding-3-small", "d").shards] == shard_files
    assert {"ingested"} == {b.status for b in load_batches(ws.resolve_run(run_dir))}
