"""Run and batch state on disk (``run.json``, ``batch.json``), always written atomically.

States of a batch (``status``)::

    planned → uploaded → submitted → validating → in_progress → finalizing
        → completed | failed | expired | cancelled → downloaded → ingested

``pending`` records a remote call in flight (``upload`` or ``create``): it is written before the
call and cleared after, so a process killed in between leaves a trace that resume resolves by
looking the file up by name or the batch up by metadata instead of calling again.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from embedbatch import __version__
from embedbatch.workspace import RunPaths, atomic_write_json, read_json, utc_now

__all__ = [
    "ACTIVE",
    "REMOTE_TERMINAL",
    "BatchState",
    "RunState",
    "git_sha",
    "load_batches",
]

REMOTE_ACTIVE = ("submitted", "validating", "in_progress", "finalizing", "cancelling")
REMOTE_TERMINAL = ("completed", "failed", "expired", "cancelled")
ACTIVE = ("planned", "uploaded", *REMOTE_ACTIVE)
DONE = ("downloaded", "ingested")


def git_sha() -> str | None:
    """The git commit of the embedbatch checkout, if it is one."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass(kw_only=True)
class BatchState:
    """One batch as recorded in ``batch.json``.

    Attributes:
        requests / inputs: request lines and embedding inputs in ``input.jsonl``.
        bytes: size of ``input.jsonl`` in bytes.
        tokens: queue tokens (max of tokenizer count and bytes/4 per input).
        attempt: how many times a batch was created from this input (token_limit_exceeded
            re-queues create a new one).
        remote: the last batch object from the API (JSON).
    """

    name: str
    status: str = "planned"
    requests: int = 0
    inputs: int = 0
    bytes: int = 0
    tokens: int = 0
    tokenizer_tokens: int = 0
    file_id: str | None = None
    batch_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    remote_status: str | None = None
    pending: str | None = None
    attempt: int = 0
    retry_of: list[str] = field(default_factory=list)
    remote: dict[str, Any] | None = None
    usage_tokens: int | None = None
    succeeded: int | None = None
    failed: int | None = None
    error: str | None = None
    history: list[list[str]] = field(default_factory=list)
    updated_at: str | None = None

    @classmethod
    def load(cls, path: Path) -> BatchState:
        data = read_json(path)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, batch_dir: Path) -> None:
        self.updated_at = utc_now().isoformat()
        atomic_write_json(batch_dir / "batch.json", asdict(self))

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.history.append([status, utc_now().isoformat()])
            self.status = status

    @property
    def is_remote_active(self) -> bool:
        return self.status in REMOTE_ACTIVE


def load_batches(run: RunPaths) -> list[BatchState]:
    """Every batch of a run, in name order."""
    return [BatchState.load(run.batch_dir(n) / "batch.json") for n in run.batch_names()]


@dataclass(kw_only=True)
class RunState:
    """A run as recorded in ``run.json`` (no secrets: the API key and DSN passwords never go here).

    Attributes:
        status: ``active`` while batches are not all terminal and ingested, then ``finished``.
        max_enqueued_tokens: the queue budget poll schedules under (None: unlimited).
        estimate: tokens and USD (standard and batch) from planning.
        actual: ``usage.total_tokens`` summed from outputs, and its batch-price USD.
    """

    run_id: str
    model: str
    dataset: str
    source: str
    source_path: str
    dimensions: int | None = None
    completion_window: str = "24h"
    metadata: dict[str, str] = field(default_factory=dict)
    max_enqueued_tokens: int | None = None
    status: str = "active"
    kind: str = "batchapi"
    created_at: str = field(default_factory=lambda: utc_now().isoformat())
    args: dict[str, Any] = field(default_factory=dict)
    tool_version: str = __version__
    git_sha: str | None = None
    lockfile_sha256: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    intake: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)
    actual: dict[str, Any] = field(default_factory=dict)
    pg_target: dict[str, Any] | None = None
    pg: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    local: dict[str, Any] = field(default_factory=dict)
    updated_at: str | None = None

    @classmethod
    def load(cls, run: RunPaths) -> RunState:
        data = read_json(run.run_json)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, run: RunPaths) -> None:
        self.updated_at = utc_now().isoformat()
        atomic_write_json(run.run_json, asdict(self))


def lockfile_sha256() -> str | None:
    """sha256 of the project's pyproject.toml (our lock of dependency ranges), if found."""
    import hashlib

    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def crash_point(name: str) -> None:
    """Test hook: ``EMBEDBATCH_CRASH_AT=name`` kills this process with SIGKILL here, so the
    crash-safety tests can stop a real subprocess at exact points between state writes and
    remote calls. Does nothing unless the variable names this point."""
    if os.environ.get("EMBEDBATCH_CRASH_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
