"""The realtime engine's pieces on their own: limiter arithmetic (a fake clock), packing, the
engine choice, the Python embedders, and ``run --engine auto``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedbatch.config import RealtimeConfig, Settings
from embedbatch.embedders import Embedder, OpenAIEmbedder
from embedbatch.engines.choose import SMALL_JOB_TOKENS, choose_engine
from embedbatch.engines.realtime.limiter import Bucket, KeyLimiter, fingerprint, parse_duration_s
from embedbatch.engines.realtime.packing import pack
from embedbatch.errors import ProviderError, UsageError
from embedbatch.records import Record
from embedbatch.server import FaultConfig, HashBackend, ServerThread
from embedbatch.server.ratelimit import ProviderLimits, format_duration
from embedbatch.tokens import get_tokenizer
from embedbatch.workspace import Workspace
from tests.conftest import API_KEY, cli_env, run_cli, sample_rows, write_jsonl


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("6m0s", 360.0), ("1.5s", 1.5), ("20ms", 0.02), ("1h2m3s", 3723.0), ("0.25", 0.25), ("", None), ("soon", None)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration_s(text) == seconds


def test_format_and_parse_agree() -> None:
    for s in (0.004, 0.5, 1.25, 59.0, 61.0, 360.0):
        back = parse_duration_s(format_duration(s))
        assert back is not None and abs(back - s) <= max(0.001, s * 0.01)


def test_bucket_refills_per_minute_and_caps() -> None:
    b = Bucket(600, updated=0.0)  # 10 units per second
    assert b.wait_s(600, 0.0) == 0
    b.take(600, 0.0)
    assert b.wait_s(100, 0.0) == pytest.approx(10.0)
    assert b.wait_s(100, 4.0) == pytest.approx(6.0)
    assert b.wait_s(5000, 100.0) == 0  # over the limit: a full bucket is enough
    b.refill(1000.0)
    assert b.level == 600  # capped at one minute's worth


def test_headers_lower_the_level_and_replace_the_limit() -> None:
    clock = Clock()
    lim = KeyLimiter(rpm=None, tpm=None, clock=clock)
    assert lim.wait_s(100) == 0
    lim.take(100)
    assert lim.wait_s(100) is None  # limits unknown: one request in flight
    lim.answered({"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "900"})
    assert lim.tokens.limit == 6000 and lim.tokens.level == 900 and lim.learned
    assert lim.wait_s(1000) == pytest.approx(1.0)  # 100 tokens short at 100 tokens/s
    lim.take(500)
    lim.answered({"x-ratelimit-limit-tokens": "3000", "x-ratelimit-remaining-tokens": "2900"})
    assert lim.tokens.limit == 3000 and lim.tokens.level == pytest.approx(200)  # rescaled, never raised


def test_429_blocks_the_key_until_the_provider_says() -> None:
    clock = Clock()
    lim = KeyLimiter(rpm=100, tpm=10_000, clock=clock)
    assert lim.rate_limited({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert lim.wait_s(1) == pytest.approx(0.25)
    assert lim.rate_limited({"retry-after": "2"}) == 2.0
    assert lim.rate_limited({"x-ratelimit-reset-tokens": "3s", "x-ratelimit-reset-requests": "120ms"}) == 3.0
    assert lim.rate_limited({}) == 1.0
    assert lim.answered_429 == 4
    clock.t += 3.0
    assert lim.wait_s(1) == 0


def test_fingerprint_hides_the_key() -> None:
    fp = fingerprint("sk-abcdef-SECRET")
    assert fp.startswith("key:") and len(fp) == 12 and "SECRET" not in fp
    assert fp == fingerprint("sk-abcdef-SECRET") != fingerprint("sk-abcdef-SECRET2")


def _recs(tokens: list[int]) -> list[Record]:
    return [Record(str(i), "file", "d", None, "x", t) for i, t in enumerate(tokens)]


def test_pack_respects_inputs_and_tokens() -> None:
    reqs = list(pack(_recs([1] * 5000), max_inputs=2048, max_tokens=300_000))
    assert [len(r) for r in reqs] == [2048, 2048, 904]
    reqs = list(pack(_recs([8000] * 80), max_inputs=2048, max_tokens=300_000))
    assert [len(r) for r in reqs] == [37, 37, 6] and all(sum(x.n_tokens for x in r) <= 300_000 for r in reqs)
    reqs = list(pack(_recs([10, 500, 10]), max_inputs=10, max_tokens=100))
    assert [[x.id for x in r] for r in reqs] == [["0"], ["1"], ["2"]]  # an oversized row goes alone, in order


def test_config_refuses_limits_beyond_the_api() -> None:
    with pytest.raises(UsageError, match="2048"):
        RealtimeConfig(max_inputs=4096)
    with pytest.raises(UsageError, match="300000"):
        RealtimeConfig(max_request_tokens=400_000)


def test_choose_engine() -> None:
    small = choose_engine(SMALL_JOB_TOKENS, tpm=None, keys=1, deadline_s=60)
    assert small.engine == "realtime" and "small job" in small.reason
    fits = choose_engine(20_000_000, tpm=1_000_000, keys=2, deadline_s=3600)
    assert fits.engine == "realtime" and fits.realtime_minutes == pytest.approx(20_000_000 / 1_800_000)
    late = choose_engine(200_000_000, tpm=1_000_000, keys=1, deadline_s=3600)
    assert late.engine == "batch" and "half" in late.reason


def test_openai_embedder_matches_the_provider(server: ServerThread, settings: Settings) -> None:
    server.state.faults = FaultConfig(next_statuses=[500, 429], paths=["/embeddings"], retry_after_s=0.01)
    emb = OpenAIEmbedder(settings=settings, config=RealtimeConfig(max_inputs=3, retry_initial_s=0.01))
    assert isinstance(emb, Embedder)
    texts = [f"sentence {i}" for i in range(10)]
    got = emb.embed(texts)
    assert got.shape == (10, 1536) and got.dtype == np.float32
    np.testing.assert_array_equal(got, HashBackend().embed(texts, "text-embedding-3-small", None))
    tok = get_tokenizer("text-embedding-3-small")
    assert emb.usage_tokens == sum(len(tok.encode(t)) for t in texts)


def test_openai_embedder_names_the_refused_text(server: ServerThread, settings: Settings) -> None:
    server.state.faults = FaultConfig(reject_text="BAD")
    emb = OpenAIEmbedder(settings=settings, config=RealtimeConfig(retry_initial_s=0.01))
    with pytest.raises(ProviderError, match=r"1 text.*text 2: rejected by the provider \(400\): 'input' contains"):
        emb.embed(["fine", "also fine", "this is BAD", "ok"])


def test_openai_embedder_needs_a_key() -> None:
    with pytest.raises(UsageError, match="OPENAI_API_KEY"):
        OpenAIEmbedder(settings=Settings())


def test_run_engine_auto_picks_realtime_for_a_small_job(server: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    server.state.limits = ProviderLimits(rpm=10_000)
    path = write_jsonl(tmp_path / "d.jsonl", sample_rows(30))
    env = cli_env(server, ws)
    r = run_cli(["run", str(path), "--fields", "title,body", "--engine", "auto"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "engine: realtime" in r.stdout and "small job" in r.stdout
    assert server.state.batches == {} and server.state.counts()["embedding_requests"] == 1
    assert "realtime run: text-embedding-3-small / d" in r.stdout


def test_run_engine_auto_picks_batch_past_the_deadline(server: ServerThread, ws: Workspace, tmp_path: Path) -> None:
    env = cli_env(server, ws)
    big = write_jsonl(tmp_path / "big.jsonl", [{"id": i, "text": "word " * 7000} for i in range(40)])
    args = ["run", str(big), "--engine", "auto", "--max-tpm", "10000", "--deadline", "10m", "--poll-seconds", "0.05"]
    r = run_cli(args, env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "engine: batch" in r.stdout and "past the 10 min deadline" in r.stdout
    assert len(server.state.batches) == 1
    assert API_KEY not in r.stdout + r.stderr
