"""Ingest: decoding, validation, error shapes, shards and manifest, verify, retry, run."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from embedbatch.engines.batchapi.batchfiles import BatchRecords
from embedbatch.engines.batchapi.output import decode_vector, read_batch_results
from embedbatch.server import HashBackend, ServerThread
from embedbatch.store.manifest import Manifest
from embedbatch.store.verify import verify_dataset
from embedbatch.workspace import Workspace
from tests.conftest import DATA, cli_env, run_cli, sample_rows, write_jsonl

MODEL = "text-embedding-3-small"


def test_decode_base64_and_float() -> None:
    v = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    b64 = base64.b64encode(v.astype("<f4").tobytes()).decode()
    assert v.tolist() == decode_vector(b64).tolist() == decode_vector([0.5, -1.25, 3.0]).tolist()
    with pytest.raises(ValueError):
        decode_vector(base64.b64encode(b"abc").decode())


def _line(cid: str, vec: object, status: int = 200) -> bytes:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vec}],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    return (
        orjson.dumps({"id": "r", "custom_id": cid, "response": {"status_code": status, "body": body}, "error": None})
        + b"\n"
    )


def test_read_batch_results_every_failure_kind(tmp_path: Path) -> None:
    """Good lines map by custom_id; bad status, wrong dim, NaN, both error shapes and absent ids fail."""
    ids = ["ok1", "ok2", "dim", "nan", "err_body", "expired", "absent"]
    records = BatchRecords()
    for i in ids:
        records.append(i, None, {}, 1)
    records.write(tmp_path / "records.parquet")
    (tmp_path / "input.jsonl").write_bytes(
        b"".join(
            orjson.dumps({"custom_id": i, "method": "POST", "url": "/v1/embeddings", "body": {"input": i}}) + b"\n"
            for i in ids
        )
    )
    good = np.ones(4, np.float32)
    out = [
        _line("ok2", [2.0] * 4),
        _line("dim", [1.0] * 3),
        _line("nan", [float("nan")] * 4),
        _line("ok1", base64.b64encode(good.tobytes()).decode()),
    ]
    (tmp_path / "output.jsonl").write_bytes(b"".join(out))
    errs = [
        orjson.dumps(
            {
                "id": "r",
                "custom_id": "err_body",
                "response": {
                    "status_code": 400,
                    "body": {"error": {"message": "too long", "type": "invalid_request_error", "code": None}},
                },
                "error": None,
            }
        ),
        orjson.dumps(
            {
                "id": "r",
                "custom_id": "expired",
                "response": None,
                "error": {"code": "batch_expired", "message": "not executed"},
            }
        ),
    ]
    (tmp_path / "errors.jsonl").write_bytes(b"\n".join(errs) + b"\n")
    res = read_batch_results(tmp_path, expected_dim=4, remote_status="expired")
    assert [True, True, False, False, False, False, False] == res.ok.tolist()
    assert [1.0] * 4 == res.vectors[0].tolist() and [2.0] * 4 == res.vectors[1].tolist()
    reasons = {rid: reason for rid, reason, _ in res.failed}
    assert reasons["dim"].startswith("dimension 3")
    assert reasons["nan"].startswith("non-finite")
    assert reasons["err_body"].startswith("http 400")
    assert reasons["expired"].startswith("batch_expired")
    assert reasons["absent"] == "missing from output (batch expired)"
    assert 6 == res.usage_tokens


def test_run_with_faults_every_row_once_or_failed(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """`run` with failing lines, an expired batch and 429s: each id is in exactly one shard with
    the server's vector for exactly its text, or in failed_ids.tsv; verify passes; DuckDB reads it."""
    f = server.state.faults
    f.line_error_rate, f.expire_batches, f.rate_429, f.paths = 0.1, 1, 0.1, ["/batches"]
    rows = sample_rows(60)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    env = cli_env(server, ws)
    r = run_cli(
        [
            "run",
            str(path),
            "--fields",
            "title,body",
            "--max-requests-per-batch",
            "20",
            "--poll-seconds",
            "0.05",
            "--max-attempts",
            "2",
            "--rows-per-shard",
            "25",
            "--json",
        ],
        env,
        tmp_path,
    )
    summary = orjson.loads(r.stdout)
    run_dir = Path(summary["run_dir"])
    failed = [ln.split("\t") for ln in (run_dir / "failed_ids.tsv").read_text().splitlines()[1:]]
    failed_ids = {x[0] for x in failed}
    assert (8 if failed_ids else 0) == r.returncode, r.stderr  # 8: the run ended with failed rows
    assert len(failed_ids) == summary["failed"]
    import duckdb

    rel = duckdb.sql(f"SELECT id, text, embedding FROM read_parquet('{ws.root}/embeddings/{MODEL}/d/*.parquet')")
    assert rel is not None
    got = rel.fetchall()
    shard_ids = [g[0] for g in got]
    assert len(shard_ids) == len(set(shard_ids))
    assert {r["id"] for r in rows} == set(shard_ids) | failed_ids
    assert not set(shard_ids) & failed_ids
    assert (len(shard_ids), len(failed_ids)) == (summary["embedded"], summary["failed"])
    backend = HashBackend()
    by_id = {r["id"]: f"{r['title']}\n\n{r['body']}" for r in rows}
    for rid, text, emb in got:
        assert by_id[rid] == text
        assert np.allclose(backend.embed([text], MODEL, None)[0], np.array(emb, np.float32))
    assert verify_dataset(ws, MODEL, "d").ok
    assert all(x[1] for x in failed)


def test_float16_and_footer_stats(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(5))
    env = cli_env(server, ws)
    r = run_cli(
        [
            "run",
            str(path),
            "--fields",
            "title,body",
            "--dimensions",
            "32",
            "--dtype",
            "float16",
            "--poll-seconds",
            "0.05",
        ],
        env,
        tmp_path,
    )
    assert 0 == r.returncode, r.stderr
    m = Manifest.load(ws, MODEL, "d")
    shard = ws.shards_dir(MODEL, "d") / m.shards[0]["file"]
    pf = pq.ParquetFile(shard)
    footer = orjson.loads(pf.metadata.metadata[b"embedbatch"])
    assert (5, 32, "float16") == (footer["rows"], footer["dim"], footer["dtype"])
    assert abs(footer["max_norm"] - 1.0) < 1e-2
    assert "fixed_size_list<element: halffloat>[32]" == str(pf.schema_arrow.field("embedding").type)
    assert [
        "id",
        "source",
        "dataset",
        "split",
        "text",
        "metadata",
        "embedding",
        "model",
        "created_at",
        "run_id",
        "parent_id",
        "chunk_index",
    ] == pf.schema_arrow.names
    assert pf.read(columns=["parent_id", "chunk_index"]).to_pylist()[0] == {"parent_id": None, "chunk_index": None}


def test_verify_catches_corruption(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(5))
    env = cli_env(server, ws)
    assert (
        0 == run_cli(["run", str(path), "--fields", "title,body", "--poll-seconds", "0.05"], env, tmp_path).returncode
    )
    m = Manifest.load(ws, MODEL, "d")
    shard = ws.shards_dir(MODEL, "d") / m.shards[0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli(["verify"], env, tmp_path)
    assert r.returncode == 1
    assert "sha256 differs" in r.stdout


def test_changed_text_supersedes(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    """Re-running after a row's text changed embeds only that row; the newer row wins."""
    rows = sample_rows(4)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    env = cli_env(server, ws)
    assert (
        0 == run_cli(["run", str(path), "--fields", "title,body", "--poll-seconds", "0.05"], env, tmp_path).returncode
    )
    rows[1]["title"] = "Changed"
    write_jsonl(path, rows)
    r = run_cli(["run", str(path), "--fields", "title,body", "--poll-seconds", "0.05", "--json"], env, tmp_path)
    assert orjson.loads(r.stdout)["embedded"] == 1
    rep = verify_dataset(ws, MODEL, "d")
    assert (True, 4) == (rep.ok, rep.rows)
    r = run_cli(["search", "Changed\n\nBody text number 1 about topic 1.", "--dataset", "d", "--json"], env, tmp_path)
    top = orjson.loads(r.stdout)[0]
    assert ("doc-1", True) == (top["id"], top["score"] > 0.999)


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
def test_arxiv_dry_run_writes_files(tmp_path: Path, ws: Workspace, server: ServerThread) -> None:
    env = cli_env(server, ws)
    r = run_cli(
        [
            "submit",
            str(DATA / "arxiv_cs_daily_2025.jsonl.gz"),
            "--fields",
            "title,summary",
            "--n",
            "300",
            "--max-requests-per-batch",
            "100",
            "--dry-run",
            "--json",
        ],
        env,
        tmp_path,
    )
    assert 0 == r.returncode, r.stderr
    est = orjson.loads(r.stdout.split("\ndry run")[0])
    run_dir = Path(est["run_dir"])
    lines = [len((run_dir / "batches" / f"batch_00{i}" / "input.jsonl").read_bytes().splitlines()) for i in (1, 2, 3)]
    assert ([100, 100, 100], 3, 0) == (lines, est["batches"], len(server.state.files))
