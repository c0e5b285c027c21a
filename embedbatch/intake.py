"""Intake: readers → row checks → preparation → sampling, shared by estimate, submit and local.

Bad rows (malformed, not an object, no id, no text field) stop the run with an
:class:`~embedbatch.errors.InputError` naming file, line and field, unless ``skip_bad_rows``;
then each is written to ``rejected.jsonl`` with its reason. Rows whose prepared text is empty
are always rejected (recorded, never a request). Duplicate ids raise
:class:`~embedbatch.errors.DuplicateIdError` after the scan, before any remote call; the check
keeps 8 bytes per row.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from embedbatch.chunking import Chunker, chunk_records
from embedbatch.config import PrepareConfig, SampleConfig, SourceConfig
from embedbatch.conversations import CONVERSATION_FIELD, Conversations, find_messages_field
from embedbatch.errors import DuplicateIdError, InputError, UsageError
from embedbatch.prepare import Preparer
from embedbatch.records import RawRow, Record
from embedbatch.sampling import Sampler
from embedbatch.tokens import Tokenizer

__all__ = ["Intake", "IntakeStats", "dataset_name"]


def source_label(source: SourceConfig) -> str:
    """Where rows came from, for run.json: the table (PostgreSQL), ``FILE:table`` (SQLite), or
    the absolute path. Never a DSN."""
    if source.is_postgres:
        return source.pg_table or "query"
    if source.is_sqlite:
        from embedbatch.sources import sqlite_path

        return f"{sqlite_path(source.path).absolute()}:{source.pg_table or 'query'}"
    if source.path.startswith("hf://"):
        return source.path
    return str(Path(source.path).absolute())


def dataset_name(source: SourceConfig) -> str:
    """The dataset name: ``--dataset``, else the table, else the file stem without extensions."""
    if source.dataset:
        return source.dataset
    if source.is_postgres or source.is_sqlite:
        return source.pg_table or "query"
    if source.path.startswith("hf://"):
        name = source.path[5:].strip("/").replace("/", "__")
        return f"{name}__{source.subset}" if source.subset and source.subset != "default" else name
    name = Path(source.path.rstrip("/")).name
    for ext in (".gz", ".jsonl", ".json", ".parquet", ".csv", ".ndjson"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    for ch in "*?[]":
        name = name.replace(ch, "")
    return name or "dataset"


@dataclass
class IntakeStats:
    """Counts from one intake pass (tokens use the model's tokenizer)."""

    rows_read: int = 0
    rejected: int = 0
    rejected_empty: int = 0
    prepared: int = 0
    sampled: int = 0
    tokens_total: int = 0
    tokens_max: int = 0
    truncated: int = 0
    bytes_total: int = 0
    documents: int = 0
    chunks: int = 0
    stale_chunks: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    missing_fields: dict[str, int] = field(default_factory=dict)
    ids: str = ""
    messages_field: str | None = None
    revision: str | None = None

    @property
    def tokens_mean(self) -> float:
        return self.tokens_total / self.sampled if self.sampled else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rejected": self.rejected,
            "rejected_empty": self.rejected_empty,
            "prepared": self.prepared,
            "sampled": self.sampled,
            "tokens_total": self.tokens_total,
            "tokens_mean": round(self.tokens_mean, 2),
            "tokens_max": self.tokens_max,
            "truncated": self.truncated,
            "bytes_total": self.bytes_total,
            "documents": self.documents,
            "chunks": self.chunks,
            "stale_chunks": self.stale_chunks,
            "reasons": self.reasons,
            "missing_fields": self.missing_fields,
            "ids": self.ids,
            "messages_field": self.messages_field,
            "revision": self.revision,
        }


class _IdFields(dict[str, Any]):
    """The names an ``--id-template`` may use: the row's fields, ``split`` and ``index``."""

    def __init__(self, row: dict[str, Any], split: str | None, index: int) -> None:
        super().__init__(row)
        if split is not None:
            self.setdefault("split", split)
        self.setdefault("index", index)


def _id_key(record_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "little")


class Intake:
    """One pass over a source producing sampled, prepared :class:`Record` objects.

    Args:
        source / prepare / sample: the stage configs.
        tokenizer: the model's tokenizer.
        rejected_path: where rejected rows go (``rejected.jsonl``); None keeps counts only.
        on_row: called every 10,000 rows read with the count (progress display).
        exclude: ``(id, text_sha256) -> bool``; True drops a chosen record after sampling (already
            embedded with that text, or planned in an unfinished run).
        strict_fields: rows that lack a field stop the run (unless ``allow_missing_fields``);
            False only counts them (``estimate``). A field no row has always stops it.
        stored: ``(ids) -> (n,) bool`` of ids the dataset holds now; with chunking, a document
            whose chunk count shrank has its old chunks past the new count listed in
            :attr:`stale` (the engine commits them as deletions with its first rows).
        chunk_tokenizer: counts chunk tokens (default: ``tokenizer``; the local engine passes
            its model's, since it counts the rest later in batches).

    Attributes:
        stale: ids of chunks no longer current (see ``stored``), after :meth:`records` ends.
    """

    def __init__(
        self,
        *,
        source: SourceConfig,
        prepare: PrepareConfig,
        sample: SampleConfig,
        tokenizer: Tokenizer | None,
        rejected_path: Path | None = None,
        on_row: Callable[[int], None] | None = None,
        exclude: Callable[[str, str], bool] | None = None,
        strict_fields: bool = True,
        stored: Callable[[list[str]], Any] | None = None,
        chunk_tokenizer: Tokenizer | None = None,
    ) -> None:
        self.source = source
        self.prepare = prepare
        self.chunker = Chunker.for_prepare(prepare, chunk_tokenizer or tokenizer)
        if self.chunker is not None:
            tokenizer = None  # the whole document is kept; each chunk is counted by the chunker
        self.stored = stored
        self.stale: list[str] = []
        self.preparer = Preparer(prepare, tokenizer)  # no tokenizer with chunking: nothing is cut
        self.id_template = source.id_template
        self.conversations: Conversations | None = None
        self.sampler = Sampler(sample)
        self.rejected_path = rejected_path
        self.on_row = on_row
        self.exclude = exclude
        self.strict_fields = strict_fields
        self.stats = IntakeStats()
        self.skipped_existing = 0
        self.dataset = dataset_name(source)
        self._rejected_fh: IO[bytes] | None = None

    def _raw_rows(self) -> Iterator[RawRow]:
        src = self.source
        if src.is_huggingface:
            from embedbatch.sources import huggingface

            return huggingface.iter_rows(
                src.path,
                subset=src.subset,
                splits=src.splits,
                revision=src.revision,
                raw_dir=src.raw_dir,
                offline=src.hf_offline,
            )
        if self.source.is_postgres:
            from embedbatch.sources.postgres import iter_rows as pg_rows

            return pg_rows(self.source)
        if self.source.is_sqlite:
            from embedbatch.sources.sqlite import iter_rows as sqlite_rows

            return sqlite_rows(self.source)
        from embedbatch.sources import iter_raw_rows

        return iter_raw_rows(self.source.path, fmt=self.source.format)

    def _reject(
        self, raw: RawRow, reason: str, field_name: str | None, *, fatal: bool, record_id: str | None = None
    ) -> None:
        key = reason.split(":")[0]
        self.stats.reasons[key] = self.stats.reasons.get(key, 0) + 1
        if fatal and not self.source.skip_bad_rows:
            raise InputError(reason, path=raw.path, line=raw.line, field=field_name)
        self.stats.rejected += 1
        if self.rejected_path is not None:
            if self._rejected_fh is None:
                self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
                self._rejected_fh = open(self.rejected_path, "ab")  # noqa: SIM115
            entry = {
                "path": raw.path,
                "line": raw.line,
                "id": record_id,
                "field": field_name,
                "reason": reason,
            }
            self._rejected_fh.write(orjson.dumps(entry) + b"\n")

    def _setup(self, row: dict[str, Any]) -> None:
        """On the first row: the id rule and whether rows are conversations."""
        src, cfg = self.source, self.prepare
        if src.id_template is None and src.kind == "huggingface" and src.id_field not in row:
            self.id_template = "{split}/{index}"  # no id column: the row's place in its split
        field_name = cfg.messages_field
        if field_name is None and cfg.detect_messages and "text" not in row:
            field_name = find_messages_field(row)
        if field_name is not None:
            self.conversations = Conversations(cfg, field_name)
            self.preparer = Preparer(replace(cfg, fields=(CONVERSATION_FIELD,), template=None), self.preparer.tokenizer)
        self.stats.ids = f"template {self.id_template}" if self.id_template else f"field {src.id_field}"
        self.stats.messages_field = field_name

    def _row_id(self, raw: RawRow, row: dict[str, Any]) -> str | None:
        """The row's id (None: rejected), from the id template or the id field."""
        if self.id_template is not None:
            try:
                split = row.get(self.source.split_field) if self.source.split_field else raw.split
                return self.id_template.format_map(_IdFields(row, None if split is None else str(split), raw.line))
            except KeyError as exc:
                self._reject(raw, f"--id-template field {exc} is missing", str(exc.args[0]), fatal=True)
            except (ValueError, IndexError, AttributeError) as exc:
                raise UsageError(f"bad --id-template {self.id_template!r}: {exc}") from exc
            return None
        field_name = self.source.id_field
        rid = row.get(field_name)
        if rid is None or rid == "":
            self._reject(raw, "missing id", field_name, fatal=True)
            return None
        if isinstance(rid, bool) or not isinstance(rid, str | int):
            self._reject(raw, f"id must be a string or integer, got {type(rid).__name__}", field_name, fatal=True)
            return None
        return str(rid)

    def _ids_of(self, raw: RawRow, row: dict[str, Any]) -> list[str]:
        """The record ids a row gives, computed as the first pass did (the id template or the
        id field, then conversation units), without recording anything: for naming duplicates."""
        if self.id_template is not None:
            try:
                split = row.get(self.source.split_field) if self.source.split_field else raw.split
                rid = self.id_template.format_map(_IdFields(row, None if split is None else str(split), raw.line))
            except (KeyError, ValueError, IndexError, AttributeError):
                return []
        else:
            value = row.get(self.source.id_field)
            if value is None or value == "" or isinstance(value, bool) or not isinstance(value, str | int):
                return []
            rid = str(value)
        conv = self.conversations
        if conv is None:
            return [rid]
        try:
            return [rid if u.suffix is None else f"{rid}/{u.suffix}" for u in conv.units(row.get(conv.field))]
        except ValueError:
            return []

    def _units(
        self, raw: RawRow, row: dict[str, Any], rid: str
    ) -> list[tuple[str, dict[str, Any], dict[str, Any]]] | None:
        """(id, fields to prepare, extra metadata) per record the row gives; None: rejected."""
        conv = self.conversations
        if conv is None:
            return [(rid, row, {})]
        try:
            units = list(conv.units(row.get(conv.field)))
        except ValueError as exc:
            self._reject(raw, str(exc), conv.field, fatal=True, record_id=rid)
            return None
        if not units:
            self._reject(raw, "missing text field", conv.field, fatal=True, record_id=rid)
            return None
        return [
            (rid if u.suffix is None else f"{rid}/{u.suffix}", {CONVERSATION_FIELD: u.text}, u.metadata) for u in units
        ]

    def _records(self, id_keys: array[int]) -> Iterator[Record]:
        src = self.source
        stratify = self.sampler.config.stratify_by
        source_kind = src.kind
        first = True
        for raw in self._raw_rows():
            self.stats.rows_read += 1
            if self.on_row is not None and self.stats.rows_read % 10_000 == 0:
                self.on_row(self.stats.rows_read)
            if raw.data is None:
                named = (raw.partial or {}).get(src.id_field) if self.id_template is None else None
                self._reject(raw, raw.error or "unreadable row", None, fatal=True, record_id=named or None)
                continue
            row = raw.data
            if first:
                self._setup(row)
                first = False
                self.stats.revision = (raw.meta or {}).get("hf", {}).get("revision")
            rid = self._row_id(raw, row)
            if rid is None:
                continue
            units = self._units(raw, row, rid)
            if units is None:
                continue
            split = row.get(src.split_field) if src.split_field else raw.split
            stratum = row.get(stratify) if stratify else None
            if stratify == "split" and stratum is None:
                stratum = split
            preparer = self.preparer
            for uid, fields_, extra in units:
                id_keys.append(_id_key(uid))
                prepared = preparer.prepare(fields_)
                if prepared.problem is not None:
                    self._reject(raw, prepared.problem, ",".join(preparer.source_fields), fatal=True, record_id=uid)
                    continue
                if prepared.missing_field is not None:
                    self._reject(raw, "missing text field", prepared.missing_field, fatal=True, record_id=uid)
                    continue
                if not prepared.text:
                    self.stats.rejected_empty += 1
                    self._reject(raw, "empty text", ",".join(preparer.source_fields), fatal=False, record_id=uid)
                    continue
                self.stats.prepared += 1
                meta = prepared.metadata()
                meta["path"] = raw.path
                meta["line"] = raw.line
                if raw.meta:
                    meta.update(raw.meta)
                meta.update(extra)
                yield Record(
                    id=uid,
                    source=source_kind,
                    dataset=self.dataset,
                    split=None if split is None else str(split),
                    text=prepared.text,
                    n_tokens=prepared.n_tokens,
                    metadata=meta,
                    stratum=None if stratum is None else str(stratum),
                )

    def records(self) -> Iterator[Record]:
        """Chosen records; raises at the end of the scan if ids repeat.

        Raises:
            InputError: a bad row (without ``skip_bad_rows``); a field no row has; rows that
                lack a field (see ``strict_fields``).
            DuplicateIdError: an id occurs twice; names the first duplicates and their places.
        """
        id_keys: array[int] = array("Q")
        try:
            aggregate = self.prepare.chunk_aggregate is not None
            for doc in self.sampler.select(self._records(id_keys)):
                if aggregate and self.exclude is not None and self.exclude(doc.id, doc.sha256):
                    self.skipped_existing += 1  # one row per document: an unchanged one is not chunked
                    continue
                for rec in self._chunks(doc) if self.chunker is not None else (doc,):
                    if not aggregate and self.exclude is not None and self.exclude(rec.id, rec.sha256):
                        self.skipped_existing += 1
                        continue
                    yield self._count_chosen(rec)
            self.stats.missing_fields = {f: n for f, n in self.preparer.missing.items() if n}
            self.preparer.check_fields(source_label(self.source), strict=self.strict_fields)
            self._check_duplicates(id_keys)
        finally:
            if self._rejected_fh is not None:
                self._rejected_fh.close()
                self._rejected_fh = None

    def _count_chosen(self, rec: Record) -> Record:
        self.stats.sampled += 1
        self.stats.tokens_total += rec.n_tokens
        self.stats.tokens_max = max(self.stats.tokens_max, rec.n_tokens)
        self.stats.bytes_total += len(rec.text.encode("utf-8"))
        if rec.metadata.get("truncated"):
            self.stats.truncated += 1
        return rec

    def _chunks(self, doc: Record) -> list[Record]:
        """One document's chunk records; its stale old chunks go to :attr:`stale`."""
        assert self.chunker is not None
        agg = self.prepare.chunk_aggregate is not None  # one row per document: no chunk rows go stale
        stored = None if agg else self.stored
        out, stale = chunk_records(doc, self.chunker, self.prepare.chunk_id_template, stored, with_parent_text=agg)
        self.stats.documents += 1
        self.stats.chunks += len(out)
        self.stats.stale_chunks += len(stale)
        self.stale += stale
        return out

    def _check_duplicates(self, id_keys: array[int]) -> None:
        keys = np.frombuffer(id_keys, dtype=np.uint64) if len(id_keys) else np.empty(0, np.uint64)
        if len(keys) < 2:
            return
        ordered = np.sort(keys)
        dup_keys = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if not dup_keys:
            return
        # Rare path: a second scan names the duplicates and where they are.
        seen: dict[str, str] = {}
        found: list[str] = []
        for raw in self._raw_rows():
            if raw.data is None:
                continue
            for rid in self._ids_of(raw, raw.data):
                if _id_key(rid) not in dup_keys:
                    continue
                where = f"{raw.path}:{raw.line}"
                if rid in seen:
                    found.append(f"{rid!r} at {seen[rid]} and {where}")
                else:
                    seen[rid] = where
            if len(found) >= 5:
                break
        if not found:  # a 64-bit hash collision between distinct ids, not a duplicate
            return
        total = int(np.sum(ordered[1:] == ordered[:-1]))
        raise DuplicateIdError(
            f"duplicate ids ({total} repeats); first: " + "; ".join(found),
            field=f"--id-template {self.id_template}" if self.id_template else self.source.id_field,
        )
