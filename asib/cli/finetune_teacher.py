"""``asib finetune-teacher RECIPE [--teacher T]``: train the recipe's teachers with cross-entropy."""

from __future__ import annotations

from typing import Annotated

import typer

from asib.cli._common import (
    ForceOpt,
    OutOpt,
    QuietOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    handle_errors,
    load,
    out_console,
    progress,
)
from asib.errors import RecipeError


@handle_errors
def finetune_teacher(
    recipe: RecipeArg,
    teacher: Annotated[str | None, typer.Option("--teacher", "-t", help="one teacher, by name or index")] = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    save_every: Annotated[int, typer.Option(help="also save the train state every N steps (0: epoch ends)")] = 0,
) -> None:
    """Fine-tune every teacher in turn (or one), writing runs/<name>/teachers/<teacher>/."""
    r = load(recipe, set_, out)
    if not r.teachers:
        raise RecipeError(["teachers: the recipe lists no teachers"], str(recipe))
    chosen = [r.find_teacher(teacher)] if teacher is not None else list(r.teachers)
    from asib.engine.loop import LoopConfig
    from asib.pipeline.finetune import finetune_teacher as run_finetune

    console = out_console()
    for spec in chosen:
        if not quiet:
            console.print(f"[bold]teacher {spec.name}[/bold] ({spec.arch})")
        result = run_finetune(
            r, spec, force=force, resume=resume, progress=progress(quiet), loop=LoopConfig(save_every_steps=save_every)
        )
        val = "-" if result.val_top1 is None else f"{result.val_top1:.2f}"
        console.print(
            f"{spec.name}: val top-1 {val}, test top-1 {result.test.top1:.2f} in {result.seconds:.1f}s"
            f" -> {result.checkpoint}",
            markup=False,
        )
