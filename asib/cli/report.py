"""``asib report RUN_DIR [RUN_DIR ...] --out DIR``: plots of runs and a table comparing them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import handle_errors, out_console


@handle_errors
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="run folders: distill runs, or finetune-teacher runs (runs/<name>/teachers/<t>)",
                                   show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the PNGs, report.md and report.json")],
    group_by: Annotated[
        str, typer.Option("--group-by", help="recipe: runs whose recipes differ only by seed are one row; name: by recipe name")
    ] = "recipe",
) -> None:
    """PNG plots per run (accuracy, loss terms, schedules, attention) and a markdown table; seeds are aggregated."""
    from asib.engine.report import make_report

    result = make_report(runs, out, group_by=group_by)
    console = out_console()
    console.print(result.table, markup=False, end="")
    n_png = sum(p.suffix == ".png" for p in result.files)
    console.print(f"\nwrote {n_png} plots, report.md and report.json to {result.out_dir}", markup=False)
