"""Which rows are already embedded or planned, for every engine's intake.

A row is *done* when the dataset's id index holds its id with the same text, and *planned*
when it sits in a batch of an unfinished Batch API run of the dataset (those will be embedded
and paid for). Every engine reads both under the dataset lock before it sends anything, so no
row is paid for twice across engines (the Batch API's ``plan``, ``embed``, ``local``).
"""

from __future__ import annotations

from collections.abc import Callable

from embedbatch.errors import StateError
from embedbatch.runs import FINAL, OpenRuns, Run, read_record_ids
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.index import IdIndex
from embedbatch.workspace import Workspace

__all__ = ["existing_ids", "skip_done_or_planned"]


def existing_ids(ws: Workspace, model: str, dataset: str) -> tuple[IdIndex, dict[str, str]]:
    """What is already done or under way for (model, dataset); call under the dataset lock.

    Returns:
        ``(index, planned)``: the store's id index of embedded rows, and id → run directory for
        the ids in batches of this dataset's runs that are neither final nor failed remotely
        (they will be embedded).
        Cost: 24 bytes per embedded row, plus the ids of the batches in flight.
    """
    index = DatasetStore(ws, model, dataset).id_index()
    planned: dict[str, str] = {}
    for entry in OpenRuns.entries(ws, model, dataset):  # finished runs hold no row in flight
        if entry.kind != "batchapi":
            continue
        try:
            run = Run.read(entry.paths)
        except StateError:
            continue
        if run.state.kind != "batchapi" or run.state.status == "dry-run":
            continue
        paths = entry.paths
        for bs in run.batches:
            if bs.status in FINAL or (bs.status == "downloaded" and bs.remote_status != "completed"):
                continue
            planned.update(dict.fromkeys(read_record_ids(run.batch_dir(bs)), str(paths.root)))
    return index, planned


def skip_done_or_planned(
    ws: Workspace, model: str, dataset: str
) -> tuple[Callable[[str, str], bool] | None, dict[str, int]]:
    """An intake ``exclude`` for rows already embedded with the same text or planned in an
    unfinished Batch API run, and the counts it fills (run directory → rows skipped for it);
    call under the dataset lock. ``(None, {})`` when nothing is embedded or planned."""
    index, planned = existing_ids(ws, model, dataset)
    skipped: dict[str, int] = {}
    if not len(index) and not planned:
        return None, skipped

    def exclude(rid: str, sha: str) -> bool:
        where = planned.get(rid)
        if where is not None:
            skipped[where] = skipped.get(where, 0) + 1
            return True
        return index.contains(rid, sha)

    return exclude, skipped
