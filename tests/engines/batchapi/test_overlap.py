"""Overlap: real processes on one workspace at once (cron poll, run, a second submit, status).

Each test stops one process at an exact step boundary with ``EMBEDBATCH_PAUSE_AT`` (it holds
whatever locks it holds there), runs the other to the end or to its own pause, then lets the
first go on. Outcomes are checked, never durations.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import orjson

from embedbatch.failures import read_failed_ids
from embedbatch.runs import Run, load_batches
from embedbatch.server import ServerThread
from embedbatch.store.manifest import Manifest
from embedbatch.store.shards import iter_live_rows
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace
from tests.conftest import Paused, cli_env, run_cli, sample_rows, write_jsonl

MODEL = "text-embedding-3-small"


def _submitted(tmp_path: Path, env: dict[str, str], rows: list[dict[str, object]], name: str, **flags: str) -> Path:
    """Submit ``rows`` as dataset ``d`` (a file d.jsonl in its own folder); returns the run dir."""
    folder = tmp_path / name
    folder.mkdir()
    path = write_jsonl(folder / "d.jsonl", rows)
    args = ["submit", str(path), "--fields", "title,body"]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", v]
    r = run_cli(args, env, tmp_path)
    assert 0 == r.returncode, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


def _downloaded(ws: Workspace, env: dict[str, str], cwd: Path, *runs: Path) -> None:
    for _ in range(100):
        assert 0 == run_cli(["poll"], env, cwd).returncode
        if all(b.status == "downloaded" for r in runs for b in load_batches(ws.resolve_run(r))):
            return
    raise AssertionError("batches never finished")


def _dataset_ids(ws: Workspace) -> list[str]:
    manifest = Manifest.load(ws, MODEL, "d")
    return [rid for chunk in iter_live_rows(ws, manifest, []) for rid in chunk["id"]]


def test_two_ingests_of_two_runs_at_once(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Ingest of run A stands between staging its shard and committing it; ingest of run B
    runs to the end meanwhile; then A commits. Both rows sets are in the dataset exactly once,
    in two shards with distinct numbers, and verify passes."""
    env = cli_env(server, ws)
    run_a = _submitted(tmp_path, env, sample_rows(12), "a")
    run_b = _submitted(tmp_path, env, sample_rows(12, start=100), "b")
    _downloaded(ws, env, tmp_path, run_a, run_b)
    a = Paused(["ingest", "--run-dir", str(run_a)], env, tmp_path, "before_manifest")
    r = run_cli(["ingest", "--run-dir", str(run_b)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    rc, _, err = a.release()
    assert 0 == rc, err
    ids = _dataset_ids(ws)
    assert sorted(f"doc-{i}" for i in [*range(12), *range(100, 112)]) == sorted(ids)
    assert ["shard-00001.parquet", "shard-00002.parquet"] == [s["file"] for s in Manifest.load(ws, MODEL, "d").shards]
    rep = verify_dataset(ws, MODEL, "d")
    assert (True, 24) == (rep.ok, rep.rows), rep.problems


def test_ingest_waits_for_a_commit_in_progress(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Ingest A stands inside the dataset lock (shard renamed, manifest not yet written); ingest
    B of another run queues on the lock instead of racing, and both commits land."""
    env = cli_env(server, ws)
    run_a = _submitted(tmp_path, env, sample_rows(6), "a")
    run_b = _submitted(tmp_path, env, sample_rows(6, start=50), "b")
    _downloaded(ws, env, tmp_path, run_a, run_b)
    a = Paused(["ingest", "--run-dir", str(run_a)], env, tmp_path, "store_before_manifest")
    b = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", "ingest", "--run-dir", str(run_b)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rc, _, err = a.release()
    assert 0 == rc, err
    _, err_b = b.communicate(timeout=120)
    assert 0 == b.returncode, err_b
    assert 12 == len(set(_dataset_ids(ws))) == len(_dataset_ids(ws))
    assert verify_dataset(ws, MODEL, "d").ok


def test_busy_dataset_lock_names_its_holder(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """With EMBEDBATCH_LOCK_TIMEOUT_S=0 an ingest that finds the dataset lock taken exits 5 and
    says which process holds it and why; after the holder is done it succeeds."""
    env = cli_env(server, ws)
    run_a = _submitted(tmp_path, env, sample_rows(4), "a")
    run_b = _submitted(tmp_path, env, sample_rows(4, start=50), "b")
    _downloaded(ws, env, tmp_path, run_a, run_b)
    a = Paused(["ingest", "--run-dir", str(run_a)], env, tmp_path, "store_before_manifest")
    r = run_cli(["ingest", "--run-dir", str(run_b)], {**env, "EMBEDBATCH_LOCK_TIMEOUT_S": "0"}, tmp_path)
    assert 5 == r.returncode
    assert f"pid {a.proc.pid}: commit {run_a.name}" in r.stderr
    assert 0 == a.release()[0]
    assert 0 == run_cli(["ingest", "--run-dir", str(run_b)], env, tmp_path).returncode
    assert 8 == len(_dataset_ids(ws))


def test_two_concurrent_submits_plan_each_row_once(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Submit A stands with its run planned and the dataset lock held; submit B of the same
    file waits, then skips every row A planned: each row is planned and sent once."""
    env = cli_env(server, ws)
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(15))
    args = ["submit", str(path), "--fields", "title,body", "--max-requests-per-batch", "5"]
    a = Paused(args, env, tmp_path, "plan_before_unlock")
    b = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert 0 == a.release()[0]
    out_b, err_b = b.communicate(timeout=120)
    assert 0 == b.returncode, err_b
    assert "skipped 15 rows already embedded or planned" in out_b
    planned = [Run.read(r).state.counts["planned"] for r in ws.all_runs()]
    assert [15, 0] == sorted(planned, reverse=True)
    assert 3 == len(server.state.batches)


def test_status_update_json_during_poll_does_not_roll_back(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """A cron poll stands after ingesting (batches ``ingested`` on disk, run lock held);
    ``status --update-json`` meanwhile writes nothing for that run and says so; afterwards every
    batch is still ``ingested`` and the run finished."""
    env = cli_env(server, ws)
    run = _submitted(tmp_path, env, sample_rows(6), "a", max_requests_per_batch="3")
    _downloaded(ws, env, tmp_path, run)
    p = Paused(["poll", "--ingest"], env, tmp_path, "poll_before_save")
    assert {"ingested"} == {b.status for b in load_batches(ws.resolve_run(run))}
    r = run_cli(["status", "--update-json", "--json"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert [False] == [item["written"] for item in orjson.loads(r.stdout)]
    assert 0 == p.release()[0]
    after = Run.read(ws.resolve_run(run))
    assert ({"ingested"}, "finished") == ({b.status for b in after.batches}, after.state.status)


def test_kill_after_manifest_rebuilds_counts_cost_and_failed_ids(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """SIGKILL right after the manifest write, then ingest again: the run's counts, usage, cost
    and failed_ids.tsv are the same as an uninterrupted ingest gives, and retry plans the
    failed rows."""
    server.state.faults.line_error_rate = 0.3
    env = cli_env(server, ws)
    run = _submitted(tmp_path, env, sample_rows(20), "a", max_requests_per_batch="10")
    _downloaded(ws, env, tmp_path, run)
    r = run_cli(["ingest", "--run-dir", str(run)], {**env, "EMBEDBATCH_CRASH_AT": "after_manifest"}, tmp_path)
    assert -signal.SIGKILL == r.returncode
    assert 8 == run_cli(["ingest", "--run-dir", str(run)], env, tmp_path).returncode  # ended with failed rows
    state = Run.read(ws.resolve_run(run))
    errors = sum(
        len((state.batch_dir(b) / "errors.jsonl").read_bytes().splitlines())
        for b in state.batches
        if (state.batch_dir(b) / "errors.jsonl").exists()
    )
    assert errors > 0
    failed = list(read_failed_ids(state.paths.failed_ids))
    embedded = _dataset_ids(ws)
    assert (errors, 20 - errors) == (len(failed), len(embedded))
    assert set() == set(failed) & set(embedded)
    assert (20 - errors, errors) == (state.state.counts["succeeded"], state.state.counts["failed"])
    assert state.state.actual["usage_tokens"] > 0 and state.state.actual["cost_batch_usd"] > 0
    server.state.faults.line_error_rate = 0.0
    r = run_cli(["retry", "--run-dir", str(run), "--no-submit"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert f"re-planned {errors} ids" in r.stdout


def test_kill_inside_retry_then_poll_finishes(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """SIGKILL after retry wrote its batches but before run.json: a second retry plans nothing
    again (those ids are in flight), the next polls submit the retry batch once, and every row
    ends up embedded."""
    server.state.faults.line_error_rate = 0.3
    env = cli_env(server, ws)
    run = _submitted(tmp_path, env, sample_rows(20), "a")
    _downloaded(ws, env, tmp_path, run)
    assert 8 == run_cli(["ingest", "--run-dir", str(run)], env, tmp_path).returncode  # ended with failed rows
    server.state.faults.line_error_rate = 0.0
    r = run_cli(["retry", "--run-dir", str(run)], {**env, "EMBEDBATCH_CRASH_AT": "retry_before_run_state"}, tmp_path)
    assert -signal.SIGKILL == r.returncode
    r = run_cli(["retry", "--run-dir", str(run), "--no-submit"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert "re-planned 0 ids" in r.stdout
    for _ in range(100):
        assert 0 == run_cli(["poll", "--ingest"], env, tmp_path).returncode
        if Run.read(ws.resolve_run(run)).state.status == "finished":
            break
    after = Run.read(ws.resolve_run(run))
    assert ["batch_001", "retry_001"] == [b.name for b in after.batches]
    assert {"ingested"} == {b.status for b in after.batches}
    assert 2 == len(server.state.batches)
    assert sorted(f"doc-{i}" for i in range(20)) == sorted(_dataset_ids(ws))
    assert verify_dataset(ws, MODEL, "d").ok
