"""Helpers for the benchmarks: peak RSS of a child process, shared data path."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"  # GNU time (Debian: apt-get install time)


def timed_cli(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """One ``embedbatch`` command in a fresh process: (seconds, peak RSS MiB, stdout). GNU time
    measures the RSS: a child forked from a large bench process would count its pages too.

    Raises:
        SystemExit: the command failed (its stderr's tail).
    """
    out = cwd / "time.txt"
    started = time.perf_counter()
    done = subprocess.run(
        [TIME, "-f", "%M", "-o", str(out), sys.executable, "-m", "embedbatch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, int(out.read_text().split()[-1]) / 1024, done.stdout


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
