"""The state a run keeps on disk, as typed records: ``run.json`` (:class:`RunState`, with the
sink sections as :class:`SinkState`) and each ``batch.json`` (:class:`BatchState`).

Only :class:`embedbatch.runs.Run` writes them (the ``_write`` methods are its own); everyone
imports these names from :mod:`embedbatch.runs`, which owns run state.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from embedbatch._version import __version__
from embedbatch.errors import StateError
from embedbatch.workspace import RunPaths, atomic_write_json, read_json, utc_now

__all__ = [
    "ACTIVE",
    "DONE",
    "FINAL",
    "RECORDS_FILE",
    "REMOTE_ACTIVE",
    "REMOTE_TERMINAL",
    "BatchState",
    "RunState",
    "SinkState",
    "git_sha",
    "last_saved_run",
    "load_batches",
    "lockfile_sha256",
    "note_run",
    "read_record_ids",
    "read_records_table",
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

    def _write(self, batch_dir: Path) -> None:  # only Run writes (under the run lock)
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
class SinkState:
    """Progress of one database target of a run (``run.json`` ``pg`` / ``libsql``).

    Attributes:
        status: None before the first write, ``pending`` (new rows to write), ``done`` or
            ``failed`` (``error`` says why; the next ingest or run resumes).
        progress: shard file → rows of that shard written and committed (resume point).
        pending_indexes: vector indexes dropped for a bulk write and not yet rebuilt
            (``name``, ``definition``): a crash between the two rebuilds them on resume.
        totals: rows ``written``, ``missing_ids`` (not in the table), ``skipped_has_vector``,
            ``refused`` (libSQL: wrong dimension or non-finite), over every pass.
        version: the layout of this section (1).
    """

    status: str | None = None
    progress: dict[str, int] = field(default_factory=dict)
    pending_indexes: list[dict[str, str]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    version: int = 1

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SinkState:
        """From run.json (an empty or missing section is a fresh state)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


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
    pg: SinkState = field(default_factory=lambda: SinkState())
    libsql_target: dict[str, Any] | None = None
    libsql: SinkState = field(default_factory=lambda: SinkState())
    timings: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    local: dict[str, Any] = field(default_factory=dict)
    realtime: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None
    failed_reasons: dict[str, int] = field(default_factory=dict)
    updated_at: str | None = None

    @classmethod
    def load(cls, run: RunPaths) -> RunState:
        """Read ``run.json`` (unknown keys are ignored; sink sections become :class:`SinkState`).

        Raises:
            StateError: missing or not valid JSON.
        """
        data = read_json(run.run_json)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("pg", "libsql"):
            values[name] = SinkState.from_json(values.get(name))
        return cls(**values)

    def _write(self, run: RunPaths) -> None:  # only Run writes (under the run lock)
        self.updated_at = utc_now().isoformat()
        atomic_write_json(run.run_json, asdict(self))
        note_run(run, self.kind)

    @property
    def sinks_pending(self) -> bool:
        """A database target of the run (pgvector, libSQL) has rows still to write."""
        pg = self.pg_target is not None and self.pg.status != "done"
        lib = self.libsql_target is not None and self.libsql.status != "done"
        return pg or lib

    @property
    def is_open(self) -> bool:
        """Whether the run still has work: an active Batch API run, a running (or interrupted,
        not yet resumed) streaming run, or any run whose database writes are not done. Open
        runs are the ones in the open-runs index; ``dry-run`` and ``finished`` ones are not."""
        if self.status in ("active", "running"):
            return True
        if self.status == "interrupted" and not (self.failure or {}).get("resumed_by"):
            return True
        return self.status not in ("dry-run",) and self.sinks_pending

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
