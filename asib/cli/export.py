"""``asib export CHECKPOINT --format onnx|torchscript|safetensors|hf --out PATH``: a checked, portable model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from asib.cli._common import handle_errors, out_console, printable


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"
    safetensors = "safetensors"
    hf = "hf"


@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="a teacher or student .safetensors", show_default=False)],
    format_: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help="onnx (dynamic batch), torchscript (traced), safetensors (asib's"
                     " header), or hf: a folder with model.safetensors and config.json for the hub (timm's layout"
                     " for timm architectures)"),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write (hf: a folder)", show_default=False)],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="prepared data folder: check the export on its test images (default: random inputs)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out file (hf: an earlier hf export)")] = False,
) -> None:
    """Export a model and check it against PyTorch (max |difference| of the logits under 1e-4 of their scale).

    onnx needs the export extra: pip install 'asib[export]'. hf of a timm model loads in timm
    (the command prints how); of a zoo or torchvision model, config.json says to use asib.api.load_model.
    """
    from asib.pipeline.export import export_checkpoint

    result = export_checkpoint(checkpoint, format_.value, out, data_dir=data, force=force)
    size = f"{result.bytes / 1e6:.2f} MB" if result.bytes >= 1e5 else f"{result.bytes / 1e3:.1f} kB"
    console = out_console()
    wrote = f"wrote {result.out} ({result.format}, {result.kind} {result.arch}, {size})"
    console.print(printable(wrote), markup=False)
    console.print(
        printable(f"max |{result.format} - torch| = {result.max_abs_diff:.3g} on {result.inputs}"), markup=False
    )
    if result.note:
        console.print(printable(f"note: {result.note}"), markup=False, style="dim")
