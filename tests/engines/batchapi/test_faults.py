"""Provider faults that must cost nothing twice and stall nothing: commit-then-5xx on uploads
and creates, a download cut mid-body, an output file gone at the provider, malformed output
lines, one broken run among healthy ones, cancel after a batch finished remotely."""

from __future__ import annotations

import signal
from pathlib import Path

import orjson
import pytest

from embedbatch.api.openai import BatchClient
from embedbatch.engines.batchapi.output import read_batch_results
from embedbatch.failures import read_failed_ids
from embedbatch.runs import Run, load_batches
from embedbatch.server import ServerThread
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace
from tests.conftest import cli_env, run_cli, sample_rows, write_jsonl

MODEL = "text-embedding-3-small"


def _submit(tmp_path: Path, env: dict[str, str], n: int, name: str = "d", per_batch: int = 5) -> Path:
    folder = tmp_path / f"src-{name}"
    folder.mkdir(exist_ok=True)
    path = write_jsonl(folder / f"{name}.jsonl", sample_rows(n))
    r = run_cli(
        ["submit", str(path), "--fields", "title,body", "--max-requests-per-batch", str(per_batch)], env, tmp_path
    )
    assert 0 == r.returncode, r.stderr
    return Path(r.stdout.strip().splitlines()[-1])


def _poll_until(ws: Workspace, env: dict[str, str], cwd: Path, run: Path, status: str, *args: str) -> None:
    for _ in range(100):
        r = run_cli(["poll", *args], env, cwd)
        if r.returncode == 8:  # the pass that ends a run with failed rows says so
            assert "finished with failures" in r.stderr
        else:
            assert 0 == r.returncode, r.stderr
        if Run.read(ws.resolve_run(run)).state.status == status:
            return
    raise AssertionError(f"run never became {status}")


def _failed_ids(run: Path) -> dict[str, str]:
    return read_failed_ids(run / "failed_ids.tsv")


@pytest.mark.parametrize("path", ["/files", "/batches"])
def test_commit_then_5xx_is_adopted_not_repeated(
    tmp_path: Path, ws: Workspace, server: ServerThread, path: str
) -> None:
    """The provider carries out the first upload (or create) and answers 500: the retry finds
    the committed object and adopts it, so the server holds exactly one file and one batch per
    planned batch, and every row is embedded once."""
    server.state.faults.fail_after_commit = [path]
    env = cli_env(server, ws)
    run = _submit(tmp_path, env, 10)
    _poll_until(ws, env, tmp_path, run, "finished", "--ingest")
    assert [] == server.state.faults.fail_after_commit  # the fault fired
    inputs = [f for f in server.state.files.values() if f.purpose == "batch"]
    assert (2, 2) == (len(inputs), len(server.state.batches))
    rep = verify_dataset(ws, MODEL, "d")
    assert (True, 10) == (rep.ok, rep.rows)


def test_odd_dataset_name_is_adopted_after_a_kill(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """A dataset named ``a"b`` killed right after its upload: resume finds the upload by its
    (slugged, hashed) name instead of uploading again."""
    env = cli_env(server, ws)
    path = write_jsonl(tmp_path / "x.jsonl", sample_rows(3))
    args = ["submit", str(path), "--fields", "title,body", "--dataset", 'a"b']
    r = run_cli(args, {**env, "EMBEDBATCH_CRASH_AT": "after_upload"}, tmp_path)
    assert -signal.SIGKILL == r.returncode
    (run,) = ws.all_runs()
    assert 0 == run_cli(["submit", "--resume", str(run.root)], env, tmp_path).returncode
    counts = server.state.counts()
    keys = ("input_files", "batches", "duplicate_uploads", "duplicate_batches")
    assert (1, 1, 0, 0) == tuple(counts[k] for k in keys)


def test_cut_download_is_retried_and_never_kept(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """The first download sends half its body and drops the connection: the pass retries it,
    no partial file is left, and the shards hold every row exactly once."""
    server.state.faults.cut_downloads = 1
    env = cli_env(server, ws)
    run = _submit(tmp_path, env, 8, per_batch=8)
    _poll_until(ws, env, tmp_path, run, "finished", "--ingest")
    assert 0 == server.state.faults.cut_downloads
    assert not list(run.rglob("*.tmp"))
    rep = verify_dataset(ws, MODEL, "d")
    assert (True, 8) == (rep.ok, rep.rows)


def test_one_broken_run_does_not_stop_the_others(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """An old run whose pgvector target cannot be reached fails in every pass; a newer healthy
    run is served in the same pass; the failure is recorded on the old run with a back-off and
    shown by status; `ingest --no-pg` is its way out."""
    env = cli_env(server, ws)
    broken = _submit(tmp_path, env, 4, name="old")
    with Run.open(ws.resolve_run(broken)) as run:
        run.state.pg_target = {"table": "items", "id_column": "id", "vector_column": "embedding"}
        run.save()
    healthy = _submit(tmp_path, env, 6, name="new")
    env_pg = {**env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    for _ in range(100):
        assert 0 == run_cli(["poll", "--ingest"], env_pg, tmp_path).returncode
        if Run.read(ws.resolve_run(healthy)).state.status == "finished":
            break
    old = Run.read(ws.resolve_run(broken)).state
    assert old.failure is not None and "DatabaseError" in old.failure["error"]
    assert verify_dataset(ws, MODEL, "new").rows == 6
    assert verify_dataset(ws, MODEL, "old").rows == 4  # shards committed before the sink failed
    r = run_cli(["status", "--offline", "--json"], env, tmp_path)
    by_id = {item["run_id"]: item for item in orjson.loads(r.stdout)}
    assert by_id[broken.name]["failure"]["attempts"] >= 1
    r = run_cli(["ingest", "--run-dir", str(broken), "--no-pg"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    _poll_until(ws, env, tmp_path, broken, "finished", "--ingest")


def test_output_gone_at_provider_fails_rows_then_retry_embeds(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """An old run's completed batch whose output file is gone (404) beside a newer healthy run:
    the same passes finish both; the old run's rows are failed with that reason instead of the
    run stalling, and `retry` embeds them."""
    server.state.faults.lose_outputs = 1
    env = cli_env(server, ws)
    run = _submit(tmp_path, env, 5, per_batch=5)
    newer = _submit(tmp_path, env, 3, name="newer")
    _poll_until(ws, env, tmp_path, run, "finished", "--ingest")
    assert "finished" == Run.read(ws.resolve_run(newer)).state.status
    assert 3 == verify_dataset(ws, MODEL, "newer").rows
    reasons = _failed_ids(run)
    assert 5 == len(reasons) and all("no longer at the provider (404)" in r for r in reasons.values())
    r = run_cli(["retry", "--run-dir", str(run)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    _poll_until(ws, env, tmp_path, run, "finished", "--ingest")
    assert {} == _failed_ids(run)
    assert 5 == verify_dataset(ws, MODEL, "d").rows


def test_malformed_output_lines_fail_their_rows_only(tmp_path: Path) -> None:
    """Malformed lines (response not an object, a nested-list vector, an empty vector, an error
    line that is an array, an error that is a string) fail their own request with a reason;
    the odd-sized vector does not decide the dimension: the majority does."""
    from embedbatch.engines.batchapi.batchfiles import BatchRecords

    ids = [f"r{i}" for i in range(8)]
    rec = BatchRecords()
    rec.extend(ids, [None] * 8, [{}] * 8, [1] * 8)
    rec.write(tmp_path / "records.parquet")
    (tmp_path / "input.jsonl").write_bytes(
        b"".join(orjson.dumps({"custom_id": i, "body": {"input": i}}) + b"\n" for i in ids)
    )

    def ok(cid: str, vec: list[float]) -> dict[str, object]:
        body = {"data": [{"index": 0, "embedding": vec}], "usage": {"total_tokens": 1}}
        return {"custom_id": cid, "response": {"status_code": 200, "body": body}}

    lines = [
        ok("r0", [1.0, 0.0]),
        {"custom_id": "r1", "response": "oops"},
        ok("r2", [[1.0, 0.0]]),  # type: ignore[list-item]
        ok("r3", []),
        ok("r4", [0.0, 1.0, 0.0]),  # odd one out
        ok("r5", [0.5, 0.5]),
        {"custom_id": "r6", "response": None, "error": "boom"},
        ok("r7", [0.1, 0.2]),
    ]
    (tmp_path / "output.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    (tmp_path / "errors.jsonl").write_bytes(b"[1, 2]\n")
    res = read_batch_results(tmp_path, expected_dim=None, remote_status="completed")
    assert 2 == res.dim
    assert [True, False, False, False, False, True, False, True] == res.ok.tolist()
    reasons = {rid: reason for rid, reason, _ in res.failed}
    assert "malformed line: response is str" == reasons["r1"]
    assert reasons["r2"].startswith("undecodable embedding: shape")
    assert reasons["r3"].startswith("undecodable embedding: shape")
    assert "dimension 3 != expected 2" == reasons["r4"]
    assert "error: boom" == reasons["r6"]


async def test_cancel_goes_past_a_batch_that_already_finished(
    tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread
) -> None:
    """The first batch completed remotely while local state still says submitted; the second
    is still validating: cancel refreshes each, leaves the finished one as it is and cancels
    the other, instead of stopping at the first."""
    import anyio

    from embedbatch.engines.batchapi.poll import cancel_run
    from embedbatch.engines.batchapi.submit import submit_run

    env = cli_env(server, ws)
    folder = tmp_path / "src"
    folder.mkdir()
    path = write_jsonl(folder / "d.jsonl", sample_rows(4))
    args = ["submit", str(path), "--fields", "title,body", "--max-requests-per-batch", "2"]
    r = run_cli([*args, "--max-enqueued-tokens", "40"], env, tmp_path)  # the budget lets one batch go
    assert 0 == r.returncode, r.stderr
    paths = ws.resolve_run(Path(r.stdout.strip().splitlines()[-1]))
    first, second = load_batches(paths)
    assert ("submitted", "planned") == (first.status, second.status)
    for _ in range(1000):  # bounded wait for an event, not a duration
        if server.state.batches[first.batch_id or ""]["status"] == "completed":
            break
        await anyio.sleep(0.01)
    server.state.faults.step_s = 600  # the second batch stays in validation
    assert ["batch_002"] == [b.name for b in await submit_run(ws, client, paths, max_enqueued_tokens=10**9)]
    outcomes = dict(await cancel_run(client, paths))
    assert {"batch_001": "completed", "batch_002": "cancelling"} == outcomes
    assert "cancelling" == server.state.batches[load_batches(paths)[1].batch_id or ""]["status"]


def test_batch_over_the_org_queue_limit_is_failed_then_retried_smaller(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """The provider's enqueued-token limit is smaller than a planned batch: instead of being
    re-created forever, the batch is failed after one refusal with a reason naming the limit,
    its rows are listed, and `retry` plans them in batches cut to that limit, which complete."""
    limit = 50  # tokens; 12 rows are ~170
    server.state.faults.enqueued_token_limit = limit
    env = cli_env(server, ws)
    run = _submit(tmp_path, env, 12, per_batch=12)
    assert load_batches(ws.resolve_run(run))[0].tokens > limit
    _poll_until(ws, env, tmp_path, run, "finished", "--ingest")
    # Created once, refused once, never re-created:
    codes = [b["errors"]["data"][0]["code"] for b in server.state.batches.values()]
    assert ["token_limit_exceeded"] == codes
    reasons = _failed_ids(run)
    assert 12 == len(reasons)
    assert all(f"enqueued-token limit of {limit:,}" in r for r in reasons.values())
    r = run_cli(["retry", "--run-dir", str(run)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    _poll_until(ws, env, tmp_path, run, "finished", "--ingest")
    assert {} == _failed_ids(run)
    assert all(b.tokens <= limit for b in load_batches(ws.resolve_run(run)) if b.name.startswith("retry_"))
    assert 12 == verify_dataset(ws, MODEL, "d").rows


def test_run_beside_cron_polls(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`embedbatch run` while a cron-style loop of `poll --ingest` passes runs on the same
    workspace: both exit 0, every row is embedded once."""
    import subprocess
    import sys

    env = cli_env(server, ws)
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(20))
    args = ["run", str(path), "--fields", "title,body", "--json", "--max-requests-per-batch", "5"]
    args += ["--poll-seconds", "0"]
    run = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    passes = 0
    while run.poll() is None and passes < 200:
        assert 0 == run_cli(["poll", "--ingest"], env, tmp_path).returncode
        passes += 1
    out, err = run.communicate(timeout=300)
    assert 0 == run.returncode, err
    assert 20 == orjson.loads(out)["embedded"]
    assert "run progress" in err  # below a terminal, run logs a line per pass
    rep = verify_dataset(ws, MODEL, "d")
    assert (True, 20) == (rep.ok, rep.rows)
    assert 4 == len(server.state.batches)


def test_stale_partial_plan_is_removed(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """A plan killed mid-way leaves ``run_*.partial``; the next plan of the dataset (under the
    dataset lock, so no live plan can own it) removes it."""
    env = cli_env(server, ws)
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    stale = ws.runs_dir(MODEL, "d") / "run_20260101T000000Z_000000.partial"
    (stale / "batches").mkdir(parents=True)
    r = run_cli(["submit", str(path), "--fields", "title,body", "--dry-run"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert not stale.exists()


def test_serve_guards_its_key_and_its_address(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """With --api-key, a wrong key is refused on the API and on the admin endpoint; binding a
    non-loopback address without --api-key is refused before anything listens."""
    import urllib.error
    import urllib.request

    base = server.base_url[: -len("/v1")]
    for path in ("/v1/batches", "/_admin/counts"):
        req = urllib.request.Request(base + path, headers={"Authorization": "Bearer wrong"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert 401 == err.value.code
    r = run_cli(["serve", "--host", "0.0.0.0", "--port", "0"], cli_env(server, ws), tmp_path)
    assert 2 == r.returncode
    assert "--api-key" in r.stderr


def test_cron_poll_overlapping_another_pass_exits_0(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """A one-shot `poll` that finds the workspace lock held (another pass) logs one line and
    exits 0: overlapping cron passes are normal, not errors."""
    from embedbatch.workspace import file_lock

    with file_lock(ws.lock, what="workspace", purpose="poll"):
        r = run_cli(["--log-format", "json", "poll", "--ingest"], cli_env(server, ws), tmp_path)
    assert 0 == r.returncode, r.stderr
    assert "another poll pass is running" in r.stderr + r.stdout


def test_awkward_ids_round_trip_through_failed_ids_and_retry(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """Ids with TAB, CR, LF, a leading quote and a backslash fail (output lost), are listed in
    failed_ids.tsv exactly, and `retry` embeds them under their exact ids."""
    from embedbatch.store.manifest import Manifest
    from embedbatch.store.shards import iter_live_rows

    ids = ["tab\there", "cr\rlf\n", '"quoted', "back\\slash\\t", "plain"]
    rows = [{"id": rid, "text": f"text of {i}"} for i, rid in enumerate(ids)]
    (tmp_path / "src").mkdir()
    path = write_jsonl(tmp_path / "src" / "d.jsonl", rows)
    server.state.faults.lose_outputs = 1
    env = cli_env(server, ws)
    r = run_cli(["submit", str(path)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    run = Path(r.stdout.strip().splitlines()[-1])
    _poll_until(ws, env, tmp_path, run, "finished", "--ingest")
    assert sorted(ids) == sorted(_failed_ids(run))
    assert 0 == run_cli(["retry", "--run-dir", str(run)], env, tmp_path).returncode
    _poll_until(ws, env, tmp_path, run, "finished", "--ingest")
    manifest = Manifest.load(ws, MODEL, "d")
    assert sorted(ids) == sorted(rid for chunk in iter_live_rows(ws, manifest, []) for rid in chunk["id"])
    assert {} == _failed_ids(run)


def test_clean_and_delete_remote_files(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`poll --ingest --delete-remote-files` removes each ingested batch's files at the provider
    and its local JSONL; `clean` does the same afterwards for a run ingested without it, keeping
    an input that still has failed rows so that `retry` can read it; verify stays OK."""
    env = cli_env(server, ws)
    run_a = _submit(tmp_path, env, 4, name="a", per_batch=2)
    _poll_until(ws, env, tmp_path, run_a, "finished", "--ingest", "--delete-remote-files")
    assert [] == [f for f in server.state.files.values() if f.purpose == "batch"]
    assert [] == list(run_a.rglob("*.jsonl"))
    assert all(b.cleaned for b in load_batches(ws.resolve_run(run_a)))

    server.state.faults.line_error_rate = 1.0  # every row of run b fails: its input must stay
    run_b = _submit(tmp_path, env, 2, name="b", per_batch=2)
    _poll_until(ws, env, tmp_path, run_b, "finished", "--ingest")
    files_before = len(server.state.files)
    r = run_cli(["clean", "--run-dir", str(run_b), "--json"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert (1, 2) == (orjson.loads(r.stdout)["batches"], files_before - len(server.state.files))
    assert ["input.jsonl"] == sorted(p.name for p in run_b.rglob("*.jsonl"))
    server.state.faults.line_error_rate = 0.0
    assert 0 == run_cli(["retry", "--run-dir", str(run_b)], env, tmp_path).returncode
    _poll_until(ws, env, tmp_path, run_b, "finished", "--ingest")
    assert (True, 4) == (verify_dataset(ws, MODEL, "a").ok, verify_dataset(ws, MODEL, "a").rows)
    assert 2 == verify_dataset(ws, MODEL, "b").rows


def test_never_fit_is_judged_by_the_tokenizer_count_not_the_byte_margin() -> None:
    """#23: a batch whose conservative queue figure (bytes/4) is over the organization's limit
    but whose tokenizer count fits is created again later, not failed as "can never fit"."""
    from typing import Any, cast

    from embedbatch.engines.batchapi.poll import _can_requeue
    from embedbatch.runs import BatchState

    fits = BatchState(name="batch_001", tokens=120, tokenizer_tokens=80)
    assert _can_requeue(cast(Any, None), fits, 100, 3)
    assert fits.error is None
