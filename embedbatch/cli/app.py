"""The ``embedbatch`` application: the typer app, global options, helpers the commands share,
and :func:`main`, the only place errors become messages and exit codes
(``EMBEDBATCH_RAISE_ERRORS=1`` re-raises instead).

Commands live in :mod:`embedbatch.cli.batch` (the Batch API path) and
:mod:`embedbatch.cli.tools` (local worker, datasets, search, server, database); option groups in
:mod:`embedbatch.cli.options`, output in :mod:`embedbatch.cli.render`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.text import Text

from embedbatch._version import __version__
from embedbatch.cli.render import console, err_console
from embedbatch.config import Settings
from embedbatch.errors import DiskError, EmbedbatchError, UsageError
from embedbatch.logs import configure_logging, scrub

app = typer.Typer(add_completion=True, no_args_is_help=True, help="Turn datasets into embeddings, cheaply.")
db_app = typer.Typer(no_args_is_help=True, help="PostgreSQL helpers: start a local server, apply migrations.")
app.add_typer(db_app, name="db")


@dataclass
class _Globals:
    """The app's context for one invocation: the global options every command reads."""

    workspace: Path | None = None
    log_format: str = "auto"
    debug: bool = False  # --debug: re-raise errors with their traceback (see _fail)


_G = _Globals()

SourceArg = Annotated[str, typer.Argument(help="File, directory, glob, or 'postgres'.")]
Model = Annotated[str | None, typer.Option("--model", help="Embedding model (env OPENAI_EMBED_MODEL).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
LastRuns = Annotated[
    int, typer.Option("--last", min=0, help="Show every open run and the newest N others (see --all).")
]
AllRuns = Annotated[bool, typer.Option("--all", help="Show every run of the workspace (reads each one).")]
Resume = Annotated[Path | None, typer.Option("--resume", help="Resume this run directory.")]
RowsPerShard = Annotated[int, typer.Option("--rows-per-shard")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 or float16 shards.")]
PgTable = Annotated[str | None, typer.Option("--pg-table", help="Write vectors into this table.")]
PgIdColumn = Annotated[str, typer.Option("--pg-id-column")]
PgVectorColumn = Annotated[str, typer.Option("--pg-vector-column")]
PgDsn = Annotated[str | None, typer.Option("--pg-dsn", help="Sink DSN (env DATABASE_URL).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Write rows that already have a vector.")]


# Exit codes beyond the error tree's (README, "Exit codes and errors").
EXIT_FAILED_ROWS = 8  # the run ended, and some of its rows failed (failed_ids.tsv)


LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _print_version(value: bool) -> None:
    if value:
        console.print(f"embedbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    workspace: Annotated[Path | None, typer.Option(help="Workspace root (env EMBEDBATCH_WORKSPACE).")] = None,
    log_format: Annotated[str, typer.Option(help="auto, console or json.")] = "auto",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (env EMBEDBATCH_DEBUG=1).")] = False,
) -> None:
    _G.debug = debug
    if log_format not in LOG_FORMATS:
        raise UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if log_level.lower() not in LOG_LEVELS:
        raise UsageError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    _G.workspace = workspace
    _G.log_format = log_format
    configure_logging(log_format, log_level)


def settings() -> Settings:
    return Settings.from_env(workspace=_G.workspace)


def open_workspace() -> Any:
    return settings().open_workspace()


def client() -> Any:
    from embedbatch.api.openai import BatchClient

    return BatchClient(settings())


async def _call_with_client(fn: Any) -> Any:
    c = client()
    try:
        return await fn(c)
    finally:
        await c.close()


def with_client(coro_fn: Any) -> Any:
    import anyio

    return anyio.run(_call_with_client, coro_fn)


def safe_args(source: str, *groups: Any, **values: Any) -> dict[str, Any]:
    """CLI args for run.json, from the option groups and extra values, without secrets (DSNs
    are dropped)."""
    from dataclasses import asdict

    merged: dict[str, Any] = {"source": source}
    for g in groups:
        merged.update(asdict(g))
    merged.update(values)
    out: dict[str, Any] = {}
    for k, v in merged.items():
        if "dsn" in k or k.startswith("_"):
            continue
        if isinstance(v, Path):
            out[k] = str(v)
        elif (
            v is None
            or isinstance(v, str | int | float | bool)
            or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        ):
            out[k] = v
    return out


def _write_metrics() -> None:
    """After every command: the workspace's metrics file for node_exporter (when the metrics
    extra is installed and the workspace exists); never fails the command."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return
    try:
        ws = open_workspace()
        if (ws.root / "batches").is_dir() or (ws.root / "indexes").is_dir():
            from embedbatch.metrics import write_metrics

            write_metrics(ws)
    except Exception as exc:  # metrics must never turn a command's outcome into an error
        import structlog

        structlog.get_logger("embedbatch.metrics").warning("metrics not written", error=str(exc))


def resume_hint(argv: list[str]) -> str:
    """How to go on after Ctrl-C, for the run this process was working on: a Batch API run is
    continued by ``run --resume``/``submit --resume`` with its real directory (or cron's poll);
    a realtime or local run by the same command again (committed rows are skipped)."""
    import shlex

    from embedbatch.runs import last_saved_run

    command = next((a for a in argv if not a.startswith("-")), "")
    last = last_saved_run()
    if last is None or not last[0].run_json.exists():
        if command in ("poll", "status", "ingest", "retry"):
            return "Run the same command again to go on: " + shlex.join(["embedbatch", *argv])
        return "Nothing was started; run the same command again."
    paths, kind = last
    run_dir = shlex.quote(str(paths.root))
    if kind != "batchapi":
        return f"Resume {kind} run {run_dir} with the same command (rows already committed are skipped): " + shlex.join(
            ["embedbatch", *argv]
        )
    if command == "run":
        return f"Resume with `embedbatch run --resume {run_dir}`, or let `embedbatch poll --ingest` finish it."
    return f"Resume with `embedbatch submit --resume {run_dir}`, or let `embedbatch poll --ingest` finish it."


def main() -> None:
    """Entry point: run the app, turning EmbedbatchError into a message and its exit code."""
    try:
        _run()
    finally:
        _write_metrics()


def _run() -> None:
    try:
        rc = app(standalone_mode=False)
        if rc == 130:  # typer turns Ctrl-C into this return code
            raise KeyboardInterrupt
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except EmbedbatchError as exc:
        _fail(exc, exc)
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted; everything done so far is on disk. {resume_hint(sys.argv[1:])}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.exceptions.TyperException as exc:  # usage errors: typer's own copy of click's
        show = getattr(exc, "show", None)
        if show is None:
            raise
        show()
        sys.exit(getattr(exc, "exit_code", 2))
    except OSError as exc:
        if exc.errno in DiskError.ERRNOS:
            _fail(exc, DiskError.from_os_error(exc))
        _fail(exc, None)
    except Exception as exc:
        _fail(exc, None)


def _fail(raised: BaseException, error: EmbedbatchError | None) -> NoReturn:
    """Print one line for an error and exit with its code (``error`` None: an unexpected one,
    exit 1); with --debug, EMBEDBATCH_DEBUG=1 or EMBEDBATCH_RAISE_ERRORS=1 re-raise it instead,
    traceback and all."""
    if _G.debug or "1" in (os.environ.get("EMBEDBATCH_RAISE_ERRORS"), os.environ.get("EMBEDBATCH_DEBUG")):
        raise raised
    if error is None:
        message = f"unexpected {type(raised).__name__}: {raised} (run with --debug for the traceback)"
        code = 1
    else:
        message, code = str(error), error.exit_code
    err_console.print(Text("error: ", style="bold red") + Text(scrub(message)), soft_wrap=True)
    sys.exit(code)


def check_bind(host: str, key: str | None, *, flag: str, key_flag: str) -> None:
    """Refuse a non-loopback ``host`` without a key (``serve``, the live report page).

    Raises:
        UsageError: ``host`` is reachable from other machines and no key was given.
    """
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not key:
        raise UsageError(f"{flag} {host} is reachable from other machines: give {key_flag} too")
