"""Run state: ``run.json`` and every ``batch.json`` of a run, owned by :class:`Run`.

Every engine keeps its runs here, and this module is the only writer of their state. A run
starts with :meth:`Run.create` (every engine); a command loads it once (:meth:`Run.open`, under
the run lock, or :meth:`Run.read`, a read-only snapshot), changes it through the objects it
holds, and saves through :meth:`Run.save` / :meth:`Run.save_batch`, which refuse without the
lock. Files are written atomically.

The open-runs index (:class:`OpenRuns`, ``batches/.active/``) holds one small entry per run that
is not done yet, written by the same saves under the same lock: cron's poll, the queue budget and
the "already planned" check read it instead of opening every run of the workspace, so their cost
follows the open runs, not the thousands of finished ones.

States of a batch (``status``)::

    planned → uploaded → submitted → validating → in_progress → finalizing
        → completed | failed | expired | cancelled → downloaded → ingested

``pending`` records a remote call in flight (``upload`` or ``create``): it is written before the
call and cleared after, so a process killed in between leaves a trace that resume resolves by
looking the file up by name or the batch up by metadata instead of calling again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from embedbatch.errors import StateError
from embedbatch.runstate import (
    ACTIVE,
    DONE,
    FINAL,
    RECORDS_FILE,
    REMOTE_ACTIVE,
    REMOTE_TERMINAL,
    BatchState,
    RunState,
    SinkState,
    git_sha,
    last_saved_run,
    load_batches,
    lockfile_sha256,
    note_run,
    read_record_ids,
    read_records_table,
)
from embedbatch.workspace import (
    RunPaths,
    Workspace,
    atomic_write_json,
    check_component,
    crash_point,
    file_lock,
    read_json,
    utc_now,
)

# Run state is imported from here; the typed records live in embedbatch.runstate.
__all__ = [
    "ACTIVE",
    "DONE",
    "FINAL",
    "RECORDS_FILE",
    "REMOTE_ACTIVE",
    "REMOTE_TERMINAL",
    "BatchState",
    "OpenEntry",
    "OpenRuns",
    "Run",
    "RunState",
    "SinkState",
    "crash_point",
    "git_sha",
    "last_saved_run",
    "load_batches",
    "lockfile_sha256",
    "note_run",
    "read_record_ids",
    "read_records_table",
    "shown_runs",
]


class Run:
    """One run loaded once: its :class:`RunState` and its batches, in name order.

    Get one with :meth:`create` (a new run), :meth:`open` (holds the run lock: the only way to
    change a run) or :meth:`read` (a snapshot; saving raises).
    """

    def __init__(self, paths: RunPaths, state: RunState, batches: list[BatchState], *, writable: bool) -> None:
        self.paths = paths
        self.state = state
        self.batches = batches
        self.writable = writable
        self._entry: dict[str, Any] | None = None  # the index entry as last written or read

    @classmethod
    def read(cls, paths: RunPaths) -> Run:
        """A read-only snapshot (atomic files: consistent per file without the lock).

        Raises:
            StateError: run.json or a batch.json is missing or unreadable.
        """
        return cls(paths, RunState.load(paths), load_batches(paths), writable=False)

    @classmethod
    def read_state(cls, paths: RunPaths) -> RunState | None:
        """Only ``run.json`` of a run, for readers that need no batch; None when it is missing
        or unreadable (a run being created, or a damaged one that ``verify`` reports)."""
        try:
            return RunState.load(paths)
        except (StateError, OSError):
            return None

    @classmethod
    def create(
        cls, paths: RunPaths, state: RunState, *, batches: list[BatchState] | None = None, staging: Path | None = None
    ) -> None:
        """Write a new run: its batches' ``batch.json``, its index entry, then ``run.json``.

        Every engine starts its runs here. The index entry is written before run.json, so an
        open run is never missing from :class:`OpenRuns` (an entry without its run is skipped
        by readers and removed by the next plan of the dataset).

        Args:
            batches: batch states whose files are already in place (Batch API planning).
            staging: write into this folder instead of ``paths.root`` (planning builds a run
                in ``run_<stamp>.partial`` and renames it into place); the index entry is
                ``paths``'s either way.
        """
        where = RunPaths(staging) if staging is not None else paths
        where.root.mkdir(parents=True, exist_ok=True)
        for bs in batches or []:
            bs._write(where.batch_dir(bs.name))
        run = cls(paths, state, list(batches or []), writable=True)
        if state.kind == "batchapi":
            state.actual["status_totals"] = run.totals()
        run._sync_entry()
        state._write(where)
        if staging is None:
            note_run(paths, state.kind)

    @classmethod
    @contextlib.contextmanager
    def open(cls, paths: RunPaths, *, wait_s: float | None = None, purpose: str = "") -> Iterator[Run]:
        """Hold the run lock and load the run; the state is settled first (see :meth:`settle`)
        and its open-runs index entry put right (a process that died between the two writes).

        Args:
            wait_s: wait this long for another process to release the run (None: fail at once).

        Raises:
            LockedError: another process holds the run.
            StateError: run.json or a batch.json is unreadable.
        """
        with file_lock(paths.lock, what=f"run {paths.run_id}", timeout_s=wait_s, purpose=purpose):
            run = cls(paths, RunState.load(paths), load_batches(paths), writable=True)
            run._entry = OpenRuns.read_entry(paths)
            if run.settle():
                run.save()
            else:
                run._sync_entry()
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
        """Write run.json (atomically, with a Batch API run's ``actual.status_totals`` from its
        batches) and keep the run's open-runs index entry in step: an open run's entry is
        written first, a closed run's entry removed after.

        Raises:
            StateError: the run lock is not held.
        """
        self._check()
        if self.state.kind == "batchapi":
            self.state.actual["status_totals"] = self.totals()
        if self.state.is_open:
            self._sync_entry()
            self.state._write(self.paths)
        else:
            self.state._write(self.paths)
            self._sync_entry()

    def save_batch(self, bs: BatchState) -> None:
        """Write one batch.json (atomically); the index entry follows when the run's queue
        (tokens and requests the provider holds) changed.

        Raises:
            StateError: the run lock is not held.
        """
        self._check()
        bs._write(self.batch_dir(bs))
        self._sync_entry()

    def add_batches(self, new: list[BatchState]) -> None:
        """Take batches whose files were just written (retry) into the run: writes their
        batch.json (status planned)."""
        self._check()
        for bs in new:
            bs._write(self.batch_dir(bs))
        self.batches.extend(new)
        self.batches.sort(key=lambda b: b.name)

    def queue(self) -> tuple[int, int]:
        """Queue tokens and requests of this run's batches that the provider holds now."""
        active = [bs for bs in self.batches if bs.status in REMOTE_ACTIVE]
        return sum(bs.tokens for bs in active), sum(bs.requests for bs in active)

    def _entry_now(self) -> dict[str, Any] | None:
        rs = self.state
        if not rs.is_open:
            return None
        tokens, requests = self.queue()
        return {
            "kind": rs.kind,
            "status": rs.status,
            "model": rs.model,
            "dataset": rs.dataset,
            "queue_tokens": tokens,
            "queue_requests": requests,
            "retry_after": (rs.failure or {}).get("retry_after") if rs.kind == "batchapi" else None,
        }

    def _sync_entry(self) -> None:
        entry = self._entry_now()
        if entry == self._entry:
            return
        OpenRuns.write_entry(self.paths, entry)
        self._entry = entry

    @property
    def finished(self) -> bool:
        """Every batch is final (ingested or cancelled), and a database sink, if any, is done."""
        return not self.state.sinks_pending and all(bs.status in FINAL for bs in self.batches)

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
            # Created → completed at the provider, seconds, per completed batch (the metrics
            # histogram reads these here, so it never opens a finished run's batches).
            "batch_seconds": [
                float(r["completed_at"]) - float(r["created_at"])
                for bs in batches
                if (r := bs.remote or {}).get("completed_at") and r.get("created_at")
            ],
        }


@dataclass(frozen=True)
class OpenEntry:
    """One run of the open-runs index: where it is and what a pass needs without opening it.

    Attributes:
        queue_tokens / queue_requests: the run's batches the provider holds now (tokens by the
            queue count, requests), as of the run's last save.
        retry_after: ISO time before which poll leaves a run whose last pass failed alone.
    """

    paths: RunPaths
    kind: str
    status: str
    model: str
    dataset: str
    queue_tokens: int = 0
    queue_requests: int = 0
    retry_after: str | None = None


class OpenRuns:
    """The workspace's open-runs index: ``batches/.active/{model}/{dataset}/{run_id}.json``.

    One entry per run that :attr:`RunState.is_open`, written and removed by :class:`Run` under
    the run's lock (so its owner is the run's owner). Readers list entries, which costs the
    open runs only. A workspace written before the index existed is indexed once, on first
    use (``batches/.active/.built`` marks it done).
    """

    BUILT = ".built"

    @staticmethod
    def write_entry(paths: RunPaths, entry: dict[str, Any] | None) -> None:
        path = paths.index_entry
        if entry is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        atomic_write_json(path, entry)

    @staticmethod
    def read_entry(paths: RunPaths) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = read_json(paths.index_entry)
        except StateError:
            return None
        return data

    @classmethod
    def entries(cls, ws: Workspace, model: str | None = None, dataset: str | None = None) -> list[OpenEntry]:
        """The open runs of the workspace (or of one model, or one model's dataset), oldest
        first. An entry whose run folder has no run.json yet (a plan in progress) or whose
        file is unreadable is left out.

        Cost: one small file per open run; finished runs cost nothing.
        """
        base = ws.open_runs_dir
        if not (base / cls.BUILT).exists():
            cls.build(ws)
        if dataset is not None and model is not None:
            pattern = f"{check_component(model, 'model')}/{check_component(dataset, 'dataset')}/run_*.json"
        elif model is not None:
            pattern = f"{check_component(model, 'model')}/*/run_*.json"
        else:
            pattern = "*/*/run_*.json"
        out: list[OpenEntry] = []
        for path in sorted(base.glob(pattern), key=lambda p: p.name):
            paths = RunPaths(ws.root / "batches" / path.parent.parent.name / path.parent.name / path.stem)
            try:
                data = read_json(path)
            except StateError:
                continue
            if not paths.run_json.exists():
                continue
            known = {f.name for f in fields(OpenEntry)} - {"paths"}
            out.append(OpenEntry(paths=paths, **{k: v for k, v in data.items() if k in known}))
        return out

    @classmethod
    def build(cls, ws: Workspace) -> int:
        """Index the open runs of a workspace written before the index existed: every run is
        read once; each open one is opened (which writes its entry), or left to the process
        that holds it (which writes its own). Returns the runs indexed."""
        from embedbatch.errors import LockedError

        n = 0
        with file_lock(ws.open_runs_dir / "build.lock", what="open-runs index", blocking=True, purpose="index"):
            if (ws.open_runs_dir / cls.BUILT).exists():
                return 0
            for paths in ws.all_runs():
                rs = Run.read_state(paths)
                if rs is None or not rs.is_open:
                    continue
                try:
                    with Run.open(paths, purpose="index open runs"):
                        n += 1
                except (LockedError, StateError):
                    continue
            atomic_write_json(ws.open_runs_dir / cls.BUILT, {"built_at": utc_now().isoformat()})
        return n

    @classmethod
    def remove_dead(cls, ws: Workspace, model: str, dataset: str) -> None:
        """Remove entries of runs that were never created (a plan killed before its rename);
        call under the dataset lock, after removing the dead ``.partial`` folders."""
        for path in (ws.open_runs_dir / model / dataset).glob("run_*.json"):
            run_dir = ws.runs_dir(model, dataset) / path.stem
            if not run_dir.exists():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def shown_runs(ws: Workspace, *, last: int | None) -> tuple[list[RunPaths], int]:
    """The runs a listing (``list``, ``status``) shows, oldest first: every open run (from the
    open-runs index) and the newest ``last`` others (every run when ``last`` is None); and how
    many older runs were left out.

    Cost: one directory listing per dataset, then only the runs shown are read: a workspace
    with 10,000 finished runs lists as fast as one with 10.
    """
    if last is None:
        return ws.all_runs(), 0
    base = ws.root / "batches"
    folders = sorted(base.glob("*/*/run_*"), key=lambda p: p.name) if base.is_dir() else []
    open_roots = {e.paths.root for e in OpenRuns.entries(ws)}
    picked: list[RunPaths] = []
    others = 0
    for folder in reversed(folders):
        if folder in open_roots or folder.suffix == ".partial" or not folder.is_dir():
            continue
        others += 1
        if len(picked) < last and (folder / "run.json").is_file():
            picked.append(RunPaths(folder))
    shown = sorted([*picked, *(RunPaths(r) for r in open_roots)], key=lambda r: r.root.name)
    return shown, max(0, others - len(picked))
