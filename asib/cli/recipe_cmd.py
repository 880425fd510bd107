"""``asib recipe check FILE`` and ``asib recipe schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import RecipeArg, SetOpt, handle_errors, load

app = typer.Typer(help="Check a recipe or print the recipe schema.", no_args_is_help=True)


@app.command("check")
@handle_errors
def check(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Validate a recipe (model names included) and print it resolved, every default filled in."""
    r = load(recipe, set_)
    typer.echo(r.to_yaml(), nl=False)


@app.command("schema")
def schema(
    out: Annotated[Path | None, typer.Option("--out", help="write to this file instead of stdout")] = None,
) -> None:
    """Print the JSON schema of a recipe (for editors and validators)."""
    from asib.recipe import Recipe

    text = json.dumps(Recipe.model_json_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
    else:
        typer.echo(text)
