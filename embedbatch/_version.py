"""The package version: one place, read by ``pyproject.toml`` (setuptools ``dynamic``) and by the
modules that stamp it into files (run.json, shard footers, manifests, dataset.json)."""

__version__ = "0.1.0"
