"""Compressed vector storage: how a shard's ``embedding`` column encodes its vectors.

``--store-dtype``:

- ``float32`` (default), ``float16``: ``fixed_size_list<float32|float16>[dim]``.
- ``int8``: ``fixed_size_binary[dim]``, one signed byte per dimension (Parquet has no 1-byte
  integer type: a list of int8 would be stored as 4-byte INT32 values), scalar quantisation with
  per-dimension ranges
  ``[lo, hi]`` (``q = round((x - lo) / (hi - lo) · 255) - 128``, clipped). The ranges are
  calibrated on the dataset's first :data:`CALIBRATION_ROWS` rows (a shard's writer buffers them),
  kept in the manifest and used unchanged by every later writer, so every shard decodes alike
  and an index built over several shards agrees with them; each shard also carries the ranges
  it was written with in its Parquet schema metadata, so a shard decodes on its own. Values
  outside the ranges are clipped and counted (``clipped`` in the shard's stats).
- ``binary``: ``fixed_size_binary[ceil(dim / 8)]``, one sign bit per dimension (``x > 0``),
  packed big-endian as ``numpy.packbits`` does. Dequantised, a bit is ``±1/sqrt(dim)`` (a unit
  vector with the signs).

``--keep-float float16`` keeps the vector beside the compressed one in ``embedding_float``
(``fixed_size_list<float16>[dim]``) for rescoring and for readers that need the values (get,
export, sinks); ``none`` keeps only the compressed column.

Published figures this design follows (Hugging Face, "Embedding Quantization", 2024-03-22;
sentence-transformers ``quantize_embeddings``): int8 keeps ~97–99 % of retrieval quality at 4×
less memory; binary keeps ~92–96 % with rescoring at 32× less; rescoring retrieves
``rescore_multiplier × k`` candidates with the compressed vectors, then scores them with the
float ones.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

__all__ = [
    "CALIBRATION_ROWS",
    "COMPRESSED",
    "FLOAT_COLUMN",
    "MATRYOSHKA_MODELS",
    "STORE_DTYPES",
    "Codec",
    "calibrate",
    "check_truncation",
    "codec_from_json",
    "codec_from_metadata",
    "decode_column",
    "itemsize",
    "truncate",
]

STORE_DTYPES = ("float32", "float16", "int8", "binary")
COMPRESSED = ("int8", "binary")
FLOAT_COLUMN = "embedding_float"  # --keep-float float16: the vectors beside int8/binary ones
CALIBRATION_ROWS = 10_000  # rows the int8 ranges are calibrated on (a writer buffers them)
METADATA_KEY = b"embedbatch.codec"


@dataclass(frozen=True)
class Codec:
    """How an ``embedding`` column encodes ``dim``-d vectors (see the module docstring).

    Attributes:
        dtype: one of :data:`STORE_DTYPES`.
        lo / hi: int8 only: per-dimension ranges, ``(dim,)`` float32.
    """

    dtype: str
    dim: int
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    def arrow_type(self) -> pa.DataType:
        """The ``embedding`` column's Arrow type."""
        if self.dtype == "binary":
            return pa.binary((self.dim + 7) // 8)
        if self.dtype == "int8":
            return pa.binary(self.dim)
        return pa.list_(pa.float16() if self.dtype == "float16" else pa.float32(), self.dim)

    def encode(self, vectors: np.ndarray) -> tuple[pa.Array, int]:
        """``(n, dim)`` float32 → the column's values, and how many int8 values were clipped.

        Raises:
            ValueError: int8 without ranges.
        """
        n = len(vectors)
        if self.dtype == "binary":
            bits = np.packbits(vectors > 0, axis=1)
            return pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(bits.shape[1]), n, [None, pa.py_buffer(bits.tobytes())]
            ), 0
        if self.dtype == "int8":
            if self.lo is None or self.hi is None:
                raise ValueError("int8 storage needs calibrated ranges")
            scaled = (vectors - self.lo) / np.maximum(self.hi - self.lo, 1e-12) * 255.0 - 128.0
            q = np.rint(scaled)
            clipped = int(((q < -128) | (q > 127)).sum())
            codes = np.ascontiguousarray(np.clip(q, -128, 127).astype(np.int8))
            column = pa.FixedSizeBinaryArray.from_buffers(self.arrow_type(), n, [None, pa.py_buffer(codes.tobytes())])
            return column, clipped
        flat = vectors.astype(np.float16 if self.dtype == "float16" else np.float32, copy=False).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), self.dim), 0

    def decode(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The column's values as ``(n, dim)`` float32 (dequantised for int8 and binary)."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        n = len(arr)
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        if self.dtype == "binary":
            bits = np.unpackbits(self.bits(arr), axis=1, count=self.dim)
            return (bits.astype(np.float32) * 2.0 - 1.0) / np.float32(np.sqrt(self.dim))
        if self.dtype == "int8":
            assert self.lo is not None and self.hi is not None
            q = self.codes(arr).astype(np.float32)
            out: np.ndarray = ((q + 128.0) / 255.0 * (self.hi - self.lo) + self.lo).astype(np.float32)
            return out
        flat = arr.values.to_numpy(zero_copy_only=False)
        return np.asarray(flat, dtype=np.float32).reshape(n, -1)

    def bits(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """binary only: the packed sign bits, ``(n, ceil(dim / 8))`` uint8 (Faiss's and the
        Hamming scan's input)."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        width = arr.type.byte_width
        raw = np.frombuffer(arr.buffers()[1], np.uint8, count=len(arr) * width, offset=arr.offset * width)
        return raw.reshape(len(arr), width)

    def codes(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int8 only: the codes, ``(n, dim)`` int8."""
        return self.bits(column).view(np.int8)

    def int8_dot(self, column: pa.Array | pa.ChunkedArray, query: np.ndarray) -> np.ndarray:
        """int8 only: ``dequantised · query`` for each row, ``(n,)`` float32, without
        dequantising: ``codes @ (q · step) + q · (lo + 128 · step)`` (one int8 → float32
        conversion and one matrix-vector product)."""
        assert self.lo is not None and self.hi is not None
        step = (self.hi - self.lo) / 255.0
        scaled = (query * step).astype(np.float32)
        offset = float(query @ (self.lo + 128.0 * step))
        out: np.ndarray = self.codes(column).astype(np.float32) @ scaled + np.float32(offset)
        return out

    def metadata(self) -> dict[bytes, bytes]:
        """The shard schema metadata that lets a shard decode on its own."""
        d: dict[str, Any] = {"dtype": self.dtype, "dim": self.dim}
        if self.lo is not None and self.hi is not None:
            d["lo"] = base64.b64encode(self.lo.astype("<f4").tobytes()).decode()
            d["hi"] = base64.b64encode(self.hi.astype("<f4").tobytes()).decode()
        return {METADATA_KEY: orjson.dumps(d)}

    def to_json(self) -> dict[str, Any]:
        """The manifest's form (``quantization``): dtype and, for int8, the ranges."""
        out: dict[str, Any] = orjson.loads(self.metadata()[METADATA_KEY])
        return out


def codec_from_json(d: dict[str, Any]) -> Codec:
    """A :class:`Codec` from :meth:`Codec.to_json`."""
    lo = np.frombuffer(base64.b64decode(d["lo"]), "<f4").astype(np.float32) if d.get("lo") else None
    hi = np.frombuffer(base64.b64decode(d["hi"]), "<f4").astype(np.float32) if d.get("hi") else None
    return Codec(str(d["dtype"]), int(d["dim"]), lo, hi)


def codec_from_metadata(schema: pa.Schema) -> Codec:
    """The codec of a shard from its schema: its metadata when it has ours, else the
    ``embedding`` column's type (float32/float16 shards, also those written before int8)."""
    md = schema.metadata or {}
    if METADATA_KEY in md:
        return _codec_from_bytes(md[METADATA_KEY])
    t = schema.field("embedding").type
    if pa.types.is_fixed_size_binary(t):  # (our compressed shards always carry their metadata)
        return Codec("binary", t.byte_width * 8)
    return Codec("float16" if t.value_type == pa.float16() else "float32", t.list_size)


@functools.lru_cache(maxsize=64)
def _codec_from_bytes(raw: bytes) -> Codec:
    """Parsed once per distinct codec (a scan asks for every batch of every shard)."""
    return codec_from_json(orjson.loads(raw))


def decode_column(schema: pa.Schema, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A shard's ``embedding`` column as ``(n, dim)`` float32, whatever its dtype."""
    return codec_from_metadata(schema).decode(column)


def calibrate(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension int8 ranges from ``(n, dim)`` float32 sample vectors: each dimension's
    minimum and maximum (as sentence-transformers' calibration does), widened by 5 % of the span
    so that later rows rarely clip, as ``(lo, hi)`` ``(dim,)`` float32."""
    lo = vectors.min(axis=0)
    hi = vectors.max(axis=0)
    span = np.maximum(hi - lo, 1e-6)
    return (lo - 0.05 * span).astype(np.float32), (hi + 0.05 * span).astype(np.float32)


# Models trained so that a prefix of the vector is itself an embedding (Matryoshka
# representation learning), from their model cards (checked 2026-12): OpenAI's
# text-embedding-3 models (the API's ``dimensions``), nomic-embed-text-v1.5,
# mxbai-embed-large-v1, jina-embeddings-v3, Snowflake's arctic-embed v1.5/v2, gemini-embedding-001
# and the *matryoshka* sentence-transformers models.
MATRYOSHKA_MODELS = (
    "text-embedding-3-small",
    "text-embedding-3-large",
    "nomic-embed-text-v1.5",
    "mxbai-embed-large-v1",
    "jina-embeddings-v3",
    "snowflake-arctic-embed-m-v1.5",
    "snowflake-arctic-embed-l-v2.0",
    "snowflake-arctic-embed-m-v2.0",
    "gemini-embedding-001",
)


def check_truncation(model: str, dim: int | None, *, force: bool = False) -> None:
    """Refuse ``--truncate-dim`` for a model not known to be trained for it (its prefixes are
    not embeddings: search quality falls apart), unless ``force``.

    Raises:
        UsageError: the model is not in :data:`MATRYOSHKA_MODELS` (nor named *matryoshka*).
    """
    if dim is None or force:
        return
    name = model.rstrip("/").rsplit("/", 1)[-1].lower()
    if name in MATRYOSHKA_MODELS or "matryoshka" in name:
        return
    from embedbatch.errors import UsageError

    raise UsageError(
        f"--truncate-dim {dim}: {model} is not known to keep its quality when cut (Matryoshka-trained models: "
        f"{', '.join(MATRYOSHKA_MODELS)}); pass --force to cut anyway"
    )


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` components of ``(n, d)`` vectors, L2-normalised: ``(n, dim)`` float32.

    Raises:
        ValueError: ``dim`` is above ``d``.
    """
    if dim > vectors.shape[1]:
        raise ValueError(f"--truncate-dim {dim} is above the vectors' {vectors.shape[1]} dimensions")
    cut = np.asarray(vectors[:, :dim], np.float32)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    out: np.ndarray = cut / np.where(norms == 0, 1.0, norms)
    return out


def itemsize(dtype: str) -> float:
    """Bytes per dimension of the ``embedding`` column: 4, 2, 1 or 1/8."""
    return {"float32": 4.0, "float16": 2.0, "int8": 1.0, "binary": 0.125}[dtype]
