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
    SetOpt,
    handle_errors,
    load,
    out_console,
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
    save_every: Annotated[int, typer.Option(help="also save the train state every N steps (0: epoch ends)")] = 0,
) -> None:
    """Train the student from the teachers' checkpoints; write student.safetensors and synergy.safetensors."""
    r = load(recipe, set_, method=method)
    from asib.engine.loop import LoopConfig
    from asib.pipeline.distill import distill as run_distill

    result = run_distill(
        r, force=force, resume=resume, progress=progress(quiet), loop=LoopConfig(save_every_steps=save_every), run_dir=out
    )
    console = out_console()
    for line in result.table_lines():
        console.print(line, markup=False)
