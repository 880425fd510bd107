"""What every command shares: recipe options, the console, and the one error boundary."""

from __future__ import annotations

import errno
import functools
import json
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from asib.errors import AsibError, RecipeError, WriteError, clip

F = TypeVar("F", bound=Callable[..., Any])



def recipe_path(text: str) -> Path:
    """A RECIPE argument as a file: the path when it exists, else the built-in recipe of that
    name (``asib recipe list``), else the path as given (reading it fails with a hint)."""
    from asib.builtin_recipes import resolve_recipe, shadowed_file

    local = shadowed_file(text)
    if local is not None:
        notice(f"using the built-in recipe {text}; {local} is not read (give its path to use it)")
    return resolve_recipe(text)


def complete_recipe(incomplete: str) -> list[str]:
    """Shell completion of a RECIPE: built-in names, then YAML files and folders under the prefix."""
    from asib.builtin_recipes import SUFFIXES, builtin_recipes

    names = [r.name for r in builtin_recipes() if r.name.startswith(incomplete)]
    folder, _, stem = incomplete.rpartition("/")
    base = Path(folder or ".")
    files: list[str] = []
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            if entry.name.startswith(stem) and not entry.name.startswith("."):
                shown_name = f"{folder}/{entry.name}" if folder else entry.name
                if entry.is_dir():
                    files.append(shown_name + "/")
                elif entry.suffix in SUFFIXES:
                    files.append(shown_name)
    return names + files


RecipeArg = Annotated[
    Path,
    typer.Argument(
        help="YAML recipe file, or the name of a built-in recipe (asib recipe list), e.g. digits;"
        " a file of that path wins over a name",
        metavar="RECIPE", parser=recipe_path, autocompletion=complete_recipe, show_default=False,
    ),
]
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
SaveEveryOpt = Annotated[
    int | None,
    typer.Option("--save-every", help="also save the train state every N steps, N >= 1 (default: at epoch ends)",
                 show_default=False),
]


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def out_console() -> Console:
    return Console(highlight=False, soft_wrap=True, emoji=False)


def handle_errors(func: F) -> F:
    """The one place where a user error becomes a red line, a hint and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        console = err_console()
        try:
            return func(*args, **kwargs)
        except RecipeError as exc:
            where = f"{exc.source}: " if exc.source else ""
            console.print(f"[red]error:[/red] invalid recipe {shown(where)}".rstrip())
            for line in exc.problems:
                console.print(f"  {printable(clip(line, MAX_LINE))}", markup=False)
            if exc.hint:
                console.print(f"[dim]hint: {shown(exc.hint)}[/dim]")
            raise typer.Exit(exc.exit_code) from None
        except AsibError as exc:
            _print_error(console, exc)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            # The machine said no (a full disk, a read-only folder, no permission) somewhere
            # that has no message of its own: still one line naming the path, no traceback.
            if exc.errno not in _ENVIRONMENT_ERRORS:
                raise
            where = exc.filename if exc.filename is not None else "a file"
            _print_error(console, WriteError(f"{where}: {exc.strerror or exc.__class__.__name__}"))
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# OS errors that come from the machine, not from asib: turned into a line by handle_errors.
_ENVIRONMENT_ERRORS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO, errno.EMFILE,
    errno.ENFILE, errno.ENAMETOOLONG, errno.ELOOP,
})
MAX_LINE = 1000  # characters of one error line; a message echoes at most a few hundred of a value


def _print_error(console: Console, exc: AsibError) -> None:
    console.print(f"[red]error:[/red] {shown(clip(exc.message, MAX_LINE))}")
    if exc.hint:
        console.print(f"[dim]hint: {shown(clip(exc.hint, MAX_LINE))}[/dim]")


_CONTROL = ("Cc", "Cf", "Zl", "Zp")  # control and format characters, line and paragraph separators


def printable(text: object) -> str:
    """``text`` with control characters (escape sequences, newlines, bidi overrides) written as
    escapes, so a name from a file can neither drive the terminal nor break a line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _CONTROL else ch
        for ch in text
    )


def shown(text: object) -> str:
    """A user-supplied string (a path, a name) for a rich-markup line: escaped and printable."""
    from rich.markup import escape

    return escape(printable(text))


def loop_config(save_every: int | None):
    """The loop settings of a training command; ``--save-every`` is 1 or more when given."""
    from asib.engine.loop import LoopConfig

    if save_every is not None and save_every < 1:
        raise AsibError(
            f"--save-every: must be 1 or more (given: {save_every})",
            hint="leave it out to save the train state at the end of every epoch only",
        )
    return LoopConfig(save_every_steps=save_every or 0)


def path_override(key: str, path: Path) -> str:
    """A ``--set`` that puts a path into the recipe as a string, whatever characters it holds."""
    return f"{key}={json.dumps(str(path))}"


def load(
    recipe: Path, overrides: list[str] | None, out: Path | None = None, check_models: bool = True,
    method: str | None = None,
):
    """Read, override and validate a recipe; with ``check_models`` also check every arch name."""
    from asib.recipe import load_recipe

    sets = list(overrides or [])
    if out is not None:
        sets.append(path_override("out_dir", out))
    result = load_recipe(recipe, sets, method)
    if check_models:
        from asib.models import check_recipe_models

        check_recipe_models(result)
    return result


def notice(text: str) -> None:
    """A line about what a command decided (starting over, nothing left to do), shown even with --quiet."""
    err_console().print(f"[dim]note:[/dim] {shown(text)}")


def progress(quiet: bool):
    from asib.engine.progress import Progress

    return Progress(enabled=not quiet, stream=sys.stderr)
