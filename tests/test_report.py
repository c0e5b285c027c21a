"""``embedbatch report`` and the live page, opened in a real headless Chromium (Playwright with
Debian's ``chromium``, which ``.ci/run`` installs): no console error, no request outside the
file or loopback, the numbers in the DOM equal to run.json, every plot drawn, and a screenshot
kept as an artefact (and as ``docs/report.png`` with ``WRITE_DOCS_SCREENSHOT=1``)."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from embedbatch.runs import RunState, load_batches
from embedbatch.server import ServerThread
from embedbatch.workspace import Workspace
from tests.conftest import DATA, cli_env, run_cli

pytest.importorskip("plotly", reason="plotly (the report extra) draws the report")
ARXIV = DATA / "arxiv_cs_daily_2025.jsonl.gz"
DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "report.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) drives the browser")
    path = shutil.which("chromium")  # .ci/run installs Debian's package
    if path is None:
        pytest.skip("no chromium on PATH: apt-get install chromium (Debian), then run again")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _arxiv_run(tmp_path: Path, ws: Workspace, server: ServerThread) -> dict[str, Any]:
    """160 arXiv rows through ``run`` in batches of 40; the first batch created fails validation
    and the second expires with part of its output. Returns the CLI env."""
    if not ARXIV.is_file():
        pytest.skip(f"shared data not present: {ARXIV}")
    with gzip.open(ARXIV, "rt") as fh:
        lines = [next(fh) for _ in range(160)]
    src = tmp_path / "arxiv.jsonl"
    src.write_text("".join(lines))
    server.state.faults.fail_batches = 1
    server.state.faults.expire_batches = 1
    env = cli_env(server, ws)
    args = ["run", str(src), "--fields", "title,summary", "--dataset", "papers", "--max-requests-per-batch", "40"]
    done = run_cli(args, env, tmp_path, timeout=300)
    assert done.returncode in (0, 8), done.stderr
    return env


def _check_page(page: Any, ws: Workspace, *, allowed: str) -> None:
    """The DOM against run.json; every plot drawn; no console error; no request but ``allowed``."""
    for paths in ws.all_runs():
        rs = RunState.load(paths)
        row = page.locator(f'#runs tr[data-run-id="{rs.run_id}"]')
        assert row.count() == 1, f"run {rs.run_id} is not in the runs table once"
        shown = {c: row.locator(f"td.{c}").inner_text().strip() for c in ("rows", "failed", "cost")}
        want = {
            "rows": f"{rs.counts['succeeded']:,}",
            "failed": f"{rs.failed_rows:,}",
            "cost": f"{rs.actual['cost_batch_usd']:.6f}",
        }
        assert want == shown
        batches = load_batches(paths)
        assert {b.status for b in batches} >= {"ingested"}
    for plot in ("cost-over-time", "batch-timeline", "norms-0", "map-0"):
        box = page.locator(f"#{plot} .main-svg").first.bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 100, plot
    assert page.locator("#map-0 .scatterlayer, #map-0 canvas").count() > 0
    assert page.evaluate("document.getElementById('batch-timeline').data.length") > 0
    assert page.evaluate("document.getElementById('map-0').data[0].x.length") > 0
    assert allowed


def _open(browser: Any, url: str, allowed: str) -> tuple[Any, Any, list[str], list[str]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith(allowed) else outside.append(r.url))
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('.main-svg').length >= 4")
    return context, page, errors, outside


def test_the_report_of_a_real_run_in_chromium(
    tmp_path: Path, ws: Workspace, server: ServerThread, browser: Any
) -> None:
    env = _arxiv_run(tmp_path, ws, server)
    (paths,) = ws.all_runs()
    states = {b.remote_status for b in load_batches(paths)}
    assert {"failed", "expired"} <= states  # the injected batches are in the run
    out = tmp_path / "report.html"
    done = run_cli(["report", "--out", str(out)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    size = out.stat().st_size
    assert size < 10_000_000
    data = orjson.loads(
        out.read_text().split('<script type="application/json" id="report-data">')[1].split("</script>")[0]
    )
    assert [r["run_id"] for r in data["runs"]] == [RunState.load(paths).run_id]
    context, page, errors, outside = _open(browser, out.as_uri(), "file://")
    _check_page(page, ws, allowed="file://")
    assert ([], []) == (errors, outside)
    titles = page.locator("#batch-timeline .gtitle").first.text_content() or ""
    assert "batch timeline" in titles and "expired" in titles and "failed" in titles
    retried = sum(1 for b in load_batches(paths) if b.name.startswith("retry_"))
    assert f"(retry batches: {retried})" in page.locator("#failures").first.inner_text()
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    if os.environ.get("WRITE_DOCS_SCREENSHOT") == "1":
        page.set_viewport_size({"width": 1280, "height": 1150})
        page.screenshot(path=str(DOCS_PNG), full_page=False)
    context.close()
    print(f"screenshot: {tmp_path / 'report.png'}")


def test_the_live_page_of_poll_watch_and_serve_ui(
    tmp_path: Path, ws: Workspace, server: ServerThread, browser: Any
) -> None:
    env = _arxiv_run(tmp_path, ws, server)
    watch = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", "poll", "--watch", "1", "--ui-port", "0"],
        env={**env, "EMBEDBATCH_LOG_FORMAT": "json"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        assert watch.stdout is not None
        for line in watch.stdout:
            if "serving the live report" in line:
                url = orjson.loads(line)["url"]
                break
        assert url is not None and url.startswith("http://127.0.0.1:")
        context, page, errors, outside = _open(browser, url, url)
        _check_page(page, ws, allowed=url)
        assert ([], []) == (errors, outside)
        page.screenshot(path=str(tmp_path / "live.png"))
        context.close()
        req = urllib.request.Request(url, method="POST", data=b"x")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 501  # read-only: GET only
    finally:
        watch.terminate()
        watch.wait(timeout=60)
    # serve --ui: the same page at /, behind serve's key (Bearer header or ?key=)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ui = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", "serve", "--port", str(port), "--ui", "--api-key", "k1"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert ui.stderr is not None
        for line in ui.stderr:
            if "live report on" in line:
                break
        base = f"http://127.0.0.1:{port}/"
        for attempt in range(100):
            try:
                urllib.request.urlopen(base, timeout=30)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401  # no key, no page
                break
            except urllib.error.URLError:
                if attempt == 99:
                    raise
                time.sleep(0.1)  # the server is still binding: retried, not timed
        with urllib.request.urlopen(base + "?key=k1", timeout=60) as resp:
            body = resp.read().decode()
        assert RunState.load(ws.all_runs()[0]).run_id in body and 'id="report-data"' in body
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def test_the_report_is_bounded_and_says_what_it_left_out(ws: Workspace) -> None:
    """Without a browser: the page lists the open runs and the newest ``last`` others, says how
    many it left out, refuses an unknown dataset, and the live page's key rule holds."""
    from embedbatch.cli.app import check_bind
    from embedbatch.errors import UsageError
    from embedbatch.report.data import collect
    from embedbatch.report.live import LivePage
    from embedbatch.report.page import render
    from tests.engines.batchapi.test_state_layer import _finished_runs

    _finished_runs(ws, 5, batches=2)
    data = collect(ws, last=3)
    newest = sorted(p.root.name for p in ws.all_runs())[-3:]
    assert ([r["run_id"] for r in data.runs], data.runs_not_shown) == (newest, 2)
    page = render(data)
    assert all(f'data-run-id="{rid}"' in page for rid in newest) and "2 older finished runs not shown" in page
    assert len(data.batches) == 6
    with pytest.raises(UsageError, match="no dataset 'nope'"):
        collect(ws, dataset="nope")
    live = LivePage(ws, keys=["k1"])
    assert (live.allowed({}, ""), live.allowed({}, "key=k1"), live.allowed({"Authorization": "Bearer k1"}, "")) == (
        False,
        True,
        True,
    )
    assert LivePage(ws).allowed({}, "")
    with pytest.raises(UsageError, match="reachable from other machines"):
        check_bind("0.0.0.0", None, flag="--ui-host", key_flag="--ui-key")
