"""The ``asib`` command line: one small module per command, errors turned into exit codes in _common."""

from __future__ import annotations

from typing import Annotated

import typer

from asib.cli import bench as bench_cmd
from asib.cli import compare, distill, evaluate, export, finetune_teacher, prepare_data, recipe_cmd, report

app = typer.Typer(
    name="asib",
    help="Multi-teacher knowledge distillation of image classifiers, one pipeline step per command."
    " A RECIPE is a YAML file or the name of a built-in recipe (asib recipe list).",
    epilog="Start: asib prepare-data digits; asib finetune-teacher digits; asib distill digits;"
    " asib evaluate runs/digits/student.safetensors",
    no_args_is_help=True,
    # Typer's own completion: --install-completion / --show-completion for bash, zsh, fish and
    # PowerShell; RECIPE arguments complete built-in names and YAML files.
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _examples(*lines: str) -> str:
    """A command's examples, for the end of its --help (one paragraph each, so none is re-wrapped)."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


EXAMPLES = {
    "prepare-data": _examples(
        "asib prepare-data digits",
        "asib prepare-data my.yaml --set data.root=/data/pets --set data.image_size=64",
    ),
    "finetune-teacher": _examples(
        "asib finetune-teacher digits",
        "asib finetune-teacher digits --teacher vgg8 --resume",
    ),
    "distill": _examples(
        "asib distill digits",
        "asib distill digits --method avg_kd --set seed=1 --out runs/digits_avg_kd",
    ),
    "evaluate": _examples(
        "asib evaluate runs/digits/student.safetensors   (the data named by its recipe)",
        "asib evaluate runs/digits/student.safetensors --data data/digits --split val --json",
        "asib evaluate runs/digits/teachers/vgg8/model.safetensors --per-class --plot vgg8_confusion.png",
    ),
    "bench": _examples(
        "asib bench fashion_mnist --max-overhead 1.15",
        "asib bench digits --synthetic 5000 --json",
    ),
    "export": _examples(
        "asib export runs/digits/student.safetensors --format onnx --out student.onnx --data data/digits",
        "asib export runs/digits/student.safetensors --format hf --out student-hf",
    ),
    "report": _examples(
        "asib report runs/digits --out reports/digits",
        "asib report runs/ladder/L3_s0 runs/ladder/L3_s1 runs/ladder/L3_s2 --out reports/L3",
    ),
    "compare": _examples(
        "asib compare fashion_mnist --methods ce,avg_kd,asib --seeds 0-4 --tune avg_kd:tau=1,2,4",
        "asib compare digits --methods ce,kd --seeds 0-2 --dry-run",
        "asib compare digits --methods ce,kd --seeds 0-2 --collect",
    ),
}

for _name, _command in (
    ("prepare-data", prepare_data.prepare_data),
    ("finetune-teacher", finetune_teacher.finetune_teacher),
    ("distill", distill.distill),
    ("evaluate", evaluate.evaluate),
    ("bench", bench_cmd.bench),
    ("export", export.export),
    ("report", report.report),
    ("compare", compare.compare),
):
    app.command(_name, epilog=EXAMPLES[_name])(_command)
app.add_typer(recipe_cmd.app, name="recipe")


def _print_version(value: bool) -> None:
    if value:
        from asib import __version__

        typer.echo(f"asib {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="print asib's version and exit"),
    ] = False,
) -> None:
    """asib: the options before a command (the help text is the app's)."""


def main() -> None:
    import os
    import sys

    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 prints results
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)
    app()
