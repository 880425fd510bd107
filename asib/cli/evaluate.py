"""``asib evaluate CHECKPOINT --data DIR``: score a saved checkpoint on a prepared split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import handle_errors, out_console, shown


@handle_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="a teacher, student or synergy .safetensors", show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="prepared data folder (from asib prepare-data)")],
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (top1, top5, nll, ece, n, per_class)")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    per_class: Annotated[bool, typer.Option("--per-class", help="also show every class's accuracy")] = False,
) -> None:
    """Top-1, top-5, NLL, ECE (15 bins) and per-class accuracy of a checkpoint."""
    from asib.pipeline.evaluate import evaluate_checkpoint

    result, about = evaluate_checkpoint(checkpoint, data, split, device)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "kind": about["kind"], "arch": about["arch"], "split": split}))
        return
    from rich.table import Table

    table = Table(title=shown(f"{about['kind']} {about['arch']} on {data} ({split}, n={result.n})"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("top-1 %", f"{result.top1:.2f}")
    table.add_row("top-5 %", f"{result.top5:.2f}")
    table.add_row("NLL", f"{result.nll:.4f}")
    table.add_row("ECE", f"{result.ece:.4f}")
    if per_class:
        for name, acc in zip(about["classes"], result.per_class, strict=True):
            table.add_row(f"  {shown(name)}", f"{acc:.2f}")
    out_console().print(table)
