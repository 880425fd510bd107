"""``asib export``: ONNX, TorchScript and safetensors exports of a digits student trained for one epoch,
checked against PyTorch on real test images, through the real entry point."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from asib.cli import app
from asib.data import make_loader, prepare_data
from asib.engine.checkpoint import load_model, read_info, save_model, save_tensors
from asib.errors import CheckpointError
from asib.models import create_model
from asib.pipeline.export import export_checkpoint
from asib.recipe import DataSpec

runner = CliRunner()


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Digits at 8x8 (300 images), a resnet8 trained one epoch, saved as a student checkpoint."""
    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    info = prepare_data(DataSpec(source="digits", train_subset=300, val_fraction=0.2), data, "digits")
    torch.manual_seed(0)
    model = create_model("resnet8", info.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for batch in make_loader(data, "train", batch_size=32, device="cpu", train=True).batches(0):
        loss = torch.nn.functional.cross_entropy(model(batch.x), batch.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    extras = {"classes": list(info.classes), "mean": list(info.mean), "std": list(info.std),
              "image_size": list(info.image_size), "epoch": 1}
    ckpt = save_model(root / "student.safetensors", model.eval(), "student", extras)
    return {"root": root, "data": data, "ckpt": ckpt}


def _diff_from_output(output: str, fmt: str) -> float:
    match = re.search(rf"max \|{fmt} - torch\| = (\S+)", output)
    assert match, output
    return float(match.group(1))


def _test_images(data: Path, n: int) -> torch.Tensor:
    return next(iter(make_loader(data, "test", batch_size=n, device="cpu"))).x


def test_onnx_export_matches_torch_and_carries_metadata(student: dict[str, Path]) -> None:
    import onnx
    import onnxruntime as ort

    out = student["root"] / "exports" / "student.onnx"
    r = runner.invoke(app, ["export", str(student["ckpt"]), "--format", "onnx", "--out", str(out),
                            "--data", str(student["data"])])
    assert r.exit_code == 0, r.output
    assert _diff_from_output(r.output, "onnx") <= 1e-4
    assert "test images of" in r.output

    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert json.loads(meta["input_size"]) == [3, 8, 8]
    assert len(json.loads(meta["mean"])) == 3 and len(json.loads(meta["std"])) == 3
    assert meta["asib.kind"] == "student" and meta["asib.arch"] == "resnet8"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic

    # Another batch size than the exported example and the CLI's check: the axis really is dynamic.
    model, _ = load_model(student["ckpt"])
    x = _test_images(student["data"], 5)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.inference_mode():
        want = model(x)
    assert got.shape == (5, 10)
    assert (got - want).abs().max().item() <= 1e-4
    assert (want.argmax(1) == got.argmax(1)).all()


def test_torchscript_export_matches_torch(student: dict[str, Path]) -> None:
    out = student["root"] / "student.pt"
    r = runner.invoke(app, ["export", str(student["ckpt"]), "--format", "torchscript", "--out", str(out),
                            "--data", str(student["data"])])
    assert r.exit_code == 0, r.output
    assert _diff_from_output(r.output, "torchscript") <= 1e-4
    assert "deprecated" in r.output  # the one note instead of torch.jit's warnings
    extra = {"asib_meta.json": ""}
    with pytest.warns(FutureWarning):
        loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["asib_meta.json"])["asib.kind"] == "student"
    model, _ = load_model(student["ckpt"])
    x = _test_images(student["data"], 3)
    with torch.inference_mode():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-4


def test_safetensors_export_keeps_header_and_weights(student: dict[str, Path]) -> None:
    out = student["root"] / "plain.safetensors"
    r = runner.invoke(app, ["export", str(student["ckpt"]), "--format", "safetensors", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "seeded random inputs" in r.output
    assert _diff_from_output(r.output, "safetensors") == 0.0
    src, dst = read_info(student["ckpt"]), read_info(out)
    assert dst.kind == "student" and dst.json_field("classes") == src.json_field("classes")
    assert dst.json_field("mean") == src.json_field("mean")
    assert all(dst.meta[k] == v for k, v in src.meta.items())


def test_export_refuses_to_overwrite_without_force(student: dict[str, Path]) -> None:
    out = student["root"] / "taken.safetensors"
    out.write_text("keep me")
    args = ["export", str(student["ckpt"]), "--format", "safetensors", "--out", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "exists" in r.output and "--force" in r.output
    assert out.read_text() == "keep me"
    r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert read_info(out).kind == "student"


def test_synergy_checkpoint_is_refused_with_a_clear_line(tmp_path: Path) -> None:
    fake = tmp_path / "synergy.safetensors"
    save_tensors(fake, {"head.w": torch.zeros(2)}, {"asib.kind": "synergy", "asib.arch": "ib_mbm",
                                                   "asib.num_classes": "10"})
    r = runner.invoke(app, ["export", str(fake), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 1
    assert "export the student or a teacher" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_export_above_tolerance_fails_and_writes_nothing(student: dict[str, Path]) -> None:
    out = student["root"] / "strict" / "model.safetensors"
    with pytest.raises(CheckpointError, match="differs from PyTorch"):
        export_checkpoint(student["ckpt"], "safetensors", out, tolerance=-1.0)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary file left behind


def test_export_checks_data_fits_the_model(student: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "digits16"
    prepare_data(DataSpec(source="digits", train_subset=100, image_size=16), other, "digits16")
    r = runner.invoke(app, ["export", str(student["ckpt"]), "--format", "safetensors",
                            "--out", str(tmp_path / "m.safetensors"), "--data", str(other)])
    assert r.exit_code == 1 and "trained on" in r.output, r.output
    r = runner.invoke(app, ["export", str(student["ckpt"]), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2  # typer's own usage error for an unknown choice


# ---------------------------------------------------------------- --format hf


def _timm_checkpoint(student: dict[str, Path], arch: str = "test_efficientnet") -> Path:
    """A timm model (a small test architecture, no download) with the digits student's header extras."""
    info = read_info(student["ckpt"])
    torch.manual_seed(0)
    model = create_model(arch, 10).eval()
    extras = {k: info.json_field(k) for k in ("classes", "mean", "std", "image_size")}
    return save_model(student["root"] / f"{arch}.safetensors", model, "teacher", extras)


def test_hf_export_of_a_timm_model_is_rebuilt_by_timm(student: dict[str, Path]) -> None:
    import timm
    from safetensors.torch import load_file
    from timm.data import resolve_data_config

    ckpt = _timm_checkpoint(student)
    out = student["root"] / "hf_timm"
    r = runner.invoke(app, ["export", str(ckpt), "--format", "hf", "--out", str(out), "--data", str(student["data"])])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "timm.create_model(" in r.output and _diff_from_output(r.output, "hf") <= 1e-4

    config = json.loads((out / "config.json").read_text())
    header = read_info(ckpt)
    assert config["architecture"] == "test_efficientnet" and config["num_classes"] == 10
    assert config["label_names"] == header.json_field("classes")
    assert isinstance(config["num_features"], int)
    cfg = config["pretrained_cfg"]
    assert cfg["mean"] == header.json_field("mean") and cfg["std"] == header.json_field("std")
    assert cfg["input_size"] == [3, 8, 8] and cfg["crop_pct"] == 1.0
    state = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("model.", "head_drop.")) for k in state)  # asib's wrapper is gone
    assert "classifier.weight" in state  # timm's own name of this family's head

    asib_model, _ = load_model(ckpt)
    x = _test_images(student["data"], 4)
    with torch.inference_mode():
        want = asib_model(x)
    # as the README tells a timm user: the architecture, and the file
    rebuilt = timm.create_model("test_efficientnet", pretrained=True, num_classes=10,
                                pretrained_cfg_overlay={"file": str(out / "model.safetensors"), "num_classes": 10})
    with torch.inference_mode():
        assert (rebuilt.eval()(x) - want).abs().max().item() <= 1e-5
    # and the folder alone, config.json included (timm's local-dir: source)
    try:
        from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    except RuntimeError as exc:  # a timm without local-dir: support
        pytest.skip(f"this timm cannot load a local folder ({exc})")
    with torch.inference_mode():
        assert (from_dir(x) - want).abs().max().item() <= 1e-5
    data_cfg = resolve_data_config({}, model=from_dir)
    assert tuple(data_cfg["input_size"]) == (3, 8, 8) and list(data_cfg["mean"]) == cfg["mean"]
    assert list(from_dir.pretrained_cfg["label_names"]) == config["label_names"]


def test_hf_export_of_a_zoo_model_says_how_asib_rebuilds_it(student: dict[str, Path]) -> None:
    import asib.api

    out = student["root"] / "hf_zoo"
    r = runner.invoke(app, ["export", str(student["ckpt"]), "--format", "hf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "asib.api.load_model" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["library"] == "asib" and config["architecture"] == "resnet8"
    assert "asib.api.load_model" in config["how_to_load"]
    assert config["pretrained_cfg"]["input_size"] == [3, 8, 8] and len(config["label_names"]) == 10
    rebuilt, info = asib.api.load_model(out / "model.safetensors")
    model, _ = load_model(student["ckpt"])
    x = _test_images(student["data"], 3)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), model(x))
    assert info.kind == "student"


def test_hf_export_folder_rules(student: dict[str, Path], tmp_path: Path) -> None:
    args = ["export", str(student["ckpt"]), "--format", "hf", "--out"]
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, [*args, str(tmp_path / "file")])
    assert r.exit_code == 1 and "writes a folder" in r.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = runner.invoke(app, [*args, str(tmp_path / "mine"), "--force"])
    assert r.exit_code == 1 and "notes.txt" in r.output
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    out = tmp_path / "hf"
    assert runner.invoke(app, [*args, str(out)]).exit_code == 0
    r = runner.invoke(app, [*args, str(out)])
    assert r.exit_code == 1 and "--force" in r.output
    r = runner.invoke(app, [*args, str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf", "mine"]  # no temporary folders left


def test_export_refuses_data_of_another_normalisation(student: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "digits_other_subset"
    prepare_data(DataSpec(source="digits", train_subset=120, val_fraction=0.2), other, "digits")  # other mean/std
    r = runner.invoke(app, ["export", str(student["ckpt"]), "--format", "safetensors",
                            "--out", str(tmp_path / "m.safetensors"), "--data", str(other)])
    assert r.exit_code == 1 and "trained on 8x8 images (mean" in r.output, r.output
    assert not (tmp_path / "m.safetensors").exists()
