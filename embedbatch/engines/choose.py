"""Which engine a job should use (``run --engine auto``).

The Batch API costs half the standard price but may take up to 24 h (Batch API guide, checked
2026-11); the realtime engine finishes in ``tokens / (tokens-per-minute limit × keys)`` minutes.
``auto`` picks realtime when the job is small or fits in the deadline at the known rate limit,
the Batch API otherwise, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ASSUMED_TPM", "SMALL_JOB_TOKENS", "EngineChoice", "choose_engine"]

# Assumed per-key limit when --max-tpm is not given: 1,000,000 tokens/min, OpenAI's usage tier 1
# for the text-embedding-3 models (rate-limits page, as published 2025; check your own limits).
ASSUMED_TPM = 1_000_000
SMALL_JOB_TOKENS = 200_000  # below this the Batch API's latency is not worth the saving (~$0.002)
USABLE_SHARE = 0.9  # the realtime engine keeps ≥ 90% of the limit busy (bench/realtime.py)


@dataclass(frozen=True)
class EngineChoice:
    """The engine (``batch`` or ``realtime``), the expected realtime minutes, and why."""

    engine: str
    realtime_minutes: float
    reason: str


def choose_engine(tokens: int, *, tpm: int | None, keys: int, deadline_s: float) -> EngineChoice:
    """Choose between the Batch API and the realtime engine for ``tokens`` input tokens.

    Args:
        tpm: tokens per minute per key (None: :data:`ASSUMED_TPM`).
        keys: API keys the realtime engine would use (each has its own limit).
        deadline_s: when the embeddings are needed (seconds).
    """
    rate = (tpm or ASSUMED_TPM) * max(1, keys) * USABLE_SHARE
    minutes = tokens / rate
    basis = f"{tpm:,} TPM" if tpm else f"an assumed {ASSUMED_TPM:,} TPM (give --max-tpm)"
    if tokens <= SMALL_JOB_TOKENS:
        return EngineChoice("realtime", minutes, f"{tokens:,} tokens is a small job (≤ {SMALL_JOB_TOKENS:,})")
    if minutes * 60 <= deadline_s:
        return EngineChoice(
            "realtime",
            minutes,
            f"{tokens:,} tokens take about {minutes:.1f} min at {basis} × {keys} key(s), "
            f"within the {deadline_s / 60:.0f} min deadline",
        )
    return EngineChoice(
        "batch",
        minutes,
        f"{tokens:,} tokens would take about {minutes:.1f} min at {basis} × {keys} key(s), past the "
        f"{deadline_s / 60:.0f} min deadline: the Batch API costs half",
    )
