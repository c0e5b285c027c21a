"""The id index answers point look-ups from disk exactly as a full scan of the shards would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedbatch.records import text_sha256
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.index import IdIndex, db_path
from embedbatch.store.manifest import Manifest
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace
from tests.store.test_use import DIM, commit

ROOT = Path(__file__).resolve().parents[2]


def _scan(ws: Workspace) -> dict[str, tuple[str, int, str]]:
    """id → (shard, row, text) of its current row, by reading every shard (newest wins)."""
    manifest = Manifest.load(ws, "m", "d")
    out: dict[str, tuple[str, int, str]] = {}
    for s in manifest.shards:
        t = pq.read_table(ws.shards_dir("m", "d") / s["file"], columns=["id", "text"])
        for row, (rid, text) in enumerate(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True)):
            out[rid] = (s["file"], row, text)
    return out


def _dataset(ws: Workspace) -> DatasetStore:
    """Three commits; the third replaces 20 ids of the first with new texts."""
    store = DatasetStore(ws, "m", "d")
    rng = np.random.default_rng(7)
    commit(store, [f"a{i}" for i in range(300)], rng.standard_normal((300, DIM)).astype(np.float32), run="run_1")
    commit(store, [f"b{i}" for i in range(200)], rng.standard_normal((200, DIM)).astype(np.float32), run="run_2")
    commit(store, [f"a{i}" for i in range(0, 40, 2)], rng.standard_normal((20, DIM)).astype(np.float32), run="run_3")
    return store


def _agrees(ws: Workspace, index: IdIndex) -> None:
    truth = _scan(ws)
    rng = np.random.default_rng(3)
    probe = [*rng.choice(sorted(truth), 120, replace=False).tolist(), *[f"absent{i}" for i in range(30)]]
    probe += [f"a{i}" for i in range(0, 40, 2)]  # superseded: the newest row answers
    assert [(truth[r][0], truth[r][1]) if r in truth else None for r in probe] == [index.locate(r) for r in probe]
    assert [r in truth for r in probe] == index.has_ids(probe).tolist()
    texts = [truth[r][2] for r in probe if r in truth]
    assert all(index.contains(r, text_sha256(t)) for r, t in zip([r for r in probe if r in truth], texts, strict=True))
    assert not index.contains("a0", text_sha256("text of a0 (run_1)"))  # the replaced text is not current
    assert len(truth) == len(index)


def test_point_lookups_equal_a_full_scan(ws: Workspace) -> None:
    _dataset(ws)
    assert db_path(ws, "m", "d").exists()
    index = IdIndex.load(ws, Manifest.load(ws, "m", "d"))
    assert index.db_rows() == 500  # every shard taken in: nothing held in memory
    _agrees(ws, index)


def test_a_database_behind_the_manifest_is_covered_and_caught_up(ws: Workspace) -> None:
    """As after a process killed between the manifest and the database: readers still answer
    from the shards it lacks, and the next commit takes them in."""
    store = _dataset(ws)
    manifest = Manifest.load(ws, "m", "d")
    behind = Manifest.load(ws, "m", "d")
    behind.shards = behind.shards[:1]
    IdIndex.catch_up(ws, behind, rebuild=True)  # the database knows only the first shard
    index = IdIndex.load(ws, manifest)
    assert index.db_rows() is None  # two shards answered from memory
    _agrees(ws, index)
    commit(store, ["c0"], np.ones((1, DIM), np.float32), run="run_4")
    assert 501 == IdIndex.load(ws, Manifest.load(ws, "m", "d")).db_rows()


def test_a_killed_commit_leaves_the_index_right(ws: Workspace, tmp_path: Path) -> None:
    _dataset(ws)
    script = (
        "import numpy as np, sys\n"
        "from embedbatch.store.dataset import DatasetStore\n"
        "from embedbatch.workspace import Workspace\n"
        "from tests.store.test_use import DIM, commit\n"
        f"commit(DatasetStore(Workspace({str(ws.root)!r}), 'm', 'd'), ['k0', 'a1'], np.ones((2, DIM), np.float32), "
        "run='run_k')\n"
    )
    env = {"EMBEDBATCH_CRASH_AT": "store_before_id_db", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=False, capture_output=True)
    assert -9 == done.returncode, done.stderr.decode()
    index = IdIndex.load(ws, Manifest.load(ws, "m", "d"))
    assert (index.locate("k0"), index.locate("a1")) == (("shard-00004.parquet", 0), ("shard-00004.parquet", 1))
    _agrees(ws, index)


def test_verify_repair_rebuilds_deleted_index_files(ws: Workspace) -> None:
    _dataset(ws)
    for f in ws.index_dir("m", "d").iterdir():
        f.unlink()
    db_path(ws, "m", "d").unlink()
    assert not verify_dataset(ws, "m", "d").ok  # the missing files are reported
    report = verify_dataset(ws, "m", "d", repair=True)
    assert report.ok, report.problems
    index = IdIndex.load(ws, Manifest.load(ws, "m", "d"))
    assert 500 == index.db_rows()
    _agrees(ws, index)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_database_falls_back_to_the_shard_files(ws: Workspace, damage: str) -> None:
    _dataset(ws)
    path = db_path(ws, "m", "d")
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"" if damage == "truncate" else b"not a database" * 100)
    index = IdIndex.load(ws, Manifest.load(ws, "m", "d"))
    _agrees(ws, index)


def test_verify_names_an_id_in_two_shards_and_quick_checks_only_the_last(ws: Workspace) -> None:
    _dataset(ws)
    manifest = Manifest.load(ws, "m", "d")
    del manifest.shards[2]["supersedes"]  # as if the third shard's replacements were never recorded
    manifest.save()
    problems = verify_dataset(ws, "m", "d").problems
    assert "id 'a0' in both shard-00001.parquet and shard-00003.parquet" in problems
    assert 20 == sum("in both" in p for p in problems)
    first = ws.shards_dir("m", "d") / "shard-00001.parquet"
    first.write_bytes(first.read_bytes()[:-1] + b"\0")  # damage the oldest shard
    assert verify_dataset(ws, "m", "d", quick=2).ok  # the last two shards are fine
    quick = verify_dataset(ws, "m", "d", quick=3)
    assert ["shard-00001.parquet: sha256 differs from the manifest"] == quick.problems
