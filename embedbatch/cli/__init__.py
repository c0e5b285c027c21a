"""The ``embedbatch`` command line: ``app`` (the typer app, helpers, :func:`main`), ``batch``,
``realtime``, ``datasets``, ``store`` and ``tools`` (the commands), ``options`` (typed option
groups), ``render`` (output).

Every option can also be set from the environment as ``EMBEDBATCH_<OPTION>`` (``--max-cost-usd``
is ``EMBEDBATCH_MAX_COST_USD``); ``--help`` shows the name. A flag on the command line wins.
"""

import inspect
import typing

import typer.models

from embedbatch.cli import batch, datasets, realtime, store, tools
from embedbatch.cli.app import app, main

__all__ = ["app", "batch", "datasets", "main", "realtime", "store", "tools"]


def _env_for_every_option(t: typer.Typer) -> None:
    callbacks = [c.callback for c in t.registered_commands]
    if t.registered_callback is not None:
        callbacks.append(t.registered_callback.callback)
    for group in t.registered_groups:
        if group.typer_instance is not None:
            _env_for_every_option(group.typer_instance)
    for cb in filter(None, callbacks):
        # Evaluate string annotations (``from __future__ import annotations``) once and keep the
        # objects: evaluating them again would build fresh OptionInfo objects without our changes.
        cb.__annotations__ = typing.get_type_hints(cb, include_extras=True)
        for name, param in inspect.signature(cb).parameters.items():
            for info in typing.get_args(param.annotation)[1:]:
                if isinstance(info, typer.models.OptionInfo) and info.envvar is None:
                    # In Annotated form typer keeps the first flag in ``default`` until it builds
                    # the command.
                    decls = [info.default, *(info.param_decls or ())]
                    flag = next((d for d in decls if isinstance(d, str) and d.startswith("--")), f"--{name}")
                    info.envvar = "EMBEDBATCH_" + flag.lstrip("-").split("/")[0].upper().replace("-", "_")
                    info.show_envvar = True
                if isinstance(info, typer.models.OptionInfo) and param.annotation.__origin__ is bool:
                    info.metavar = info.metavar or ""  # a flag takes no value: no "<bool>" in --help


_env_for_every_option(app)
