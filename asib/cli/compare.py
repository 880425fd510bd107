"""``asib compare RECIPE --methods ... --seeds ...``: a study of methods x seeds, and its answer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import RecipeArg, SetOpt, handle_errors, out_console, printable, shown


@handle_errors
def compare(
    recipe: RecipeArg,
    methods: Annotated[str, typer.Option("--methods", help="comma-separated methods, e.g. ce,avg_kd,dkd,asib")],
    seeds: Annotated[str, typer.Option("--seeds", help="seeds that pair the runs: 0-4, or 0,1,2")] = "0-4",
    set_: SetOpt = None,
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help="an extra arm NAME:key=value,... (distill keys; method=M picks its method,"
                     " default the recipe's); repeatable"),
    ] = None,
    tune: Annotated[
        list[str] | None,
        typer.Option("--tune", help="ARM:key=v1,v2,... chosen on the validation split before the seeds run"
                     " (distill keys; several --tune of one arm make a grid); repeatable"),
    ] = None,
    tune_seeds: Annotated[
        str, typer.Option("--tune-seeds", help="tune on the first seed only (first) or on every seed (all)")
    ] = "first",
    against: Annotated[
        str | None, typer.Option("--against", help="the reference arm of the paired differences (default avg_kd)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="study folder (default <run folder>/compare)")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="runs at once")] = 1,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads per run (default: the cores shared among the jobs)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the runs' commands, one a line, and run nothing")] = False,
    collect: Annotated[
        bool, typer.Option("--collect", help="start nothing: write the table from the runs that have finished (runs"
                           " made from --dry-run's commands elsewhere, or a study under way)")
    ] = False,
    table_only: Annotated[bool, typer.Option("--table-only", help="no plot")] = False,
) -> None:
    """Run every method and variant at every seed as an ordinary `asib distill` run under one study folder
    (finished runs are skipped, unfinished ones resumed), tune the knobs asked for on validation first,
    and print each arm's mean ± sd and its paired difference to a reference with a 95% interval.
    """
    import os

    from asib.pipeline.compare import compare as run_compare
    from asib.pipeline.compare import make_spec, parse_seeds
    from asib.recipe import load_recipe

    names = [m.strip() for m in methods.split(",") if m.strip()]
    spec = make_spec(recipe, methods=names, seeds=parse_seeds(seeds), sets=set_ or [], variants=variant or [],
                     tune=tune or [], tune_seeds=tune_seeds, against=against)
    folder = out or load_recipe(recipe, set_ or []).run_dir / "compare"
    if threads is None and jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    console = out_console()

    def say(line: str) -> None:
        console.print(printable(line), markup=False, highlight=False)

    result = run_compare(spec, folder, jobs=jobs, threads=threads, dry_run=dry_run, collect_only=collect,
                         plots=not table_only, say=say)
    if dry_run:
        return
    console.print("")
    console.print(result.table, markup=False, end="")
    console.print(f"\nwrote {', '.join(p.name for p in result.files)} to {result.folder}", markup=False)
    if result.failed:
        console.print(f"[red]{len(result.failed)} run(s) failed:[/red] {shown(', '.join(result.failed))}")
        raise typer.Exit(1)
