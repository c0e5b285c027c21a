"""``embedbatch import``: bring your own vectors into a dataset, exactly once.

Sources: Parquet (one file, or a folder of ``*.parquet`` read in name order) with an id, an
optional text and a vector column (``fixed_size_list`` or ``list`` of floats); or the layout
``embedbatch export --format npy`` writes (``vectors.npy`` + ``ids.txt``, a folder or the
``.npy`` file itself). Rows stream in parts of ``rows_per_part`` (memory: one part).

Every part is checked before anything of it is written: ids present and unique within the
import, one dimension (the dataset's, when it has rows), finite values; a bad row stops the
import with the file, row and field. Each part commits as one shard through the dataset store,
keyed ``{import id}/part-NNNNNN`` in the manifest's sources, where the import id is a digest of
the source (paths, sizes, modification times) and the fields: a killed import run again skips
the parts already committed and goes on, so every row lands once. An id the dataset already
holds is replaced (its old row is superseded), as when a row is embedded again. One import of a
dataset runs at a time (the dataset's ``import`` engine lock).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.errors import InputError, UsageError
from embedbatch.failures import tsv_unescape
from embedbatch.store.dataset import DatasetStore
from embedbatch.store.index import id_key
from embedbatch.store.quant import STORE_DTYPES
from embedbatch.workspace import Workspace, crash_point, utc_now

__all__ = ["ImportResult", "import_vectors"]


@dataclass
class ImportResult:
    """What an import did.

    Attributes:
        rows: rows committed by this call; skipped_rows: rows of parts an earlier (killed)
            call had committed already.
        parts: parts in the source; shards: shard files this call added.
    """

    import_id: str
    model: str
    dataset: str
    dim: int = 0
    rows: int = 0
    skipped_rows: int = 0
    parts: int = 0
    shards: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Part:
    file: str
    first_row: int  # 0-based row of the part's first row in ``file``
    ids: list[str]
    texts: list[str]
    vectors: np.ndarray


def _files(source: Path) -> list[Path]:
    if source.is_dir():
        if (source / "vectors.npy").exists():
            return [source / "vectors.npy"]
        files = sorted(source.glob("*.parquet"))
        if not files:
            raise UsageError(f"{source}: no *.parquet files and no vectors.npy to import")
        return files
    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    return [source]


def _import_id(files: list[Path], fields: tuple[str, ...]) -> str:
    h = hashlib.sha256(orjson.dumps(fields))
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "import_" + h.hexdigest()[:16]


def _vectors(col: pa.ChunkedArray | pa.Array, name: str, field_name: str, first_row: int) -> np.ndarray:
    """``(n, dim)`` float32 from a fixed-size or variable list column of equal lengths."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        row = first_row + int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"field {field_name!r} is null", path=name, line=row + 1)
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.diff(arr.offsets.to_numpy())
        dim = int(lengths[0]) if len(lengths) else 0
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            raise InputError(
                f"field {field_name!r} has {int(lengths[bad[0]])} values where earlier rows have {dim}",
                path=name,
                line=first_row + int(bad[0]) + 1,
            )
    else:
        raise InputError(f"field {field_name!r} is {arr.type}, not a list of floats", path=name, line=first_row + 1)
    values: np.ndarray = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(arr), dim)


def _parquet_parts(path: Path, rows: int, id_field: str, text_field: str | None, vector_field: str) -> Iterator[_Part]:
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    for needed in (id_field, vector_field):
        if needed not in names:
            raise InputError(f"no field {needed!r} (fields: {', '.join(sorted(names))})", path=str(path), line=1)
    with_text = text_field is not None and text_field in names
    columns = [id_field, vector_field, *([text_field] if with_text and text_field else [])]
    first = 0
    for batch in pf.iter_batches(batch_size=rows, columns=columns):
        ids_col = batch.column(id_field)
        ids = [None if v is None else str(v) for v in ids_col.to_pylist()]
        texts = [t or "" for t in batch.column(text_field).to_pylist()] if with_text and text_field else [""] * len(ids)
        vecs = _vectors(batch.column(vector_field), str(path), vector_field, first)
        yield _Part(str(path), first, ids, texts, vecs)  # type: ignore[arg-type]
        first += len(ids)


def _npy_parts(path: Path, rows: int) -> Iterator[_Part]:
    ids_path = path.with_name("ids.txt")
    if not ids_path.exists():
        raise UsageError(f"{path}: the ids go in {ids_path.name} beside it (one per line, as export writes)")
    vectors = np.load(path, mmap_mode="r")
    if vectors.ndim != 2:
        raise InputError(f"expected an (n, dim) array, got shape {vectors.shape}", path=str(path), line=1)
    with open(ids_path, encoding="utf-8", newline="\n") as fh:
        first = 0
        while first < len(vectors):
            ids: list[str] = []
            for _ in range(min(rows, len(vectors) - first)):
                line = fh.readline()
                if not line:  # end of file: an id is missing
                    raise InputError(
                        f"fewer ids than the {len(vectors):,} vectors", path=str(ids_path), line=first + len(ids) + 1
                    )
                ids.append(tsv_unescape(line.rstrip("\n")))
            vecs = np.asarray(vectors[first : first + len(ids)], dtype=np.float32)
            yield _Part(str(ids_path), first, ids, [""] * len(ids), vecs)
            first += len(ids)
        extra = fh.readline()
    if extra.strip():
        raise InputError(f"more ids than the {len(vectors):,} vectors", path=str(ids_path), line=len(vectors) + 1)


def _parts(files: list[Path], rows: int, id_field: str, text_field: str | None, vector_field: str) -> Iterator[_Part]:
    """Every file's rows in parts of at most ``rows`` (a part never spans two files)."""
    for f in files:
        if f.suffix == ".npy":
            yield from _npy_parts(f, rows)
        else:
            yield from _parquet_parts(f, rows, id_field, text_field, vector_field)


def _check(part: _Part, dim: int | None, earlier: np.ndarray, id_field: str) -> None:
    """Raise on the part's first bad row.

    Args:
        earlier: ``(n,)`` bool, the ids an earlier part of this import holds already.
    """
    for i, rid in enumerate(part.ids):
        if not rid:
            raise InputError(f"field {id_field!r} is missing or empty", path=part.file, line=part.first_row + i + 1)
    n, d = part.vectors.shape
    if dim is not None and d != dim:
        raise InputError(f"{d}-d vectors where the dataset has {dim}-d ones", path=part.file, line=part.first_row + 1)
    finite = np.isfinite(part.vectors).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InputError("NaN or infinite value in the vector", path=part.file, line=part.first_row + row + 1)
    keys = np.fromiter((id_key(r) for r in part.ids), np.uint64, count=n)
    order = np.argsort(keys, kind="stable")
    dup = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if len(dup):
        i = int(order[dup[0] + 1])
        raise InputError(f"duplicate id {part.ids[i]!r} in the import", path=part.file, line=part.first_row + i + 1)
    hit = np.flatnonzero(earlier)
    if len(hit):
        i = int(hit[0])
        raise InputError(
            f"duplicate id {part.ids[i]!r}: an earlier row of the import has it",
            path=part.file,
            line=part.first_row + i + 1,
        )


def _earlier(store: DatasetStore, import_id: str, ids: list[str]) -> np.ndarray:
    """Which ids a shard this import committed holds (the id index answers, 500 ids a query:
    no id of the import is kept in memory)."""
    manifest = store.manifest()
    mine = [
        n for n, s in enumerate(manifest.shards) if any(x.startswith(f"{import_id}/") for x in s.get("sources", []))
    ]
    if not mine:
        return np.zeros(len(ids), bool)
    index = store.id_index(manifest)
    try:
        return np.isin(index.shard_positions(ids), np.asarray(mine, np.int32))
    finally:
        index.close()


def import_vectors(
    ws: Workspace,
    source: Path,
    *,
    model: str,
    dataset: str,
    id_field: str = "id",
    text_field: str | None = "text",
    vector_field: str = "embedding",
    rows_per_part: int = 100_000,
    dtype: str = "float32",
    keep_float: bool = False,
    truncate_dim: int | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> ImportResult:
    """Import vectors into (model, dataset), exactly once (module doc).

    Args:
        text_field: the text column (Parquet; optional: rows without it get an empty text).
        rows_per_part: rows per part, which is one shard.
        dtype: ``float32``, ``float16``, ``int8`` or ``binary`` shards (:mod:`embedbatch.store.quant`).
        keep_float: int8/binary: keep the vectors as float16 beside them.
        truncate_dim: keep each vector's first N components, re-normalised.

    Returns:
        :class:`ImportResult`.

    Raises:
        UsageError: no such source; a bad dtype or part size.
        InputError: a bad row (file, row and field named); the parts before it are committed,
            and the same command resumes once the source is fixed (a changed source is a new
            import).
        LockedError: another import of the dataset is running.
    """
    if dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if rows_per_part < 1:
        raise UsageError("--rows-per-shard must be at least 1")
    files = _files(Path(source))
    import_id = _import_id(files, (id_field, text_field or "", vector_field, str(rows_per_part)))
    store = DatasetStore(ws, model, dataset)
    result = ImportResult(import_id, model, dataset)
    with store.engine_lock("import"):
        manifest = store.manifest()
        done = manifest.sources()
        dim = None if manifest.truncate_dim else manifest.dimensions  # a cut dataset: the input's own is checked
        for k, part in enumerate(_parts(files, rows_per_part, id_field, text_field, vector_field)):
            result.parts += 1
            key = f"{import_id}/part-{k:06d}"
            if key in done:  # committed by an earlier (killed) call: checked then
                dim = int(part.vectors.shape[1])
                result.skipped_rows += len(part.ids)
                continue
            _check(part, dim, _earlier(store, import_id, part.ids), id_field)
            dim = int(part.vectors.shape[1])
            result.dim = dim
            writer = store.writer(
                dim=dim, dtype=dtype, rows_per_shard=len(part.ids) + 1, keep_float=keep_float, truncate_dim=truncate_dim
            )
            writer.write(
                ids=part.ids,
                texts=part.texts,
                metadata=[
                    orjson.dumps({"file": part.file, "row": part.first_row + i}).decode() for i in range(len(part.ids))
                ],
                splits=[None] * len(part.ids),
                vectors=part.vectors,
                source="import",
                dataset=dataset,
                model=model,
                run_id=import_id,
            )
            writer.add_source(key)
            entries = store.commit(
                writer,
                run_id=import_id,
                run_info={"created_at": utc_now().isoformat(), "kind": "import", "source": str(source)},
            )
            result.shards += [e["file"] for e in entries]
            result.rows += len(part.ids)
            crash_point("import_after_part")
            if on_rows is not None:
                on_rows(result.rows + result.skipped_rows)
    return result
