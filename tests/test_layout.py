"""The package's floor plan, checked: engines on a shared core, no cycles, no upward arrows, and
long modules only where docs/architecture.md says why."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embedbatch"
CORE = (
    "embedbatch._version",
    "embedbatch.config",
    "embedbatch.conversations",
    "embedbatch.db",
    "embedbatch.errors",
    "embedbatch.failures",
    "embedbatch.intake",
    "embedbatch.logs",
    "embedbatch.planned",
    "embedbatch.prepare",
    "embedbatch.records",
    "embedbatch.runs",
    "embedbatch.runstate",
    "embedbatch.sampling",
    "embedbatch.sinks",
    "embedbatch.sources",
    "embedbatch.store",
    "embedbatch.tokens",
    "embedbatch.workspace",
)
UPPER = ("embedbatch.engines", "embedbatch.cli", "embedbatch.server", "embedbatch.search", "embedbatch.report")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _graph(*, top_level_only: bool) -> dict[str, set[str]]:
    """module → the package modules it imports (module level only, or anywhere)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, leaving out the package root (it only re-exports) and a package's lazy
    imports of its own submodules."""
    out: list[list[str]] = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == "embedbatch" or nxt.startswith(node + "."):
                continue
            if nxt in on_path:
                out.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                done.add(nxt)
                visit(nxt, [*path, nxt], on_path | {nxt}, done)

    for start in sorted(graph):
        if start != "embedbatch":
            visit(start, [start], {start}, {start})
    return out


def test_no_import_cycle() -> None:
    """No module imports, directly or not, a module that imports it back."""
    assert [] == _cycles(_graph(top_level_only=True))
    assert [] == _cycles(_graph(top_level_only=False))


def test_engines_sit_on_the_core_and_nothing_points_up() -> None:
    """No engine imports another engine; the core imports no engine, CLI, server or search;
    no module imports the package root (the version lives in embedbatch._version)."""
    graph = _graph(top_level_only=False)
    across = [
        (a, b)
        for a, bs in graph.items()
        for b in bs
        if a.startswith("embedbatch.engines.")
        and b.startswith("embedbatch.engines.")
        and a.split(".")[2] != b.split(".")[2]
    ]
    upward = [(a, b) for a, bs in graph.items() for b in bs if a.startswith(CORE) and b.startswith(UPPER)]
    root = sorted(a for a, bs in graph.items() if "embedbatch" in bs)
    assert ([], [], []) == (across, upward, root)


def test_long_modules_are_explained() -> None:
    """A module over 450 lines is named, with its reason, in docs/architecture.md's list of long
    modules; a module named there that is no longer long is taken off the list."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Long modules", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^- `(embedbatch/[\w/]+\.py)`", section, re.M))
    long = {
        str(f.relative_to(ROOT))
        for f in PACKAGE.rglob("*.py")
        if len(f.read_text(encoding="utf-8").splitlines()) > MAX_LINES
    }
    assert (set(), set()) == (long - listed, listed - long)


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["status"], ["list"], ["list-datasets"]])
def test_quick_commands_load_no_heavy_library(args: list[str], tmp_path: Path) -> None:
    """`--version`, `--help`, `status` on an empty workspace, `list` and `list-datasets` start
    without the openai SDK, torch, Faiss, DuckDB or pyarrow's dataset machinery (they cost
    0.5-2 s to import and none of these commands needs them)."""
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "EMBEDBATCH_WORKSPACE": str(tmp_path / "ws")}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "embedbatch", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert 0 == done.returncode, done.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = {"openai", "torch", "faiss", "duckdb", "pyarrow.dataset", "sentence_transformers"}
    assert set() == heavy & loaded
