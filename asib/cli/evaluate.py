"""``asib evaluate CHECKPOINT [--data DIR]``: score a saved checkpoint on a prepared split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import handle_errors, notice, out_console, printable, shown


@handle_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="a teacher, student or synergy .safetensors", show_default=False)],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="prepared data folder (from asib prepare-data); default: the one the"
                     " checkpoint's recipe names", show_default=False),
    ] = None,
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print JSON: top1, top5, ece (percent), nll, n, per_class (class, top1, n),"
                     " classes, confusion [true][predicted], units"),
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    per_class: Annotated[bool, typer.Option("--per-class", help="also show every class's accuracy")] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", metavar="PNG", help="write the confusion matrix as a PNG (needs asib[report])",
                     show_default=False),
    ] = None,
) -> None:
    """Top-1, top-5 and ECE (15 bins), all in percent, NLL, per-class accuracy and the confusion
    matrix of a checkpoint. A checkpoint trained on another input size or normalisation than the
    data's is refused."""
    from asib.pipeline.evaluate import evaluate_checkpoint, plot_confusion

    result = evaluate_checkpoint(checkpoint, data, split, device)
    if result.data_from_recipe and not as_json:
        notice(f"data: {result.data} (named by the checkpoint's recipe)")
    if plot is not None:
        plot_confusion(result, plot)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    table = Table(title=shown(f"{result.kind} {result.arch} on {result.data} ({split}, n={result.n})"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("top-1 %", f"{result.top1:.2f}")
    table.add_row("top-5 %", f"{result.top5:.2f}")
    table.add_row("ECE %", f"{result.ece:.2f}")
    table.add_row("NLL", f"{result.nll:.4f}")
    if per_class:
        for name, acc, n in zip(result.classes, result.per_class, result.per_class_n, strict=True):
            table.add_row(f"  {shown(name)} (n={n})", f"{acc:.2f}")
    console = out_console()
    console.print(table)
    if plot is not None:
        console.print(printable(f"wrote {plot} (confusion matrix)"), markup=False)
