"""``asib report RUN_DIR [RUN_DIR ...] --out DIR``: plots of runs and a table comparing them."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import handle_errors, out_console, printable


class GroupBy(str, Enum):
    recipe = "recipe"
    name = "name"


class PlotFormat(str, Enum):
    png = "png"
    svg = "svg"
    pdf = "pdf"


@handle_errors
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="run folders: distill runs, or finetune-teacher runs (runs/<name>/teachers/<t>)",
                                   show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the PNGs, report.md and report.json")],
    group_by: Annotated[
        GroupBy,
        typer.Option("--group-by", help="recipe: runs whose recipes differ only by seed are one row; name: by recipe name"),
    ] = GroupBy.recipe,
    table_only: Annotated[bool, typer.Option("--table-only", help="write report.md and report.json, no plots")] = False,
    fmt: Annotated[
        PlotFormat, typer.Option("--format", help="plot format: png, or svg / pdf (vector, for papers)")
    ] = PlotFormat.png,
) -> None:
    """Plots per run (accuracy, loss terms, schedules, attention; PNG, SVG or PDF) and a markdown table; seeds are aggregated."""
    from asib.report import make_report

    result = make_report(runs, out, group_by=group_by.value, plots=not table_only, fmt=fmt.value)
    console = out_console()
    console.print(result.table, markup=False, end="")
    n_plots = sum(p.suffix == f".{fmt.value}" for p in result.files)
    plots = f"{n_plots} plots, " if n_plots else ""
    console.print()
    console.print(printable(f"wrote {plots}report.md and report.json to {result.out_dir}"), markup=False)
