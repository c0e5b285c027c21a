"""The ``embedbatch`` command line: ``app`` (commands), ``options`` (typed option groups), ``render``."""

from embedbatch.cli.app import app, main

__all__ = ["app", "main"]
