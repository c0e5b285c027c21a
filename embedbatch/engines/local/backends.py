"""Other runtimes for the local encoder: ONNX Runtime (fp32, dynamic int8) and OpenVINO (fp32,
bf16, fp16, weight-compressed int8), both on CPU.

sentence-transformers' own ``backend="onnx"``/``"openvino"`` need ``optimum``/``optimum-intel``,
whose releases pin older transformers/sentence-transformers than this project's torch 2.13
stack, so the model is exported here instead: the Transformer module alone (``torch.onnx.export``,
the TorchScript exporter, opset 17, dynamic batch and sequence axes), with pooling (mean, cls or
max) and normalisation done in NumPy as the model's Pooling and Normalize modules do. OpenVINO
converts that ONNX file (``openvino.convert_model``).

int8:
- onnx: ONNX Runtime's dynamic quantization (``quantize_dynamic``): QInt8 weights, per channel,
  of the attention MatMuls; the feed-forward MatMuls stay float32. Measured on
  all-MiniLM-L6-v2 over the quality probes: quantizing every MatMul gives a minimum cosine of
  0.970 (the two-token text "ok" suffers most), leaving the feed-forward ones in float32 0.992.
- openvino: NNCF's ``compress_weights`` (int8 asymmetric, per channel, every MatMul), which
  the CPU plugin runs with activations quantized on the fly (its dynamic quantization).
  Measured the same way: minimum cosine 0.997.

OpenVINO's CPU plugin computes in bf16 by default where the CPU has it; here the precision
follows ``--dtype`` (``INFERENCE_PRECISION_HINT``), so ``float32`` means float32.

Exports are cached under ``{cache_dir}/{model label}/{backend}-{fp32|int8}-{key}/`` with
``cache.json``; ``key`` hashes the model's folder or name, the quantization and the torch,
transformers, onnx and runtime versions, so an upgrade exports again and a second run reuses
the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from embedbatch.errors import MissingExtraError, UsageError
from embedbatch.workspace import atomic_write_json

__all__ = ["BACKENDS", "OnnxRunner", "OpenVinoRunner", "export_key"]

BACKENDS = ("torch", "onnx", "openvino")
OPSET = 17
# --dtype → OpenVINO's INFERENCE_PRECISION_HINT
_OV_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _versions(backend: str) -> dict[str, str]:
    import onnx
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__}
    if backend == "onnx":
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    else:
        import openvino

        out["openvino"] = openvino.__version__
    return out


def _is_ffn(node: str) -> bool:
    """A feed-forward MatMul of a BERT-style layer (``intermediate``, or ``output/dense``
    outside attention): kept in float32 by the onnx int8 export."""
    return "intermediate" in node or ("output/dense" in node and "attention" not in node)


def export_key(model_ref: str, quantize: str | None, backend: str = "onnx") -> tuple[str, dict[str, Any]]:
    """(16 hex digits, the parts hashed) for a model folder or hub name, a quantization and a
    backend (``onnx`` or ``openvino``).

    Raises:
        ImportError: the backend's runtime is not installed.
    """
    parts: dict[str, Any] = {"model": os.path.abspath(model_ref) if os.path.isdir(model_ref) else model_ref}
    parts.update(_versions(backend))
    parts["backend"] = backend
    parts["quantize"] = quantize or "fp32"
    parts["opset"] = OPSET
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16], parts


class _Exported:
    """A SentenceTransformer's Transformer module exported to another runtime, pooled (and
    normalised) in NumPy as the model's own modules do.

    Subclasses set ``backend`` and ``filename``, and implement ``_convert`` (make the cached
    file from an exported fp32 ONNX file), ``_load`` and ``_hidden`` (one forward pass:
    ``(n, seq, hidden) float32``).

    Attributes:
        cache_hit: True when the export was found in the cache.
        path: the model file in use.

    Raises:
        MissingExtraError: the runtime is missing.
        UsageError: a model whose modules are not Transformer + Pooling (+ Normalize), or a
            quantization other than int8.
    """

    backend = ""
    filename = ""

    def __init__(self, st_model: Any, model_ref: str, label: str, cache_dir: Path, quantize: str | None) -> None:
        if quantize not in (None, "int8"):
            raise UsageError(f"--quantize must be int8 (or absent), got {quantize!r}")
        kinds = [type(m).__name__ for m in st_model]
        if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
            raise UsageError(f"the {self.backend} backend runs Transformer + Pooling (+ Normalize) models, not {kinds}")
        config = st_model[1].get_config_dict()
        self.pooling = str(config.get("pooling_mode") or "mean")
        if self.pooling not in ("mean", "cls", "max"):
            raise UsageError(f"the {self.backend} backend pools mean, cls or max, not {self.pooling!r}")
        self.normalize = "Normalize" in kinds
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                            if n in st_model.tokenizer.model_input_names]  # fmt: skip
        key, parts = export_key(model_ref, quantize, self.backend)
        folder = cache_dir / label / f"{self.backend}-{quantize or 'fp32'}-{key}"
        self.path = folder / self.filename
        self.cache_hit = self.path.is_file()
        started = time.perf_counter()
        if not self.cache_hit:
            folder.mkdir(parents=True, exist_ok=True)
            fp32 = folder / ".model.fp32.onnx.tmp"
            export_onnx(st_model, self.input_names, fp32)
            self._convert(fp32, folder, quantize)
            fp32.unlink(missing_ok=True)
            atomic_write_json(folder / "cache.json", {**parts, "export_s": round(time.perf_counter() - started, 2)})

    def _convert(self, fp32: Path, folder: Path, quantize: str | None) -> None:
        raise NotImplementedError

    def _hidden(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``(n, seq)`` int64 ids and mask → ``(n, dim)`` float32 sentence embeddings."""
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self._hidden({k: v for k, v in feeds.items() if k in self.input_names})
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


def export_onnx(st_model: Any, input_names: list[str], path: Path) -> None:
    """Write the model's Transformer module (``last_hidden_state`` output) as fp32 ONNX to ``path``."""
    import torch

    transformer = st_model[0].auto_model

    class _Hidden(torch.nn.Module):
        def __init__(self, model: Any, names: list[str]) -> None:
            super().__init__()
            self.model = model
            self.names = names

        def forward(self, *inputs: Any) -> Any:
            return self.model(**dict(zip(self.names, inputs, strict=True))).last_hidden_state

    wrapper = _Hidden(transformer, input_names).eval()
    example = torch.ones((2, 16), dtype=torch.long)
    mask = torch.ones_like(example)
    mask[1, 9:] = 0  # a padded row, so the masking path is what is traced
    args = {"input_ids": example, "attention_mask": mask, "token_type_ids": torch.zeros_like(example)}
    axes = {n: {0: "batch", 1: "sequence"} for n in [*input_names, "last_hidden_state"]}
    # The tracer warns about Python conditionals in transformers' masking code; the traced
    # graph is checked by the quality guard against the torch model instead.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            tuple(args[n] for n in input_names),
            str(path),
            input_names=input_names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


class OnnxRunner(_Exported):
    """The model in ONNX Runtime (CPU), fp32 or dynamic int8; see the module docstring.

    Args:
        st_model: the loaded ``SentenceTransformer`` (fp32, CPU: exported from it).
        model_ref: its folder or hub name (the cache key).
        label: the model's workspace label (the cache folder).
        cache_dir: ``workspace/cache/models``.
        quantize: None or ``int8``.
    """

    backend = "onnx"
    filename = "model.onnx"

    def __init__(self, st_model: Any, model_ref: str, label: str, cache_dir: Path, quantize: str | None) -> None:
        try:
            import onnx  # noqa: F401
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingExtraError("onnx and onnxruntime", "onnx") from exc
        super().__init__(st_model, model_ref, label, cache_dir, quantize)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def _convert(self, fp32: Path, folder: Path, quantize: str | None) -> None:
        if quantize != "int8":
            os.replace(fp32, self.path)
            return
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
        os.replace(tmp, self.path)

    def _hidden(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run(None, feeds)[0])


class OpenVinoRunner(_Exported):
    """The model in OpenVINO's CPU runtime; see the module docstring.

    Args:
        st_model, model_ref, label, cache_dir, quantize: as :class:`OnnxRunner`.
        dtype: the compute precision, ``float32``, ``bfloat16`` or ``float16``.

    Raises:
        MissingExtraError: openvino (or, for int8, nncf) is missing.
    """

    backend = "openvino"
    filename = "model.xml"

    def __init__(
        self, st_model: Any, model_ref: str, label: str, cache_dir: Path, quantize: str | None, dtype: str
    ) -> None:
        try:
            import onnx  # noqa: F401
            import openvino as ov

            if quantize == "int8":
                import nncf  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError("openvino, nncf and onnx", "openvino") from exc
        if dtype not in _OV_PRECISION:
            raise UsageError(f"the openvino backend computes in {', '.join(_OV_PRECISION)}, not {dtype!r}")
        super().__init__(st_model, model_ref, label, cache_dir, quantize)
        core = ov.Core()
        self.compiled = core.compile_model(
            str(self.path), "CPU", {"INFERENCE_PRECISION_HINT": _OV_PRECISION[dtype], "PERFORMANCE_HINT": "LATENCY"}
        )
        self.request = self.compiled.create_infer_request()

    def _convert(self, fp32: Path, folder: Path, quantize: str | None) -> None:
        import openvino as ov

        model = ov.convert_model(str(fp32))
        if quantize == "int8":
            # NNCF logs its statistics table and draws a progress bar on stdout, which belongs
            # to the command's own output (``--json``): quieten the one, move the other.
            with contextlib.redirect_stdout(sys.stderr):
                import nncf

                nncf.set_log_level(logging.WARNING)
                model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        tmp = folder / ".model.tmp.xml"
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), self.path.with_suffix(".bin"))
        os.replace(tmp, self.path)  # the .xml last: its presence means the pair is complete

    def _hidden(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.request.infer(feeds)[0])
