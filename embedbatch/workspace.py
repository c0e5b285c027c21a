"""Every on-disk path of the workspace, atomic writes, and locks.

Layout (root: ``--workspace`` / EMBEDBATCH_WORKSPACE)::

    batches/{model}/{dataset}/run_<UTC stamp>/run.json, rejected.jsonl, run.lock
        batches/batch_NNN/input.jsonl records.parquet batch.json output.jsonl errors.jsonl failed_ids.tsv
    embeddings/{model}/{dataset}/shard-NNNNN.parquet
    indexes/{model}/{dataset}/manifest.json, dataset.lock, ids/shard-NNNNN.parquet (id index)
        .active/{model}/{dataset}/run_<stamp>.json (open-runs index)
    cache/  logs/  workspace.lock
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from embedbatch.errors import LockedError, StateError, UsageError

__all__ = [
    "RunPaths",
    "Workspace",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_component",
    "crash_point",
    "file_lock",
    "fsync_dir",
    "read_json",
    "utc_now",
    "utc_stamp",
]

_BAD_COMPONENT = re.compile(r"[\x00-\x1f/\\]")


def check_component(name: str, what: str) -> str:
    """Return ``name`` if it is a safe single path component, else raise.

    Raises:
        UsageError: empty, ``.``/``..``, contains ``/``, ``\\`` or control characters.
    """
    if not name or name in {".", ".."} or _BAD_COMPONENT.search(name) or name.startswith("."):
        raise UsageError(f"invalid {what} name {name!r}: it must be one path component (no '/', '..')")
    return name


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def utc_stamp() -> str:
    """A run stamp like ``20261122T020631Z_123456`` (sortable, unique per microsecond)."""
    now = utc_now()
    return now.strftime("%Y%m%dT%H%M%SZ_") + f"{now.microsecond:06d}"


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that renames into it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """Open a temp file for streaming writes; on clean exit fsync and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    """Read a JSON file written by :func:`atomic_write_json`.

    Raises:
        StateError: missing or not valid JSON.
    """
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise StateError(f"{path}: missing") from exc
    except orjson.JSONDecodeError as exc:
        raise StateError(f"{path}: not valid JSON ({exc})") from exc


@contextlib.contextmanager
def file_lock(
    path: Path, *, what: str, blocking: bool = False, timeout_s: float | None = None, purpose: str = ""
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block.

    The lock dies with the process, so a ``kill -9`` never leaves a stale lock. The holder writes
    ``pid purpose`` into the file, so a waiter's error can say who holds it.

    Args:
        blocking: wait as long as it takes.
        timeout_s: wait up to this many seconds (polling every 50-500 ms); None and not
            ``blocking``: fail at once.

    Raises:
        LockedError: another process holds it (past ``timeout_s``, or at once).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        delay = 0.05
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                break
            except BlockingIOError as exc:
                waited = time.monotonic() - started
                if timeout_s is None or waited >= timeout_s:
                    holder = _lock_holder(path)
                    after = f" after waiting {waited:.0f} s" if timeout_s else ""
                    raise LockedError(f"{what} is locked by another process{holder}{after} ({path})") from exc
                time.sleep(min(delay, max(0.0, timeout_s - waited)))
                delay = min(delay * 2, 0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {purpose}".strip().encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    if not text:
        return ""
    pid, _, purpose = text.partition(" ")
    return f" (pid {pid}{': ' + purpose if purpose else ''})"


def crash_point(name: str) -> None:
    """Test hook at a step boundary, so tests can drive real processes to exact points.

    ``EMBEDBATCH_CRASH_AT=name`` kills this process with SIGKILL here (crash safety).
    ``EMBEDBATCH_PAUSE_AT=name:DIR`` touches ``DIR/name.ready`` and waits until ``DIR/name.go``
    exists (overlap: a second process runs while this one stands here, holding its locks).
    Does nothing unless a variable names this point. These two test variables are the only
    environment reads outside :class:`embedbatch.config.Settings`.
    """
    if os.environ.get("EMBEDBATCH_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, folder = os.environ.get("EMBEDBATCH_PAUSE_AT", "").partition(":")
    if point == name and folder:
        Path(folder, f"{name}.ready").touch()
        while not Path(folder, f"{name}.go").exists():
            time.sleep(0.01)


@dataclass(frozen=True)
class RunPaths:
    """Paths inside one run directory ``batches/{model}/{dataset}/run_<stamp>/``."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected.jsonl"

    @property
    def failed_ids(self) -> Path:
        return self.root / "failed_ids.tsv"

    @property
    def rows(self) -> Path:
        """Realtime runs: the prepared rows still to embed (removed when the run finishes)."""
        return self.root / "rows.jsonl"

    @property
    def failed_rows(self) -> Path:
        """Realtime runs: the prepared rows listed in failed_ids.tsv (what ``retry`` sends)."""
        return self.root / "failed_rows.jsonl"

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def index_entry(self) -> Path:
        """This run's entry in the workspace's open-runs index:
        ``batches/.active/{model}/{dataset}/{run_id}.json`` (see :class:`embedbatch.runs.OpenRuns`).
        A run being planned in ``run_<stamp>.partial`` has the entry of its final name."""
        name = self.root.name.removesuffix(".partial")
        dataset, model = self.root.parent, self.root.parent.parent
        return model.parent / ".active" / model.name / dataset.name / f"{name}.json"

    def batch_dir(self, name: str) -> Path:
        return self.root / "batches" / name

    def batch_names(self) -> list[str]:
        base = self.root / "batches"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and (p / "batch.json").exists())


@dataclass(frozen=True)
class Workspace:
    """The workspace root and the paths below it; model and dataset names are checked.

    Attributes:
        lock_timeout_s: how long a command waits for a dataset lock that another process holds
            (seconds; env ``EMBEDBATCH_LOCK_TIMEOUT_S`` through :class:`Settings`).
    """

    root: Path
    lock_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    def runs_dir(self, model: str, dataset: str) -> Path:
        return self.root / "batches" / check_component(model, "model") / check_component(dataset, "dataset")

    def new_run(self, model: str, dataset: str) -> RunPaths:
        """A fresh run directory path (not created) named by the current UTC time."""
        return RunPaths(self.runs_dir(model, dataset) / f"run_{utc_stamp()}")

    def all_runs(self) -> list[RunPaths]:
        """Every run directory that has a run.json, oldest first."""
        base = self.root / "batches"
        if not base.is_dir():
            return []
        runs = [RunPaths(p.parent) for p in base.glob("*/*/run_*/run.json")]
        return sorted(runs, key=lambda r: r.root.name)

    def shards_dir(self, model: str, dataset: str) -> Path:
        return self.root / "embeddings" / check_component(model, "model") / check_component(dataset, "dataset")

    def manifest_path(self, model: str, dataset: str) -> Path:
        return (
            self.root
            / "indexes"
            / check_component(model, "model")
            / check_component(dataset, "dataset")
            / "manifest.json"
        )

    def index_dir(self, model: str, dataset: str) -> Path:
        """The id index files of (model, dataset): ``indexes/{model}/{dataset}/ids/``."""
        return self.manifest_path(model, dataset).with_name("ids")

    def datasets(self) -> list[tuple[str, str]]:
        """(model, dataset) pairs that have a manifest."""
        base = self.root / "indexes"
        if not base.is_dir():
            return []
        return sorted((p.parent.parent.name, p.parent.name) for p in base.glob("*/*/manifest.json"))

    @property
    def lock(self) -> Path:
        return self.root / "workspace.lock"

    @property
    def open_runs_dir(self) -> Path:
        """The open-runs index: ``batches/.active/`` (one small entry per run not yet done)."""
        return self.root / "batches" / ".active"

    def resolve_run(self, run_dir: Path) -> RunPaths:
        """A run directory given by the user.

        Raises:
            StateError: it has no run.json.
        """
        paths = RunPaths(Path(run_dir).absolute())
        if not paths.run_json.exists():
            raise StateError(f"{run_dir}: not a run directory (no run.json)")
        return paths
