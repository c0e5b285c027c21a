"""Prometheus metrics: the textfile written after each command counts what the run did; serve
and ``poll --watch --metrics-port`` answer /metrics."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from embedbatch.runs import RunState
from embedbatch.server import ServerThread
from embedbatch.workspace import RunPaths, Workspace
from tests.conftest import API_KEY, cli_env, run_cli, sample_rows, write_jsonl

parser = pytest.importorskip("prometheus_client.parser", reason="the metrics extra is not installed")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in parser.text_string_to_metric_families(text)
        for s in fam.samples
    }


def lab(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def test_textfile_counts_match_the_run(server: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(40))
    env = cli_env(server, ws)
    r = run_cli(
        [
            "run",
            str(path),
            "--fields",
            "title,body",
            "--max-requests-per-batch",
            "15",
            "--poll-seconds",
            "0.05",
            "--json",
        ],
        env,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    run_dir = Path(orjson.loads(r.stdout)["run_dir"])
    rs = RunState.load(RunPaths(run_dir))
    got = samples((ws.root / "metrics" / "embedbatch.prom").read_text())
    model = "text-embedding-3-small"
    assert got[("embedbatch_records_total", lab(dataset="d", model=model))] == 40
    run_labels = lab(dataset="d", model=model, kind="batchapi")
    assert got[("embedbatch_tokens_total", run_labels)] == rs.actual["usage_tokens"] > 0
    assert got[("embedbatch_cost_usd_total", run_labels)] == pytest.approx(rs.actual["cost_batch_usd"])
    assert got[("embedbatch_batches", lab(state="ingested"))] == 3
    assert got[("embedbatch_batch_seconds_count", ())] == 3
    assert got[("embedbatch_runs", lab(kind="batchapi", status="finished"))] == 1
    assert got[("embedbatch_errors_total", lab(kind="failed_rows"))] == 0


def test_serve_answers_metrics(server: ServerThread) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    urllib.request.urlopen(urllib.request.Request(server.base_url + "/batches", headers=auth))
    text = urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/metrics").read().decode()
    got = samples(text)
    assert got[("embedbatch_server_requests_total", lab(path="batches", status="200"))] >= 1


def test_poll_watch_serves_metrics(ws: Workspace, server: ServerThread, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (ws.root / "batches").mkdir(parents=True)
    env = cli_env(server, ws)
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", "poll", "--watch", "0.2", "--metrics-port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60  # a bound on a hung process, not a measurement
        while True:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "metrics never served"
                time.sleep(0.1)
        assert ("embedbatch_errors_total", lab(kind="run_failures")) in samples(text)
    finally:
        proc.terminate()
        proc.wait(10)
    r = run_cli(["poll", "--metrics-port", str(port)], env, tmp_path)
    assert r.returncode == 2 and "--metrics-port needs --watch" in r.stderr
