"""Exporting a teacher or student checkpoint: ONNX, TorchScript, a plain safetensors file, or a
folder for the Hugging Face hub ecosystem (``hf``: model.safetensors + config.json).

Every export is checked before it is moved into place: the written file is run (onnxruntime,
``torch.jit.load``, a rebuild from the safetensors, or for ``hf`` the rebuild its config.json
describes) on a few inputs and compared with the PyTorch model in fp32. A difference above the
tolerance is an error and leaves nothing behind. The inputs are the first test images of a
prepared dataset when one is given (the realistic check), else seeded random images of the
checkpoint's input shape.

``hf`` of a timm architecture is timm's own layout: the state dict without asib's wrapper and
a config.json in timm's pretrained_cfg style (architecture, num_classes, num_features, label
names, and the preprocessing: mean, std, input size), so timm rebuilds it with
``timm.create_model(ARCH, pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=DIR/model.safetensors,
num_classes=N))``, ``timm.create_model("local-dir:DIR", pretrained=True)``, or ``"hf-hub:USER/REPO"``
once the folder is uploaded. Other architectures (the CIFAR zoo, torchvision, timm models with a
``small_input`` stem) keep asib's checkpoint as model.safetensors, and config.json says
``"library": "asib"`` and how to rebuild it (``asib.api.load_model``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asib.data.prepared import replace_dir
from asib.engine.checkpoint import CheckpointInfo, load_model, read_info, save_tensors
from asib.engine.io import atomic_write, umask
from asib.errors import AsibError, CheckpointError, DataError

FORMATS = ("onnx", "torchscript", "safetensors", "hf")
HF_FILES = ("model.safetensors", "config.json")  # what --format hf writes into its folder
TOLERANCE = 1e-4  # max |export - torch| on fp32 logits, per unit of the logits' scale (max |logit|, at least 1)
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
    if fmt == "hf":
        _check_hf_out(out, force)
    elif out.is_dir():
        raise AsibError(f"--out {out}: is a folder; give a file name")
    elif out.exists() and not force:
        raise AsibError(f"--out {out}: exists", hint="use --force to replace it")
    model, info = load_model(info.path)
    model = model.float().eval()
    inputs, source = check_inputs(info, model, data_dir, n_inputs)
    with torch.inference_mode():
        expected = model(inputs)
    # float32 kernels differ by about 1e-7 of the values they add up: an untrained model's logits on
    # random inputs reach hundreds, so the tolerance scales with them (1 and below: absolute)
    tolerance = tolerance * max(1.0, float(expected.abs().max().item()))
    if fmt == "hf":
        diff, note = write_hf_folder(model, info, out, inputs, expected, tolerance)
        size = sum((out / name).stat().st_size for name in HF_FILES)
        return ExportResult(out, fmt, info.kind, info.arch, diff, inputs.shape[0], source, size, note)
    writer = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}[fmt]
    diffs: list[float] = []

    def write(tmp: Path) -> None:
        run = writer(model, info, tmp, inputs)
        diff = max_abs_diff(run(inputs), expected)
        diffs.append(diff)
        if not diff <= tolerance:  # also catches NaN
            raise CheckpointError(
                f"{out}: the {fmt} export differs from PyTorch by {diff:.3g} (tolerance {tolerance:.3g}); "
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
    from asib.pipeline.evaluate import check_data_fits

    data = load_info(data_dir)
    check_data_fits(info, data, data_dir)  # class count, and the input size and normalisation of its header
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
            hint="pip install 'asib[export]'",
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


# ---------------------------------------------------------------- hf: a folder for the hub ecosystem

# pretrained_cfg keys that describe where timm's own weights came from, not these weights
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag", "license",
                "origin_url", "paper_name", "paper_ids", "notes", "description", "label_offset",
                "label_descriptions", "test_input_size", "test_crop_pct", "test_pool_size")
# asib's preprocessing as timm's data config: the prepared images are resized (bilinear,
# antialiased) to the input size with no crop, then scaled to [0, 1] and normalised.
_PREPROCESSING = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def _check_hf_out(out: Path, force: bool) -> None:
    """--out of --format hf is a folder: new, empty, or (with --force) one holding only an hf export."""
    if out.exists() and not out.is_dir():
        raise AsibError(f"--out {out}: is a file; --format hf writes a folder (model.safetensors, config.json)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in HF_FILES or not p.is_file() or p.is_symlink())
    if foreign:
        raise AsibError(f"--out {out}: holds files an hf export does not write ({', '.join(foreign[:4])}),"
                        " so asib leaves it alone", hint="give a new or empty folder")
    if not force:
        raise AsibError(f"--out {out}: holds an hf export already", hint="use --force to replace it")


def timm_architecture(model: nn.Module) -> str | None:
    """The timm architecture whose own state dict and config rebuild ``model``, or None: a zoo
    or torchvision model, or a timm model whose stem asib replaced (``small_input``)."""
    from asib.models.classifier import TimmClassifier

    if not isinstance(model, TimmClassifier) or model.small_input or model.adapted_param_names:
        return None
    return str(model.model.pretrained_cfg.get("architecture") or "") or None


def timm_state_dict(model: nn.Module, reference: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights under timm's own names, as ``reference`` (a fresh timm model) has them:
    asib's wrapper is stripped and its head put back where timm keeps its classifier (a 1x1
    convolution head, which asib holds as a Linear, gets its 1x1 shape back)."""
    state = dict(model.model.state_dict())
    for key, value in model.classifier.state_dict().items():
        state[f"{model.inner_classifier_path}.{key}"] = value
    own = reference.state_dict()
    if set(state) != set(own):
        odd = sorted(set(state) ^ set(own))
        raise CheckpointError(f"{model.arch}: its weights do not map onto timm's names (e.g. {odd[0]})",
                              hint="export with --format safetensors or onnx instead")
    out = {}
    for key, value in state.items():
        if value.shape != own[key].shape and value.numel() == own[key].numel():
            value = value.reshape(own[key].shape)
        out[key] = value.detach().float().contiguous() if value.is_floating_point() else value.detach().contiguous()
    return out


def _preprocessing(info: CheckpointInfo, model: nn.Module) -> dict[str, object]:
    """mean, std, input size and class names of the checkpoint (the model's defaults where the
    header has none)."""
    cfg = model.default_cfg
    mean = info.json_field("mean") or list(cfg.mean)
    std = info.json_field("std") or list(cfg.std)
    classes = info.json_field("classes") or [str(i) for i in range(info.num_classes)]
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "input_size": list(input_shape(info, model)), "label_names": [str(c) for c in classes]}


def _provenance(info: CheckpointInfo) -> dict[str, object]:
    from asib import __version__

    return {"kind": info.kind, "arch": info.arch, "num_classes": info.num_classes, "small_input": info.small_input,
            "source_checkpoint": str(info.path), "asib_version": __version__,
            "preprocessing": "RGB resized to input_size (bilinear), scaled to [0, 1], then (x - mean) / std"
            " per channel; NCHW float32"}


def timm_hf_config(name: str, reference: nn.Module, info: CheckpointInfo, model: nn.Module) -> dict[str, object]:
    """config.json in timm's hub style: architecture, num_classes, num_features, label_names and
    a pretrained_cfg with this checkpoint's preprocessing."""
    pre = _preprocessing(info, model)
    timm_cfg = {k: v for k, v in dict(reference.pretrained_cfg).items() if k not in _SOURCE_KEYS and v is not None}
    if tuple(timm_cfg.get("input_size") or ())[1:] != tuple(pre["input_size"])[1:]:  # type: ignore[index]
        timm_cfg.pop("pool_size", None)
    timm_cfg.update(_PREPROCESSING)
    timm_cfg.update({"architecture": name, "custom_load": False, "num_classes": info.num_classes,
                     "input_size": pre["input_size"], "mean": pre["mean"], "std": pre["std"]})
    config: dict[str, object] = {"architecture": name, "num_classes": info.num_classes,
                                 "num_features": int(getattr(reference, "num_features", model.feature_dim))}
    pool = getattr(reference, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    config["label_names"] = pre["label_names"]
    config["pretrained_cfg"] = json.loads(json.dumps(timm_cfg))  # tuples as lists
    config["asib"] = _provenance(info)
    return config


def asib_hf_config(info: CheckpointInfo, model: nn.Module) -> dict[str, object]:
    """config.json of a model timm cannot build: what it is, its preprocessing, and how to rebuild it."""
    pre = _preprocessing(info, model)
    return {
        "library": "asib",
        "architecture": info.arch,
        "num_classes": info.num_classes,
        "num_features": int(model.feature_dim),
        "label_names": pre["label_names"],
        "pretrained_cfg": {**_PREPROCESSING, "input_size": pre["input_size"], "mean": pre["mean"], "std": pre["std"],
                           "num_classes": info.num_classes},
        "how_to_load": "pip install asib; import asib.api; model, info = asib.api.load_model('model.safetensors')"
        " (the asib.* header of model.safetensors rebuilds the model; not a timm architecture)",
        "asib": _provenance(info),
    }


def write_hf_folder(
    model: nn.Module, info: CheckpointInfo, out: Path, inputs: torch.Tensor, expected: torch.Tensor, tolerance: float
) -> tuple[float, str]:
    """Write model.safetensors and config.json into a new folder beside ``out``, rebuild the model
    as a user of the folder would and compare, then move the folder into place. Returns the
    largest difference and a note on how to load it."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    name = timm_architecture(model)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        weights = tmp / "model.safetensors"
        if name is not None:
            import timm

            reference = timm.create_model(name, num_classes=info.num_classes)
            save_file(timm_state_dict(model, reference), str(weights), metadata={"format": "pt"})
            config = timm_hf_config(name, reference, info, model)
        else:
            save_tensors(weights, {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()},
                         export_metadata(info, model))
            config = asib_hf_config(info, model)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        rebuilt = _rebuild_hf(tmp, name, info)
        with torch.inference_mode():
            diff = max_abs_diff(rebuilt(inputs), expected)
        if not diff <= tolerance:
            raise CheckpointError(
                f"{out}: the hf export differs from PyTorch by {diff:.3g} (tolerance {tolerance:.3g}); nothing was written",
                hint="try --format safetensors or onnx",
            )
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the umask decides, as for any file
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if name is not None:
        note = (f"timm rebuilds it: timm.create_model('{name}', pretrained=True, num_classes={info.num_classes},"
                f" pretrained_cfg_overlay=dict(file='{out / 'model.safetensors'}', num_classes={info.num_classes}))"
                f" or timm.create_model('local-dir:{out}', pretrained=True); uploaded to the hub: 'hf-hub:USER/REPO'")
    else:
        why = "has asib's small_input stem, which timm does not build" if info.small_input else \
            "is not a timm architecture"
        note = (f"{info.arch} {why}: config.json says library asib; load the folder's weights with"
                f" asib.api.load_model('{out / 'model.safetensors'}')")
    return diff, note


def _rebuild_hf(folder: Path, name: str | None, info: CheckpointInfo) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a user of the folder rebuilds it: timm from the weights file, else asib's loader."""
    if name is not None:
        import timm

        n = info.num_classes
        model = timm.create_model(name, pretrained=True, num_classes=n,
                                  pretrained_cfg_overlay={"file": str(folder / "model.safetensors"), "num_classes": n})
    else:
        model, _ = load_model(folder / "model.safetensors", kinds=(info.kind,))
    return model.float().eval()
