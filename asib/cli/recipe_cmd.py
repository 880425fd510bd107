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
    """Validate a recipe (model names included) and print it resolved, every default filled in.

    Example: asib recipe check recipes/digits.yaml --set distill.tau=2
    """
    r = load(recipe, set_)
    typer.echo(r.to_yaml(), nl=False)


@app.command("schema")
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
