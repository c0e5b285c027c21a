"""Compressed vector storage (int8, binary, float16 kept beside), Matryoshka truncation and
search with rescoring: round trips within the documented error, calibration that new shards do
not move, and recall that rescoring improves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from embedbatch.errors import UsageError
from embedbatch.search.exact import nearest
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.manifest import Manifest
from embedbatch.store.quant import check_truncation, codec_from_json, truncate
from embedbatch.store.shards import read_vectors
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace

DIM = 96


def _unit(rng: np.random.Generator, n: int, dim: int = DIM, *, scale: float = 1.0) -> np.ndarray:
    v = (rng.normal(size=(n, dim)) * scale).astype(np.float32)
    out: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def _commit(
    store: DatasetStore, vecs: np.ndarray, first: int, run: str, *, rows_per_shard: int = 100_000, **storage: object
) -> None:
    w = store.writer(dim=None, rows_per_shard=rows_per_shard, **storage)  # type: ignore[arg-type]
    n = len(vecs)
    ids = [f"r{first + i}" for i in range(n)]
    for a in range(0, n, 700):
        w.write(
            ids=ids[a : a + 700],
            texts=[f"text {first + i}" for i in range(a, min(n, a + 700))],
            metadata=["{}"] * len(ids[a : a + 700]),
            splits=[None] * len(ids[a : a + 700]),
            vectors=vecs[a : a + 700],
            source="s",
            dataset=store.dataset,
            model=store.model,
            run_id=run,
        )
        if w.rows_in_open_shard >= rows_per_shard:
            w.close_shard()
    w.add_source(f"{run}/x")
    store.commit(w, run_id=run, run_info={})


@pytest.mark.parametrize(
    ("dtype", "keep", "bound"),
    [("float16", False, 1e-3), ("int8", False, None), ("int8", True, 1e-3), ("binary", True, 1e-3)],
)
def test_round_trip_within_the_documented_error(tmp_path: Path, dtype: str, keep: bool, bound: float | None) -> None:
    """Stored then read back (read_vectors, get): float16 kept or float16 storage within 1e-3;
    int8 within half a quantisation step of each dimension's range; verify is clean."""
    vecs = _unit(np.random.default_rng(1), 3000)
    ws = Workspace(tmp_path / "ws")
    store = DatasetStore(ws, "m", "d")
    _commit(store, vecs, 0, "run1", rows_per_shard=1000, dtype=dtype, keep_float=keep)
    ids, _, got = read_vectors(ws, "m", "d")
    assert ids == [f"r{i}" for i in range(3000)] and got.shape == (3000, DIM)
    if bound is not None:
        assert float(np.abs(got - vecs).max()) <= bound
    else:
        codec = codec_from_json(Manifest.load(ws, "m", "d").quantization or {})
        assert codec.lo is not None and codec.hi is not None
        step = (codec.hi - codec.lo) / 255
        inside = (vecs >= codec.lo) & (vecs <= codec.hi)
        assert inside.mean() > 0.999, "the calibration covers the data"
        assert (np.abs(got - vecs)[inside] <= np.broadcast_to(step / 2 + 1e-6, vecs.shape)[inside]).all()
    (row,) = store.get(["r7"], columns=["embedding"])
    assert row is not None and np.allclose(row["embedding"], got[7])
    assert verify_dataset(ws, "m", "d").problems == []


def test_binary_keeps_the_signs_packed_in_an_eighth_of_a_byte(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    vecs = _unit(np.random.default_rng(2), 500)
    ws = Workspace(tmp_path / "ws")
    store = DatasetStore(ws, "m", "b")
    _commit(store, vecs, 0, "run1", dtype="binary", keep_float=False)
    m = Manifest.load(ws, "m", "b")
    table = pq.read_table(ws.shards_dir("m", "b") / m.shards[0]["file"], columns=["embedding"])
    assert table.schema.field("embedding").type.byte_width == DIM // 8
    _, _, got = read_vectors(ws, "m", "b")
    assert (np.sign(got) == np.where(vecs > 0, 1, -1)).all()
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_int8_ranges_are_stable_under_new_shards(tmp_path: Path) -> None:
    """The first commit calibrates; a later commit of wider vectors keeps the dataset's ranges
    (its shard decodes with them) and counts what it clipped."""
    rng = np.random.default_rng(3)
    ws = Workspace(tmp_path / "ws")
    store = DatasetStore(ws, "m", "q")
    _commit(store, _unit(rng, 2000), 0, "run1", dtype="int8")
    first = Manifest.load(ws, "m", "q").quantization
    wide = _unit(rng, 2000) * 3  # three times the first shard's values: outside the ranges
    _commit(store, wide, 2000, "run2", dtype="int8")
    m = Manifest.load(ws, "m", "q")
    assert m.quantization == first, "a new shard does not move the calibration"
    assert m.shards[-1]["clipped"] > 0 and m.shards[0]["clipped"] == 0
    import pyarrow.parquet as pq

    from embedbatch.store.quant import codec_from_metadata

    shard2 = codec_from_metadata(pq.read_schema(ws.shards_dir("m", "q") / m.shards[-1]["file"]))
    assert shard2.to_json() == first
    assert verify_dataset(ws, "m", "q").problems == []


def test_truncation_keeps_the_prefix_renormalised(tmp_path: Path) -> None:
    vecs = _unit(np.random.default_rng(4), 400)
    ws = Workspace(tmp_path / "ws")
    store = DatasetStore(ws, "m", "t")
    _commit(store, vecs, 0, "run1", truncate_dim=32)
    _, _, got = read_vectors(ws, "m", "t")
    want = vecs[:, :32] / np.linalg.norm(vecs[:, :32], axis=1, keepdims=True)
    assert got.shape == (400, 32) and np.allclose(got, want, atol=1e-6)
    assert Manifest.load(ws, "m", "t").truncate_dim == 32 and Manifest.load(ws, "m", "t").dimensions == 32
    assert np.allclose(truncate(vecs, 32), want, atol=1e-6)


def test_the_guard_refuses_truncation_for_an_unknown_model() -> None:
    with pytest.raises(UsageError, match="--force"):
        check_truncation("sentence-transformers/all-MiniLM-L6-v2", 128)
    check_truncation("sentence-transformers/all-MiniLM-L6-v2", 128, force=True)
    check_truncation("text-embedding-3-small", 512)
    check_truncation("nomic-ai/nomic-embed-text-v1.5", 256)


def test_rescoring_improves_recall_over_the_raw_binary_scan(tmp_path: Path) -> None:
    """Clustered 96-d vectors stored binary with float16 kept: recall@10 against the exact
    float32 top 10, without rescoring (multiplier 1) and with it (4, 16). (Few dimensions make
    binary codes coarse; bench/compression.py measures real 384- and 1536-d vectors.)"""
    rng = np.random.default_rng(5)
    centres = _unit(rng, 40)
    vecs = centres[rng.integers(0, 40, 4000)] + 0.35 * _unit(rng, 4000)
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    ws = Workspace(tmp_path / "ws")
    store = DatasetStore(ws, "m", "r")
    _commit(store, vecs, 0, "run1", dtype="binary", keep_float=True)
    m = Manifest.load(ws, "m", "r")
    queries = vecs[rng.choice(4000, 30, replace=False)] + 0.1 * _unit(rng, 30)
    recall = {1: 0.0, 4: 0.0, 16: 0.0}
    for q in queries:
        truth = {f"r{i}" for i in np.argsort(-(vecs @ q))[:10]}
        for mult in recall:
            got = {h["id"] for h in nearest(ws, m, q, k=10, rescore_multiplier=mult)}
            recall[mult] += len(got & truth) / 10 / len(queries)
    assert recall[1] < recall[4] < recall[16], recall  # more candidates rescored, more found
    assert recall[4] > recall[1] + 0.1 and recall[16] >= 0.85, recall


def test_embed_stores_int8_and_get_says_it_is_dequantised(tmp_path: Path, server: object, ws: Workspace) -> None:
    from tests.conftest import cli_env, run_cli

    src = tmp_path / "d.jsonl"
    src.write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "text": f"row {i} on topic {i % 5}"}) + b"\n" for i in range(60))
    )
    env = cli_env(server, ws)  # type: ignore[arg-type]
    r = run_cli(["embed", str(src), "--dataset", "i8", "--store-dtype", "int8", "--keep-float", "none"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    got = run_cli(["get", "r3", "--dataset", "i8", "--json"], env, tmp_path)
    assert got.returncode == 0, got.stderr
    row = orjson.loads(got.stdout)
    assert row["embedding_from"] == "int8 (dequantised)" and row["dimensions"] == 1536
    hits = run_cli(["search", "row 3 on topic 3", "--dataset", "i8", "-k", "3", "--json"], env, tmp_path)
    assert hits.returncode == 0 and orjson.loads(hits.stdout)[0]["id"] == "r3", hits.stdout
    refused = run_cli(["embed", str(src), "--dataset", "x", "--store-dtype", "int4"], env, tmp_path)
    assert refused.returncode != 0 and "--store-dtype must be" in refused.stderr


def test_sql_spans_datasets_of_every_dtype(tmp_path: Path) -> None:
    """One query over float32, int8 (no float kept) and binary (float16 kept) datasets: each
    keeps its own vector column type; `embedding` holds the float vectors where there are any."""
    pytest.importorskip("duckdb", reason="duckdb (the sql extra) runs the query")
    from embedbatch.store.catalog import run_sql

    rng = np.random.default_rng(6)
    ws = Workspace(tmp_path / "ws")
    _commit(DatasetStore(ws, "m", "f32"), _unit(rng, 50), 0, "a")
    _commit(DatasetStore(ws, "m", "i8"), _unit(rng, 40), 0, "b", dtype="int8", keep_float=False)
    _commit(DatasetStore(ws, "m", "bin"), _unit(rng, 30), 0, "c", dtype="binary", keep_float=True)
    _, rows = run_sql(
        ws,
        "SELECT dataset, count(*), count(embedding), count(embedding_int8), count(embedding_bits), "
        "max(len(embedding)), max(octet_length(embedding_bits)) FROM embeddings GROUP BY dataset ORDER BY dataset",
    )
    assert rows == [
        ("bin", 30, 30, 0, 30, DIM, DIM // 8),
        ("f32", 50, 50, 0, 0, DIM, None),
        ("i8", 40, 0, 40, 0, None, None),
    ]


def test_the_binary_scan_scores_by_hamming_distance(tmp_path: Path) -> None:
    """128-d binary shards are scanned on 64-bit words: scores 1 - 2·hamming/dim, the same
    ranking as the dot product of the sign vectors."""
    rng = np.random.default_rng(7)
    vecs = _unit(rng, 3000, 128)
    ws = Workspace(tmp_path / "ws")
    _commit(DatasetStore(ws, "m", "h"), vecs, 0, "run1", dtype="binary", keep_float=False)
    q = _unit(rng, 1, 128)[0]
    signs = np.where(vecs > 0, 1.0, -1.0)
    want = np.sort((signs @ np.where(q > 0, 1.0, -1.0)) / 128)[::-1][:10]
    got = nearest(ws, Manifest.load(ws, "m", "h"), q, k=10, rescore_multiplier=1)
    assert np.allclose([h["score"] for h in got], want)


def test_import_stores_compressed_and_cut_vectors(tmp_path: Path) -> None:
    """`import` takes the same storage: int8 codes decoding within the calibration's steps, and
    a Matryoshka cut (forced past the guard by the caller) re-normalised."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedbatch.store.importer import import_vectors

    vecs = _unit(np.random.default_rng(8), 1200)
    src = tmp_path / "mine.parquet"
    pq.write_table(
        pa.table({"id": [f"x{i}" for i in range(1200)], "embedding": list(vecs)}),
        src,
    )
    ws = Workspace(tmp_path / "ws")
    import_vectors(ws, src, model="m", dataset="imp8", dtype="int8", keep_float=False)
    _, _, got = read_vectors(ws, "m", "imp8")
    assert Manifest.load(ws, "m", "imp8").shards[0]["dtype"] == "int8"
    assert float(np.abs(got - vecs).max()) < 0.02
    import_vectors(ws, src, model="m", dataset="cut", truncate_dim=48)
    _, _, cut = read_vectors(ws, "m", "cut")
    assert np.allclose(cut, truncate(vecs, 48), atol=1e-6)


def test_cut_vectors_reach_a_database_of_the_cut_dimension(tmp_path: Path, server: object, ws: Workspace) -> None:
    """`embed --truncate-dim 256` into libSQL: the target is checked (and created) for 256-d
    vectors, the vectors stored there are the cut, re-normalised ones."""
    pytest.importorskip("libsql", reason="libsql is the libSQL sink")
    import sqlite3
    import struct

    from tests.conftest import cli_env, run_cli

    src = tmp_path / "d.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"id": f"r{i}", "text": f"row {i}"}) + b"\n" for i in range(20)))
    db = tmp_path / "v.db"
    flags = ["--truncate-dim", "256", "--libsql-url", str(db), "--libsql-table", "v", "--libsql-mode", "insert"]
    r = run_cli(["embed", str(src), "--dataset", "cut", *flags], cli_env(server, ws), tmp_path)  # type: ignore[arg-type]
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(str(db)) as conn:
        blobs = dict(conn.execute("SELECT id, embedding FROM v").fetchall())
    vec = np.array(struct.unpack("<256f", blobs["r3"]), np.float32)
    (row,) = DatasetStore(ws, "text-embedding-3-small", "cut").get(["r3"], columns=["embedding"])
    assert len(blobs) == 20 and row is not None and np.allclose(vec, row["embedding"], atol=1e-6)
    assert abs(float(np.linalg.norm(vec)) - 1) < 1e-5
