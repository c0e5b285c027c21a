"""The realtime engine against ``serve``'s rate limits over loopback, through the official SDK.

Every outcome asserted here is a count or a vector, never a duration: the limiter is exercised
by jobs a little larger than one minute's budget, so runs are short on any machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from embedbatch.config import PrepareConfig, RealtimeConfig, SampleConfig, Settings, SourceConfig
from embedbatch.engines.realtime.pipeline import RealtimeResult, run_realtime
from embedbatch.errors import ProviderError
from embedbatch.failures import read_failed_ids
from embedbatch.runs import RunState
from embedbatch.server import FakeOpenAI, FaultConfig, HashBackend, ServerThread
from embedbatch.server.ratelimit import ProviderLimits
from embedbatch.store.shards import read_vectors
from embedbatch.tokens import get_tokenizer
from embedbatch.workspace import RunPaths, Workspace
from tests.conftest import Paused, cli_env, pg_exec, run_cli, write_jsonl

MODEL = "text-embedding-3-small"
K1, K2 = "sk-rt-SECRET-key-one-111", "sk-rt-SECRET-key-two-222"


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i}", "text": f"row {i} talks about topic {i % 11} and item {i * 7}"} for i in range(start, start + n)
    ]


def tokens_of(data: list[dict[str, Any]]) -> int:
    tok = get_tokenizer(MODEL)
    return sum(len(tok.encode(r["text"])) for r in data)


@pytest.fixture
def limited(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """A server whose limits and faults the test sets through ``server.state`` before use."""
    state = FakeOpenAI(tmp_path / "server", api_key=f"{K1},{K2}", faults=FaultConfig(step_s=0.01))
    srv = ServerThread(state).start()
    yield srv
    srv.stop()


def embed(srv: ServerThread, ws: Workspace, path: Path, *, keys: tuple[str, ...] = (K1,), **cfg: Any) -> RealtimeResult:
    settings = Settings(openai_api_keys=keys, openai_base_url=srv.base_url, workspace=ws.root, openai_timeout_s=10)
    cfg.setdefault("retry_initial_s", 0.01)
    return run_realtime(
        ws,
        settings,
        source=SourceConfig(path=str(path)),
        prepare=PrepareConfig(fields=("text",)),
        sample=SampleConfig(),
        realtime=RealtimeConfig(model=MODEL, **cfg),
    )


def assert_exact(ws: Workspace, data: list[dict[str, Any]], dataset: str = "d") -> None:
    """Every row once, with the vector the provider computes for its text."""
    ids, texts, vectors = read_vectors(ws, MODEL, dataset)
    assert sorted(ids) == sorted(r["id"] for r in data)
    want = HashBackend().embed(texts, MODEL, None)
    np.testing.assert_array_equal(vectors, want)


def test_headers_followed_without_429(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    """Limits unknown at the start: learned from the first answer's headers, then respected."""
    data = rows(300)
    total = tokens_of(data)
    limited.state.limits = ProviderLimits(tpm=int(total / 1.08))  # the job is 8% over one minute's budget
    path = write_jsonl(tmp_path / "d.jsonl", data)
    result = embed(limited, ws, path, max_inputs=8)
    assert result.rows == 300 and result.failed == 0
    assert result.answered_429 == 0
    assert limited.state.counts()["rate_limited"] == 0
    (key,) = result.keys.values()
    assert key["tpm"] == int(total / 1.08)  # adopted from x-ratelimit-limit-tokens
    assert result.usage_tokens == total
    assert_exact(ws, data)


def test_key_drained_by_another_client_gets_429s_and_follows_them(
    limited: ServerThread, ws: Workspace, tmp_path: Path
) -> None:
    """The seed is wrong twice over (10× the limit, a full bucket while another client has just
    used it up): the first requests get 429s, then the answers' headers and retry-after rule."""
    data = rows(300)
    total = tokens_of(data)
    limit = total * 15  # the job is a 15th of a minute's budget ...
    limited.state.limits = ProviderLimits(tpm=limit)
    limited.state.limits.admit(K1, limit - 20, MODEL)  # ... which another client has just used up
    path = write_jsonl(tmp_path / "d.jsonl", data)
    result = embed(limited, ws, path, max_inputs=8, max_tpm=limit * 10)
    assert result.rows == 300 and result.failed == 0
    server_429 = limited.state.counts()["rate_limited"]
    assert server_429 > 0 and result.answered_429 == server_429
    (key,) = result.keys.values()
    assert key["tpm"] == limit  # the header's limit replaced the wrong seed
    assert_exact(ws, data)


def test_429_storm_with_retry_after(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    limited.state.faults = FaultConfig(next_statuses=[429] * 12, retry_after_s=0.02, paths=["/embeddings"])
    data = rows(120)
    path = write_jsonl(tmp_path / "d.jsonl", data)
    result = embed(limited, ws, path, max_inputs=10)
    assert result.rows == 120 and result.failed == 0
    assert result.answered_429 == 12
    assert [c for c in limited.state.calls if c[2] == 429] == [("POST", "/v1/embeddings", 429)] * 12
    assert_exact(ws, data)


def test_two_keys_with_separate_limits(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    data = rows(400)
    total = tokens_of(data)
    limit = int(total / 2.1)  # one key's minute holds under half the job: both keys must work
    limited.state.limits = ProviderLimits(tpm=limit)
    path = write_jsonl(tmp_path / "d.jsonl", data)
    result = embed(limited, ws, path, keys=(K1, K2), max_inputs=8, max_tpm=limit)
    assert result.rows == 400 and result.answered_429 == 0
    usage = limited.state.key_usage()
    assert len(usage) == 2 and all(u["tokens"] > 0 and u["rate_limited"] == 0 for u in usage.values())
    assert sum(u["tokens"] for u in usage.values()) == total
    assert set(result.keys) == set(usage)  # the same fingerprints on both sides
    assert_exact(ws, data)


def test_five_percent_server_errors(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    limited.state.faults = FaultConfig(rate_500=0.05, paths=["/embeddings"], seed=3)
    data = rows(600)
    path = write_jsonl(tmp_path / "d.jsonl", data)
    result = embed(limited, ws, path, max_inputs=5)
    assert result.rows == 600 and result.failed == 0
    assert result.retries == sum(1 for c in limited.state.calls if c[2] == 500)
    assert_exact(ws, data)


def test_refused_rows_are_isolated_then_retried(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    data = rows(64)
    data[10]["text"] += " POISON"
    data[41]["text"] += " POISON"
    limited.state.faults = FaultConfig(reject_text="POISON")
    path = write_jsonl(tmp_path / "d.jsonl", data)
    result = embed(limited, ws, path, max_inputs=16)
    assert result.rows == 62 and result.failed == 2
    run = RunPaths(Path(result.run_dir))
    failed = read_failed_ids(run.failed_ids)
    assert set(failed) == {"r10", "r41"}
    assert all(
        reason.startswith("rejected by the provider (400)") and "cannot be processed" in reason
        for reason in failed.values()
    )

    limited.state.faults = FaultConfig()
    env = cli_env(limited, ws, OPENAI_API_KEY=K1)
    r = run_cli(["retry", "--run-dir", str(run.root)], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "embedded 0 of 0 failed rows; 2 still failed" in r.stdout  # a 400 for that input: final
    assert "not sent again (2 row(s))" in r.stderr and "--force" in r.stderr
    assert set(read_failed_ids(run.failed_ids)) == {"r10", "r41"}
    r = run_cli(["retry", "--run-dir", str(run.root), "--force"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "embedded 2 of 2 failed rows; 0 still failed" in r.stdout
    assert read_failed_ids(run.failed_ids) == {}
    rs = RunState.load(run)
    assert rs.realtime["rows"] == 64 and rs.counts["succeeded"] == 64 and rs.counts["failed"] == 0
    assert_exact(ws, data)


def test_kill_after_commit_then_resume(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    data = rows(500)
    path = write_jsonl(tmp_path / "d.jsonl", data)
    env = cli_env(limited, ws, OPENAI_API_KEY=K1)
    args = ["embed", str(path), "--max-inputs", "20", "--commit-rows", "100", "--max-concurrency", "1"]
    r = run_cli(args, {**env, "EMBEDBATCH_CRASH_AT": "realtime_after_commit"}, tmp_path)
    assert r.returncode == -9
    ids, _, _ = read_vectors(ws, MODEL, "d")
    assert len(ids) == 100  # the first shard was committed before the kill
    r = run_cli([*args, "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    out = orjson.loads(r.stdout)
    assert out["skipped_existing"] == 100 and out["rows"] == 400 and out["failed"] == 0
    assert len(out["interrupted_runs"]) == 1
    dead = RunState.load(RunPaths(Path(out["run_dir"]).parent / out["interrupted_runs"][0]))
    assert dead.status == "interrupted" and dead.failure is not None
    assert_exact(ws, data)


def test_kill_before_commit_loses_nothing(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    data = rows(150)
    path = write_jsonl(tmp_path / "d.jsonl", data)
    env = cli_env(limited, ws, OPENAI_API_KEY=K1)
    args = ["embed", str(path), "--max-inputs", "25", "--commit-rows", "50", "--max-concurrency", "1"]
    r = run_cli(args, {**env, "EMBEDBATCH_CRASH_AT": "realtime_before_commit"}, tmp_path)
    assert r.returncode == -9
    assert read_vectors(ws, MODEL, "d")[0] == []  # killed before the first commit: nothing visible
    r = run_cli(args, env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert_exact(ws, data)


def test_keys_never_reach_files_or_output(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# two keys\n{K1}\n\n{K2}\n")
    path = write_jsonl(tmp_path / "d.jsonl", rows(40))
    limited.state.limits = ProviderLimits(rpm=100_000)  # (the server counts per key when it limits)
    env = cli_env(limited, ws, OPENAI_API_KEY="sk-not-used")
    r = run_cli(["--debug", "embed", str(path), "--api-key-file", str(key_file), "--max-inputs", "4"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(limited.state.key_usage()) == 2
    for text in (r.stdout, r.stderr, *(p.read_text(errors="replace") for p in ws.root.rglob("*") if p.is_file())):
        assert "SECRET" not in text


def test_bad_key_stops_the_run(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(30))
    with pytest.raises(ProviderError, match="Incorrect API key"):
        embed(limited, ws, path, keys=("sk-wrong",), max_inputs=5)
    (run,) = ws.all_runs()
    rs = RunState.load(run)
    assert rs.status == "failed" and rs.counts["succeeded"] == 0


def test_batch_plan_refuses_while_realtime_runs(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(200))
    env = cli_env(limited, ws, OPENAI_API_KEY=K1)
    args = ["embed", str(path), "--max-inputs", "20", "--commit-rows", "50", "--max-concurrency", "1"]
    paused = Paused(args, env, tmp_path, "realtime_after_commit")
    r = run_cli(["submit", str(path)], env, tmp_path)
    assert r.returncode != 0 and "a realtime run of text-embedding-3-small/d is embedding now" in r.stderr
    code, _, err = paused.release()
    assert code == 0, err
    r = run_cli(["submit", str(path), "--dry-run", "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["skipped_existing"] == 200


def test_rows_planned_in_a_batch_run_are_not_paid_twice(limited: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    limited.state.faults.step_s = 30  # the batch stays in flight
    data = rows(80)
    path = write_jsonl(tmp_path / "d.jsonl", data)
    env = cli_env(limited, ws, OPENAI_API_KEY=K1)
    r = run_cli(["submit", str(path)], env, tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "more").mkdir()
    more = write_jsonl(tmp_path / "more" / "d.jsonl", [*data, *rows(20, start=80)])
    result = embed(limited, ws, more)
    assert result.already_planned == 80 and result.rows == 20
    assert result.usage_tokens == tokens_of(rows(20, start=80))


def test_realtime_into_pgvector(limited: ServerThread, ws: Workspace, tmp_path: Path, pg_dsn: str) -> None:
    import anyio

    anyio.run(lambda: pg_exec(pg_dsn, "CREATE TABLE items (id text PRIMARY KEY, embedding vector(1536))"))
    data = rows(50)
    anyio.run(lambda: pg_exec(pg_dsn, *[f"INSERT INTO items (id) VALUES ('{r['id']}')" for r in data]))
    path = write_jsonl(tmp_path / "d.jsonl", data)
    env = cli_env(limited, ws, OPENAI_API_KEY=K1)
    r = run_cli(["embed", str(path), "--pg-table", "items", "--pg-dsn", pg_dsn, "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["pg"]["written"] == 50
    (got,) = anyio.run(lambda: pg_exec(pg_dsn, "SELECT id, embedding::text FROM items ORDER BY id"))
    want = dict(zip([r["id"] for r in data], HashBackend().embed([r["text"] for r in data], MODEL, None), strict=True))
    assert len(got) == 50
    for rid, text in got:
        np.testing.assert_allclose(np.array(orjson.loads(text), np.float32), want[rid], rtol=1e-6)
