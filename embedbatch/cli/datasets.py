"""Dataset commands: ``download-dataset`` (Hugging Face or a local dataset folder into the
workspace) and ``list-datasets`` (downloaded and embedded datasets)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from embedbatch.cli.app import JsonOut, app, open_workspace, settings
from embedbatch.cli.render import console, print_json
from embedbatch.errors import UsageError


@app.command("download-dataset")
def download_dataset(
    name: Annotated[str, typer.Option("--name", help="ORG/NAME on the hub, or a save_to_disk / hub-style folder.")],
    subset: Annotated[str | None, typer.Option("--subset", help="The config (subset).")] = None,
    split: Annotated[list[str] | None, typer.Option("--split", help="A split (repeat; default: all).")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    source: Annotated[str, typer.Option("--source", help="huggingface (local folders are imported too).")] = (
        "huggingface"
    ),
    json_out: JsonOut = False,
) -> None:
    """Copy a dataset into workspace/datasets/raw/{source}/{ORG}__{NAME}/{subset}/{split}/ as
    Parquet parts with a dataset.json; a second call at the same revision is a no-op."""
    from embedbatch.sources.huggingface import download_dataset as download

    if source != "huggingface":
        raise UsageError(f"--source must be huggingface, got {source!r}")
    if not name.strip():
        raise UsageError("--name is empty: give ORG/NAME on the hub, or a save_to_disk / hub-style folder")
    s = settings()
    result = download(
        s.workspace / "datasets" / "raw",
        name,
        subset=subset,
        splits=tuple(split or ()),
        revision=revision,
        offline=s.hf_hub_offline,
    )
    if json_out:
        print_json(result.__dict__)
        return
    what = "unchanged (same revision)" if result.unchanged else "downloaded"
    console.print(f"{result.source}/{result.name} [{result.subset}] revision {result.revision}: {what}", markup=False)
    for sp, info in result.splits.items():
        console.print(f"  {sp}: {info['rows']:,} rows, {info['bytes']:,} bytes", highlight=False)
    console.print(result.path, markup=False, highlight=False, soft_wrap=True)


@app.command("list-datasets")
def list_datasets(json_out: JsonOut = False) -> None:
    """Downloaded datasets (source, name, subset, splits, rows, bytes, revision) and embedded
    datasets (model, dataset, rows, dimension, shards, runs, last update)."""
    from embedbatch.sources.huggingface import list_downloaded
    from embedbatch.store.verify import list_workspace

    ws = open_workspace()
    downloaded = list_downloaded(Path(ws.root) / "datasets" / "raw")
    embedded = list_workspace(ws)["datasets"]
    if json_out:
        print_json({"downloaded": downloaded, "embedded": embedded})
        return
    t = Table(title="downloaded")
    for c in ("source", "name", "subset", "splits", "rows", "bytes", "revision"):
        t.add_column(c)
    for d in downloaded:
        t.add_row(
            d["source"],
            d["name"],
            d["subset"],
            ",".join(d["splits"]),
            f"{d['rows']:,}",
            f"{d['bytes']:,}",
            str(d["revision"])[:20],
        )
    console.print(t)
    t = Table(title="embedded")
    for c in ("model", "dataset", "rows", "dim", "shards", "runs", "updated"):
        t.add_column(c)
    for d in embedded:
        t.add_row(
            d["model"],
            d["dataset"],
            f"{d['rows']:,}",
            str(d["dimensions"]),
            str(d["shards"]),
            str(len(d["runs"])),
            str(d.get("updated_at") or ""),
        )
    console.print(t)
