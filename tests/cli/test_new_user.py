"""What a new user trips on (issue #22): failures that must say so, hints that must work."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from embedbatch.failures import read_failed_ids
from embedbatch.runs import Run
from embedbatch.server import FakeOpenAI, FaultConfig, HashBackend, ServerThread
from embedbatch.workspace import Workspace
from tests.conftest import API_KEY, Paused, cli_env, run_cli, sample_rows, write_jsonl


class _MiniBackend(HashBackend):
    """A 384-d model whatever is asked (a local MiniLM served under another model's name)."""

    def embed(self, texts: list[str], model: str, dimensions: int | None) -> np.ndarray:
        return super().embed(texts, model, 384)


@pytest.fixture
def mini_server(tmp_path: Path) -> Iterator[ServerThread]:
    state = FakeOpenAI(tmp_path / "mini", api_key=API_KEY, backend=_MiniBackend(), faults=FaultConfig(step_s=0.01))
    srv = ServerThread(state).start()
    yield srv
    srv.stop()


def test_a_run_whose_rows_all_fail_says_so(tmp_path: Path, ws: Workspace, mini_server: ServerThread) -> None:
    """Every row comes back 384-d for a 1536-d model: `run` exits 8 naming the reason and
    count, `list` says "finished with failures", `retry` leaves the rows alone (their failure
    cannot change) and `retry --force` sends them again."""
    env = cli_env(mini_server, ws)
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(12))
    r = run_cli(["run", str(src), "--fields", "title,body", "--poll-seconds", "0.05"], env, tmp_path)
    assert 8 == r.returncode, r.stderr
    assert "finished with failures: 12 row(s) failed" in r.stderr
    assert "12 × dimension 384 != expected 1536" in r.stderr
    (run_dir,) = [p for p in (ws.root / "batches").glob("*/*/run_*")]
    state = Run.read(ws.resolve_run(run_dir)).state
    assert (12, {"dimension 384 != expected 1536": 12}) == (state.counts["failed"], state.failed_reasons)
    listed = orjson.loads(run_cli(["list", "--json"], env, tmp_path).stdout)
    assert ["finished with failures"] == [x["status"] for x in listed["runs"]]
    batches_before = len(mini_server.state.batches)
    r = run_cli(["retry", "--run-dir", str(run_dir)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert "re-planned 0 ids" in r.stdout and "12 × dimension 384 != expected 1536" in r.stderr
    assert batches_before == len(mini_server.state.batches)
    r = run_cli(["retry", "--run-dir", str(run_dir), "--force", "--no-submit"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert "re-planned 12 ids" in r.stdout


def test_ingest_and_poll_exit_8_when_the_run_ends_with_failures(
    tmp_path: Path, ws: Workspace, mini_server: ServerThread
) -> None:
    """`submit` then `poll --ingest` until the run ends: the pass that finishes it exits 8 and
    prints the reason; a later `ingest --run-dir` of that run exits 8 too; `status --json`
    carries the outcome."""
    env = cli_env(mini_server, ws)
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(5))
    r = run_cli(["submit", str(src), "--fields", "title,body"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    mini_server.wait_idle()
    codes = []
    for _ in range(20):  # passes until the run is finished: download, then ingest
        p = run_cli(["poll", "--ingest"], env, tmp_path)
        codes.append(p.returncode)
        if p.returncode:
            break
    assert 8 == codes[-1] and set(codes[:-1]) <= {0}, codes
    assert "5 × dimension 384 != expected 1536" in p.stderr
    assert 8 == run_cli(["ingest", "--run-dir", str(run_dir)], env, tmp_path).returncode
    (st,) = orjson.loads(run_cli(["status", "--offline", "--json"], env, tmp_path).stdout)
    assert ("finished", "finished with failures", 5) == (st["status"], st["outcome"], st["failed_rows"])
    assert 0 == run_cli(["poll", "--ingest"], env, tmp_path).returncode  # nothing new ended


def test_retry_after_success_leaves_no_failed_count(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Rows that failed for a passing reason and then succeeded on retry leave the run with
    failed = 0 (#23: the count kept the first attempt's failures) and exit 0."""
    server.state.faults.line_error_rate = 0.5
    env = cli_env(server, ws)
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(20))
    r = run_cli(["submit", str(src), "--fields", "title,body"], env, tmp_path)
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    server.wait_idle()
    for _ in range(5):
        assert run_cli(["poll", "--ingest"], env, tmp_path).returncode in (0, 8)
    state = Run.read(ws.resolve_run(run_dir)).state
    first_failed = state.counts["failed"]
    assert 0 < first_failed == len(read_failed_ids(run_dir / "failed_ids.tsv"))
    server.state.faults.line_error_rate = 0.0
    assert 0 == run_cli(["retry", "--run-dir", str(run_dir)], env, tmp_path).returncode
    server.wait_idle()
    codes = [run_cli(["poll", "--ingest"], env, tmp_path).returncode for _ in range(3)]
    assert {0} == set(codes)
    state = Run.read(ws.resolve_run(run_dir)).state
    assert ("finished", 0, 20) == (state.status, state.counts["failed"], state.counts["succeeded"])


def test_ctrl_c_in_run_names_the_real_run_dir_and_the_hint_works(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """SIGINT while `run` stands after its batch create: the message names the run's real
    directory; the command it gives finishes the run."""
    env = cli_env(server, ws)
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(6))
    p = Paused(["run", str(src), "--fields", "title,body", "--poll-seconds", "0.05"], env, tmp_path, "after_create")
    p.proc.send_signal(signal.SIGINT)
    (p.dir / f"{p.point}.go").touch()  # the paused step may be on a worker thread: let it end
    _, err = p.proc.communicate(timeout=120)
    assert 130 == p.proc.returncode
    (run_dir,) = [d for d in (ws.root / "batches").glob("*/*/run_*")]
    hint = f"embedbatch run --resume {run_dir}"
    assert hint in err and "RUN_DIR" not in err
    r = run_cli([*hint.split()[1:], "--poll-seconds", "0.05"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert "finished" == Run.read(ws.resolve_run(run_dir)).state.status


def test_ctrl_c_in_embed_gives_the_command_that_resumes_it(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """SIGINT in `embed` after its first commit: the hint is the same `embed` command; running
    it embeds the rest (committed rows skipped), and the interrupted run names the run that
    resumed it."""
    env = cli_env(server, ws)
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(40))
    args = ["embed", str(src), "--fields", "title,body", "--commit-rows", "10", "--max-inputs", "10"]
    p = Paused(args, env, tmp_path, "realtime_after_commit")
    p.proc.send_signal(signal.SIGINT)
    (p.dir / f"{p.point}.go").touch()  # the paused step may be on a worker thread: let it end
    _, err = p.proc.communicate(timeout=120)
    assert 130 == p.proc.returncode
    assert "RUN_DIR" not in err
    hint = err.split("with the same command (rows already committed are skipped): ", 1)[1].strip()
    assert hint.startswith("embedbatch embed ")
    r = subprocess.run(
        [sys.executable, "-m", "embedbatch", *hint.split()[1:]], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert 0 == r.returncode, r.stderr
    runs = sorted(ws.all_runs(), key=lambda x: x.root.name)
    first, second = (Run.read(x).state for x in runs)
    assert ("interrupted", second.run_id) == (first.status, (first.failure or {}).get("resumed_by"))
    assert 40 == first.counts.get("succeeded", 0) + second.counts["succeeded"]
