"""Exporting a teacher or student checkpoint: ONNX, TorchScript, or a plain safetensors file.

Every export is checked before it is moved into place: the written file is run (onnxruntime,
``torch.jit.load``, or a rebuild from the safetensors) on a few inputs and compared with the
PyTorch model in fp32. A difference above the tolerance is an error and leaves nothing behind.
The inputs are the first test images of a prepared dataset when one is given (the realistic
check), else seeded random images of the checkpoint's input shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asib.engine.checkpoint import CheckpointInfo, load_model, read_info, save_tensors
from asib.engine.io import atomic_write
from asib.errors import AsibError, CheckpointError, DataError

FORMATS = ("onnx", "torchscript", "safetensors")
TOLERANCE = 1e-4  # max |export - torch| on fp32 logits
EXAMPLE_BATCH = 2  # the export traces batch 2 and is checked on another batch size (the dynamic axis)
INPUT_NAME, OUTPUT_NAME = "images", "logits"
NOTES = {
    "torchscript": "TorchScript (torch.jit) is deprecated in current PyTorch; the file loads with torch.jit.load, "
    "but prefer onnx for anything long-lived",
}


@dataclass(frozen=True)
class ExportResult:
    """What was written and how closely it reproduces the PyTorch model."""

    out: Path
    format: str
    kind: str
    arch: str
    max_abs_diff: float
    n_inputs: int
    inputs: str  # where the check inputs came from, in words
    bytes: int
    note: str | None = None  # something the user should know about the format


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    data_dir: str | Path | None = None,
    force: bool = False,
    n_inputs: int = 8,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export a teacher or student checkpoint to ``out`` in ``fmt`` and check it against PyTorch."""
    if fmt not in FORMATS:
        raise AsibError(f"--format: unknown format '{fmt}'", hint=f"use one of {', '.join(FORMATS)}")
    out = Path(out)
    info = read_info(checkpoint)
    if info.kind == "synergy":
        raise CheckpointError(
            f"{info.path}: is a synergy checkpoint (the fused teachers need the teachers and student to run); "
            "export the student or a teacher",
            hint=f"e.g. asib export {info.path.parent / 'student.safetensors'} --format {fmt} --out FILE",
        )
    if out.is_dir():
        raise AsibError(f"--out {out}: is a folder; give a file name")
    if out.exists() and not force:
        raise AsibError(f"--out {out}: exists", hint="use --force to replace it")
    model, info = load_model(info.path)
    model = model.float().eval()
    inputs, source = check_inputs(info, model, data_dir, n_inputs)
    with torch.inference_mode():
        expected = model(inputs)
    writer = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}[fmt]
    diffs: list[float] = []

    def write(tmp: Path) -> None:
        run = writer(model, info, tmp, inputs)
        diff = max_abs_diff(run(inputs), expected)
        diffs.append(diff)
        if not diff <= tolerance:  # also catches NaN
            raise CheckpointError(
                f"{out}: the {fmt} export differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}); "
                "nothing was written",
                hint="this is likely an exporter problem with this architecture; try another --format",
            )

    atomic_write(out, write)
    note = NOTES.get(fmt)
    return ExportResult(out, fmt, info.kind, info.arch, diffs[0], inputs.shape[0], source, out.stat().st_size, note)


def max_abs_diff(got: torch.Tensor | np.ndarray, expected: torch.Tensor) -> float:
    """Largest absolute elementwise difference, in fp32."""
    got_t = torch.as_tensor(np.asarray(got)).float()
    if tuple(got_t.shape) != tuple(expected.shape):
        raise CheckpointError(f"the export returns shape {tuple(got_t.shape)}, PyTorch {tuple(expected.shape)}")
    return float((got_t - expected.float()).abs().max().item())


# ---------------------------------------------------------------- check inputs


def input_shape(info: CheckpointInfo, model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was trained on: the checkpoint's image_size, else the model's default."""
    size = info.json_field("image_size")
    if size:
        return (3, int(size[0]), int(size[1]))
    cfg = getattr(model, "default_cfg", None)
    return tuple(cfg.input_size) if cfg is not None else (3, 32, 32)  # type: ignore[return-value]


def check_inputs(
    info: CheckpointInfo, model: nn.Module, data_dir: str | Path | None, n: int
) -> tuple[torch.Tensor, str]:
    """The first ``n`` normalised test images of ``data_dir``, or ``n`` seeded random inputs."""
    shape = input_shape(info, model)
    if data_dir is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randn((n, *shape), generator=gen), f"{n} seeded random input{'s' if n != 1 else ''} of shape {shape}"
    from asib.data import load_info, make_loader

    data = load_info(data_dir)
    if data.num_classes != info.num_classes:
        raise CheckpointError(
            f"{info.path}: the {info.kind} has {info.num_classes} classes but {data_dir} has {data.num_classes}"
        )
    split = "test" if data.counts.get("test", 0) else "train"
    if tuple(data.image_size) != shape[1:]:
        raise DataError(f"{data_dir}: images are {data.image_size} but {info.path} was trained on {shape[1:]}")
    batch = next(iter(make_loader(data_dir, split, batch_size=n, device="cpu")))
    return batch.x.float().contiguous(), f"{batch.x.shape[0]} {split} images of {data_dir}"


# ---------------------------------------------------------------- metadata


def export_metadata(info: CheckpointInfo, model: nn.Module) -> dict[str, str]:
    """The checkpoint's ``asib.*`` header plus plain keys a user of the file looks for first."""
    shape = input_shape(info, model)
    meta = dict(info.meta)
    mean = info.json_field("mean")
    std = info.json_field("std")
    meta.update({
        "classes": json.dumps(info.json_field("classes")),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "input_size": json.dumps(list(shape)),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "preprocessing": "RGB scaled to [0, 1], then (x - mean) / std per channel; NCHW float32",
        "source_checkpoint": str(info.path),
    })
    return meta


# ---------------------------------------------------------------- writers
# Each writer writes ``tmp`` and returns a function that runs the written file on a batch.

Runner = Callable[[torch.Tensor], np.ndarray | torch.Tensor]


def _example(inputs: torch.Tensor) -> torch.Tensor:
    """The traced example: batch 2 even from one input (torch.export would fix a batch of 1 as a constant)."""
    return torch.cat([inputs, inputs])[:EXAMPLE_BATCH].clone()


def _require(module: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise AsibError(
            f"--format onnx needs the '{package}' package, which is not installed",
            hint="pip install onnx onnxscript onnxruntime (or pip install -e '.[dev]')",
        )


def _write_onnx(model: nn.Module, info: CheckpointInfo, tmp: Path, inputs: torch.Tensor) -> Runner:
    """torch.export-based ONNX exporter (the non-deprecated one), batch axis dynamic, metadata added."""
    for module, package in (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")):
        _require(module, package)
    import warnings

    import onnx
    import onnxruntime as ort

    example = _example(inputs)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about decompositions on stderr-free paths
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in export_metadata(info, model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    tmp.write_bytes(proto.SerializeToString())
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]

    return run


def _write_torchscript(model: nn.Module, info: CheckpointInfo, tmp: Path, inputs: torch.Tensor) -> Runner:
    """A traced module; the metadata travels as ``asib_meta.json`` in its extra files."""
    import warnings

    example = _example(inputs)
    with warnings.catch_warnings():
        # torch.jit warns (FutureWarning) on every call; the CLI prints one note instead.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, (example,), check_trace=False)
        meta = json.dumps(export_metadata(info, model), indent=1)
        torch.jit.save(traced, str(tmp), _extra_files={"asib_meta.json": meta})
        loaded = torch.jit.load(str(tmp), map_location="cpu").eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(x)

    return run


def _write_safetensors(model: nn.Module, info: CheckpointInfo, tmp: Path, inputs: torch.Tensor) -> Runner:
    """The model's fp32 state dict with the same header, rebuilt from the written file to check it."""
    meta = export_metadata(info, model)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    # save_tensors writes atomically itself; here it writes the temporary file that atomic_write moves.
    save_tensors(tmp, state, meta)
    rebuilt, _ = load_model(tmp, kinds=(info.kind,))
    rebuilt = rebuilt.float().eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return rebuilt(x)

    return run
