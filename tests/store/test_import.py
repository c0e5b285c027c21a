"""`embedbatch import`: export → import round trip, bad input refused with file and row, and a
killed import that resumes with every id once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedbatch.errors import InputError
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.export import export_dataset
from embedbatch.store.importer import import_vectors
from embedbatch.store.manifest import Manifest
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace
from tests.store.test_use import DIM, commit

ROOT = Path(__file__).resolve().parents[2]


def _parquet(path: Path, ids: list[str], vectors: np.ndarray, *, texts: list[str] | None = None) -> Path:
    cols = {
        "id": pa.array(ids, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]),
    }
    if texts is not None:
        cols["text"] = pa.array(texts, pa.string())
    pq.write_table(pa.table(cols), path)
    return path


def test_export_then_import_gives_the_same_rows(ws: Workspace, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = DatasetStore(ws, "m", "d")
    vecs = rng.standard_normal((120, DIM)).astype(np.float32)
    commit(store, [f"r\t{i}" for i in range(120)], vecs, run="run_1")  # a tab in the id: escaped in ids.txt
    export_dataset(ws, "m", "d", tmp_path / "out")
    result = import_vectors(ws, tmp_path / "out", model="m", dataset="copy", rows_per_part=50)
    assert (120, 0, 3, DIM) == (result.rows, result.skipped_rows, result.parts, result.dim)
    copy = DatasetStore(ws, "m", "copy")
    ids = [f"r\t{i}" for i in range(0, 120, 7)]
    got = copy.get(ids, columns=["embedding"])
    want = store.get(ids, columns=["embedding"])
    assert all(g is not None and w is not None for g, w in zip(got, want, strict=True))
    assert all(np.array_equal(g["embedding"], w["embedding"]) for g, w in zip(got, want, strict=True))  # type: ignore[index]
    assert verify_dataset(ws, "m", "copy").ok
    assert 120 == Manifest.load(ws, "m", "copy").current_rows


def test_parquet_import_with_texts_and_a_second_import_replacing_rows(ws: Workspace, tmp_path: Path) -> None:
    vecs = np.eye(10, DIM, dtype=np.float32)
    _parquet(tmp_path / "a.parquet", [f"x{i}" for i in range(10)], vecs, texts=[f"t{i}" for i in range(10)])
    import_vectors(ws, tmp_path / "a.parquet", model="m", dataset="p")
    again = _parquet(tmp_path / "b.parquet", ["x0", "x1"], 2 * vecs[:2], texts=["new0", "new1"])
    import_vectors(ws, again, model="m", dataset="p")
    rows = DatasetStore(ws, "m", "p").get(["x0", "x5"], columns=["text", "embedding"])
    assert ("new0", "t5") == (rows[0]["text"], rows[1]["text"])  # type: ignore[index]
    assert 10 == Manifest.load(ws, "m", "p").current_rows


@pytest.mark.parametrize(
    ("case", "message", "row"),
    [
        ("dimension", "6-d vectors where the dataset has 8-d ones", 1),
        ("nan", "NaN or infinite value", 4),
        ("duplicate", "duplicate id 'y2'", 6),
        ("missing id", "field 'id' is missing or empty", 3),
    ],
)
def test_bad_input_is_refused_with_file_and_row(
    ws: Workspace, tmp_path: Path, case: str, message: str, row: int
) -> None:
    commit(DatasetStore(ws, "m", "d"), ["a"], np.ones((1, DIM), np.float32), run="run_1")
    ids = [f"y{i}" for i in range(8)]
    vecs = np.ones((8, DIM), np.float32)
    if case == "dimension":
        vecs = np.ones((8, 6), np.float32)
    elif case == "nan":
        vecs[3, 2] = np.nan
    elif case == "duplicate":
        ids[5] = "y2"
    else:
        ids[2] = ""
    path = _parquet(tmp_path / "bad.parquet", ids, vecs)
    with pytest.raises(InputError, match=message) as info:
        import_vectors(ws, path, model="m", dataset="d")
    assert (str(path), row) == (info.value.path, info.value.line)
    rows_before = 1  # the dataset's one row: nothing of the bad part was written
    assert rows_before == Manifest.load(ws, "m", "d").current_rows


def test_a_killed_import_resumes_with_every_id_once(ws: Workspace, tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    ids = [f"k{i}" for i in range(250)]
    path = _parquet(tmp_path / "k.parquet", ids, rng.standard_normal((250, DIM)).astype(np.float32))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from embedbatch.store.importer import import_vectors\n"
        "from embedbatch.workspace import Workspace\n"
        f"import_vectors(Workspace({str(ws.root)!r}), Path({str(path)!r}), model='m', dataset='k', rows_per_part=100)\n"
    )
    env = {"EMBEDBATCH_CRASH_AT": "import_after_part", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=False, capture_output=True)
    assert -9 == killed.returncode, killed.stderr.decode()
    assert 100 == Manifest.load(ws, "m", "k").current_rows  # the first part is in
    result = import_vectors(ws, path, model="m", dataset="k", rows_per_part=100)
    assert (150, 100) == (result.rows, result.skipped_rows)
    manifest = Manifest.load(ws, "m", "k")
    stored = [
        rid
        for s in manifest.shards
        for rid in pq.read_table(ws.shards_dir("m", "k") / s["file"], columns=["id"]).column("id").to_pylist()
    ]
    assert sorted(ids) == sorted(stored)  # every id once: no part twice, none lost
    assert (250, 250) == (manifest.rows, manifest.current_rows)


def test_cli_import(ws: Workspace, tmp_path: Path) -> None:
    path = _parquet(tmp_path / "c.parquet", ["c0", "c1"], np.ones((2, DIM), np.float32))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "EMBEDBATCH_WORKSPACE": str(ws.root)}
    args = [sys.executable, "-m", "embedbatch", "import", str(path), "--dataset", "c", "--model", "m", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert 0 == done.returncode, done.stderr
    assert 2 == orjson.loads(done.stdout)["rows"]
    bad = _parquet(tmp_path / "d.parquet", ["c0", "c0"], np.ones((2, DIM), np.float32))
    args[4] = str(bad)
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "d.parquet" in done.stderr and "duplicate id 'c0'" in done.stderr


def test_a_duplicate_across_parts_is_refused_and_the_dataset_keeps_its_own_ids(ws: Workspace, tmp_path: Path) -> None:
    """An id in two parts of one import is refused (found through the id index, not kept in
    memory); an id the dataset held before the import is not a duplicate: it is replaced."""
    commit(DatasetStore(ws, "m", "d"), ["z1"], np.ones((1, DIM), np.float32), run="run_1")
    ids = ["z0", "z1", "z2", "z3", "z4", "z5", "z2", "z7"]
    path = _parquet(tmp_path / "two.parquet", ids, np.ones((8, DIM), np.float32))
    with pytest.raises(InputError, match="duplicate id 'z2': an earlier row of the import has it") as info:
        import_vectors(ws, path, model="m", dataset="d", rows_per_part=4)
    assert (str(path), 7) == (info.value.path, info.value.line)
    assert 4 == Manifest.load(ws, "m", "d").current_rows  # the first part: z0, z1 (replaced), z2, z3
