"""embedbatch: datasets to embeddings, through the OpenAI Batch API, /v1/embeddings, or local models.

The same operations as the CLI, as functions over typed config objects (async where they talk
to the provider)::

    plan_run, submit_run, poll_pass, ingest_run, drive_run, estimate, verify_dataset,
    run_local, run_realtime

and, to embed a list of strings directly, the :class:`Embedder` protocol with
:class:`OpenAIEmbedder` and :class:`LocalEmbedder`.
"""

import typing as _typing

from embedbatch._version import __version__

if _typing.TYPE_CHECKING:  # the names below, typed; at run time each is imported on first use
    from embedbatch.api.openai import BatchClient, RetryPolicy
    from embedbatch.config import (
        BatchLimits,
        IngestConfig,
        LocalConfig,
        PgTarget,
        PrepareConfig,
        RealtimeConfig,
        SampleConfig,
        Settings,
        SourceConfig,
        SubmitConfig,
    )
    from embedbatch.embedders import Embedder, LocalEmbedder, OpenAIEmbedder
    from embedbatch.engines.batchapi.drive import drive_run
    from embedbatch.engines.batchapi.estimate import estimate
    from embedbatch.engines.batchapi.ingest import ingest_run
    from embedbatch.engines.batchapi.plan import plan_run
    from embedbatch.engines.batchapi.poll import cancel_run, poll_pass
    from embedbatch.engines.batchapi.retry import plan_retry
    from embedbatch.engines.batchapi.submit import submit_run
    from embedbatch.engines.local.pipeline import run_local
    from embedbatch.engines.realtime.pipeline import run_realtime
    from embedbatch.errors import EmbedbatchError
    from embedbatch.runs import Run
    from embedbatch.store.dataset import DatasetStore
    from embedbatch.store.verify import list_workspace, verify_dataset
    from embedbatch.workspace import Workspace

# Importing the package (and so the CLI, for `--version` or `status`) loads none of the engines,
# the openai SDK, torch or pyarrow: a name is imported from its module when first used.
_LAZY = {
    "BatchClient": "embedbatch.api.openai",
    "BatchLimits": "embedbatch.config",
    "DatasetStore": "embedbatch.store.dataset",
    "EmbedbatchError": "embedbatch.errors",
    "Embedder": "embedbatch.embedders",
    "IngestConfig": "embedbatch.config",
    "LocalConfig": "embedbatch.config",
    "LocalEmbedder": "embedbatch.embedders",
    "OpenAIEmbedder": "embedbatch.embedders",
    "PgTarget": "embedbatch.config",
    "PrepareConfig": "embedbatch.config",
    "RealtimeConfig": "embedbatch.config",
    "RetryPolicy": "embedbatch.api.openai",
    "Run": "embedbatch.runs",
    "SampleConfig": "embedbatch.config",
    "Settings": "embedbatch.config",
    "SourceConfig": "embedbatch.config",
    "SubmitConfig": "embedbatch.config",
    "Workspace": "embedbatch.workspace",
    "cancel_run": "embedbatch.engines.batchapi.poll",
    "drive_run": "embedbatch.engines.batchapi.drive",
    "estimate": "embedbatch.engines.batchapi.estimate",
    "ingest_run": "embedbatch.engines.batchapi.ingest",
    "list_workspace": "embedbatch.store.verify",
    "plan_retry": "embedbatch.engines.batchapi.retry",
    "plan_run": "embedbatch.engines.batchapi.plan",
    "poll_pass": "embedbatch.engines.batchapi.poll",
    "run_local": "embedbatch.engines.local.pipeline",
    "run_realtime": "embedbatch.engines.realtime.pipeline",
    "submit_run": "embedbatch.engines.batchapi.submit",
    "verify_dataset": "embedbatch.store.verify",
}


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'embedbatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BatchClient",
    "BatchLimits",
    "DatasetStore",
    "EmbedbatchError",
    "Embedder",
    "IngestConfig",
    "LocalConfig",
    "LocalEmbedder",
    "OpenAIEmbedder",
    "PgTarget",
    "PrepareConfig",
    "RealtimeConfig",
    "RetryPolicy",
    "Run",
    "SampleConfig",
    "Settings",
    "SourceConfig",
    "SubmitConfig",
    "Workspace",
    "__version__",
    "cancel_run",
    "drive_run",
    "estimate",
    "ingest_run",
    "list_workspace",
    "plan_retry",
    "plan_run",
    "poll_pass",
    "run_local",
    "run_realtime",
    "submit_run",
    "verify_dataset",
]
