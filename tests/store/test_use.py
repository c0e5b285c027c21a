"""Using the stored embeddings: streaming exact search (equal to brute force), get by id,
search --id, export round trips, and the SQL catalog over two datasets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from embedbatch.search.exact import nearest, search_by_id
from embedbatch.store.catalog import run_sql
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.export import export_dataset
from embedbatch.store.manifest import Manifest
from embedbatch.workspace import Workspace
from tests.conftest import run_cli

DIM = 8


def commit(store: DatasetStore, ids: list[str], vectors: np.ndarray, *, run: str, dtype: str = "float32") -> None:
    writer = store.writer(dim=DIM, dtype=dtype, rows_per_shard=1000)
    writer.write(
        ids=ids,
        texts=[f"text of {i} ({run})" for i in ids],
        metadata=[orjson.dumps({"run": run}).decode()] * len(ids),
        splits=["train"] * len(ids),
        vectors=vectors,
        source="file",
        dataset=store.dataset,
        model=store.model,
        run_id=run,
    )
    writer.add_source(f"{run}/batch_001")
    store.commit(writer, run_id=run, run_info={"kind": "test"})


@pytest.fixture(params=["float32", "float16"])
def data(ws: Workspace, request: pytest.FixtureRequest) -> dict[str, np.ndarray]:
    """Three shards of one dataset; the third re-embeds 5 ids of the first (they supersede)."""
    rng = np.random.default_rng(1)
    store = DatasetStore(ws, "m", "d")
    current: dict[str, np.ndarray] = {}
    for run, ids in (("run_1", [f"a{i}" for i in range(40)]), ("run_2", [f"b{i}" for i in range(33)])):
        v = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        commit(store, ids, v, run=run, dtype=request.param)
        current.update(zip(ids, v, strict=True))
    again = [f"a{i}" for i in range(5)]
    v = rng.standard_normal((5, DIM)).astype(np.float32)
    commit(store, again, v, run="run_3", dtype=request.param)
    current.update(zip(again, v, strict=True))
    if request.param == "float16":
        current = {k: x.astype(np.float16).astype(np.float32) for k, x in current.items()}
    return current


def brute(current: dict[str, np.ndarray], q: np.ndarray, k: int, exclude: str | None = None) -> list[str]:
    ids = [i for i in current if i != exclude]
    m = np.stack([current[i] for i in ids])
    scores = (m @ q) / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))
    return [ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


def test_streaming_search_equals_brute_force(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    manifest = Manifest.load(ws, "m", "d")
    rng = np.random.default_rng(9)
    for _ in range(10):
        q = rng.standard_normal(DIM).astype(np.float32)
        for chunk in (7, 1000):  # many chunks with a running top-k, or one
            hits = nearest(ws, manifest, q, k=6, chunk_rows=chunk)
            assert [h["id"] for h in hits] == brute(data, q, 6)
            assert all(h["text"].startswith(f"text of {h['id']} (") for h in hits)
    superseded = nearest(ws, manifest, data["a0"], k=1)[0]
    assert superseded["id"] == "a0" and superseded["text"] == "text of a0 (run_3)"


def test_get_and_search_by_id(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    store = DatasetStore(ws, "m", "d")
    rows = store.get(["b7", "a3", "nope"])
    assert rows[2] is None
    b7, a3 = rows[0], rows[1]
    assert b7 is not None and a3 is not None
    np.testing.assert_array_equal(b7["embedding"], data["b7"])
    assert (a3["text"], a3["run_id"], a3["split"]) == ("text of a3 (run_3)", "run_3", "train")  # the newest row
    hits = search_by_id(ws, "b7", dataset="d", model=None, k=4)
    assert [h["id"] for h in hits] == brute(data, data["b7"], 4, exclude="b7")


@pytest.mark.parametrize("fmt", ["npy", "arrow", "f16"])
def test_export_round_trip(ws: Workspace, data: dict[str, np.ndarray], tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"export-{fmt}"
    report = export_dataset(ws, "m", "d", out, fmt=fmt)
    ids = (out / "ids.txt").read_text().splitlines()
    assert sorted(ids) == sorted(data) and report["count"] == len(data) == 73
    if fmt == "npy":
        vecs = np.load(out / "vectors.npy")
    elif fmt == "arrow":
        table = pa.ipc.open_file(out / "vectors.arrow").read_all()
        assert table.column("id").to_pylist() == ids
        vecs = np.asarray(table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False)).reshape(
            -1, DIM
        )
    else:
        vecs = np.fromfile(out / "vectors.f16", dtype="<f2").reshape(-1, DIM)
    tol = 1e-3 if fmt == "f16" else 0
    np.testing.assert_allclose(vecs.astype(np.float32), np.stack([data[i] for i in ids]), atol=tol, rtol=tol)
    meta = orjson.loads((out / "export.json").read_bytes())
    name = {"npy": "vectors.npy", "arrow": "vectors.arrow", "f16": "vectors.f16"}[fmt]
    assert meta["dimensions"] == DIM and set(meta["files"]) == {"ids.txt", name}
    for file, digest in meta["files"].items():
        assert hashlib.sha256((out / file).read_bytes()).hexdigest() == digest


def test_sql_over_two_datasets(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    commit(DatasetStore(ws, "m", "other"), ["x", "y"], np.ones((2, DIM), np.float32), run="run_9")
    cols, rows = run_sql(ws, "SELECT dataset, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1")
    assert cols == ["dataset", "n"] and rows == [("d", 73), ("other", 2)]
    _, rows = run_sql(ws, "SELECT dataset, count(*), sum(rows) FROM shards GROUP BY 1 ORDER BY 1")
    assert rows == [("d", 3, 78), ("other", 1, 2)]  # 78 rows written, 5 of them superseded
    _, rows = run_sql(ws, "SELECT text FROM embeddings WHERE id = 'a1'")
    assert rows == [("text of a1 (run_3)",)]


def test_cli_get_search_id_export_sql(ws: Workspace, data: dict[str, np.ndarray], tmp_path: Path) -> None:
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "PATH": "/usr/bin:/bin"}
    r = run_cli(["get", "b2", "--dataset", "d", "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    got = orjson.loads(r.stdout)
    assert got["id"] == "b2" and got["dimensions"] == DIM
    np.testing.assert_allclose(got["embedding"], data["b2"], rtol=1e-6)
    assert run_cli(["get", "zzz", "--dataset", "d"], env, tmp_path).returncode == 2
    r = run_cli(["search", "--id", "b2", "--dataset", "d", "-k", "3", "--json"], env, tmp_path)
    assert [h["id"] for h in orjson.loads(r.stdout)] == brute(data, data["b2"], 3, exclude="b2")
    r = run_cli(["export", "--dataset", "d", "--out", str(tmp_path / "x"), "--json"], env, tmp_path)
    assert orjson.loads(r.stdout)["count"] == 73
    r = run_cli(["sql", "SELECT count(*) AS n FROM runs", "--csv"], env, tmp_path)
    assert r.returncode == 0 and r.stdout.splitlines() == ["n", "0"]
    r = run_cli(["sql", "SELECT nope FROM embeddings"], env, tmp_path)
    assert r.returncode == 2 and "sql:" in r.stderr
