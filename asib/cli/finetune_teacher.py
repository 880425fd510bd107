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
    """Fine-tune every teacher in turn (or one), writing runs/<name>/teachers/<teacher>/; ends with a
    table of the teachers.

    With --resume each teacher's run goes on from its train state, starts from the beginning
    when it has none, and is skipped when it has finished.
    """
    loop = loop_config(save_every)
    r = load(recipe, set_, out)
    if not r.teachers:
        raise RecipeError(["teachers: the recipe lists no teachers"], str(recipe))
    chosen = [r.find_teacher(teacher)] if teacher is not None else list(r.teachers)
    from asib.pipeline.finetune import finetune_teacher as run_finetune
    from asib.pipeline.finetune import planned_steps

    show = progress(quiet)  # one display for every teacher: the run row counts all their steps
    show.expect([planned_steps(r, spec) for spec in chosen])
    results = []
    for spec in chosen:
        show.line(f"teacher {printable(spec.name)} ({printable(spec.arch)})")
        result = run_finetune(r, spec, force=force, resume=resume, progress=show, loop=loop, notice=notice)
        results.append((spec, result))
    console = out_console()
    for line in teacher_table(results):
        console.print(printable(line), markup=False)


def teacher_table(results: list) -> list[str]:
    """The teachers a finetune-teacher command trained (and those it found finished): one row each."""
    head = ("teacher", "arch", "params", "best epoch", "val top-1", "test top-1", "seconds", "checkpoint")
    rows = []
    for spec, result in results:
        s = result.summary
        rows.append((
            spec.name, spec.arch, _count(s.get("params")),
            f"{s['best_epoch']}/{s.get('epochs', spec.train.epochs)}" if s.get("best_epoch") else "-",
            _pct(s.get("val_top1")), _pct(s.get("test_top1")),
            f"{s['seconds']:.1f}" if isinstance(s.get("seconds"), (int, float)) else "-",
            str(result.checkpoint) + (" (finished before)" if result.finished_before else ""),
        ))
    widths = [max(len(row[c]) for row in [head, *rows]) for c in range(len(head))]
    left = {0, 1, 7}
    return ["  ".join(cell.ljust(w) if c in left else cell.rjust(w) for c, (cell, w) in
                      enumerate(zip(row, widths, strict=True))).rstrip() for row in [head, *rows]]


def _pct(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _count(n: object) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}k" if n >= 1000 else str(n)
