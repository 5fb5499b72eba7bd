"""`gptoss report`: memory, loss, throughput and expert-load PNGs, a report.md and a summary for one run or several."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonOpt, RunsOpt

OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", metavar="DIR", help="Where to write the PNGs and report.md (default: RUN/report)."),
]


def command(run: RunsOpt = None, out: OutOpt = None, json: JsonOpt = False) -> None:
    """Plot a run's memory, loss, throughput and expert load as PNGs, write report.md and print a summary.

    Missing data (no inference yet, a killed run) is reported, not fatal. With several --run the plots
    overlay the runs and go to the first run's report/ unless --out is given.

    Example: gptoss report --run runs/demo
    """
    from ..output import console, print_json, warn
    from ..report.summary import make_report, summary_table

    result = make_report(run or [], out, warn=warn)
    if json:
        print_json(result)
        return
    console.print(summary_table(result["runs"]))
    for summary in result["runs"]:
        for gap in summary["missing"]:
            console.print(f"[yellow]missing[/] ({summary['name']}): {gap}", highlight=False)
    console.print(
        f"wrote {len(result['files'])} files to [bold]{result['out']}[/]: "
        + ", ".join(Path(f).name for f in result["files"]),
        highlight=False,
    )
