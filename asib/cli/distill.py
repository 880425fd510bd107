"""``asib distill RECIPE``: distil the teachers into the student (method from the recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import (
    ForceOpt,
    MethodOpt,
    QuietOpt,
    RecipeArg,
    ResumeOpt,
    SaveEveryOpt,
    SetOpt,
    handle_errors,
    load,
    loop_config,
    notice,
    out_console,
    printable,
    progress,
)


@handle_errors
def distill(
    recipe: RecipeArg,
    set_: SetOpt = None,
    method: MethodOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="folder of this run (default: the recipe's out_dir); teachers are read from the recipe's paths"),
    ] = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    save_every: SaveEveryOpt = None,
) -> None:
    """Train the student from the teachers' checkpoints; write student.safetensors and synergy.safetensors.

    With --resume a stopped run goes on from its train state; one stopped before its first
    train state starts again from the beginning, and a finished one is left as it is (exit 0),
    so a preempted job can simply run the same command again.
    """
    loop = loop_config(save_every)
    r = load(recipe, set_, method=method)
    from asib.pipeline.distill import distill as run_distill

    result = run_distill(
        r, force=force, resume=resume, progress=progress(quiet), loop=loop, run_dir=out, notice=notice
    )
    if result.finished_before:
        return
    console = out_console()
    for line in result.table_lines():
        console.print(printable(line), markup=False)
