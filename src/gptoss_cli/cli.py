"""The `gptoss` command: registers the commands, `--version`, and the one error boundary in main().

Commands import torch and friends inside their functions, so `gptoss --help` is instant.
Set GPTOSS_DEBUG=1 to see the traceback behind a one-line error.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from . import __version__
from .commands import build, env, export, import_, infer, report, train

app = typer.Typer(
    name="gptoss",
    help="Train and run compact gpt-oss-architecture language models from scratch.\n\n"
    "Try: [bold]gptoss env[/], [bold]gptoss build --config compact[/], "
    "[bold]gptoss train --config tiny --run runs/demo[/], "
    "[bold]gptoss infer \"GPT models are\" -n 20 --run runs/demo[/].",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

app.command("env")(env.command)
app.command("build")(build.command)
app.command("train")(train.command)
app.command("infer")(infer.command)
app.command("report")(report.command)
app.command("export")(export.command)
app.command("import")(import_.command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gptoss {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Train and run compact gpt-oss-architecture language models from scratch."""


def main() -> None:
    """Entry point: known errors become one line on stderr and exit code 2 (1 for anything unexpected)."""
    from .errors import GptossError

    debug = os.environ.get("GPTOSS_DEBUG", "") not in ("", "0")
    try:
        app(standalone_mode=False)
    except GptossError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # click's own usage errors and exits are handled below
        import click

        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        if debug:
            raise
        print(f"error: {type(err).__name__}: {err} (set GPTOSS_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
