"""``asib recipe list``, ``asib recipe show NAME``, ``asib recipe check RECIPE`` and ``asib recipe schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import RecipeArg, SetOpt, handle_errors, load

app = typer.Typer(
    help="List, show and check recipes; print the recipe schema.",
    no_args_is_help=True,
    epilog="Examples:\n\n  asib recipe list\n\n  asib recipe show digits > my.yaml\n\n"
    "  asib recipe check my.yaml --set distill.tau=2",
)


@app.command("list", epilog="Example: asib recipe list")
@handle_errors
def list_() -> None:
    """The built-in recipes: each name (usable wherever a recipe file is) and its first comment line."""
    from asib.builtin_recipes import builtin_recipes

    recipes = builtin_recipes()
    width = max((len(r.name) for r in recipes), default=0)
    for r in recipes:
        typer.echo(f"{r.name:<{width}}  {r.summary}".rstrip())


@app.command("show", epilog="Examples:\n\n  asib recipe show digits\n\n  asib recipe show study/fmnist_full > mine.yaml")
@handle_errors
def show(recipe: RecipeArg) -> None:
    """Print a recipe as written (comments included), to copy and edit; a built-in name or a file."""
    from asib.recipe import read_recipe_text

    typer.echo(read_recipe_text(recipe), nl=False)


@app.command(
    "check",
    epilog="Examples:\n\n  asib recipe check digits\n\n  asib recipe check my.yaml --set distill.tau=2",
)
@handle_errors
def check(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Validate a recipe (model names included) and print it resolved, every default filled in."""
    r = load(recipe, set_)
    typer.echo(r.to_yaml(), nl=False)


@app.command("schema", epilog="Example: asib recipe schema --out recipe.schema.json")
@handle_errors
def schema(
    out: Annotated[Path | None, typer.Option("--out", help="write to this file instead of stdout")] = None,
) -> None:
    """Print the JSON schema of a recipe (for editors and validators).

    The distill keys each method reads are listed under ``x-asib-method-keys`` (a key of
    another method is a recipe error), the method's own defaults under ``x-asib-method-defaults``.
    """
    from asib.recipe import METHOD_DEFAULTS, METHOD_KEYS, Recipe, method_keys

    schema = Recipe.model_json_schema()
    schema["x-asib-method-keys"] = {m: sorted(method_keys(m)) for m in METHOD_KEYS}
    schema["x-asib-method-defaults"] = {m: METHOD_DEFAULTS.get(m, {}) for m in METHOD_KEYS}
    text = json.dumps(schema, indent=2)
    if out:
        from asib.engine.io import atomic_write_text

        atomic_write_text(out, text + "\n")
    else:
        typer.echo(text)
