"""The dataset store: staged shards, commit under the lock, orphans, the id index, verify."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedbatch.errors import StateError
from embedbatch.records import text_sha256
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace


def _write(store: DatasetStore, ids: list[str], texts: list[str], *, dim: int = 4, run: str = "run_1") -> list[str]:
    """Write rows through a store writer and commit them; returns the new shard files."""
    writer = store.writer(dim=dim, rows_per_shard=1000)
    rng = np.random.default_rng(len(ids))
    writer.write(
        ids=ids,
        texts=texts,
        metadata=["{}"] * len(ids),
        splits=[None] * len(ids),
        vectors=rng.standard_normal((len(ids), dim)).astype(np.float32),
        source="file",
        dataset=store.dataset,
        model=store.model,
        run_id=run,
    )
    writer.add_source(f"{run}/batch_001")
    return [e["file"] for e in store.commit(writer, run_id=run, run_info={"kind": "test"})]


def test_commit_numbers_shards_and_indexes_ids(ws: Workspace) -> None:
    """Two commits give shard-00001 and shard-00002; the id index answers by id and text, and a
    re-embedded id with new text supersedes its old row (the newest row wins)."""
    store = DatasetStore(ws, "m", "d")
    assert ["shard-00001.parquet"] == _write(store, ["a", "b"], ["alpha", "beta"])
    assert ["shard-00002.parquet"] == _write(store, ["b", "c"], ["beta v2", "gamma"], run="run_2")
    index = store.id_index()
    assert 3 == len(index)
    assert (True, False) == (index.contains("b", text_sha256("beta v2")), index.contains("b", text_sha256("beta")))
    assert [True, True, True, False] == index.has_ids(["a", "b", "c", "z"]).tolist()
    assert ("shard-00002.parquet", 0) == index.locate("b")
    assert [["b"]] == [s.get("supersedes") for s in store.manifest().shards[1:]]
    rep = verify_dataset(ws, "m", "d")
    assert (True, 3) == (rep.ok, rep.rows), rep.problems


def test_orphans_removed_but_live_staged_shards_kept(ws: Workspace) -> None:
    """Under the lock, a renamed-but-unlisted shard and a temp file nobody holds are removed;
    a shard another writer has staged (its flock held) is left alone and commits later."""
    store = DatasetStore(ws, "m", "d")
    _write(store, ["a"], ["alpha"])
    live = store.writer(dim=4)
    live.write(
        ids=["x"],
        texts=["x"],
        metadata=["{}"],
        splits=[None],
        vectors=np.ones((1, 4), np.float32),
        source="file",
        dataset="d",
        model="m",
        run_id="run_live",
    )
    live.close_shard()
    (store.shards_dir / "shard-00009.parquet").write_bytes(b"left by a crash")
    (store.shards_dir / ".shard-dead.tmp").write_bytes(b"writer died")
    with store.locked("test"):
        removed = store.remove_orphans(store.manifest())
    assert ["shard-00009.parquet", ".shard-dead.tmp"] == sorted(removed, key=lambda n: n.startswith("."))
    assert live.staged[0].tmp.exists()
    assert ["shard-00002.parquet"] == [e["file"] for e in store.commit(live, run_id="run_live", run_info={})]
    assert [True, True] == store.id_index().has_ids(["a", "x"]).tolist()


def test_dimension_mismatch_is_refused_at_commit(ws: Workspace) -> None:
    """A 3-d shard cannot join a 4-d dataset: StateError, and its staged file is gone."""
    store = DatasetStore(ws, "m", "d")
    _write(store, ["a"], ["alpha"])
    with pytest.raises(StateError, match="3-d vectors cannot join"):
        _write(store, ["b"], ["beta"], dim=3)
    assert ["shard-00001.parquet"] == sorted(p.name for p in store.shards_dir.iterdir())


def test_lost_or_wrong_index_is_found_and_repaired(ws: Workspace) -> None:
    """A missing index file does not stop look-ups (the look-up database answers) and verify
    reports it; verify flags an index that disagrees with its shard, and verify --repair
    rebuilds both."""
    store = DatasetStore(ws, "m", "d")
    _write(store, ["a", "b"], ["alpha", "beta"])
    path = store.index_dir / "shard-00001.parquet"
    path.unlink()
    assert store.id_index().contains("a", text_sha256("alpha"))
    assert ["shard-00001.parquet: id index file missing (run verify --repair)"] == verify_dataset(ws, "m", "d").problems
    assert verify_dataset(ws, "m", "d", repair=True).ok
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 1), path)
    rep = verify_dataset(ws, "m", "d")
    assert ["shard-00001.parquet: id index does not match the shard's ids (run verify --repair)"] == rep.problems
    assert verify_dataset(ws, "m", "d", repair=True).ok
