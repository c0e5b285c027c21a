"""``manifest.json``: the list of a (model, dataset)'s committed shards, the source of truth.

A shard file that the manifest does not list is not part of the dataset (an orphan of a crash,
removed by the store under its lock). Only :class:`embedbatch.store.dataset.DatasetStore`
writes a manifest; everyone else reads a snapshot with :meth:`Manifest.load`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedbatch._version import __version__
from embedbatch.workspace import Workspace, atomic_write_json, read_json, utc_now

__all__ = ["Manifest", "file_sha256", "superseded_ids"]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """``manifest.json``: shards (file, sha256, bytes, rows, sources), model, dimensions, sampling, runs.

    Attributes:
        shards: one entry per committed shard, oldest first: ``file``, ``sha256``, ``bytes``,
            ``rows``, ``dim``, ``dtype``, ``min_norm``/``max_norm`` (L2), ``created_at``,
            ``tool_version``, ``git_sha``, ``sources`` (``run_id/batch`` keys whose rows it
            holds), ``supersedes`` (ids whose older rows it replaces) and ``deletes`` (ids it
            removes from the current view: tombstones, e.g. a re-chunked document's chunks
            past its new count, or ``embedbatch delete``; a commit of deletions alone is a
            zero-row shard).
        runs: run id → ``{"created_at", "kind"}`` of every run that committed rows.
        sampling: the distinct sampling descriptions of those runs.
        quantization: int8 storage: the dataset's calibrated ranges
            (:meth:`embedbatch.store.quant.Codec.to_json`), set by the first int8 commit and
            then used unchanged by every writer.
        truncate_dim: the Matryoshka dimension the vectors were cut to (None: not cut).
        keep_float: int8/binary: ``float16`` when the float vectors are kept beside them.
    """

    path: Path
    model: str
    dataset: str
    dimensions: int | None = None
    dtype: str = "float32"
    shards: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, Any] = field(default_factory=dict)
    sampling: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, Any] | None = None
    truncate_dim: int | None = None
    keep_float: str | None = None

    @classmethod
    def load(cls, ws: Workspace, model: str, dataset: str) -> Manifest:
        """The manifest as on disk now (an empty one when the dataset has none yet).

        Raises:
            StateError: the file is not valid JSON.
        """
        path = ws.manifest_path(model, dataset)
        if not path.exists():
            return cls(path, model, dataset)
        d = read_json(path)
        return cls(
            path,
            d["model"],
            d["dataset"],
            d.get("dimensions"),
            d.get("dtype", "float32"),
            d.get("shards", []),
            d.get("runs", {}),
            d.get("sampling", []),
            d.get("quantization"),
            d.get("truncate_dim"),
            d.get("keep_float"),
        )

    def save(self) -> None:
        """Write atomically. Only the dataset store calls this, under the dataset lock."""
        atomic_write_json(
            self.path,
            {
                "model": self.model,
                "dataset": self.dataset,
                "dimensions": self.dimensions,
                "dtype": self.dtype,
                "rows": self.rows,
                "shards": self.shards,
                "runs": self.runs,
                "sampling": self.sampling,
                **({"quantization": self.quantization} if self.quantization else {}),
                **({"truncate_dim": self.truncate_dim} if self.truncate_dim else {}),
                **({"keep_float": self.keep_float} if self.keep_float else {}),
                "updated_at": utc_now().isoformat(),
                "tool_version": __version__,
            },
        )

    @property
    def rows(self) -> int:
        """Rows in all shards (superseded rows included)."""
        return sum(int(s["rows"]) for s in self.shards)

    @property
    def current_rows(self) -> int:
        """Rows in the current view: every shard row less those later shards replaced or deleted
        (each id in a shard's ``supersedes`` or ``deletes`` took exactly one current row out).
        No shard is opened."""
        return self.rows - sum(len(s.get("supersedes", ())) + len(s.get("deletes", ())) for s in self.shards)

    def sources(self) -> set[str]:
        """Keys ``run_id/batch`` of every batch whose rows are in a shard."""
        return {src for s in self.shards for src in s.get("sources", [])}

    def shard_paths(self, ws: Workspace) -> list[Path]:
        base = ws.shards_dir(self.model, self.dataset)
        return [base / s["file"] for s in self.shards]


def superseded_ids(manifest: Manifest) -> dict[str, set[str]]:
    """shard file → ids whose rows in that shard later shards replaced or deleted (readers drop
    them)."""
    out: dict[str, set[str]] = {}
    later: set[str] = set()
    for s in reversed(manifest.shards):
        out[s["file"]] = set(later)
        later.update(s.get("supersedes", []))
        later.update(s.get("deletes", []))
    return out
