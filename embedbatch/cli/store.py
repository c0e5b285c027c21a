"""Commands that use the stored embeddings: ``index build`` (Faiss), ``get`` (a row by id, or
a document's chunks), ``delete`` (tombstones), ``export`` (vectors for other tools), ``import``
(vectors from other tools) and ``sql`` (DuckDB over shards, manifests and runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from embedbatch.cli.app import JsonOut, Model, app, open_workspace, settings
from embedbatch.cli.options import SinkOptions, StoreOptions, with_options
from embedbatch.cli.render import console, print_chunks, print_json, print_kv
from embedbatch.errors import NotFoundError, UsageError

index_app = typer.Typer(no_args_is_help=True, help="Vector indexes (Faiss) beside the shards.")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    dataset: Annotated[str | None, typer.Option("--dataset", help="The dataset to index.")] = None,
    model: Model = None,
    kind: Annotated[str, typer.Option("--kind", help="flat, hnsw or ivfpq.")] = "hnsw",
    metric: Annotated[str, typer.Option("--metric", help="cosine, ip or l2.")] = "cosine",
    merge: Annotated[str | None, typer.Option("--merge", help="D1,D2: one index over several datasets.")] = None,
    into: Annotated[str | None, typer.Option("--into", help="With --merge: the merged index's name.")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Start over instead of adding new shards.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Build a Faiss index under indexes/{model}/{dataset}/faiss/; new shards are added on the next
    build; --merge D1,D2 --into D indexes datasets of the same model and dimension together."""
    from embedbatch.search.exact import find_dataset
    from embedbatch.search.index import build_index

    ws = open_workspace()
    if merge:
        if not into or dataset:
            raise UsageError("--merge D1,D2 needs --into NAME (and no --dataset)")
        names = [n.strip() for n in merge.split(",") if n.strip()]
        pairs = [find_dataset(ws, n, model) for n in names]
        if len({m for m, _ in pairs}) != 1:
            raise UsageError(f"--merge needs datasets of one model, got {sorted({m for m, _ in pairs})}; give --model")
        m, datasets = pairs[0][0], [d for _, d in pairs]
    else:
        if not dataset:
            raise UsageError("give --dataset D (or --merge D1,D2 --into D)")
        m, d = find_dataset(ws, dataset, model)
        datasets = [d]
    info = build_index(ws, m, datasets, into=into, kind=kind, metric=metric, rebuild=rebuild)
    if json_out:
        print_json(info.__dict__)
    elif info.unchanged:
        console.print(f"{info.kind}-{info.metric} index of {', '.join(datasets)} is current ({info.count:,} rows)")
    else:
        console.print(
            f"{info.kind}-{info.metric} index of {', '.join(datasets)}: {info.count:,} rows "
            f"({info.added:,} added) in {info.build_s:.1f} s → {info.path}",
            markup=False,
        )


@app.command()
def get(
    record_id: Annotated[str, typer.Argument(help="The row's id.")],
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset (see `embedbatch list`).")],
    model: Model = None,
    chunks: Annotated[bool, typer.Option("--chunks", help="List the chunks of this document instead.")] = False,
    chunk_id_template: Annotated[
        str, typer.Option("--chunk-id-template", help="With --chunks: the chunk ids' template.")
    ] = "{parent_id}#{k}",
    json_out: JsonOut = False,
) -> None:
    """A stored row by id: text, metadata and vector, through the id index (one row group read);
    with --chunks, a document's chunks (index, id, characters, tokens, text)."""
    from embedbatch.search.exact import find_dataset
    from embedbatch.store.dataset import DatasetStore

    ws = open_workspace()
    m, d = find_dataset(ws, dataset, model)
    if chunks:
        found = DatasetStore(ws, m, d).chunks_of(record_id, template=chunk_id_template)
        if not found:
            raise NotFoundError(f"no chunks of {record_id!r} in dataset {m}/{d} (ids {chunk_id_template})")
        if json_out:
            print_json(found)
        else:
            print_chunks(record_id, found)
        return
    (row,) = DatasetStore(ws, m, d).get([record_id])
    if row is None:
        raise NotFoundError(f"no id {record_id!r} in dataset {m}/{d}")
    vec = row.pop("embedding")
    row["dimensions"] = len(vec)
    row["embedding_from"] = _vector_source(ws, m, d, row["shard"])  # e.g. "int8 (dequantised)"
    if json_out:
        print_json({**_plain(row), "embedding": [float(x) for x in vec]})
        return
    preview = ", ".join(f"{x:.4f}" for x in vec[:6])
    print_kv(
        f"{m}/{d}: {record_id}", [(k, str(v)) for k, v in _plain(row).items()] + [("embedding", f"[{preview}, …]")]
    )


@app.command()
@with_options
def delete(
    sink: SinkOptions,
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset to delete rows from.")],
    ids: Annotated[str | None, typer.Option("--ids", help="Comma-separated ids.")] = None,
    ids_file: Annotated[Path | None, typer.Option("--ids-file", help="A file of ids, one a line.")] = None,
    model: Model = None,
    json_out: JsonOut = False,
) -> None:
    """Take rows out of the dataset's current view (search, get, sql, export, verify): a
    tombstone commit, exactly once. Ids the dataset does not hold are reported, not an error.
    With sink flags (--pg-table/--pg-chunks-table, --libsql-url with --libsql-table or
    --libsql-chunks-table) the same ids leave those tables too (in a chunks table, a parent id
    also deletes its chunks)."""
    from embedbatch.search.exact import find_dataset
    from embedbatch.store.dataset import DatasetStore
    from embedbatch.workspace import utc_stamp

    if (ids is None) == (ids_file is None):
        raise UsageError("give --ids a,b,c or --ids-file FILE")
    if ids_file is not None:
        try:
            wanted = [line.rstrip("\r") for line in ids_file.read_text(encoding="utf-8").split("\n") if line.strip()]
        except OSError as exc:
            raise UsageError(f"--ids-file {ids_file}: {exc.strerror or exc}") from exc
    else:
        wanted = [i.strip() for i in (ids or "").split(",") if i.strip()]
    ws = open_workspace()
    m, d = find_dataset(ws, dataset, model)
    key = f"delete_{utc_stamp()}"
    gone = DatasetStore(ws, m, d).delete(wanted, key=key, run_id=key, run_info={"kind": "delete"})
    missing = len(set(wanted) - set(gone))
    tables = _delete_from_sinks(sink, wanted)
    if json_out:
        print_json({"deleted": len(gone), "not_found": missing, "key": key, "tables": tables})
    else:
        console.print(
            f"deleted {len(gone):,} row(s) from {m}/{d}" + (f"; {missing:,} id(s) not found" if missing else "")
        )
        for table, n in tables.items():
            console.print(f"deleted {n:,} row(s) from {table}")


def _delete_from_sinks(sink: SinkOptions, ids: list[str]) -> dict[str, int]:
    """The ids out of the database targets the flags name; table → rows deleted."""
    import anyio

    from embedbatch.sinks import chunks

    out: dict[str, int] = {}
    cfg = settings()
    pg = sink.target()
    if pg is not None:
        dsn = sink.dsn(cfg)
        if not dsn:
            raise UsageError("--pg-table/--pg-chunks-table need a database: set DATABASE_URL or pass --pg-dsn")
        out[f"postgres:{pg.table}"] = anyio.run(chunks.delete_pg, dsn, pg, ids)
    lib = sink.libsql_target()
    if lib is not None:
        from embedbatch.sinks.libsql import connect

        conn = connect(lib.url, sink.libsql_token(cfg))
        try:
            out[f"libsql:{lib.table}"] = chunks.delete_libsql(conn, lib, ids)
        finally:
            conn.close()
    return out


def _vector_source(ws: Any, model: str, dataset: str, shard: str) -> str:
    import pyarrow.parquet as pq

    from embedbatch.store.shards import vector_source

    return vector_source(pq.read_schema(ws.shards_dir(model, dataset) / shard))


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


@app.command()
def export(
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset to export.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write into (created).")],
    fmt: Annotated[str, typer.Option("--format", help="npy, arrow or f16 (raw little-endian float16).")] = "npy",
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float16 (npy, arrow).")] = "float32",
    model: Model = None,
    json_out: JsonOut = False,
) -> None:
    """Write the vectors row-aligned with ids.txt, and export.json (model, dimension, count, sha256)."""
    from embedbatch.search.exact import find_dataset
    from embedbatch.store.export import export_dataset

    ws = open_workspace()
    m, d = find_dataset(ws, dataset, model)
    report = export_dataset(ws, m, d, out, fmt=fmt, dtype=dtype)
    if json_out:
        print_json(report)
    else:
        source = ", ".join(report["vectors_from"])
        console.print(f"exported {report['count']:,} × {report['dimensions']} ({source}) to {out}", markup=False)


@app.command("import")
@with_options
def import_cmd(
    store: StoreOptions,
    source: Annotated[Path, typer.Argument(help="Parquet file or folder, or vectors.npy + ids.txt (export's layout).")],
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset to import into.")],
    model: Annotated[str, typer.Option("--model", help="The model the vectors come from.")],
    id_field: Annotated[str, typer.Option("--id-field")] = "id",
    text_field: Annotated[str, typer.Option("--text-field", help="Optional: rows without it get no text.")] = "text",
    vector_field: Annotated[str, typer.Option("--vector-field")] = "embedding",
    rows_per_shard: Annotated[int, typer.Option("--rows-per-shard")] = 100_000,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float16 shards (or --store-dtype).")] = "float32",
    json_out: JsonOut = False,
) -> None:
    """Bring your own vectors: stream them into shards, manifest and id index, checking dimension,
    NaN and duplicate ids; a killed import, run again, goes on where it stopped."""
    from embedbatch.cli.render import RowProgress
    from embedbatch.store.importer import import_vectors
    from embedbatch.workspace import check_component

    ws = open_workspace()
    storage = store.fields(model, dtype)
    with RowProgress("importing") as progress:
        result = import_vectors(
            ws,
            source,
            model=check_component(model, "model"),
            dataset=check_component(dataset, "dataset"),
            id_field=id_field,
            text_field=text_field,
            vector_field=vector_field,
            rows_per_part=rows_per_shard,
            dtype=storage["dtype"],
            keep_float=storage.get("keep_float", "float16") == "float16",
            truncate_dim=storage["truncate_dim"],
            on_rows=progress,
        )
    if json_out:
        print_json(result.to_json())
    else:
        again = f" ({result.skipped_rows:,} imported before)" if result.skipped_rows else ""
        console.print(
            f"imported {result.rows:,} rows × {result.dim} into {model}/{dataset}{again}; "
            f"{len(result.shards)} new shard(s)",
            markup=False,
        )


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="SQL over the views embeddings, shards and runs.")],
    json_out: JsonOut = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
) -> None:
    """Run DuckDB SQL over views: embeddings (every shard's rows, with model and dataset),
    shards (the manifests' entries) and runs (run.json of every run)."""
    from embedbatch.store.catalog import run_sql

    columns, rows = run_sql(open_workspace(), query)
    if json_out:
        print_json([dict(zip(columns, r, strict=True)) for r in rows])
    elif csv_out:
        import csv
        import sys

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
    else:
        from rich.table import Table

        t = Table()
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*("" if v is None else str(v) for v in r))
        console.print(t)
