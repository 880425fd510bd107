"""End to end through the real entry point (typer's CliRunner) on tiny digits data and tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from asib.cli import app

runner = CliRunner()


def tiny_recipe(root: Path, name: str = "tiny", **distill: object) -> dict:
    """Digits at 8x8, a 400-image subset, two cheap teachers of different families, 1 epoch each."""
    train = {"epochs": 2, "batch_size": 32, "optim": {"name": "adamw", "lr": 3e-3}, "augment": {"hflip": False, "crop_padding": 1}}
    return {
        "name": name,
        "out_dir": str(root / "runs" / name),
        "device": "cpu",
        "data": {"source": "digits", "dir": str(root / "data" / "digits"), "train_subset": 400, "val_fraction": 0.2},
        "teachers": [
            {"name": "t1", "arch": "resnet8", "train": train},
            {"name": "t2", "arch": "vgg8", "train": train},
        ],
        "student": {"arch": "resnet8"},
        "distill": {
            "num_stages": 1,
            "student_epochs": 1,
            "teacher_adapt_epochs": 1,
            "batch_size": 32,
            "ib_mbm": {"dim": 16, "heads": 2},
            "student_optim": {"name": "adamw", "lr": 3e-3},
            **distill,
        },
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    recipe = write_recipe(root / "tiny.yaml", tiny_recipe(root))
    r = invoke("prepare-data", recipe)
    assert r.exit_code == 0, r.output
    r = invoke("finetune-teacher", recipe, "--quiet")
    assert r.exit_code == 0, r.output
    return {"root": root, "recipe": recipe, "data": root / "data" / "digits", "run": root / "runs" / "tiny",
            "finetune_output": r.output}


def test_prepare_and_finetune_write_artifacts(pipeline: dict[str, Path]) -> None:
    data, run = pipeline["data"], pipeline["run"]
    for name in ("train.safetensors", "val.safetensors", "test.safetensors", "dataset.json"):
        assert (data / name).is_file()
    for t in ("t1", "t2"):
        folder = run / "teachers" / t
        for name in ("model.safetensors", "last.safetensors", "recipe.yaml", "metrics.jsonl", "summary.json"):
            assert (folder / name).is_file(), name
        assert not (folder / "train_state.safetensors").exists()
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2 and "val_top1" in json.loads(lines[-1])
        record = json.loads(lines[-1])
        assert record["val_loss"] > 0 and record["seconds"] >= 0  # validation loss, the epoch's time
        assert len((folder / "metrics.csv").read_text().splitlines()) == 3  # a header, one row per epoch
        log = (folder / "train.log").read_text()
        assert "run started" in log and log.count("epoch=") == 2 and f"{t}: best epoch" in log
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["versions"]["torch"] and summary["device"]["type"] == "cpu" and summary["params"] > 0


def test_finetune_ends_with_a_table_of_its_teachers(pipeline: dict[str, Path]) -> None:
    lines = str(pipeline["finetune_output"]).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("teacher "))
    assert lines[head].split() == ["teacher", "arch", "params", "best", "epoch", "val", "top-1", "test", "top-1",
                                   "seconds", "checkpoint"]
    for row, name in zip(lines[head + 1:head + 3], ("t1", "t2"), strict=True):
        summary = json.loads((pipeline["run"] / "teachers" / name / "summary.json").read_text())
        cells = row.split()
        assert cells[0] == name and cells[1] == summary["arch"]
        assert cells[3] == f"{summary['best_epoch']}/2" and cells[5] == f"{summary['test_top1']:.2f}"
        assert cells[-1].endswith(f"{name}/model.safetensors")


def test_evaluate_reproduces_summary(pipeline: dict[str, Path]) -> None:
    folder = pipeline["run"] / "teachers" / "t1"
    summary = json.loads((folder / "summary.json").read_text())
    r = invoke("evaluate", folder / "model.safetensors", "--data", pipeline["data"], "--json")
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output)
    assert set(figures) >= {"top1", "top5", "nll", "ece", "n"}
    assert figures["top1"] == pytest.approx(summary["test_top1"], abs=1e-9)
    r = invoke("evaluate", folder / "model.safetensors", "--data", pipeline["data"], "--per-class")
    assert r.exit_code == 0 and "top-1" in r.output


def test_distill_end_to_end(pipeline: dict[str, Path]) -> None:
    root, recipe, data = pipeline["root"], pipeline["recipe"], pipeline["data"]
    out = root / "runs" / "distilled"
    r = invoke("distill", recipe, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert "synergy" in r.output and "student (asib)" in r.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("student_val_top1", "student_test_top1", "synergy_test_top1", "teacher_test_top1", "seconds"):
        assert summary[key] is not None, key
    assert len(summary["teacher_test_top1"]) == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in records] == ["A", "B"]
    a, b = records
    for key in ("syn_ce", "ib_kl", "cccp", "beta", "tau", "attn_t0", "attn_t1", "synergy_val_top1", "seconds"):
        assert key in a, key
    for key in ("ce", "kd", "kd_ens", "tau", "disagree", "student_val_top1", "student_val_loss", "attn_t0", "seconds"):
        assert key in b, key

    # the final table: sizes, val and test, the kept epoch, the gain over the teachers' average
    average = summary["teacher_average_test_top1"]
    assert average == pytest.approx(_teacher_average_top1(pipeline), abs=1e-3)
    assert summary["student_gain_over_teacher_average"] == pytest.approx(summary["student_test_top1"] - average, abs=1e-3)
    assert summary["student_params"] > 0 and len(summary["teacher_params"]) == 2 and summary["best_epoch"] == 2
    assert summary["versions"]["asib"] and summary["device"]["type"] == "cpu"
    table = r.output.splitlines()
    assert ["model", "arch", "params", "val", "top-1", "test", "top-1"] in [line.split() for line in table]
    row = next(line.split() for line in table if line.startswith("student (asib)"))
    assert row[-2:] == [f"{summary['student_val_top1']:.2f}", f"{summary['student_test_top1']:.2f}"]
    assert any(line.startswith("teacher average (logits)") and line.endswith(f"{average:.2f}") for line in table)
    assert "student kept: epoch 2 of 2 (best val top-1)" in r.output
    assert f"student - teacher average: {summary['student_gain_over_teacher_average']:+.2f} points" in r.output
    log = (out / "train.log").read_text()  # what the run printed, the table included
    assert log.count("epoch=") == 2 and "student - teacher average" in log and "run folder:" in log
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    r = invoke("evaluate", out / "student.safetensors", "--data", data, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["top1"] == pytest.approx(summary["student_test_top1"], abs=1e-9)
    r = invoke("evaluate", out / "synergy.safetensors", "--data", data, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["top1"] == pytest.approx(summary["synergy_test_top1"], abs=1e-9)


def _teacher_average_top1(pipeline: dict[str, Path]) -> float:
    """Test top-1 (%) of the average logits of the two teachers, computed here from their files."""
    import torch

    from asib.data import load_info
    from asib.engine.checkpoint import load_model
    from asib.engine.loaders import eval_loader
    from asib.engine.runtime import make_runtime

    runtime = make_runtime("cpu", precision="fp32")
    loader = eval_loader(pipeline["data"], "test", load_info(pipeline["data"]), 256, runtime)
    teachers = [load_model(pipeline["run"] / "teachers" / t / "model.safetensors")[0].eval() for t in ("t1", "t2")]
    hits = n = 0
    with torch.inference_mode():
        for batch in loader.batches(0):
            mean = torch.stack([t(batch.x).float() for t in teachers]).mean(0)
            hits += int((mean.argmax(1) == batch.y).sum())
            n += batch.y.numel()
    return 100.0 * hits / n


def test_missing_tracker_is_one_line_before_any_work(pipeline: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = pipeline["root"] / "runs" / "tracked"
    r = invoke("distill", pipeline["recipe"], "--out", out, "--set", "tracking=[wandb]")
    assert r.exit_code == 1
    assert "tracking: wandb needs the wandb package, which is not installed" in r.output
    assert "pip install 'asib[wandb]'" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_synergy_checkpoint_holds_the_adapted_teacher_blocks(pipeline: dict[str, Path]) -> None:
    """With teacher blocks unfrozen, evaluating synergy.safetensors gives summary.json's figure."""
    root, data = pipeline["root"], pipeline["data"]
    adapted = tiny_recipe(root, teacher_freeze_schedule=[1], teacher_optim={"name": "adamw", "lr": 1e-2})
    recipe = write_recipe(root / "adapt.yaml", adapted)
    out = root / "runs" / "adapted"
    r = invoke("distill", recipe, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teachers_adapted"] is True
    r = invoke("evaluate", out / "synergy.safetensors", "--data", data, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["top1"] == pytest.approx(summary["synergy_test_top1"], abs=1e-9)
    # the teachers' own figures are of the checkpoints as loaded, untouched by the adaptation
    for k, name in enumerate(("t1", "t2")):
        teacher = json.loads((pipeline["run"] / "teachers" / name / "summary.json").read_text())
        assert summary["teacher_test_top1"][k] == pytest.approx(teacher["test_top1"], abs=1e-3)


@pytest.mark.parametrize("method", ["ce", "kd", "avg_kd", "dkd"])
def test_baselines_run(pipeline: dict[str, Path], method: str) -> None:
    out = pipeline["root"] / "runs" / f"b_{method}"
    r = invoke("distill", pipeline["recipe"], "--out", out, "--method", method, "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["synergy_test_top1"] is None
    assert not (out / "synergy.safetensors").exists()
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())["distill"]
    assert resolved["method"] == method and "ib_mbm" not in resolved  # only what the method reads


def test_another_methods_key_is_a_recipe_error(pipeline: dict[str, Path]) -> None:
    out = pipeline["root"] / "runs" / "strict"
    r = invoke("distill", pipeline["recipe"], "--out", out, "--set", "distill.method=avg_kd")
    assert r.exit_code == 2
    assert "distill.ib_mbm: not used by method avg_kd" in r.output
    assert "distill.teacher_adapt_epochs: not used by method avg_kd" in r.output
    assert not out.exists()


def test_existing_run_is_refused_then_forced(pipeline: dict[str, Path]) -> None:
    recipe = pipeline["recipe"]
    r = invoke("finetune-teacher", recipe, "--teacher", "t1", "--quiet")
    assert r.exit_code == 1
    assert "already holds a run" in r.output and "--resume" in r.output


# ---------------------------------------------------------------- bad input: one line, no traceback, nothing written


def _nothing_written(root: Path, before: set[Path]) -> bool:
    return set(root.rglob("*")) == before


def test_typo_key_exit_2(tmp_path: Path) -> None:
    data = tiny_recipe(tmp_path)
    data["teachers"][1]["smal_input"] = True
    recipe = write_recipe(tmp_path / "r.yaml", data)
    before = set(tmp_path.rglob("*"))
    r = invoke("prepare-data", recipe)
    assert r.exit_code == 2
    assert "teachers[1].smal_input: unknown key; did you mean 'small_input'?" in r.output
    assert "Traceback" not in r.output
    assert _nothing_written(tmp_path, before)


def test_wrong_type_exit_2(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    r = invoke("finetune-teacher", recipe, "--set", "teachers.0.train.epochs=many")
    assert r.exit_code == 2
    assert "teachers[0].train.epochs:" in r.output and "'many'" in r.output


def test_unknown_arch_exit_2(tmp_path: Path) -> None:
    data = tiny_recipe(tmp_path)
    data["teachers"][1]["arch"] = "resnet1522"
    recipe = write_recipe(tmp_path / "r.yaml", data)
    before = set(tmp_path.rglob("*"))
    r = invoke("finetune-teacher", recipe)
    assert r.exit_code == 2
    assert "teachers[1].arch: unknown model 'resnet1522'; did you mean" in r.output
    assert _nothing_written(tmp_path, before)


def test_missing_data_exit_1(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    before = set(tmp_path.rglob("*"))
    r = invoke("finetune-teacher", recipe)
    assert r.exit_code == 1
    assert "prepare-data" in r.output and "Traceback" not in r.output
    assert _nothing_written(tmp_path, before)


def test_checkpoint_folder_exit_1(pipeline: dict[str, Path]) -> None:
    r = invoke("evaluate", pipeline["run"] / "teachers" / "t1", "--data", pipeline["data"])
    assert r.exit_code == 1
    assert "is a folder" in r.output


def test_fewer_than_two_teachers(pipeline: dict[str, Path]) -> None:
    data = tiny_recipe(pipeline["root"])
    data["teachers"] = data["teachers"][:1]
    recipe = write_recipe(pipeline["root"] / "one.yaml", data)
    out = pipeline["root"] / "runs" / "one_teacher"
    r = invoke("distill", recipe, "--out", out)
    assert r.exit_code == 2
    assert "needs at least 2 teachers" in r.output
    assert not out.exists()


def test_wrong_kind_teacher_checkpoint(pipeline: dict[str, Path]) -> None:
    root = pipeline["root"]
    student_out = root / "runs" / "kind_src"
    assert invoke("distill", pipeline["recipe"], "--out", student_out, "--method", "ce", "-q").exit_code == 0
    data = tiny_recipe(root)
    data["teachers"][0]["checkpoint"] = str(student_out / "student.safetensors")
    recipe = write_recipe(root / "kind.yaml", data)
    out = root / "runs" / "kind"
    r = invoke("distill", recipe, "--out", out)
    assert r.exit_code == 1
    assert "is a student checkpoint, not a teacher" in r.output
    assert not out.exists()


def test_teacher_class_count_mismatch(pipeline: dict[str, Path], tmp_path: Path) -> None:
    from asib.engine.checkpoint import save_model
    from asib.models import create_model

    other = create_model("resnet8", num_classes=7)
    path = save_model(tmp_path / "seven.safetensors", other, "teacher")
    data = tiny_recipe(pipeline["root"])
    data["teachers"][1]["checkpoint"] = str(path)
    recipe = write_recipe(tmp_path / "r.yaml", data)
    out = tmp_path / "run"
    r = invoke("distill", recipe, "--out", out)
    assert r.exit_code == 1
    assert "trained on 7 classes but the data has 10" in r.output
    assert not out.exists()


def test_recipe_check_and_schema(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    r = invoke("recipe", "check", recipe, "--set", "distill.tau=2")
    assert r.exit_code == 0, r.output
    resolved = yaml.safe_load(r.output)
    assert resolved["distill"]["tau"] == 2.0 and resolved["distill"]["ib_beta"] == 0.001
    r = invoke("recipe", "schema")
    assert r.exit_code == 0
    schema = json.loads(r.output)
    assert "DistillSpec" in schema["$defs"]
    keys = schema["x-asib-method-keys"]
    assert "disagreement" in keys["asib"] and "disagreement" not in keys["avg_kd"] and "tau" not in keys["ce"]
    assert schema["x-asib-method-defaults"]["dkd"] == {"ce_alpha": 1.0}


def test_python_dash_m_and_fast_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "import sys; from asib.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False", "asib --help must not import torch"
    out = subprocess.run([sys.executable, "-m", "asib", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "distill" in out.stdout
