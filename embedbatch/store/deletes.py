"""A run's deletions: the ids of its documents' chunks past their new count (tombstones).

The intake finds them (:func:`stored_ids` is its probe); the engine keeps them in the run's
folder (:func:`save_run_deletes`) and commits them once, under the run's key
(:func:`run_deletes_key`), when its rows are in (:func:`commit_run_deletes`). See
:meth:`embedbatch.store.dataset.DatasetStore.delete`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from embedbatch.store.dataset import DatasetStore
from embedbatch.workspace import atomic_write_bytes

__all__ = ["DELETES_FILE", "commit_run_deletes", "run_deletes_key", "save_run_deletes", "stored_ids"]


def stored_ids(store: DatasetStore) -> Any:
    """``(ids) -> (n,) bool`` of ids the dataset holds now, or None for an empty dataset (an
    intake then probes nothing)."""
    index = store.id_index()
    return index.has_ids if len(index) else None


def run_deletes_key(run_id: str) -> str:
    """The manifest source key of a run's stale-chunk deletions (committed once per run)."""
    return f"{run_id}/deletes"


DELETES_FILE = "deletes.json"  # a run's stale chunk ids, written at intake, committed at its end


def save_run_deletes(run_dir: Path, ids: Sequence[str]) -> None:
    """Keep a run's ids to delete (its documents' chunks past their new count) in its folder."""
    if ids:
        atomic_write_bytes(run_dir / DELETES_FILE, orjson.dumps(list(ids)))


def commit_run_deletes(store: DatasetStore, run_dir: Path, *, run_id: str, run_info: dict[str, Any]) -> int:
    """Commit the ids a run saved with :func:`save_run_deletes`, exactly once (key
    ``{run_id}/deletes``); returns how many were deleted now."""
    path = run_dir / DELETES_FILE
    if not path.exists():
        return 0
    ids = orjson.loads(path.read_bytes())
    return len(
        store.delete(ids, key=f"{run_id}/deletes", run_id=run_id, run_info=run_info)
    )  # the local engine's key too
