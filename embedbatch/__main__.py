"""``python -m embedbatch`` runs the CLI."""

from embedbatch.cli import main

main()
