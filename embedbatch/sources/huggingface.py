"""Hugging Face datasets as a source, and ``download-dataset``.

Four places hold such a dataset:

- ``copy``: what ``download-dataset`` wrote, ``datasets/raw/{source}/{folder}/{subset}/{split}/
  part-NNNNN.parquet`` plus ``dataset.json`` (read with pyarrow, offline; ``hf://`` finds it,
  and the folder itself works as a SOURCE);
- ``saved``: a ``save_to_disk`` folder (``dataset_dict.json`` or ``state.json``);
- ``repo``: a folder laid out like a hub dataset repository (a ``README.md`` card with YAML
  front matter, or a ``data/`` folder), read by ``datasets`` offline;
- ``hub``: ``hf://ORG/NAME`` streamed from the hub (``datasets``, ``streaming=True``).

``hf://ORG/NAME`` reads the downloaded copy when there is one (offline first), otherwise the
hub. Every row carries its split and its index in the split (``RawRow.line``), which give the
default ids ``{split}/{index}`` of datasets without an id column; the index is stable for a
pinned revision, and the revision is recorded. Memory stays bounded: rows are read in batches
of :data:`BATCH_ROWS` whatever the dataset's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedbatch.errors import DiskError, EmbedbatchError, InputError, MissingExtraError, ProviderError, UsageError
from embedbatch.records import RawRow
from embedbatch.workspace import atomic_write_json, fsync_dir

__all__ = [
    "DownloadResult",
    "HfDataset",
    "download_dataset",
    "is_hf_source",
    "iter_rows",
    "list_downloaded",
    "resolve",
]

HF_PREFIX = "hf://"
BATCH_ROWS = 1000
PART_ROWS = 100_000  # rows per Parquet part of a downloaded split
DEFAULT_SUBSET = "default"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise MissingExtraError("datasets", "hf") from exc
    return datasets


_NETWORK_MODULES = ("requests", "urllib3", "httpx", "httpcore", "aiohttp", "huggingface_hub", "fsspec")


@contextlib.contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    """The one boundary for the hub: a network failure (after the hub client's own retries)
    becomes one :class:`ProviderError` naming the hub and ``HF_HUB_OFFLINE``. The hub client's
    retry warnings are kept off stderr (the error says it all)."""
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        yield
    except EmbedbatchError:
        raise
    except Exception as exc:
        module = type(exc).__module__.split(".")[0]
        network = module in _NETWORK_MODULES or isinstance(exc, ConnectionError | TimeoutError)
        if isinstance(exc, OSError) and exc.errno in DiskError.ERRNOS:
            network = False
        if not network and "Couldn't reach" not in str(exc):
            raise
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ProviderError(
            f"cannot reach the Hugging Face hub at {endpoint} for {name} ({first}); download the dataset "
            "where the hub can be reached, or set HF_HUB_OFFLINE=1 to read only local copies"
        ) from exc


def is_saved_dataset(path: Path) -> bool:
    """A ``save_to_disk`` folder (a DatasetDict or one Dataset)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def is_hub_repo(path: Path) -> bool:
    """A folder laid out like a hub dataset repository: a README.md card with YAML front
    matter (``configs:`` or ``dataset_info:``), or a ``data/`` folder of data files."""
    readme = path / "README.md"
    if readme.is_file():
        head = readme.read_text(encoding="utf-8", errors="replace")[:20_000]
        if head.startswith("---") and ("configs:" in head or "dataset_info:" in head):
            return True
    return (path / "data").is_dir()


def is_hf_source(spec: str) -> bool:
    """True for ``hf://ORG/NAME``, a ``save_to_disk`` folder or a hub-style repo folder."""
    if spec.startswith(HF_PREFIX):
        return True
    path = Path(spec)
    return path.is_dir() and (is_saved_dataset(path) or is_hub_repo(path) or is_copy(path))


def is_copy(path: Path) -> bool:
    """A folder ``download-dataset`` wrote (``dataset.json`` beside the split folders)."""
    return (path / "dataset.json").is_file() and (path / "dataset.json").read_bytes().lstrip().startswith(b"{")


@dataclass(frozen=True)
class HfDataset:
    """Where a Hugging Face dataset's rows are read from.

    Attributes:
        kind: ``copy``, ``saved``, ``repo`` or ``hub`` (module doc).
        name: ``ORG/NAME`` (hub, copy) or the folder (saved, repo).
        path: the folder (saved, repo) or the copy's subset folder (copy).
        revision: the hub commit, or a content fingerprint of a local folder.
    """

    kind: Literal["copy", "saved", "repo", "hub"]
    name: str
    subset: str | None
    revision: str | None
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``hf://ORG/NAME`` for hub datasets and their copies, else the folder."""
        hub = self.kind == "hub" or (self.kind == "copy" and self.info.get("source") == "huggingface")
        return f"{HF_PREFIX}{self.name}" if hub else str(self.path)

    def splits(self, wanted: tuple[str, ...] = ()) -> list[str]:
        """The splits to read: ``wanted`` (checked) or all, in the dataset's order.

        Raises:
            UsageError: a wanted split the dataset does not have.
        """
        have = self._split_names()
        missing = [s for s in wanted if s not in have]
        if missing:
            raise UsageError(f"{self.label}: no split {', '.join(missing)}; the splits are: {', '.join(have)}")
        return list(wanted) or have

    def _split_names(self) -> list[str]:
        if self.kind == "copy":  # (JSON objects are written with sorted keys: the order is kept apart)
            return list(self.info.get("split_order") or self.info.get("splits", {}))
        if self.kind == "saved":
            assert self.path is not None
            if (self.path / "dataset_dict.json").is_file():
                return list(orjson.loads((self.path / "dataset_dict.json").read_bytes())["splits"])
            return [_saved_split_name(self.path)]
        ds = _datasets()
        return list(ds.get_dataset_split_names(self._load_path(), self.subset, revision=self.revision))

    def _load_path(self) -> str:
        return str(self.path) if self.kind == "repo" else self.name

    def batches(self, split: str) -> Iterator[list[dict[str, Any]]]:
        """The rows of ``split`` in order, :data:`BATCH_ROWS` at a time."""
        if self.kind == "copy":
            assert self.path is not None
            for part in sorted((self.path / split).glob("part-*.parquet")):
                for batch in pq.ParquetFile(part).iter_batches(batch_size=BATCH_ROWS):
                    yield batch.to_pylist()
            return
        for table in self.arrow_batches(split):
            yield table.to_pylist()

    def arrow_batches(self, split: str) -> Iterator[pa.Table]:
        """The rows of ``split`` as Arrow tables (saved, repo, hub)."""
        ds = _datasets()
        if self.kind == "saved":
            assert self.path is not None
            loaded = ds.load_from_disk(str(self.path))
            one = loaded[split] if isinstance(loaded, ds.DatasetDict) else loaded
            yield from one.with_format("arrow").iter(batch_size=BATCH_ROWS)
            return
        stream = ds.load_dataset(self._load_path(), self.subset, split=split, revision=self.revision, streaming=True)
        schema = stream.features.arrow_schema if stream.features is not None else None
        for batch in stream.iter(batch_size=BATCH_ROWS):
            table = pa.Table.from_pydict(batch)
            if schema is not None:
                table = table.cast(schema)
            schema = table.schema
            yield table

    def describe(self) -> dict[str, Any]:
        """Features, license and citation, as far as the dataset says."""
        ds = _datasets()
        info: Any = None
        if self.kind == "saved":
            assert self.path is not None
            loaded = ds.load_from_disk(str(self.path))
            first = next(iter(loaded.values())) if isinstance(loaded, ds.DatasetDict) else loaded
            info = first.info
        elif self.kind in ("repo", "hub"):
            info = ds.load_dataset_builder(self._load_path(), self.subset, revision=self.revision).info
        card = self._card()
        out: dict[str, Any] = {"features": None, "license": None, "citation": None, "description": None}
        if info is not None:
            out["features"] = info.features.to_dict() if info.features is not None else None
            out["license"] = info.license or None
            out["citation"] = info.citation or None
            out["description"] = (info.description or None) and info.description[:2000]
        out["license"] = out["license"] or card.get("license")
        out["citation"] = out["citation"] or card.get("citation")
        return out

    def _card(self) -> dict[str, Any]:
        """License and citation from the dataset card (README.md): the YAML front matter's
        ``license`` and the first ```bibtex block."""
        text = ""
        if self.kind == "repo" and self.path is not None and (self.path / "README.md").is_file():
            text = (self.path / "README.md").read_text(encoding="utf-8", errors="replace")
        elif self.kind == "hub":
            try:
                from huggingface_hub import DatasetCard

                text = DatasetCard.load(self.name).content
            except Exception:
                return {}
        return parse_card(text)


def parse_card(text: str) -> dict[str, Any]:
    """``license`` (YAML front matter) and ``citation`` (the first ```bibtex block) of a card."""
    out: dict[str, Any] = {}
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end > 0:
            import yaml

            try:
                front = yaml.safe_load(text[3:end])
            except yaml.YAMLError:
                front = None
            if isinstance(front, dict) and front.get("license"):
                lic = front["license"]
                out["license"] = ", ".join(map(str, lic)) if isinstance(lic, list) else str(lic)
    start = text.find("```bibtex")
    if start >= 0:
        end = text.find("```", start + 9)
        if end > 0:
            out["citation"] = text[start + 9 : end].strip()
    return out


def _saved_split_name(path: Path) -> str:
    info = orjson.loads((path / "dataset_info.json").read_bytes())
    return str(info.get("split") or "train")


def _fingerprint(folder: Path) -> str:
    """A content fingerprint of a local dataset folder: sha256 over its files' names and bytes."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def _hub_revision(name: str, revision: str | None) -> str | None:
    """The commit sha the hub gives for ``revision`` (None when it cannot be asked)."""
    try:
        from huggingface_hub import HfApi

        return str(HfApi().dataset_info(name, revision=revision).sha)
    except Exception:
        return None


def copy_dir(raw_dir: Path, source: str, name: str, subset: str | None) -> Path:
    """``raw_dir/{source}/{ORG}__{NAME}/{subset}``: where a downloaded copy lives."""
    folder = name.strip("/").replace("/", "__")
    return raw_dir / source / folder / (subset or DEFAULT_SUBSET)


def resolve(spec: str, *, subset: str | None, revision: str | None, raw_dir: Path | None, offline: bool) -> HfDataset:
    """Where the rows of ``spec`` come from (module doc).

    Raises:
        UsageError: not a Hugging Face source; offline (HF_HUB_OFFLINE) without a local copy.
        MissingExtraError: ``datasets`` is needed and not installed.
    """
    if spec.startswith(HF_PREFIX):
        name = spec[len(HF_PREFIX) :].strip("/")
        if name.count("/") > 1 or not name:
            raise UsageError(f"{spec}: give hf://ORG/NAME (the subset and splits go in --subset and --split)")
        if raw_dir is not None:
            copy = copy_dir(raw_dir, "huggingface", name, subset)
            if (copy / "dataset.json").is_file():
                info = orjson.loads((copy / "dataset.json").read_bytes())
                if revision is None or revision in (info.get("revision"), info.get("requested_revision")):
                    return HfDataset("copy", name, subset, info.get("revision"), copy, info)
        if offline:
            raise UsageError(
                f"{spec} is not downloaded here and HF_HUB_OFFLINE is set: run `embedbatch download-dataset "
                f"--name {name}` where the hub can be reached (or unset HF_HUB_OFFLINE)"
            )
        _datasets()
        return HfDataset("hub", name, subset, revision or _hub_revision(name, revision))
    path = Path(spec)
    if is_copy(path):
        info = orjson.loads((path / "dataset.json").read_bytes())
        return HfDataset(
            "copy", str(info.get("name") or path.parent.name), info.get("subset"), info.get("revision"), path, info
        )
    if is_saved_dataset(path):
        if subset:
            raise UsageError(f"{spec} is a save_to_disk folder: it has no --subset")
        return HfDataset("saved", path.name, None, _fingerprint(path), path)
    if is_hub_repo(path):
        return HfDataset("repo", path.name, subset, _fingerprint(path), path)
    raise UsageError(f"{spec} is not a Hugging Face dataset (hf://ORG/NAME, a save_to_disk or a hub-style folder)")


def iter_rows(
    spec: str,
    *,
    subset: str | None = None,
    splits: tuple[str, ...] = (),
    revision: str | None = None,
    raw_dir: Path | None = None,
    offline: bool = False,
) -> Iterator[RawRow]:
    """Every row of the chosen splits, in split order then row order; ``RawRow.line`` is the
    index in the split, ``split`` the split, ``meta`` the dataset's name, subset, revision and
    split.

    Raises:
        UsageError: see :func:`resolve`; an unknown split.
        InputError: a part that cannot be read.
        ProviderError: the hub cannot be reached.
    """
    with _hub_errors(spec):
        yield from _iter_rows(resolve(spec, subset=subset, revision=revision, raw_dir=raw_dir, offline=offline), splits)


def _iter_rows(ds: HfDataset, splits: tuple[str, ...]) -> Iterator[RawRow]:
    for split in ds.splits(splits):
        meta = {"hf": {"name": ds.name, "subset": ds.subset, "revision": ds.revision, "split": split}}
        label = f"{ds.label}/{split}"
        index = 0
        try:
            for rows in ds.batches(split):
                for row in rows:
                    yield RawRow(label, index, row, split=split, meta=meta)
                    index += 1
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"cannot read the dataset: {exc}", path=label, line=index) from exc


@dataclass
class DownloadResult:
    """What ``download-dataset`` did: the copy's folder, whether anything changed, rows per split."""

    path: str
    source: str
    name: str
    subset: str
    revision: str | None
    unchanged: bool
    splits: dict[str, dict[str, int]]


def download_dataset(
    raw_dir: Path,
    name: str,
    *,
    subset: str | None = None,
    splits: tuple[str, ...] = (),
    revision: str | None = None,
    offline: bool = False,
    as_name: str | None = None,
) -> DownloadResult:
    """Copy a dataset into ``raw_dir/{source}/{folder}/{subset}/{split}/part-NNNNN.parquet``
    with a ``dataset.json`` (name, subset, revision, features, rows and bytes per split,
    license, citation, download time, tool version), streaming in bounded memory.

    ``name`` is ``ORG/NAME`` on the hub (``source`` ``huggingface``) or a local ``save_to_disk`` /
    hub-style folder (``source`` ``file``). A split already copied at the same revision is kept
    (a second call is a no-op); a split is written to ``.{split}.partial`` and renamed when
    complete, so an interrupted download restarts that split cleanly.

    Args:
        as_name: store a local folder as the hub dataset ``ORG/NAME`` (mirrors, tests).

    Raises:
        UsageError: unknown dataset or split; offline without a local folder.
        MissingExtraError: ``datasets`` is not installed.
        ProviderError: the hub cannot be reached.
    """
    with _hub_errors(name):
        return _download(
            raw_dir, name, subset=subset, splits=splits, revision=revision, offline=offline, as_name=as_name
        )


def _download(
    raw_dir: Path,
    name: str,
    *,
    subset: str | None,
    splits: tuple[str, ...],
    revision: str | None,
    offline: bool,
    as_name: str | None,
) -> DownloadResult:
    from embedbatch._version import __version__

    local = Path(name).is_dir()
    spec = name if local else f"{HF_PREFIX}{name.strip('/')}"
    ds = resolve(spec, subset=subset, revision=revision, raw_dir=None, offline=offline)
    source = "huggingface" if (as_name or not local) else "file"
    dest = copy_dir(raw_dir, source, as_name or (ds.name if not local else Path(name).name), subset)
    meta_path = dest / "dataset.json"
    old = orjson.loads(meta_path.read_bytes()) if meta_path.is_file() else {}
    chosen = ds.splits(splits)
    same = old.get("revision") == ds.revision and ds.revision is not None
    todo = [s for s in chosen if not (same and s in old.get("splits", {}) and (dest / s).is_dir())]
    result = DownloadResult(str(dest), source, as_name or ds.name, subset or DEFAULT_SUBSET, ds.revision, not todo, {})
    if not todo:
        result.splits = {s: old["splits"][s] for s in chosen}
        return result
    dest.mkdir(parents=True, exist_ok=True)
    meta = {
        "source": source,
        "name": as_name or ds.name,
        "origin": str(Path(name).resolve()) if local else f"{HF_PREFIX}{ds.name}",
        "subset": subset or DEFAULT_SUBSET,
        "revision": ds.revision,
        "requested_revision": revision,
        **ds.describe(),
        "splits": dict(old.get("splits", {})) if same else {},
        "tool_version": __version__,
    }
    order = ds.splits()
    for split in todo:
        meta["splits"][split], schema = _copy_split(ds, split, dest)
        meta["split_order"] = [s for s in order if s in meta["splits"]]
        if meta.get("features") is None and schema is not None:  # streamed builders know them only now
            meta["features"] = _datasets().Features.from_arrow_schema(schema).to_dict()
        meta["downloaded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_json(meta_path, meta)  # after each split: a crash keeps the finished ones
    result.splits = {s: meta["splits"][s] for s in chosen}
    return result


def _copy_split(ds: HfDataset, split: str, dest: Path) -> tuple[dict[str, int], pa.Schema | None]:
    partial = dest / f".{split}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rows = parts = writer_rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for table in ds.arrow_batches(split):
            if writer is None or writer_rows >= PART_ROWS:
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(partial / f"part-{parts:05d}.parquet", table.schema, compression="zstd")
                parts += 1
                writer_rows = 0
            writer.write_table(table)
            writer_rows += table.num_rows
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    size = sum(p.stat().st_size for p in partial.iterdir())
    final = dest / split
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(dest)
    return {"rows": rows, "bytes": size, "parts": parts}, (writer.schema if writer is not None else None)


def list_downloaded(raw_dir: Path) -> list[dict[str, Any]]:
    """Every downloaded dataset: source, name, subset, splits, rows, bytes, revision, time."""
    out = []
    for meta_path in sorted(raw_dir.glob("*/*/*/dataset.json")):
        m = orjson.loads(meta_path.read_bytes())
        splits = m.get("splits", {})
        out.append(
            {
                "source": m.get("source"),
                "name": m.get("name"),
                "subset": m.get("subset"),
                "splits": list(m.get("split_order") or splits),
                "rows": sum(s["rows"] for s in splits.values()),
                "bytes": sum(s["bytes"] for s in splits.values()),
                "revision": m.get("revision"),
                "downloaded_at": m.get("downloaded_at"),
                "path": str(meta_path.parent),
            }
        )
    return out
