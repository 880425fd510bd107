"""The ``asib`` command line: one small module per command, errors turned into exit codes in _common."""

from __future__ import annotations

import typer

from asib.cli import bench as bench_cmd
from asib.cli import compare, distill, evaluate, export, finetune_teacher, prepare_data, recipe_cmd, report

app = typer.Typer(
    name="asib",
    help="Multi-teacher knowledge distillation of image classifiers, one pipeline step per command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("prepare-data")(prepare_data.prepare_data)
app.command("finetune-teacher")(finetune_teacher.finetune_teacher)
app.command("distill")(distill.distill)
app.command("evaluate")(evaluate.evaluate)
app.command("bench")(bench_cmd.bench)
app.command("export")(export.export)
app.command("report")(report.report)
app.command("compare")(compare.compare)
app.add_typer(recipe_cmd.app, name="recipe")


def main() -> None:
    import os
    import sys

    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 prints results
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)
    app()
