"""Faults ``serve`` injects so that it can be the test peer (``--faults`` / :class:`FaultConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class FaultConfig:
    """Injected faults. Rates are probabilities per call or per line, drawn from ``seed``.

    Attributes:
        rate_429 / rate_500 / rate_503: chance a call answers that status (429 with Retry-After).
        next_statuses: statuses answered by the next calls, in order (deterministic faults).
        line_error_rate: chance an output line becomes an error-file line (HTTP 500 shape: a retry can succeed).
        fail_batches: how many of the next created batches fail validation.
        expire_batches: how many of the next created batches expire after ``expire_fraction``.
        enqueued_token_limit: fail a new batch with token_limit_exceeded when the model's enqueued
            tokens would exceed it.
        token_limit_batches: how many of the next created batches fail with token_limit_exceeded
            whatever the queue holds (deterministic re-queue tests).
        fail_after_commit: path parts (``/files``, ``/batches``): the next POST to each is carried
            out, then answered 500, as a provider that commits and then fails does (one per item).
        cut_downloads: how many of the next file downloads send half the body and drop the connection.
        lose_outputs: how many of the next completed batches lose their output file (404 later).
        step_s: seconds each status step takes (slow batches).
        create_delay_s: the batch is created, then the answer waits this long.
        retry_after_s: the Retry-After a 429 carries.
        reject_text: ``/v1/embeddings`` answers 400 for a request with an input containing this.
        latency_s: every ``/v1/embeddings`` answer waits this long (a provider's answer time).
        paths: only calls whose path contains one of these get HTTP faults (empty: all).
    """

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    next_statuses: list[int] = field(default_factory=list)
    line_error_rate: float = 0.0
    fail_batches: int = 0
    expire_batches: int = 0
    expire_fraction: float = 0.5
    enqueued_token_limit: int | None = None
    token_limit_batches: int = 0
    fail_after_commit: list[str] = field(default_factory=list)
    cut_downloads: int = 0
    lose_outputs: int = 0
    step_s: float = 0.05
    create_delay_s: float = 0.0
    retry_after_s: float = 0.05
    reject_text: str = ""
    latency_s: float = 0.0
    paths: list[str] = field(default_factory=list)
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> FaultConfig:
        """Parse ``"rate_429=0.1,line_error_rate=0.05,expire_batches=1"``."""
        cfg = cls()
        types = {f.name: f.type for f in fields(cls)}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, eq, value = part.partition("=")
            if key not in types:
                raise ValueError(f"unknown fault {key!r}; valid: {', '.join(sorted(types))}")
            if not eq:
                raise ValueError(f"{key} needs a value ({key}=…)")
            current = getattr(cfg, key)
            if isinstance(current, list):
                setattr(
                    cfg,
                    key,
                    [type(current[0])(v) if current else int(v) for v in value.split("|")]
                    if key == "next_statuses"
                    else value.split("|"),
                )
            elif key == "enqueued_token_limit":
                cfg.enqueued_token_limit = int(value)
            else:
                setattr(cfg, key, type(current)(value))
        return cfg
