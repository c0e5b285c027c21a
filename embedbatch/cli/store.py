"""Commands that use the stored embeddings: ``get`` (a row by id), ``export`` (vectors for other
tools) and ``sql`` (DuckDB over shards, manifests and runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from embedbatch.cli.app import JsonOut, Model, app, open_workspace
from embedbatch.cli.render import console, print_json, print_kv
from embedbatch.errors import UsageError


@app.command()
def get(
    record_id: Annotated[str, typer.Argument(help="The row's id.")],
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset (see `embedbatch list`).")],
    model: Model = None,
    json_out: JsonOut = False,
) -> None:
    """A stored row by id: text, metadata and vector, through the id index (one row group read)."""
    from embedbatch.search.exact import find_dataset
    from embedbatch.store.dataset import DatasetStore

    ws = open_workspace()
    m, d = find_dataset(ws, dataset, model)
    (row,) = DatasetStore(ws, m, d).get([record_id])
    if row is None:
        raise UsageError(f"no id {record_id!r} in dataset {m}/{d}")
    vec = row.pop("embedding")
    row["dimensions"] = len(vec)
    if json_out:
        print_json({**_plain(row), "embedding": [float(x) for x in vec]})
        return
    preview = ", ".join(f"{x:.4f}" for x in vec[:6])
    print_kv(
        f"{m}/{d}: {record_id}", [(k, str(v)) for k, v in _plain(row).items()] + [("embedding", f"[{preview}, …]")]
    )


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
        console.print(f"exported {report['count']:,} × {report['dimensions']} to {out}", markup=False)


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

        w = csv.writer(sys.stdout)
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
