"""``asib prepare-data RECIPE``: raw images to prepared tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import (
    QuietOpt,
    RecipeArg,
    SetOpt,
    handle_errors,
    load,
    notice,
    out_console,
    path_override,
    printable,
)


@handle_errors
def prepare_data(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="prepared-data folder (overrides data.dir)")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace a dataset asib prepared there (never a folder of other files)")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Read the recipe's data source and write train/val/test tensors plus dataset.json.

    An imagefolder source may be one folder of class folders (a seeded, stratified test split
    is carved: data.test_fraction), train/ + test/, or train/ + val/ (val/ is then the test split).
    """
    sets = list(set_ or []) + ([path_override("data.dir", out)] if out else [])
    r = load(recipe, sets, check_models=False)
    if r.data.source == "imagefolder":
        from asib.data.sources.imagefolder import find_layout

        layout = find_layout(r.data.root, r.data.test_fraction)
        if layout.ignored or not quiet:  # a folder that is not read is said even with --quiet
            notice(layout.describe())
    from asib.data import prepare_data as run_prepare

    info = run_prepare(r.data, r.data_dir, name=r.name, force=force)
    if not quiet:
        counts = ", ".join(f"{k} {v}" for k, v in info.counts.items())
        h, w = info.image_size
        out_console().print(
            printable(f"prepared {info.source} into {r.data_dir}: {counts}; {info.num_classes} classes, {h}x{w}"),
            markup=False,
        )
