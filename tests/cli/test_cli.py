"""The installed CLI as a user meets it: usage errors, error lines, version, Ctrl-C, inputs
that would leave lying state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from embedbatch.server import ServerThread
from embedbatch.workspace import Workspace
from tests.conftest import cli_env, run_cli, sample_rows, write_jsonl


def _env(ws: Workspace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EMBEDBATCH_"))}
    return {**env, "EMBEDBATCH_WORKSPACE": str(ws.root)}


def test_usage_errors_exit_2_without_traceback(tmp_path: Path, ws: Workspace) -> None:
    """An unknown option, an unknown command, a bad number, a missing argument: click's
    one-line message, exit 2, no traceback."""
    for args in (["submit", "--bogus"], ["nosuch"], ["estimate", "x.jsonl", "--n", "abc"], ["ingest"]):
        r = run_cli(args, _env(ws), tmp_path)
        assert 2 == r.returncode, (args, r.stderr)
        assert "Traceback" not in r.stderr and "Error:" in r.stderr


def test_version_and_markup_in_messages(tmp_path: Path, ws: Workspace) -> None:
    """`--version` prints the version; an error naming `[/x]` prints it as it is."""
    r = run_cli(["--version"], _env(ws), tmp_path)
    assert (0, "embedbatch 0.1.0") == (r.returncode, r.stdout.strip())
    r = run_cli(["status", "--run-dir", str(tmp_path / "[/x]")], _env(ws), tmp_path)
    assert 5 == r.returncode
    assert "[/x]" in r.stderr and "MarkupError" not in r.stderr


def test_no_key_plans_nothing_and_empty_input_is_an_error(tmp_path: Path, ws: Workspace) -> None:
    """Without OPENAI_API_KEY, submit says so and leaves no run; an empty input is an error
    (exit 3) and leaves no run either."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    r = run_cli(["submit", str(path), "--fields", "title,body"], _env(ws), tmp_path)
    assert 2 == r.returncode and "OPENAI_API_KEY is not set" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    r = run_cli(["submit", str(empty), "--dry-run"], _env(ws), tmp_path)
    assert 3 == r.returncode and "no rows to embed" in r.stderr
    assert [] == ws.all_runs()
    assert [] == list(ws.root.glob("batches/*/*/*.partial"))


def test_misspelled_field_costs_nothing(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`--fields title,bdy` and a `{tilte}` placeholder exit 3 naming the fields that exist;
    nothing reaches the provider."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    r = run_cli(["submit", str(path), "--fields", "title,bdy"], cli_env(server, ws), tmp_path)
    assert 3 == r.returncode
    assert "did you mean 'body'" in r.stderr
    r = run_cli(["submit", str(path), "--template", "T: {tilte}\\n{body}"], cli_env(server, ws), tmp_path)
    assert 3 == r.returncode
    assert "placeholder 'tilte' is in no row" in r.stderr and "did you mean 'title'" in r.stderr
    assert ([], {}) == (list(server.state.files), server.state.batches)


def test_ctrl_c_says_how_to_resume(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """SIGINT during `poll --watch` exits 130 with a line saying how to resume."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedbatch", "--log-format", "json", "poll", "--watch", "30"],
        env=cli_env(server, ws),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the first pass has run: the process is in its sleep
    assert "poll pass" in line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert 130 == proc.returncode
    assert "interrupted; everything done so far is on disk" in err


def test_db_init_from_a_built_wheel_in_a_fresh_venv(tmp_path: Path, pg_dsn: str) -> None:
    """The wheel, installed (not editable) into a fresh virtual environment, runs `db init`:
    the migrations ship inside the package."""
    import zipfile

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"), str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert 0 == r.returncode, r.stderr
    (wheel,) = (tmp_path / "w").glob("embedbatch-*.whl")
    assert "embedbatch/db/migrations/001_knowledge_chunks.sql" in zipfile.ZipFile(wheel).namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert 0 == r.returncode, r.stderr[-2000:]
    r = subprocess.run(
        [str(venv / "bin" / "embedbatch"), "db", "init", "--dsn", pg_dsn],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert 0 == r.returncode, r.stderr
    assert "applied 001_knowledge_chunks.sql, 002_knowledge_chunks_hnsw.sql" in r.stdout


def test_status_below_a_terminal_is_plain_lines(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Piped, `status` prints one line per run and per batch with the whole run directory."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(4))
    env = cli_env(server, ws)
    r = run_cli(["submit", str(path), "--fields", "title,body", "--max-requests-per-batch", "2"], env, tmp_path)
    run_dir = r.stdout.strip().splitlines()[-1]
    r = run_cli(["status", "--offline"], {**env, "COLUMNS": "40"}, tmp_path)
    lines = r.stdout.splitlines()
    assert 3 == len(lines)
    assert lines[0].startswith("run ") and lines[0].endswith(f"dir={run_dir}")
    assert [True, True] == [ln.startswith("  batch batch_00") for ln in lines[1:]]


def test_unreachable_provider_fails_fast_naming_the_url(tmp_path: Path, ws: Workspace) -> None:
    """Nothing listens at OPENAI_BASE_URL: submit gives up after a few tries (not minutes of
    retries), names the URL and the setting, exits 6, and says how to continue the planned run."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(2))
    env = {**_env(ws), "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}
    env["EMBEDBATCH_RETRY_INITIAL_S"] = "0.01"
    r = run_cli(["--log-format", "json", "submit", str(path), "--fields", "title,body"], env, tmp_path)
    assert 6 == r.returncode
    assert "cannot reach the provider at http://127.0.0.1:1/v1" in r.stderr and "OPENAI_BASE_URL" in r.stderr
    (run,) = ws.all_runs()
    assert f"embedbatch submit --resume {run.root}" in r.stderr
    # The upload's one retry first looks for a committed file, whose own 3 retries find the
    # provider unreachable: 4 retries in all, not the 8-attempt budget of each call.
    assert 4 == r.stderr.count('"event": "retrying"')
    # Submitting the same rows again points to the run that already holds them.
    r = run_cli(["submit", str(path), "--fields", "title,body"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert f"2 of them are planned in an unfinished run; continue it with: embedbatch submit --resume {run.root}" in (
        r.stdout
    )


def test_every_option_reads_its_environment_variable(tmp_path: Path, ws: Workspace) -> None:
    """EMBEDBATCH_<OPTION> sets an option (EMBEDBATCH_FIELDS, EMBEDBATCH_JSON); --help names it."""
    import orjson

    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    env = {**_env(ws), "EMBEDBATCH_FIELDS": "title,body", "EMBEDBATCH_JSON": "1"}
    r = run_cli(["estimate", str(path)], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    assert 3 == orjson.loads(r.stdout)["sampled"]
    r = run_cli(["estimate", "--help"], {**_env(ws), "COLUMNS": "250"}, tmp_path)
    assert "env var: EMBEDBATCH_FIELDS" in r.stdout


def test_file_expiry_days_reaches_the_upload(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`--file-expiry-days 2` uploads input files that the provider expires two days later;
    out of range (31) is a usage error before anything is planned."""
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(2))
    env = cli_env(server, ws)
    r = run_cli(["submit", str(path), "--fields", "title,body", "--file-expiry-days", "31"], env, tmp_path)
    assert 2 == r.returncode and "--file-expiry-days must be 1 to 30" in r.stderr
    r = run_cli(["submit", str(path), "--fields", "title,body", "--file-expiry-days", "2"], env, tmp_path)
    assert 0 == r.returncode, r.stderr
    (f,) = [f for f in server.state.files.values() if f.purpose == "batch"]
    assert 2 * 86_400 == (f.expires_at or 0) - f.created_at
