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
from .commands import bench, build, chat, env, eval, export, import_, infer, prepare, report, serve, train

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
app.command("prepare")(prepare.command)
app.command("prepare")(prepare.command)
app.command("train")(train.command)
app.command("infer")(infer.command)
app.command("chat")(chat.command)
app.command("report")(report.command)
app.command("eval")(eval.command)
app.command("export")(export.command)
app.command("import")(import_.command)
app.command("bench")(bench.command)
app.command("serve")(serve.command)


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
    """Entry point. Usage errors are click's (usage line, exit 2); our known errors become one line on
    stderr and exit 2; anything unexpected one line and exit 1 (GPTOSS_DEBUG=1 re-raises both)."""
    from .errors import GptossError

    debug = os.environ.get("GPTOSS_DEBUG", "") not in ("", "0")
    try:
        app()  # standalone mode: click handles its own usage errors, --help and Ctrl-C, then sys.exit
    except GptossError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if debug:
            raise
        print(f"error: {type(err).__name__}: {err} (set GPTOSS_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
