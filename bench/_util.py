"""Helpers for the benchmarks: peak RSS of a child process, shared data path."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run_child(code: str, *args: str) -> dict[str, float]:
    """Run ``code`` in a fresh Python; it prints one JSON object. Adds its peak RSS (MiB)."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


PEAK_RSS = "import resource; _rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
_ = resource
