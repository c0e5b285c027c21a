"""Other runtimes for the local encoder: ONNX Runtime, fp32 or dynamic int8.

sentence-transformers' own ``backend="onnx"`` needs ``optimum``, whose releases pin older
transformers/sentence-transformers than this project's torch 2.13 stack, so the model is
exported here instead: the Transformer module alone (``torch.onnx.export``, the TorchScript
exporter, opset 17, dynamic batch and sequence axes), with pooling (mean, cls or max) and
normalisation done in NumPy as the model's Pooling and Normalize modules do. int8 is
ONNX Runtime's dynamic quantization (``quantize_dynamic``): QInt8 weights, per channel, of the
attention MatMuls; the feed-forward MatMuls stay float32. Measured on all-MiniLM-L6-v2 over the
quality probes: quantizing every MatMul gives a minimum cosine of 0.970 (the two-token text
"ok" suffers most), leaving the feed-forward ones in float32 gives 0.992.

Exports are cached under ``{cache_dir}/{model label}/onnx-{fp32|int8}-{key}/model.onnx`` with
``cache.json``; ``key`` hashes the model's folder or name and the torch, transformers, onnx and
onnxruntime versions, so an upgrade exports again and a second run reuses the file.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from embedbatch.errors import MissingExtraError, UsageError
from embedbatch.workspace import atomic_write_json

__all__ = ["BACKENDS", "OnnxRunner", "export_key"]

BACKENDS = ("torch", "onnx")
OPSET = 17


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _is_ffn(node: str) -> bool:
    """A feed-forward MatMul of a BERT-style layer (``intermediate``, or ``output/dense``
    outside attention): kept in float32 by the int8 export."""
    return "intermediate" in node or ("output/dense" in node and "attention" not in node)


def export_key(model_ref: str, quantize: str | None) -> tuple[str, dict[str, Any]]:
    """(16 hex digits, the parts hashed) for a model folder or hub name and a quantization."""
    parts: dict[str, Any] = {"model": os.path.abspath(model_ref) if os.path.isdir(model_ref) else model_ref}
    parts.update(_versions())
    parts["quantize"] = quantize or "fp32"
    parts["opset"] = OPSET
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16], parts


class OnnxRunner:
    """A SentenceTransformer's Transformer module in ONNX Runtime, pooled as the model does.

    Args:
        st_model: the loaded ``SentenceTransformer`` (fp32, CPU: exported from it).
        model_ref: its folder or hub name (the cache key).
        label: the model's workspace label (the cache folder).
        cache_dir: ``workspace/cache/models``.
        quantize: None or ``int8``.

    Attributes:
        cache_hit: True when the export was found in the cache.
        path: the ``.onnx`` file in use.

    Raises:
        MissingExtraError: onnx or onnxruntime is missing.
        UsageError: a model whose modules are not Transformer + Pooling (+ Normalize).
    """

    def __init__(self, st_model: Any, model_ref: str, label: str, cache_dir: Path, quantize: str | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingExtraError("onnx and onnxruntime", "onnx") from exc
        if quantize not in (None, "int8"):
            raise UsageError(f"--quantize must be int8 (or absent), got {quantize!r}")
        kinds = [type(m).__name__ for m in st_model]
        if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
            raise UsageError(f"the onnx backend runs Transformer + Pooling (+ Normalize) models, not {kinds}")
        config = st_model[1].get_config_dict()
        self.pooling = str(config.get("pooling_mode") or "mean")
        if self.pooling not in ("mean", "cls", "max"):
            raise UsageError(f"the onnx backend pools mean, cls or max, not {self.pooling!r}")
        self.normalize = "Normalize" in kinds
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                            if n in st_model.tokenizer.model_input_names]  # fmt: skip
        key, parts = export_key(model_ref, quantize)
        folder = cache_dir / label / f"onnx-{quantize or 'fp32'}-{key}"
        self.path = folder / "model.onnx"
        self.cache_hit = self.path.is_file()
        started = time.perf_counter()
        if not self.cache_hit:
            folder.mkdir(parents=True, exist_ok=True)
            self._export(st_model, folder, quantize)
            atomic_write_json(folder / "cache.json", {**parts, "export_s": round(time.perf_counter() - started, 2)})
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def _export(self, st_model: Any, folder: Path, quantize: str | None) -> None:
        import torch

        transformer = st_model[0].auto_model

        class _Hidden(torch.nn.Module):
            def __init__(self, model: Any, names: list[str]) -> None:
                super().__init__()
                self.model = model
                self.names = names

            def forward(self, *inputs: Any) -> Any:
                return self.model(**dict(zip(self.names, inputs, strict=True))).last_hidden_state

        wrapper = _Hidden(transformer, self.input_names).eval()
        example = torch.ones((2, 16), dtype=torch.long)
        mask = torch.ones_like(example)
        mask[1, 9:] = 0  # a padded row, so the masking path is what is traced
        args = {"input_ids": example, "attention_mask": mask, "token_type_ids": torch.zeros_like(example)}
        axes = {n: {0: "batch", 1: "sequence"} for n in [*self.input_names, "last_hidden_state"]}
        fp32 = folder / ".model.fp32.onnx.tmp"
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                wrapper,
                tuple(args[n] for n in self.input_names),
                str(fp32),
                input_names=self.input_names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
        if quantize == "int8":
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic

            matmuls = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "MatMul"]
            tmp = folder / ".model.int8.onnx.tmp"
            quantize_dynamic(
                str(fp32),
                str(tmp),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                reduce_range=True,
                nodes_to_exclude=[n for n in matmuls if _is_ffn(n)],
            )
            fp32.unlink()
            os.replace(tmp, self.path)
        else:
            os.replace(fp32, self.path)

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``(n, seq)`` int64 ids and mask → ``(n, dim)`` float32 sentence embeddings."""
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]
        m = mask[..., None].astype(np.float32)
        if self.pooling == "cls":
            out = hidden[:, 0]
        elif self.pooling == "max":
            out = np.where(m > 0, hidden, -1e9).max(axis=1)
        else:
            out = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        out = np.asarray(out, dtype=np.float32)
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
