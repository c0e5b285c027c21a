#!/usr/bin/env python3
"""Build the demo dataset: docstrings of the standard library, one JSONL row each.

Every Python install has this text, so the demo needs no download and the repository commits
no third-party text. Rows: ``{"id": qualified name, "kind", "module", "doc"}``.

Usage: python scripts/stdlib_docstrings.py OUT.jsonl
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path

# Modules that open windows, print, start services or are deprecated noise on import.
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "__main__",
    "pydoc_data",
    "lib2to3",
    "test",
    "ensurepip",
    "venv",
    "xxlimited",
    "xxlimited_35",
    "xxsubtype",
    "_xxtestfuzz",
}


def rows() -> list[dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name in sorted(sys.stdlib_module_names):
        if name in SKIP or name.startswith("_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        if mod.__doc__:
            out[name] = {"id": name, "kind": "module", "module": name, "doc": inspect.cleandoc(mod.__doc__)}
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            qual = f"{name}.{obj.__qualname__}"
            doc = inspect.getdoc(obj)
            if doc and qual not in out:
                out[qual] = {
                    "id": qual,
                    "kind": "class" if inspect.isclass(obj) else "function",
                    "module": name,
                    "doc": doc,
                }
            if inspect.isclass(obj):
                for mname, member in sorted(vars(obj).items()):
                    if mname.startswith("_") or not inspect.isfunction(member):
                        continue
                    mdoc = inspect.getdoc(member)
                    mq = f"{name}.{member.__qualname__}"
                    if mdoc and mq not in out and member.__qualname__.startswith(obj.__qualname__ + "."):
                        out[mq] = {"id": mq, "kind": "method", "module": name, "doc": mdoc}
    return list(out.values())


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "stdlib_docs.jsonl")
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = rows()
    with open(dest, "w", encoding="utf-8") as fh:
        for row in data:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(data)} docstrings -> {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
