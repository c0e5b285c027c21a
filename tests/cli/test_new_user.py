"""What a new user trips on (issue #22): failures that must say so, hints that must work."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from embedbatch.failures import read_failed_ids
from embedbatch.runs import Run
from embedbatch.server import FakeOpenAI, FaultConfig, HashBackend, ServerThread
from embedbatch.workspace import Workspace
from tests.conftest import API_KEY, Paused, cli_env, pg_exec, run_cli, sample_rows, write_jsonl


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


# ---- #22.4: any text is counted; unexpected errors and disk errors are one line ----------------


def test_a_100k_character_cjk_and_emoji_row_is_counted_and_cut(tmp_path: Path, ws: Workspace) -> None:
    """100,000 characters of CJK and emoji (up to 4 tokens a character) plan without an error:
    the row is cut to the token limit and counted."""
    text = ("漢字かな交じり文😀🚀👩‍👩‍👧 " * 10_000)[:100_000]
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "text": text}, {"id": "short", "text": "hi"}])
    env = {**os.environ, "EMBEDBATCH_WORKSPACE": str(ws.root), "OPENAI_API_KEY": "sk-unused"}
    r = run_cli(["submit", str(src), "--fields", "text", "--dry-run", "--json"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    est = orjson.loads(r.stdout)
    assert (2, 1) == (est["sampled"], est["truncated"])
    assert 8_100 < est["tokens_total"] - 1 <= 8_191  # the long row, cut at the token limit, and "hi"


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (RuntimeError("boom"), 1, "error: unexpected RuntimeError: boom (run with --debug for the traceback)"),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/ws/x.parquet"),
            10,
            "error: disk full: /data/ws/x.parquet",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/ro/run.json"),
            10,
            "error: permission denied: /ro/run.json",
        ),
    ],
)
def test_unexpected_and_disk_errors_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], raised: Exception, code: int, line: str
) -> None:
    """An exception nobody expected prints one line and exits 1; a full disk or a refused path
    exits 10 naming the path; no traceback either way."""
    import importlib

    cli_app = importlib.import_module("embedbatch.cli.app")  # the module (the package's ``app`` is the Typer)

    def app(**_: object) -> None:
        raise raised

    monkeypatch.setattr(cli_app, "app", app)
    with pytest.raises(SystemExit) as exit_info:
        cli_app._run()
    err = capsys.readouterr().err
    assert (code, [line]) == (exit_info.value.code, [ln for ln in err.splitlines() if ln])


def test_disk_full_while_downloading_is_not_a_provider_error() -> None:
    """ENOSPC raised while an output file streams to disk is our disk, not a broken connection."""
    from embedbatch.api.openai import _is_transport_error

    assert not _is_transport_error(OSError(errno.ENOSPC, "No space left on device", "/ws/out.jsonl"))
    assert _is_transport_error(ConnectionResetError(errno.ECONNRESET, "reset"))


# ---- #22.5-6: bad rows are recorded with their line and id ----------------------------------------


def test_skip_bad_rows_skips_a_row_without_its_text_field(tmp_path: Path, ws: Workspace) -> None:
    """A row lacking the only text field is a bad row: --skip-bad-rows records it (line, id,
    reason) and goes on; without it the run stops naming the line."""
    rows = [{"id": f"r{i}", "summary": f"text {i}"} for i in range(12)]
    del rows[4]["summary"]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    env = {**os.environ, "EMBEDBATCH_WORKSPACE": str(ws.root), "OPENAI_API_KEY": "sk-unused"}
    r = run_cli(["submit", str(src), "--fields", "summary", "--dry-run"], env, tmp_path)
    assert 3 == r.returncode and f"{src}:5" in r.stderr
    r = run_cli(["submit", str(src), "--fields", "summary", "--dry-run", "--skip-bad-rows", "--json"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert 11 == orjson.loads(r.stdout)["sampled"]
    (rejected,) = [orjson.loads(x) for p in ws.root.rglob("rejected.jsonl") for x in p.read_bytes().splitlines()]
    assert (5, "r4", "missing text field") == (rejected["line"], rejected["id"], rejected["reason"])


def test_a_ragged_csv_row_is_recorded_with_its_line_and_id(tmp_path: Path, ws: Workspace) -> None:
    """A CSV row with too many fields goes to rejected.jsonl with its physical line and its id."""
    src = tmp_path / "d.csv"
    src.write_text("id,text\na,first\nb,two,fields\nc,third\n", encoding="utf-8")
    env = {**os.environ, "EMBEDBATCH_WORKSPACE": str(ws.root), "OPENAI_API_KEY": "sk-unused"}
    r = run_cli(["submit", str(src), "--fields", "text", "--dry-run", "--skip-bad-rows"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    (rejected,) = [orjson.loads(x) for p in ws.root.rglob("rejected.jsonl") for x in p.read_bytes().splitlines()]
    assert (3, "b") == (rejected["line"], rejected["id"])
    assert rejected["reason"].startswith("ragged CSV row")


# ---- #22.7: sinks store the text and say what they did not get --------------------------------


def test_libsql_insert_mode_stores_the_text_and_search_shows_it(
    tmp_path: Path, ws: Workspace, server: ServerThread
) -> None:
    """The README's libSQL route: insert mode creates a `content` column with each row's text,
    so `search --libsql-url … --libsql-table …` (text column `content` by default) works."""
    pytest.importorskip("libsql", reason="libsql (the libsql extra) is not installed")
    src = write_jsonl(tmp_path / "papers.jsonl", sample_rows(8))
    env = cli_env(server, ws)
    db = ["--libsql-url", str(tmp_path / "vectors.db"), "--libsql-table", "papers"]
    r = run_cli(
        ["run", str(src), "--fields", "title,body", "--poll-seconds", "0.05", *db, "--libsql-mode", "insert"],
        env,
        tmp_path,
    )
    assert 0 == r.returncode, r.stderr
    text = "Title 3\n\nBody text number 3 about topic 3."
    r = run_cli(["search", text, *db, "--json"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    hits = orjson.loads(r.stdout)
    assert ("doc-3", text) == (hits[0]["id"], hits[0]["text"])


def test_pgvector_insert_mode_creates_the_table_and_a_new_target_is_told_about_old_rows(
    tmp_path: Path, ws: Workspace, server: ServerThread, pg_dsn: str
) -> None:
    """`--pg-mode insert` into a table that does not exist creates it (id, vector(dim),
    content) and fills it; a second target for rows already embedded gets nothing sent, and
    the command says how to write them from the store; that command fills it."""
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(6))
    env = cli_env(server, ws, DATABASE_URL=pg_dsn)
    base = ["run", str(src), "--fields", "title,body", "--poll-seconds", "0.05", "--pg-mode", "insert"]
    r = run_cli([*base, "--pg-table", "docs"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    (first_run,) = [d for d in (ws.root / "batches").glob("*/*/run_*")]
    ((n, dims, text),) = asyncio.run(
        pg_exec(pg_dsn, "SELECT count(*), max(vector_dims(embedding)), max(content) FROM docs WHERE id = 'doc-2'")
    )[0]
    assert (1, 1536, "Title 2\n\nBody text number 2 about topic 2.") == (n, dims, text)
    r = run_cli([*base, "--pg-table", "docs2"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    hints = [ln.strip() for ln in r.stderr.splitlines() if ln.strip().startswith("embedbatch ingest --run-dir")]
    assert [f"embedbatch ingest --run-dir {first_run}"] == [h.split(" --pg", 1)[0] for h in hints], r.stderr
    (hint,) = hints
    assert "--pg-table docs2" in hint and "--pg-mode insert" in hint
    assert 0 == run_cli(shlex.split(hint)[1:], env, tmp_path).returncode
    assert [[6]] == asyncio.run(pg_exec(pg_dsn, "SELECT count(*) FROM docs2"))[0]


# ---- #22.8: the SQLite example script --------------------------------------------------------------


def test_debian_to_sqlite_without_its_data_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    """Without the packages file the script prints one error naming --data and makes no
    database; with a small packages file it builds the table."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "debian_to_sqlite.py"
    out = tmp_path / "debian.db"
    r = subprocess.run(
        [sys.executable, str(script), str(out), "--data", str(tmp_path / "absent.jsonl.gz")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert 0 != r.returncode and "pass --data" in r.stderr and "Traceback" not in r.stderr
    assert [] == list(tmp_path.iterdir())
    pkgs = write_jsonl(
        tmp_path / "p.jsonl",
        [{"package": "vim", "section": "editors", "synopsis": "Vi IMproved", "description": "An editor."}],
    )
    r = subprocess.run([sys.executable, str(script), str(out), "--data", str(pkgs)], capture_output=True, text=True)
    assert 0 == r.returncode, r.stderr
    import sqlite3

    assert [(1, "vim", None)] == sqlite3.connect(out).execute("SELECT id, package, embedding FROM packages").fetchall()


# ---- #22.9-11: the hub, progress below a terminal, rows held by another run ---------------------


def test_an_unreachable_hub_is_one_line_naming_it(tmp_path: Path, ws: Workspace) -> None:
    """The hub cannot be reached (a closed loopback port as HF_ENDPOINT): exit 6 and one line
    naming the hub and HF_HUB_OFFLINE, no traceback, no retry chatter."""
    pytest.importorskip("datasets", reason="datasets (the hf extra) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update({"EMBEDBATCH_WORKSPACE": str(ws.root), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)})
    r = run_cli(["estimate", "hf://google/sgd", "--fields", "text"], env, tmp_path, timeout=300)
    assert 6 == r.returncode, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[:1] == lines and lines, r.stderr  # exactly one line: no traceback, no retry chatter
    assert "cannot reach the Hugging Face hub at http://127.0.0.1:9" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]


def test_embed_logs_progress_below_a_terminal(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`embed` with stderr not a terminal logs `progress` lines (rows, rows/s); the interval is
    EMBEDBATCH_PROGRESS_LOG_S (0: every update)."""
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(30))
    env = cli_env(server, ws, EMBEDBATCH_PROGRESS_LOG_S="0")
    r = run_cli(
        ["--log-format", "json", "embed", str(src), "--fields", "title,body", "--max-inputs", "10"], env, tmp_path
    )
    assert 0 == r.returncode, r.stderr
    progress = [orjson.loads(ln) for ln in r.stderr.splitlines() if '"event": "progress"' in ln]
    assert progress and 30 == progress[-1]["rows"]
    assert {"embedding"} == {p["stage"] for p in progress}


def test_embed_names_the_batch_run_that_holds_its_rows(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """After a submit that planned the rows but failed to upload, `embed` sends none of them
    (they would be paid twice) and says which run holds them and how to release them; after
    `cancel` of that run, `embed` embeds them."""
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(5))
    env = cli_env(server, ws)
    server.state.faults.paths, server.state.faults.rate_500 = ["/files"], 1.0
    r = run_cli(["submit", str(src), "--fields", "title,body"], {**env, "EMBEDBATCH_RETRY_ATTEMPTS": "1"}, tmp_path)
    assert 6 == r.returncode, r.stderr
    server.state.faults.rate_500 = 0.0
    (run_dir,) = [d for d in (ws.root / "batches").glob("*/*/run_*")]
    r = run_cli(["embed", str(src), "--fields", "title,body"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert f"the unfinished Batch API run {run_dir} has them planned" in r.stderr
    assert f"embedbatch cancel --run-dir {run_dir}" in r.stderr
    assert 0 == run_cli(["cancel", "--run-dir", str(run_dir)], env, tmp_path).returncode
    r = run_cli(["embed", str(src), "--fields", "title,body", "--json"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert 5 == orjson.loads(r.stdout)["rows"]


# ---- #22.13-15: search, get, sql, help -----------------------------------------------------------


def test_search_id_puts_the_query_row_first_on_ties(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Two rows with the same text (so the same vector): `search --id` of either lists that row
    first, then its twin."""
    rows = [{"id": i, "text": t} for i, t in [("pkg-a", "same summary"), ("pkg-b", "same summary"), ("c", "other")]]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    env = cli_env(server, ws)
    assert 0 == run_cli(["run", str(src), "--fields", "text", "--poll-seconds", "0.05"], env, tmp_path).returncode
    for first, twin in (("pkg-a", "pkg-b"), ("pkg-b", "pkg-a")):
        r = run_cli(["search", "--id", first, "--dataset", "d", "-k", "2", "--json"], env, tmp_path)
        assert 0 == r.returncode, r.stderr
        assert [first, twin] == [h["id"] for h in orjson.loads(r.stdout)]


def test_ids_are_data_not_markup_and_missing_ids_exit_9(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`get` shows an id with brackets as it is; a missing id exits 9 (not found), naming it."""
    rows = [{"id": "[bold]b[/bold]", "text": "one"}, {"id": "x", "text": "two"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    env = cli_env(server, ws)
    assert 0 == run_cli(["run", str(src), "--fields", "text", "--poll-seconds", "0.05"], env, tmp_path).returncode
    r = run_cli(["get", "[bold]b[/bold]", "--dataset", "d"], {**env, "COLUMNS": "200"}, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert "[bold]b[/bold]" in r.stdout
    r = run_cli(["get", "[/x]", "--dataset", "d"], env, tmp_path)
    assert (9, "error: no id '[/x]' in dataset text-embedding-3-small/d") == (r.returncode, r.stderr.strip())
    r = run_cli(["search", "--id", "[/x]", "--dataset", "d"], env, tmp_path)
    assert 9 == r.returncode and "Traceback" not in r.stderr
    r = run_cli(["search", "one", "--dataset", "d", "--model", "text-embedding-3-large"], env, tmp_path)
    assert 2 == r.returncode and "it was embedded with: text-embedding-3-small" in r.stderr
    r = run_cli(["sql", "SELECT id FROM embeddings ORDER BY id", "--csv"], env, tmp_path)
    assert (0, "id\n[bold]b[/bold]\nx\n") == (r.returncode, r.stdout)


def test_help_shows_no_bool_metavar_and_every_option_has_its_variable(tmp_path: Path) -> None:
    """Flags take no value: `--help` shows no `<bool>` for them; commands without option groups
    (poll, status) read EMBEDBATCH_<OPTION> too."""
    env = {**os.environ, "COLUMNS": "200"}
    for cmd in ("submit", "poll", "status", "embed"):
        out = run_cli([cmd, "--help"], env, tmp_path).stdout
        assert [] == [ln for ln in out.splitlines() if "<bool>" in ln and "--help" not in ln], cmd
    assert "EMBEDBATCH_INGEST" in run_cli(["poll", "--help"], env, tmp_path).stdout


# ---- #22.14: values that cannot work are refused before anything is sent ------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--log-level", "chatty", "list"], 2, "--log-level must be one of debug, info, warning, error"),
        (["serve", "--port", "99999"], 2, "--port must be 0-65535"),
        (["serve", "--faults", "bogus=1"], 2, "unknown fault 'bogus'; valid: create_delay_s"),
        (["serve", "--rpm", "-1"], 2, "--rpm must be at least 1"),
        (["serve", "--api-key", ","], 2, "--api-key names no key"),
        (["download-dataset", "--name", ""], 2, "--name is empty"),
        (["estimate", "{src}", "--fields", "text", "--config", "{tmp}/absent.yaml"], 2, "absent.yaml: no such file"),
        (["estimate", "{src}", "--fields", "text", "--truncate-chars", "-1"], 2, "--truncate-chars must be at least 1"),
        (["submit", "{src}", "--fields", "text", "--dimensions", "99999"], 2, "--dimensions 99999 is more than"),
        (
            ["submit", "{src}", "--fields", "text", "--output-expiry-days", "31"],
            2,
            "--output-expiry-days must be 1 to 30",
        ),
        (["estimate", "{tmp}/binary.jsonl", "--fields", "text"], 3, "its first bytes are binary"),
        (["serve", "--model", "{tmp}"], 2, "cannot load model"),
    ],
)
def test_values_that_cannot_work_are_one_line_errors(
    tmp_path: Path, ws: Workspace, server: ServerThread, args: list[str], code: int, message: str
) -> None:
    """Each is refused with one line and its documented exit code, and nothing reaches the
    provider (the server saw no file and no batch)."""
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "abcdef"}])
    (tmp_path / "binary.jsonl").write_bytes(b"\x00\x01\x02\xff\xfebinary")
    argv = [a.replace("{src}", str(src)).replace("{tmp}", str(tmp_path)) for a in args]
    r = run_cli(argv, cli_env(server, ws), tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert (code, 1) == (r.returncode, len(lines)), r.stderr
    assert message in lines[0] and "Traceback" not in r.stderr
    assert (0, 0) == (server.state.counts()["files"], server.state.counts()["batches"])


def test_message_content_parts_are_embedded_as_their_text(tmp_path: Path, ws: Workspace) -> None:
    """A chat message whose content is a list of parts is its text parts joined, never a
    Python repr; `--unit message` shows records, not rows, as sampled."""
    rows = [
        {
            "id": "c1",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {}}],
                },
                {"role": "assistant", "content": "hi there"},
            ],
        }
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    env = {**os.environ, "EMBEDBATCH_WORKSPACE": str(ws.root), "OPENAI_API_KEY": "sk-unused"}
    r = run_cli(["submit", str(src), "--dry-run", "--unit", "message", "--json"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert (1, 2, 2) == tuple(orjson.loads(r.stdout)[k] for k in ("rows_read", "prepared", "sampled"))
    (inp,) = ws.root.rglob("input.jsonl")
    texts = [orjson.loads(ln)["body"]["input"] for ln in inp.read_bytes().splitlines()]
    assert ["user: hello", "assistant: hi there"] == texts
    r = run_cli(["estimate", str(src), "--unit", "message"], {**env, "COLUMNS": "200"}, tmp_path)
    assert "records sampled" in r.stdout and "rows read" in r.stdout


# ---- #22.16: provider limits from the current reference ----------------------------------------


def test_output_expiry_is_sent_with_each_batch(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """--output-expiry-days N is sent as output_expires_after; the provider's output file
    expires N days after it is made (and run.json records N)."""
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    env = cli_env(server, ws)
    r = run_cli(
        ["run", str(src), "--fields", "title,body", "--output-expiry-days", "2", "--poll-seconds", "0.05"],
        env,
        tmp_path,
    )
    assert 0 == r.returncode, r.stderr
    (batch,) = server.state.batches.values()
    out = server.state.files[batch["output_file_id"]]
    assert out.expires_at is not None and 2 * 86_400 == out.expires_at - out.created_at
    (run_dir,) = [d for d in (ws.root / "batches").glob("*/*/run_*")]
    assert 2 == Run.read(ws.resolve_run(run_dir)).state.output_expiry_days


# ---- #23: ids, exports, waiting for cron, given-up ids ---------------------------------------------


def test_templated_duplicate_ids_are_an_input_error_naming_both_rows(tmp_path: Path, ws: Workspace) -> None:
    """`--id-template '{k}'` with two rows of the same k: exit 3 before anything is planned,
    naming the id and both lines (the check read the raw id field before)."""
    src = write_jsonl(
        tmp_path / "d.jsonl", [{"k": "a", "text": "one"}, {"k": "b", "text": "x"}, {"k": "a", "text": "two"}]
    )
    env = {**os.environ, "EMBEDBATCH_WORKSPACE": str(ws.root), "OPENAI_API_KEY": "sk-unused"}
    for cmd in (["estimate"], ["submit", "--dry-run"]):
        r = run_cli([*cmd, str(src), "--fields", "text", "--id-template", "{k}"], env, tmp_path)
        assert 3 == r.returncode, r.stderr
        assert f"'a' at {src}:1 and {src}:3" in r.stderr
    assert [] == list(ws.root.glob("batches/*/*/run_*/batch_*"))


def test_a_failed_re_export_leaves_the_old_export_whole(
    tmp_path: Path, ws: Workspace, server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export that dies half-way (here: the second chunk raises) leaves the previous export
    exactly as it was; a folder holding other files is refused, never emptied."""
    from embedbatch.store import export as export_mod

    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(30))
    env = cli_env(server, ws)
    assert 0 == run_cli(["run", str(src), "--fields", "title,body", "--poll-seconds", "0.05"], env, tmp_path).returncode
    out = tmp_path / "export"
    first = export_mod.export_dataset(ws, "text-embedding-3-small", "d", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = export_mod.iter_vector_chunks  # type: ignore[attr-defined]

    def dying(*args: Any, **kwargs: Any) -> Iterator[object]:
        for n, chunk in enumerate(real(*args, chunk_rows=10, **kwargs)):
            if n:
                raise KeyboardInterrupt  # the process stops half-way through the re-export
            yield chunk

    monkeypatch.setattr(export_mod, "iter_vector_chunks", dying)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export_dataset(ws, "text-embedding-3-small", "d", out, dtype="float16")
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}
    assert "float32" == first["dtype"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = run_cli(["export", "--dataset", "d", "--out", str(tmp_path / "mine")], env, tmp_path)
    assert 2 == r.returncode and "holds other files" in r.stderr
    assert "keep me" == (tmp_path / "mine" / "notes.txt").read_text()


def test_cancel_waits_for_a_run_that_a_cron_poll_holds(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`cancel` while a poll pass holds the run waits for it (EMBEDBATCH_LOCK_TIMEOUT_S), then
    cancels, instead of exiting 5 at once."""
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(4))
    env = cli_env(server, ws)
    server.state.faults.step_s = 600  # the batch stays in validation: there is something to cancel
    r = run_cli(["submit", str(src), "--fields", "title,body"], env, tmp_path)
    run_dir = r.stdout.strip().splitlines()[-1]
    poll = Paused(["poll"], env, tmp_path, "poll_before_save")
    cancel = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", "cancel", "--run-dir", run_dir],
        env={**env, "EMBEDBATCH_LOCK_TIMEOUT_S": "120"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with contextlib.suppress(subprocess.TimeoutExpired):
        cancel.wait(3)  # the old behaviour: exit 5 at once; waiting here cannot fail a correct build
    assert cancel.returncode is None, cancel.communicate()
    assert 0 == poll.release()[0]
    out, err = cancel.communicate(timeout=120)
    assert 0 == cancel.returncode, err
    assert "batch_001: cancelling" in out or "batch_001: cancelled" in out


def test_given_up_ids_are_listed_once(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Rows that fail on every attempt: retry.json lists each given-up id once (it listed an id
    once per batch that had tried it)."""
    server.state.faults.line_error_rate = 1.0
    src = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    env = cli_env(server, ws)
    r = run_cli(
        ["run", str(src), "--fields", "title,body", "--poll-seconds", "0.05", "--max-attempts", "3"], env, tmp_path
    )
    assert 8 == r.returncode, r.stderr
    (retry_json,) = ws.root.rglob("retry.json")
    assert ["doc-0", "doc-1", "doc-2"] == sorted(orjson.loads(retry_json.read_bytes())["given_up"])
