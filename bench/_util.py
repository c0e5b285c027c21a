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


# Peak RSS of this process image in MiB: VmHWM (Linux) resets at exec, while ru_maxrss also counts
# the parent's pages a forked child held before exec (a large parent inflated the children's figure).
PEAK_RSS = """
import resource
def _rss():
    try:
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""
_ = resource
