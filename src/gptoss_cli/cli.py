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
    '[bold]gptoss infer "GPT models are" -n 20 --run runs/demo[/].',
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

app.command("env")(env.command)
app.command("build")(build.command)
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
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Train and run compact gpt-oss-architecture language models from scratch."""


def main() -> None:
    """Entry point. A usage error (unknown option, bad value) is one line and exit 2; our known errors one line on
    stderr and exit 2; an OS error (disk full, read-only file system, permission) one line naming the path,
    exit 1; anything unforeseen one line saying it is a bug, exit 1 (GPTOSS_DEBUG=1 re-raises all three)."""
    from .errors import GptossError

    debug = os.environ.get("GPTOSS_DEBUG", "") not in ("", "0")
    try:
        # Not standalone: click's usage errors come here, to be one line like every other error; --help,
        # typer.Exit(code) and the commands' own exit statuses come back as the return value.
        command = typer.main.get_command(app)
        _plain_flags(command)
        code = command.main(standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command's own handling
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as err:  # click's usage errors (typer's public base class of them)
        message = err.format_message()
        if not message.strip() or "\n" in message.strip():  # a bare `gptoss`: show the help text
            err.show()
        else:
            ctx = getattr(err, "ctx", None)
            where = ctx.command_path if ctx is not None else "gptoss"
            print(f"error: {message.rstrip('.')} (see {where} --help)", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    except GptossError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if debug:
            raise
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        if debug:
            raise
        first = (str(err).splitlines() or [""])[0][:300]
        print(
            f"error: unexpected {type(err).__name__}: {first} -- this is a bug in gptoss; run again with "
            "GPTOSS_DEBUG=1 to see the traceback, and report it",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _plain_flags(command) -> None:
    """Typer's help prints a type beside every option, `<bool>` for an on/off flag that takes no value and
    `<list[str]>` for a repeatable one: a flag shows nothing and a repeatable option its element type.
    (A variadic argument, `prepare DATA...`, keeps Typer's `<list[str]>`: Typer takes no metavar for its
    type column.)"""
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        ctx = typer.Context(cmd)
        for param in [*cmd.params, cmd.get_help_option(ctx)]:
            if param is None or param.metavar is not None:
                continue
            if getattr(param, "is_flag", False):
                param.metavar = ""
            elif getattr(param, "multiple", False):  # --stop X --stop Y
                param.metavar = param.display_type_rich(ctx).replace("list[", "").replace("]", "")


def os_error_line(err: OSError) -> str:
    """'PATH: reason' for an OSError from any library (the path when it carries one)."""
    reason = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else f"{type(err).__name__}: {reason}"
