"""Submit, status, poll against the loopback server through the official openai SDK."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import anyio
import openai
import orjson
import pytest

from embedbatch.api.openai import BatchClient, RetryPolicy
from embedbatch.config import BatchLimits, PrepareConfig, SampleConfig, Settings, SourceConfig, SubmitConfig
from embedbatch.engines.batchapi.plan import plan_run
from embedbatch.engines.batchapi.poll import poll_pass
from embedbatch.engines.batchapi.submit import submit_run
from embedbatch.errors import LimitError, LockedError, ProviderError
from embedbatch.runs import RunState, load_batches
from embedbatch.server import ServerThread
from embedbatch.workspace import Workspace, file_lock
from tests.conftest import API_KEY, cli_env, run_cli, sample_rows, write_jsonl


def plan(ws: Workspace, path: Path, **submit: Any) -> Any:
    return plan_run(
        ws,
        source=SourceConfig(path=str(path)),
        prepare=PrepareConfig(fields=("title", "body")),
        sample=SampleConfig(),
        submit=SubmitConfig(**submit),
    )  # type: ignore[arg-type]


async def drain(ws: Workspace, client: BatchClient, server: ServerThread, **kw: Any) -> None:
    for _ in range(200):
        await poll_pass(ws, client, **kw)  # type: ignore[arg-type]
        runs = [RunState.load(r) for r in ws.all_runs()]
        if all(all(b.status in ("downloaded", "ingested") for b in load_batches(r)) for r in ws.all_runs()) and runs:
            return
        await anyio.sleep(0.02)
    raise AssertionError("batches never finished")


async def test_submit_and_poll_to_downloaded(
    tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(25))
    planned = plan(ws, path, limits=BatchLimits(max_requests=10))
    run = planned.run  # type: ignore[attr-defined]
    assert [10, 10, 5] == [b.requests for b in load_batches(run)]
    await submit_run(ws, client, run)
    await drain(ws, client, server)
    batches = load_batches(run)
    assert {"downloaded"} == {b.status for b in batches}
    assert [10, 10, 5] == [b.succeeded for b in batches]
    out_ids = sorted(
        orjson.loads(x)["custom_id"]
        for b in batches
        for x in (run.batch_dir(b.name) / "output.jsonl").read_bytes().splitlines()
    )
    assert sorted(r["id"] for r in sample_rows(25)) == out_ids
    counts = server.state.counts()
    assert (6, 3, 0, 0) == tuple(counts[k] for k in ("files", "batches", "duplicate_uploads", "duplicate_batches"))
    meta = {b["metadata"]["embedbatch_batch"] for b in server.state.batches.values()}
    assert {"batch_001", "batch_002", "batch_003"} == meta


async def test_retries_429_and_5xx(tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread) -> None:
    """Injected 429/500/503 are retried; the work completes with no duplicate upload."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(5))
    run = plan(ws, path).run  # type: ignore[attr-defined]
    server.state.faults.next_statuses = [429, 500, 503, 429]
    await submit_run(ws, client, run)
    assert 4 == client.retries
    assert (1, 1) == (server.state.counts()["files"], server.state.counts()["batches"])
    statuses = [c[2] for c in server.state.calls[:4]]
    assert [429, 500, 503, 429] == statuses


async def test_4xx_not_retried(tmp_path: Path, settings: Settings, ws: Workspace) -> None:
    bad = BatchClient(
        Settings(openai_api_key="sk-wrong-key-000000", openai_base_url=settings.openai_base_url),
        policy=RetryPolicy(attempts=5, initial_s=0.01),
    )
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(2))
    run = plan(ws, path).run  # type: ignore[attr-defined]
    with pytest.raises(ProviderError) as info:
        await submit_run(ws, bad, run)
    assert (401, 0) == (info.value.status_code, bad.retries)
    assert "Incorrect API key" in str(info.value)


def _answer_empty_list(conn: socket.socket) -> None:
    """Read a request and answer an empty OpenAI list object, then close."""
    conn.recv(65536)
    body = b'{"object":"list","data":[],"has_more":false}'
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    conn.close()


def test_connection_reset_is_retried() -> None:
    """A server that drops the first connections: the SDK error becomes RetryLater and is retried."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    hits: list[int] = []

    def serve() -> None:
        while len(hits) < 5:
            conn, _ = lsock.accept()
            hits.append(1)
            if len(hits) <= 2:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()  # RST
                continue
            _answer_empty_list(conn)
            return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = BatchClient(
        Settings(openai_api_key=API_KEY, openai_base_url=f"http://127.0.0.1:{port}/v1", openai_timeout_s=5),
        policy=RetryPolicy(attempts=5, initial_s=0.01, max_s=0.05),
    )
    assert anyio.run(c.find_file, "x.jsonl") is None
    assert (3, 2) == (len(hits), c.retries)
    lsock.close()


async def test_token_limit_exceeded_requeues(
    tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread
) -> None:
    """A batch failing with token_limit_exceeded goes back to the queue, its rows not failed,
    and is created again: two batches at the provider, the second one completes. (The fault
    hits exactly the first create, so the outcome does not depend on when poll looks.)"""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(4))
    run = plan(ws, path).run  # type: ignore[attr-defined]
    server.state.faults.token_limit_batches = 1
    await submit_run(ws, client, run)
    await drain(ws, client, server)
    bs = load_batches(run)[0]
    assert (1, 1, 0) == (bs.attempt, len(bs.retry_of), bs.failed)
    assert ("downloaded", 4, 2) == (bs.status, bs.succeeded, len(server.state.batches))
    assert "token_limit_exceeded" == server.state.batches[bs.retry_of[0]]["errors"]["data"][0]["code"]


async def test_enqueued_budget_holds_batches(
    tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread
) -> None:
    """Planned batches wait while the model's enqueued tokens would pass the budget."""
    server.state.faults.step_s = 0.2
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(30))
    run = plan(ws, path, limits=BatchLimits(max_requests=10, max_enqueued_tokens=250)).run  # type: ignore[attr-defined]
    tokens = [b.tokens for b in load_batches(run)]
    assert all(t <= 250 for t in tokens) and sum(tokens) > 250
    submitted = await submit_run(ws, client, run)
    assert len(submitted) == 1
    await drain(ws, client, server)
    assert len(tokens) == len(server.state.batches)


def test_max_cost_refuses_before_upload(tmp_path: Path, ws: Workspace) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(10))
    with pytest.raises(LimitError, match="max-cost-usd"):
        plan(ws, path, max_cost_usd=1e-9)
    assert [] == ws.all_runs()


async def test_resubmit_skips_existing_and_planned(
    tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread
) -> None:
    """Appending rows embeds only the new ones; ids planned in an unfinished run are skipped."""
    from embedbatch.engines.batchapi.ingest import ingest_run

    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(10))
    run1 = plan(ws, path).run  # type: ignore[attr-defined]
    second = plan(ws, path)
    assert (0, 10) == (second.state.counts["planned"], second.skipped_existing)  # type: ignore[attr-defined]
    await submit_run(ws, client, run1)
    await drain(ws, client, server)
    await ingest_run(ws, run1)
    write_jsonl(path, [*sample_rows(10), *sample_rows(3, start=10)])
    third = plan(ws, path)
    assert (3, 10) == (third.state.counts["planned"], third.skipped_existing)  # type: ignore[attr-defined]


def test_lock_contention(ws: Workspace) -> None:
    ws.root.mkdir(parents=True)
    with file_lock(ws.lock, what="workspace"), pytest.raises(LockedError):  # noqa: SIM117
        with file_lock(ws.lock, what="workspace"):
            pass


def test_cli_submit_status_poll_and_no_secrets(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """The CLI end to end; the API key appears in no file the workspace holds and no output."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(12))
    env = cli_env(server, ws)
    r = run_cli(["submit", str(path), "--fields", "title,body", "--max-requests-per-batch", "5"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    assert (run_dir / "run.json").exists()
    for _ in range(50):
        r = run_cli(["poll"], env, tmp_path)
        assert 0 == r.returncode, r.stderr
        if all(b.status == "downloaded" for b in load_batches(ws.resolve_run(run_dir))):
            break
    r = run_cli(["status", "--update-json", "--json"], env, tmp_path)
    data = orjson.loads(r.stdout)
    assert [5, 5, 2] == [b["succeeded"] for b in data[0]["batches"]]
    assert {"downloaded"} == {b["status"] for b in data[0]["batches"]}
    leaked = [p for p in ws.root.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert [] == leaked
    bad = run_cli(
        ["submit", str(path), "--fields", "title,body"], {**env, "OPENAI_API_KEY": "sk-bad-" + "9" * 20}, tmp_path
    )
    assert "sk-bad" not in bad.stdout + bad.stderr


def test_sdk_against_server_shapes(server: ServerThread) -> None:
    """The official SDK parses every object the server returns (files, batches, embeddings)."""
    c = openai.OpenAI(api_key=API_KEY, base_url=server.base_url, max_retries=0)
    emb = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=64)
    assert [64, 64] == [len(d.embedding) for d in emb.data]
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="text-embedding-ada-002", input="a", dimensions=64)


def test_timeout_is_retried() -> None:
    """A server that accepts and stalls: the client times out, retries, and gets the answer."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            conn, _ = lsock.accept()
            conns.append(conn)
            if len(conns) == 1:
                continue  # stall: read nothing, answer nothing
            _answer_empty_list(conn)
            return

    threading.Thread(target=serve, daemon=True).start()
    c = BatchClient(
        Settings(openai_api_key=API_KEY, openai_base_url=f"http://127.0.0.1:{port}/v1", openai_timeout_s=0.3),
        policy=RetryPolicy(attempts=3, initial_s=0.01, max_s=0.05),
    )
    assert anyio.run(c.find_file, "x.jsonl") is None
    assert (2, 1) == (len(conns), c.retries)
    lsock.close()


async def test_enqueued_requests_stay_under_the_provider_limit(
    tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are created only while the model's enqueued requests stay under the Batch API's
    limit (1,000,000 for embeddings; 10 here): the third batch of 5 waits for a poll after the
    first two finish."""
    import embedbatch.engines.batchapi.submit as submit_mod

    monkeypatch.setattr(submit_mod, "MAX_ENQUEUED_REQUESTS", 10)
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(15))
    run = plan(ws, path, limits=BatchLimits(max_requests=5)).run  # type: ignore[attr-defined]
    done = await submit_run(ws, client, run)
    assert (2, ["submitted", "submitted", "planned"]) == (len(done), [b.status for b in load_batches(run)])
    await drain(ws, client, server)
    assert {"downloaded"} == {b.status for b in load_batches(run)}
    assert 3 == len(server.state.batches)


async def test_ingest_commits_every_commit_rows_and_a_crash_between_commits_resumes(
    tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ingest commits at the first batch boundary past COMMIT_ROWS (so its memory does not
    grow with the run): 5 batches of 10 rows with COMMIT_ROWS=20 give three commits. A crash
    just after the second commit (its batches not yet marked ingested) is resumed by the next
    ingest: every row once, every batch ingested."""
    from embedbatch.engines.batchapi import ingest as ingest_mod
    from embedbatch.engines.batchapi.ingest import ingest_run
    from embedbatch.store.dataset import DatasetStore
    from embedbatch.store.manifest import Manifest

    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(50))
    run = plan(ws, path, limits=BatchLimits(max_requests=10)).run
    await submit_run(ws, client, run)
    await drain(ws, client, server)
    monkeypatch.setattr(ingest_mod, "COMMIT_ROWS", 20)
    commits: list[str] = []

    def crash_after_second_commit(name: str) -> None:
        if name == "after_manifest":
            commits.append(name)
            if len(commits) == 2:
                raise KeyboardInterrupt("killed between commits")

    monkeypatch.setattr(ingest_mod, "crash_point", crash_after_second_commit)
    with pytest.raises(KeyboardInterrupt):
        await ingest_run(ws, run)
    assert ["ingested"] * 2 + ["downloaded"] * 3 == [b.status for b in load_batches(run)]
    monkeypatch.setattr(ingest_mod, "crash_point", lambda name: None)
    result = await ingest_run(ws, run)
    assert (result.batches, result.rows) == (1, 10)  # the second commit's two batches are only marked
    assert {"ingested"} == {b.status for b in load_batches(run)}
    state = RunState.load(run)
    manifest = Manifest.load(ws, state.model, state.dataset)
    sources = [src for s in manifest.shards for src in s["sources"]]
    assert sorted(sources) == sorted(f"{run.run_id}/batch_{i:03d}" for i in range(1, 6))
    assert 3 == len(manifest.shards) and 50 == manifest.current_rows == manifest.rows
    (got,) = DatasetStore(ws, state.model, state.dataset).get(["doc-49"], columns=["id"])
    assert got is not None
