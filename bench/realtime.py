"""The realtime engine at the rate limit: arXiv 30k rows (title + abstract) against
``embedbatch serve --tpm L``, one key and then two, and a naive loop of one request per row,
all in the same run.

The provider's bucket starts full (a minute's worth, as OpenAI's does), so the first L tokens
of a run pass at once; the *sustained* rate is measured after that burst:
``(tokens - L × keys) / wall minutes``. Targets: sustained tokens/min ÷ (L × keys) ≥ 0.9,
429 share < 1%, two keys ≥ 1.8× one key (sustained rate).

Every answer is delayed by 150 ms (a provider's answer time; loopback alone has none), so the
naive loop's rows/s is what such a script gets.

Usage: python bench/realtime.py [--rows 30000] [--burst-share 0.3] [--naive-rows 100]
"""

from __future__ import annotations

import argparse
import gzip
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import openai
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import DATA

from embedbatch.config import PrepareConfig, RealtimeConfig, SampleConfig, Settings, SourceConfig
from embedbatch.engines.realtime.pipeline import run_realtime
from embedbatch.tokens import get_tokenizer
from embedbatch.workspace import Workspace

MODEL = "text-embedding-3-small"
KEYS = ("sk-bench-key-1", "sk-bench-key-2")
LATENCY_S = 0.15  # each answer takes this long, as the provider's do (loopback alone has none)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``embedbatch serve`` in its own process (its CPU work does not share our GIL)."""

    def __init__(self, tmp: Path, tpm: int | None) -> None:
        self.port = free_port()
        args = [sys.executable, "-m", "embedbatch", "serve", "--port", str(self.port), "--api-key", ",".join(KEYS)]
        args += ["--data-dir", str(tmp / f"serve-{self.port}"), "--rpm", "100000", "--faults", f"latency_s={LATENCY_S}"]
        if tpm:
            args += ["--tpm", str(tpm)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("serve did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def realtime(tmp: Path, source: Path, tpm: int, keys: tuple[str, ...], name: str) -> dict[str, float]:
    srv = Serve(tmp, tpm)
    try:
        ws = Workspace(tmp / name)
        settings = Settings(openai_api_keys=keys, openai_base_url=srv.url, workspace=ws.root, openai_timeout_s=120)
        r = run_realtime(
            ws,
            settings,
            source=SourceConfig(path=str(source)),
            prepare=PrepareConfig(fields=("title", "summary")),
            sample=SampleConfig(),
            realtime=RealtimeConfig(model=MODEL, max_concurrency=16),
        )
    finally:
        srv.stop()
    budget = tpm * len(keys)
    sustained = (r.usage_tokens - budget) / (r.wall_s / 60)
    return {
        "rows": r.rows,
        "failed": r.failed,
        "tokens": r.usage_tokens,
        "wall_s": r.wall_s,
        "rows_per_s": r.rows / r.wall_s,
        "sustained_tpm": sustained,
        "ratio": sustained / budget,
        "requests": r.requests,
        "answered_429": r.answered_429,
        "share_429": r.answered_429 / (r.requests + r.answered_429),
    }


def naive(tmp: Path, texts: list[str]) -> float:
    """One request per row, one at a time (the script this engine replaces); rows/s."""
    srv = Serve(tmp, None)

    async def go() -> float:
        client = openai.AsyncOpenAI(api_key=KEYS[0], base_url=srv.url, max_retries=2)
        t0 = time.perf_counter()
        for text in texts:
            await client.embeddings.create(model=MODEL, input=text)
        await client.close()
        return len(texts) / (time.perf_counter() - t0)

    try:
        return anyio.run(go)
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=30_000)
    ap.add_argument("--burst-share", type=float, default=0.3, help="L as a share of the job's tokens")
    ap.add_argument("--naive-rows", type=int, default=100)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-realtime-"))
    source = tmp / "arxiv.jsonl"
    rows = []
    with gzip.open(DATA / "arxiv_cs_daily_2025.jsonl.gz", "rb") as fh:
        for line in fh:
            rows.append(orjson.loads(line))
            if len(rows) == a.rows:
                break
    source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    tok = get_tokenizer(MODEL)
    texts = [f"{r['title']}\n\n{r['summary']}" for r in rows]
    total = sum(len(tok.encode(t)) for t in texts)
    tpm = int(total * a.burst_share)
    print(f"{len(rows):,} arXiv rows, {total:,} tokens; serve --tpm {tpm:,} per key")
    one = realtime(tmp, source, tpm, KEYS[:1], "one")
    two = realtime(tmp, source, tpm, KEYS, "two")
    naive_rps = naive(tmp, texts[: a.naive_rows])
    print(f"{'':24}{'one key':>14}{'two keys':>14}")
    for k in ("rows", "failed", "tokens", "requests", "answered_429", "wall_s", "rows_per_s", "sustained_tpm"):
        print(f"{k:24}{one[k]:>14,.1f}{two[k]:>14,.1f}")
    print(f"{'sustained / limit':24}{one['ratio']:>14.3f}{two['ratio']:>14.3f}   (target >= 0.9)")
    print(f"{'429 share':24}{one['share_429']:>14.4f}{two['share_429']:>14.4f}   (target < 0.01)")
    ratio = two["sustained_tpm"] / one["sustained_tpm"]
    print(f"two keys / one key (sustained tokens/min): {ratio:.2f}x (target >= 1.8)")
    print(f"naive loop, one request per row: {naive_rps:.1f} rows/s over {a.naive_rows} rows")
    print(f"realtime one key / naive (rows/s): {one['rows_per_s'] / naive_rps:.1f}x")


if __name__ == "__main__":
    main()
