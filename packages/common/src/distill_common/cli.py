"""The umbrella ``distill`` command: one sub-app per installed package, found through entry points.

Packages register their Typer app under the ``distill.commands`` entry-point group, so this module
imports no subproject: ``distill rf``, ``distill flash``, ``distill prune`` and ``distill eval`` appear
when their package is installed.
"""

from __future__ import annotations

import inspect
import signal
import sys
from importlib.metadata import entry_points

import typer
from rich.console import Console

from distill_common.errors import DistillError, os_error_message
from distill_common.versions import package_versions

app = typer.Typer(
    name="distill",
    help="Diffusion distillation workbench: train few-step students, evaluate them against their teacher, "
    "and promote the winner in the MLflow registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version_callback(value: bool) -> None:
    if value:
        for dist, ver in package_versions().items():
            typer.echo(f"{dist} {ver}")
        raise typer.Exit()


@app.callback()
def _root(
    version_: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print every package's version and exit."
    ),
) -> None:
    """Diffusion distillation workbench."""


@app.command("ui")
def ui_cmd(
    port: int = typer.Option(8501, "--port", help="Port of the page."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_envvar=False,
                                            help="MLflow store to read (default: $MLFLOW_TRACKING_URI, else "
                                                 "./mlflow.db); never created by reading."),
) -> None:
    """Web page to try registered teachers and students side by side, with their metrics and plots."""
    from distill_common.foreground import check_port_free
    from distill_common.registry_cli import use_tracking_uri
    from distill_common.ui import serve

    check_port_free(host, port)
    use_tracking_uri(tracking_uri)  # the page's server process inherits it

    raise typer.Exit(serve(host, port))


@app.command("env")
def env_cmd() -> None:
    """Check this machine: versions, device and bf16 support, data root, tracking store, caches; each line OK or
    what to fix (like accelerate env). Creates nothing."""
    from distill_common.env_check import report

    raise typer.Exit(report())


def _register_subcommands() -> None:
    from distill_common.registry_cli import app as registry_app

    app.add_typer(registry_app, name="registry")
    for ep in sorted(entry_points(group="distill.commands"), key=lambda e: e.name):
        try:
            sub = ep.load()
        except Exception as exc:  # a broken optional package must not break the other commands
            err_console.print(f"[yellow]warning:[/] could not load 'distill {ep.name}': {exc}")
            continue
        app.add_typer(sub, name=ep.name)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does: the MLflow run is marked KILLED, the
    output folder's lock is released and a stage stays unfinished (a rerun resumes)."""


_terminated: list[int] = []  # SIGTERMs received while run_app ran


def _on_sigterm(signum: int, frame: object) -> None:
    _terminated.append(signum)
    raise Terminated()


def plain_help(command):
    """Give every command of a click tree click's plain help layout (fits 80 columns: no boxes, no type column
    with ``<bool>``); returns the command."""
    command.rich_markup_mode = None
    for sub in getattr(command, "commands", {}).values():
        if not sub.short_help and sub.help:  # the whole first paragraph, wrapped, never cut at 45 characters
            sub.short_help = " ".join(inspect.cleandoc(sub.help).split("\n\n")[0].split())
        plain_help(sub)
    return command


def build(typer_app: typer.Typer | None = None):
    """The click command of ``typer_app`` (default: ``distill`` with every sub-app), as ``main`` runs it."""
    if typer_app is None:
        _register_subcommands()
        typer_app = app
    return plain_help(typer.main.get_command(typer_app))


def run_app(typer_app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a Typer app, turning DistillError and OSError (disk full, read-only, a file for a folder) into one
    red line and exit code 2, and SIGTERM into an orderly stop (exit 143)."""
    _terminated.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        build(typer_app).main(args=argv, standalone_mode=True)
    except DistillError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        err_console.print(f"[bold red]error:[/] {os_error_message(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit:
        # click turns an interrupt into "Aborted!" and exit 1; a SIGTERM stop says so and exits 128 + 15
        if _terminated:
            err_console.print("[bold red]stopped:[/] terminated by SIGTERM; the run was marked KILLED and its folder "
                              "released: rerun the same command to resume", highlight=False, soft_wrap=True)
            sys.exit(128 + signal.SIGTERM)
        raise
    except Terminated:
        err_console.print("[bold red]stopped:[/] terminated by SIGTERM; rerun the same command to resume",
                          highlight=False, soft_wrap=True)
        sys.exit(128 + signal.SIGTERM)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``distill`` console script."""
    _register_subcommands()
    run_app(app, argv)


if __name__ == "__main__":
    main()
