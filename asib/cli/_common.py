"""What every command shares: recipe options, the console, and the one error boundary."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from asib.errors import AsibError, RecipeError

F = TypeVar("F", bound=Callable[..., Any])

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/digits.yaml", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a recipe value before validation: key.sub=value (repeatable)"),
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="run folder (overrides the recipe's out_dir)")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue the run from its saved train state")]
ForceOpt = Annotated[bool, typer.Option("--force", help="replace an existing run's files")]
MethodOpt = Annotated[
    str | None,
    typer.Option("--method", "-m", help="run the recipe with this distillation method; the distill keys it does"
                 " not read are left out (a --set of them is still an error)"),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def handle_errors(func: F) -> F:
    """The one place where a user error becomes a red line, a hint and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        console = err_console()
        try:
            return func(*args, **kwargs)
        except RecipeError as exc:
            where = f"{exc.source}: " if exc.source else ""
            console.print(f"[red]error:[/red] invalid recipe {where}".rstrip(), markup=True)
            for line in exc.problems:
                console.print(f"  {line}", markup=False)
            if exc.hint:
                console.print(f"[dim]hint: {exc.hint}[/dim]")
            raise typer.Exit(exc.exit_code) from None
        except AsibError as exc:
            console.print(f"[red]error:[/red] {_escape(exc.message)}")
            if exc.hint:
                console.print(f"[dim]hint: {_escape(exc.hint)}[/dim]")
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def load(
    recipe: Path, overrides: list[str] | None, out: Path | None = None, check_models: bool = True,
    method: str | None = None,
):
    """Read, override and validate a recipe; with ``check_models`` also check every arch name."""
    from asib.recipe import load_recipe

    sets = list(overrides or [])
    if out is not None:
        sets.append(f"out_dir={out}")
    result = load_recipe(recipe, sets, method)
    if check_models:
        from asib.models import check_recipe_models

        check_recipe_models(result)
    return result


def progress(quiet: bool):
    from asib.engine.progress import Progress

    return Progress(enabled=not quiet, stream=sys.stderr)
