"""Estimate: counts, tokens, batch files and cost of a job before anything is sent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

from embedbatch.config import BatchLimits, PrepareConfig, SampleConfig, SourceConfig
from embedbatch.engines.batchapi.split import BatchSplitter, request_encoder
from embedbatch.intake import Intake, IntakeStats
from embedbatch.tokens import PRICES_AS_OF, cost_usd, get_tokenizer, queue_tokens

__all__ = ["Estimate", "estimate"]


@dataclass(frozen=True)
class Estimate:
    """The numbers ``estimate`` and ``submit --dry-run`` print.

    Attributes:
        stats: intake counts and token totals (model tokenizer).
        batches: batch input files the limits give.
        cost_standard_usd / cost_batch_usd: at standard and Batch API prices (None: unpriced model).
    """

    model: str
    dataset: str
    stats: IntakeStats
    batches: int
    queue_tokens: int
    cost_standard_usd: float | None
    cost_batch_usd: float | None
    sampling: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            **self.stats.to_json(),
            "batches": self.batches,
            "queue_tokens": self.queue_tokens,
            "cost_standard_usd": self.cost_standard_usd,
            "cost_batch_usd": self.cost_batch_usd,
            "prices_as_of": PRICES_AS_OF,
            "sampling": self.sampling,
        }

    @classmethod
    def build(
        cls,
        *,
        model: str,
        dataset: str,
        stats: IntakeStats,
        batches: int,
        queue_tokens: int,
        sampling: dict[str, Any],
    ) -> Estimate:
        standard, batch = cost_usd(model, stats.tokens_total)
        return cls(model, dataset, stats, batches, queue_tokens, standard, batch, sampling)


def estimate(
    *,
    source: SourceConfig,
    prepare: PrepareConfig,
    sample: SampleConfig,
    model: str,
    dimensions: int | None = None,
    limits: BatchLimits | None = None,
    on_row: Callable[[int], None] | None = None,
) -> Estimate:
    """Read, prepare and sample the source; count what a submit would send.

    Raises:
        InputError: a bad row (unless ``skip_bad_rows``), duplicate ids.
    """
    intake = Intake(
        source=source,
        prepare=prepare,
        sample=sample,
        tokenizer=get_tokenizer(model),
        on_row=on_row,
        strict_fields=False,
    )
    splitter = BatchSplitter(limits or BatchLimits())
    encode = request_encoder(model=model, dimensions=dimensions)
    queue = 0
    records = intake.records()
    while chunk := list(islice(records, 4096)):
        tokens = [queue_tokens(r.n_tokens, len(r.text.encode("utf-8"))) for r in chunk]
        queue += sum(tokens)
        splitter.assign([len(encode(r.id, r.text)) for r in chunk], tokens)
    return Estimate.build(
        model=model,
        dataset=intake.dataset,
        stats=intake.stats,
        batches=splitter.batch + 1,
        queue_tokens=queue,
        sampling=intake.sampler.describe(),
    )
