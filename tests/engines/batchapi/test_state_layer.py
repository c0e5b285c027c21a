"""The state layer: one owner of run state, one read per poll pass, targets checked by the
Python API before anything is written or paid for."""

from __future__ import annotations

import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedbatch.api.openai import BatchClient
from embedbatch.config import (
    BatchLimits,
    LibsqlTarget,
    PgTarget,
    PrepareConfig,
    SampleConfig,
    SourceConfig,
    SubmitConfig,
)
from embedbatch.engines.batchapi.plan import plan_run
from embedbatch.engines.batchapi.poll import poll_pass
from embedbatch.engines.batchapi.submit import submit_run
from embedbatch.errors import DatabaseError
from embedbatch.runs import BatchState, OpenRuns, Run, RunState
from embedbatch.server import ServerThread
from embedbatch.workspace import Workspace
from tests.conftest import sample_rows, write_jsonl

MODEL = "text-embedding-3-small"


def _finished_runs(ws: Workspace, n: int, *, batches: int = 10, dataset: str = "old") -> None:
    """``n`` finished Batch API runs of ``batches`` ingested batches each, written the way every
    engine writes a run (Run.create)."""
    for _ in range(n):
        paths = ws.new_run(MODEL, dataset)
        state = RunState(run_id=paths.run_id, model=MODEL, dataset=dataset, source="file", source_path="x")
        state.status = "finished"
        done = [BatchState(name=f"batch_{i:03d}", status="ingested", requests=5, tokens=50) for i in range(batches)]
        Run.create(paths, state, batches=done)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[Path]]:
    """Every read of a run.json or batch.json, by path (all state reads go through read_bytes)."""
    counts: Counter[Path] = Counter()
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        if self.name in ("run.json", "batch.json"):
            counts[self] += 1
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    yield counts


async def test_a_poll_pass_reads_each_active_run_once_and_no_finished_run(
    tmp_path: Path, ws: Workspace, client: BatchClient, server: ServerThread, reads: Counter[Path]
) -> None:
    _finished_runs(ws, 50)
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(30))
    planned = plan_run(
        ws,
        source=SourceConfig(path=str(path)),
        prepare=PrepareConfig(fields=("title", "body")),
        sample=SampleConfig(),
        submit=SubmitConfig(model=MODEL, limits=BatchLimits(max_requests=10)),
    )
    active = planned.run
    assert active is not None
    await submit_run(ws, client, active)
    OpenRuns.entries(ws)  # a workspace is indexed once, on first use (here: already, by the writes)

    async def measured() -> Counter[Path]:
        reads.clear()
        await poll_pass(ws, client)
        return Counter(reads)

    first = await measured()
    mine = {p for p in first if active.root in p.parents}
    assert {active.run_json: 1} == {p: n for p, n in first.items() if p.name == "run.json"}
    assert 3 == sum(1 for p in mine if p.name == "batch.json")
    assert set(first) == mine, "a finished run's files were read"
    assert all(n == 1 for n in first.values())

    _finished_runs(ws, 50)  # twice the finished runs: the pass reads the same
    second = await measured()
    assert sorted(first.values()) == sorted(second.values())
    assert set(second) <= mine


def test_the_metrics_step_opens_no_batch_and_counts_rows_from_the_manifest(
    ws: Workspace, reads: Counter[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("prometheus_client", reason="the metrics extra (prometheus-client) writes the metrics file")
    import numpy as np

    from embedbatch.metrics import write_metrics
    from embedbatch.store import index as id_index
    from embedbatch.store.dataset import DatasetStore
    from tests.store.test_use import DIM, commit

    _finished_runs(ws, 20, batches=5)
    store = DatasetStore(ws, MODEL, "old")
    commit(store, [f"r{i}" for i in range(10)], np.eye(10, DIM, dtype=np.float32), run="run_a")
    commit(store, ["r0", "r1"], np.eye(2, DIM, dtype=np.float32), run="run_b")  # two rows replaced
    loaded: list[str] = []
    monkeypatch.setattr(id_index.IdIndex, "load", classmethod(lambda cls, *a, **k: loaded.append("load")))
    reads.clear()
    write_metrics(ws)
    text = (ws.root / "metrics" / "embedbatch.prom").read_text()
    assert 'embedbatch_batches{state="ingested"} 100.0' in text
    assert f'embedbatch_records_total{{dataset="old",model="{MODEL}"}} 10.0' in text
    assert 0 == sum(n for p, n in reads.items() if p.name == "batch.json")
    assert [] == loaded
    reads.clear()
    write_metrics(ws)  # unchanged runs come from the cache: no run.json is read again
    assert (text, 0) == ((ws.root / "metrics" / "embedbatch.prom").read_text(), sum(reads.values()))


def test_the_index_is_rebuilt_for_a_workspace_written_before_it(ws: Workspace) -> None:
    _finished_runs(ws, 3, batches=2)
    paths = ws.new_run(MODEL, "live")
    live = RunState(run_id=paths.run_id, model=MODEL, dataset="live", source="file", source_path="x")
    Run.create(paths, live, batches=[BatchState(name="batch_001", status="submitted", requests=4, tokens=40)])
    shutil.rmtree(ws.open_runs_dir)  # as an older version left it: no index at all
    entries = OpenRuns.entries(ws)
    assert [(paths.root, "active", 40, 4)] == [
        (e.paths.root, e.status, e.queue_tokens, e.queue_requests) for e in entries
    ]
    with Run.open(paths) as run:  # closing the run takes it out of the index
        run.batches[0].status = "ingested"
        run.save_batch(run.batches[0])
        run.settle()
        run.save()
    assert [] == OpenRuns.entries(ws)


def _wrong_libsql(tmp_path: Path) -> dict[str, Any]:
    db = tmp_path / "kb.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, embedding F32_BLOB(3))")
    conn.commit()
    conn.close()
    return {"libsql_target": LibsqlTarget(url=str(db), table="chunks")}


@pytest.mark.parametrize("kind", ["pgvector", "libsql"])
def test_plan_run_checks_its_targets_before_anything_is_written_or_paid(
    kind: str, tmp_path: Path, ws: Workspace, server: ServerThread, request: pytest.FixtureRequest
) -> None:
    """Through the Python API, as the CLI: a target that cannot take 1536-d vectors stops the
    plan; no run folder, no file at the provider."""
    if kind == "libsql":
        pytest.importorskip("libsql", reason="the libsql package (dev extra) runs the libSQL sink")
        sinks = _wrong_libsql(tmp_path)
    else:
        dsn: str = request.getfixturevalue("pg_dsn")
        import asyncio

        import asyncpg

        async def make() -> None:
            conn = await asyncpg.connect(dsn)
            await conn.execute("CREATE TABLE items (id text PRIMARY KEY, embedding vector(3))")
            await conn.close()

        asyncio.run(make())
        sinks = {"pg_target": PgTarget(table="items"), "dsn": dsn}
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(5))
    with pytest.raises(DatabaseError, match="3"):
        plan_run(
            ws,
            source=SourceConfig(path=str(path)),
            prepare=PrepareConfig(fields=("title", "body")),
            sample=SampleConfig(),
            submit=SubmitConfig(model=MODEL),
            **sinks,
        )
    assert [] == ws.all_runs()
    assert not ws.runs_dir(MODEL, "d").exists() or [] == list(ws.runs_dir(MODEL, "d").iterdir())
    assert 0 == server.state.counts()["files"]


def test_list_and_status_read_the_open_runs_and_the_newest_finished_ones(
    ws: Workspace, tmp_path: Path, reads: Counter[Path]
) -> None:
    """30 finished runs and one open one (the oldest of all): ``list`` and ``status`` show the
    open run and the newest ``--last`` finished runs, say how many older ones they left out,
    and read no other run; ``--all`` shows every run."""
    import orjson

    from embedbatch.store.verify import list_workspace
    from tests.conftest import run_cli

    paths = ws.new_run(MODEL, "live")
    live = RunState(run_id=paths.run_id, model=MODEL, dataset="live", source="file", source_path="x")
    live.status = "active"
    Run.create(paths, live, batches=[BatchState(name="batch_001", status="planned", requests=5, tokens=50)])
    _finished_runs(ws, 30, batches=1)
    newest = sorted(p.name for p in (ws.root / "batches" / MODEL / "old").glob("run_*"))[-5:]
    OpenRuns.entries(ws)
    reads.clear()
    data = list_workspace(ws, last=5)
    assert [r["run_id"] for r in data["runs"]] == [paths.run_id, *newest]
    assert (data["runs_not_shown"], sum(1 for p in reads if p.name == "run.json")) == (25, 6)
    read_runs = {next(a.name for a in p.parents if a.name.startswith("run_")) for p in reads}
    assert read_runs == {paths.run_id, *newest}

    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "PATH": "/usr/bin:/bin"}
    shown = run_cli(["status", "--offline", "--last", "5", "--json"], env, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert [r["run_id"] for r in orjson.loads(shown.stdout)] == [paths.run_id, *newest]
    plain = run_cli(["status", "--offline", "--last", "5"], env, tmp_path)
    assert "25 older finished run(s) not shown" in plain.stderr
    every = run_cli(["list", "--all", "--json"], env, tmp_path)
    assert (len(orjson.loads(every.stdout)["runs"]), orjson.loads(every.stdout)["runs_not_shown"]) == (31, 0)


def test_sql_reads_the_runs_only_for_a_query_that_names_them(ws: Workspace, reads: Counter[Path]) -> None:
    pytest.importorskip("duckdb", reason="duckdb (the sql extra) runs embedbatch sql")
    from embedbatch.store.catalog import run_sql

    _finished_runs(ws, 12, batches=1)
    reads.clear()
    assert [(0,)] == run_sql(ws, "SELECT count(*) AS n FROM shards")[1]
    assert 0 == sum(reads.values())
    assert [(12,)] == run_sql(ws, "SELECT count(*) FROM Runs")[1]
    assert 12 == sum(1 for p in reads if p.name == "run.json")
