"""Clean: once a batch is ingested, its JSONL files are no longer needed, here or at the provider.

For every ingested batch of a run: the provider's input, output and error files are deleted
(a file already gone counts as deleted), and so are the local ``output.jsonl`` and
``errors.jsonl``. The local ``input.jsonl`` goes too, unless the batch still has failed rows
that ``retry`` would read from it. State (``batch.json``), ``records.parquet`` and
``failed_ids.tsv`` stay, so status, verify and the shards' provenance are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from embedbatch.runs import BatchState, Run
from embedbatch.workspace import RunPaths

if TYPE_CHECKING:  # the SDK is imported only by the commands that call the provider
    from embedbatch.api.openai import BatchClient

__all__ = ["CleanReport", "clean_batch", "clean_run"]

log = structlog.get_logger(__name__)
LOCAL_FILES = ("output.jsonl", "errors.jsonl")


@dataclass
class CleanReport:
    """What a clean removed: batches visited, provider files deleted, local bytes freed."""

    batches: int = 0
    remote_files: int = 0
    local_bytes: int = 0


async def clean_batch(client: BatchClient | None, run: Run, bs: BatchState, report: CleanReport) -> None:
    """Remove one ingested batch's files (see the module docstring); ``client`` None keeps the
    provider's files."""
    if bs.status != "ingested" or bs.cleaned:
        return
    report.batches += 1
    if client is not None:
        for file_id in filter(None, (bs.file_id, bs.output_file_id, bs.error_file_id)):
            report.remote_files += await client.delete_file(file_id)
    d = run.batch_dir(bs)
    failed = d / "failed_ids.tsv"
    keep_input = failed.exists() and len(failed.read_bytes().splitlines()) > 1
    for name in (*LOCAL_FILES, *(() if keep_input else ("input.jsonl",))):
        path = d / name
        if path.exists():
            report.local_bytes += path.stat().st_size
            path.unlink()
    bs.cleaned = client is not None
    run.save_batch(bs)


async def clean_run(client: BatchClient | None, paths: RunPaths, *, wait_s: float | None = None) -> CleanReport:
    """Clean every ingested batch of a run, under the run lock.

    Args:
        wait_s: how long to wait for a run lock another process holds (None: fail at once).

    Raises:
        LockedError: another process holds the run (past ``wait_s``).
    """
    report = CleanReport()
    with Run.open(paths, wait_s=wait_s, purpose="clean") as run:
        for bs in run.batches:
            await clean_batch(client, run, bs, report)
    log.info("cleaned", run=paths.run_id, **report.__dict__)
    return report
