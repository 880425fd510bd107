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
    SaveEveryOpt,
    SetOpt,
    handle_errors,
    load,
    loop_config,
    notice,
    out_console,
    printable,
    progress,
    shown,
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
    save_every: SaveEveryOpt = None,
) -> None:
    """Fine-tune every teacher in turn (or one), writing runs/<name>/teachers/<teacher>/.

    With --resume each teacher's run goes on from its train state, starts from the beginning
    when it has none, and is skipped when it has finished.
    """
    loop = loop_config(save_every)
    r = load(recipe, set_, out)
    if not r.teachers:
        raise RecipeError(["teachers: the recipe lists no teachers"], str(recipe))
    chosen = [r.find_teacher(teacher)] if teacher is not None else list(r.teachers)
    from asib.pipeline.finetune import finetune_teacher as run_finetune

    console = out_console()
    for spec in chosen:
        if not quiet:
            console.print(f"[bold]teacher {shown(spec.name)}[/bold] ({shown(spec.arch)})")
        result = run_finetune(
            r, spec, force=force, resume=resume, progress=progress(quiet), loop=loop, notice=notice
        )
        if result.finished_before:
            continue
        val = "-" if result.val_top1 is None else f"{result.val_top1:.2f}"
        console.print(
            printable(f"{spec.name}: val top-1 {val}, test top-1 {result.test.top1:.2f} in {result.seconds:.1f}s"
                      f" -> {result.checkpoint}"),
            markup=False,
        )
