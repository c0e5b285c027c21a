"""Run state: ``run.json`` and every ``batch.json`` of a run, owned by :class:`Run`.

Every engine keeps its runs here. A command loads a run once (:meth:`Run.open`, under the run
lock, or :meth:`Run.read`, a read-only snapshot), changes it through the objects it holds, and
saves through :meth:`Run.save` / :meth:`Run.save_batch`, which refuse without the lock. Files
are written atomically; nothing else writes them.

States of a batch (``status``)::

    planned → uploaded → submitted → validating → in_progress → finalizing
        → completed | failed | expired | cancelled → downloaded → ingested

``pending`` records a remote call in flight (``upload`` or ``create``): it is written before the
call and cleared after, so a process killed in between leaves a trace that resume resolves by
looking the file up by name or the batch up by metadata instead of calling again.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from embedbatch._version import __version__
from embedbatch.errors import StateError
from embedbatch.workspace import RunPaths, atomic_write_json, crash_point, file_lock, read_json, utc_now

__all__ = [
    "ACTIVE",
    "FINAL",
    "REMOTE_ACTIVE",
    "REMOTE_TERMINAL",
    "BatchState",
    "Run",
    "RunState",
    "crash_point",
    "git_sha",
    "load_batches",
]

REMOTE_ACTIVE = ("submitted", "validating", "in_progress", "finalizing", "cancelling")
REMOTE_TERMINAL = ("completed", "failed", "expired", "cancelled")
ACTIVE = ("planned", "uploaded", *REMOTE_ACTIVE)
DONE = ("downloaded", "ingested")
FINAL = ("ingested", "cancelled")  # nothing more will happen to the batch


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
        not_before: ISO time before which a re-queued batch is not created again (back-off).
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
    not_before: str | None = None
    cleaned: bool = False
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


# A batch's records, row for row with its input file: id, split, metadata, token count. Written
# by the Batch API engine's planning; read by ingest, retry and by every engine's "which rows are
# planned" check (embedbatch.planned), so the file's name and its id reader live here.
RECORDS_FILE = "records.parquet"


def read_records_table(batch_dir: Path, columns: list[str] | None = None) -> Any:
    """A batch's ``records.parquet`` as an Arrow table (``columns``: only these).

    Raises:
        StateError: the file is missing or unreadable.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = batch_dir / RECORDS_FILE
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise StateError(f"{path}: cannot read the batch's records ({exc})") from exc


def read_record_ids(batch_dir: Path) -> list[str]:
    """Only the ``id`` column of a batch's records, in input order.

    Raises:
        StateError: the file is missing or unreadable.
    """
    ids: list[str] = read_records_table(batch_dir, ["id"]).column("id").to_pylist()
    return ids


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
        counts: ``failed`` is the rows still failed (in failed_ids.tsv: a retry that succeeded
            takes a row out), ``succeeded``, ``planned``, ``retried``…
        failed_reasons: the most common reasons of the rows still failed, with their counts.
        failure: the last error a poll pass hit on this run (``error``, ``at``, ``attempts``,
            ``retry_after``: ISO time before which cron passes leave the run alone); None once a
            pass succeeds.
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
    file_expiry_days: int | None = None
    output_expiry_days: int | None = None
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
    libsql_target: dict[str, Any] | None = None
    libsql: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    local: dict[str, Any] = field(default_factory=dict)
    realtime: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None
    failed_reasons: dict[str, int] = field(default_factory=dict)
    updated_at: str | None = None

    @classmethod
    def load(cls, run: RunPaths) -> RunState:
        data = read_json(run.run_json)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, run: RunPaths) -> None:
        self.updated_at = utc_now().isoformat()
        atomic_write_json(run.run_json, asdict(self))
        note_run(run, self.kind)

    @property
    def failed_rows(self) -> int:
        """Rows of this run that are still failed (0 while none is recorded)."""
        return int(self.counts.get("failed") or 0)

    @property
    def outcome(self) -> str:
        """The status as people read it: ``finished with failures`` for a finished run that
        still has failed rows, else :attr:`status` (``active``, ``finished``, ``interrupted``…)."""
        if self.status == "finished" and self.failed_rows:
            return "finished with failures"
        resumed_by = (self.failure or {}).get("resumed_by") if self.status == "interrupted" else None
        if resumed_by:
            return f"interrupted, resumed by {resumed_by}"
        return self.status


_last_saved: tuple[RunPaths, str] | None = None


def note_run(paths: RunPaths, kind: str) -> None:
    """Remember the run this process is working on (every run.json write does; planning calls
    it again once its partial folder is renamed into place)."""
    global _last_saved
    _last_saved = (paths, kind)


def last_saved_run() -> tuple[RunPaths, str] | None:
    """The run this process last wrote, and its kind (``batchapi``, ``realtime``, ``local``):
    what an interrupted command names in its hint; None when it wrote no run."""
    return _last_saved


def lockfile_sha256() -> str | None:
    """sha256 of the project's pyproject.toml (our lock of dependency ranges), if found."""
    import hashlib

    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Run:
    """One run loaded once: its :class:`RunState` and its batches, in name order.

    Get one with :meth:`open` (holds the run lock: the only way to change a run) or
    :meth:`read` (a snapshot; saving raises).
    """

    def __init__(self, paths: RunPaths, state: RunState, batches: list[BatchState], *, writable: bool) -> None:
        self.paths = paths
        self.state = state
        self.batches = batches
        self.writable = writable

    @classmethod
    def read(cls, paths: RunPaths) -> Run:
        """A read-only snapshot (atomic files: consistent per file without the lock).

        Raises:
            StateError: run.json or a batch.json is missing or unreadable.
        """
        return cls(paths, RunState.load(paths), load_batches(paths), writable=False)

    @classmethod
    @contextlib.contextmanager
    def open(cls, paths: RunPaths, *, wait_s: float | None = None, purpose: str = "") -> Iterator[Run]:
        """Hold the run lock and load the run; the state is settled first (see :meth:`settle`).

        Args:
            wait_s: wait this long for another process to release the run (None: fail at once).

        Raises:
            LockedError: another process holds the run.
            StateError: run.json or a batch.json is unreadable.
        """
        with file_lock(paths.lock, what=f"run {paths.run_id}", timeout_s=wait_s, purpose=purpose):
            run = cls(paths, RunState.load(paths), load_batches(paths), writable=True)
            if run.settle():
                run.save()
            yield run
            run.writable = False

    @property
    def run_id(self) -> str:
        return self.state.run_id

    def batch_dir(self, bs: BatchState) -> Path:
        return self.paths.batch_dir(bs.name)

    def _check(self) -> None:
        if not self.writable:
            raise StateError(f"run {self.run_id}: state changed without holding the run lock")

    def save(self) -> None:
        """Write run.json (atomically).

        Raises:
            StateError: the run lock is not held.
        """
        self._check()
        self.state.save(self.paths)

    def save_batch(self, bs: BatchState) -> None:
        """Write one batch.json (atomically).

        Raises:
            StateError: the run lock is not held.
        """
        self._check()
        bs.save(self.batch_dir(bs))

    def add_batches(self, new: list[BatchState]) -> None:
        """Take batches whose files and batch.json were just written (retry) into the run."""
        self._check()
        self.batches.extend(new)
        self.batches.sort(key=lambda b: b.name)

    @property
    def finished(self) -> bool:
        """Every batch is final (ingested or cancelled), and a database sink, if any, is done."""
        sink_done = (not self.state.pg_target or self.state.pg.get("status") == "done") and (
            not self.state.libsql_target or self.state.libsql.get("status") == "done"
        )
        return sink_done and all(bs.status in FINAL for bs in self.batches)

    def settle(self) -> bool:
        """Derive ``active``/``finished`` from the batches (a run whose process died between
        writing batches and run.json is put right). Returns True if the status changed."""
        if self.state.kind != "batchapi" or self.state.status not in ("active", "finished"):
            return False
        status = "finished" if self.finished else "active"
        changed = status != self.state.status
        self.state.status = status
        return changed

    def totals(self, batches: list[BatchState] | None = None) -> dict[str, Any]:
        """Per-run totals from its batches (what ``status`` prints and stores)."""
        batches = self.batches if batches is None else batches
        by_status: dict[str, int] = {}
        for bs in batches:
            by_status[bs.status] = by_status.get(bs.status, 0) + 1
        return {
            "batches": len(batches),
            "by_status": by_status,
            "requests": sum(bs.requests for bs in batches),
            "succeeded": sum(bs.succeeded or 0 for bs in batches),
            "failed": sum(bs.failed or 0 for bs in batches),
            "queue_tokens": sum(bs.tokens for bs in batches),
            "enqueued_tokens": sum(bs.tokens for bs in batches if bs.status in REMOTE_ACTIVE),
        }
