"""The ``embedbatch`` command line: ``app`` (the typer app, helpers, :func:`main`), ``batch`` and
``tools`` (the commands), ``options`` (typed option groups), ``render`` (output)."""

from embedbatch.cli import batch, tools
from embedbatch.cli.app import app, main

__all__ = ["app", "batch", "main", "tools"]
