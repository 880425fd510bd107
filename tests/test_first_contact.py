"""What a new user meets first: built-in recipes by name from any folder, --version, completion and
examples in --help, the packaging (the wheel ships the recipes and the licence, the extras), and
asib evaluate without --data, with class names, one unit, a confusion matrix and a refusal of data
the checkpoint was not trained on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from asib.builtin_recipes import RECIPES_DIR, builtin_recipes, find_builtin, resolve_recipe
from asib.cli import EXAMPLES, app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- built-in recipes


def test_builtin_recipes_by_name_from_an_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = invoke("recipe", "list")
    assert r.exit_code == 0, r.output
    names = [line.split()[0] for line in r.output.splitlines()]
    assert {"digits", "cifar100", "fashion_mnist", "ladder/L3", "study/fmnist_full"} <= set(names)
    assert any(line.startswith("digits ") and "digits" in line[7:] for line in r.output.splitlines())  # a summary
    r = invoke("recipe", "show", "digits")
    assert r.exit_code == 0, r.output
    assert r.output == (RECIPES_DIR / "digits.yaml").read_text()  # as written, comments included
    r = invoke("recipe", "check", "study/fmnist_full")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output)["name"]  # resolved: every default filled in
    r = invoke("prepare-data", "digits", "--set", "data.image_size=8", "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "digits" / "dataset.json").is_file()  # relative to the working folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_path_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").write_text("name: mine\n")
    r = invoke("recipe", "check", "digits")
    assert r.exit_code == 0 and yaml.safe_load(r.output)["name"] == "mine"
    (tmp_path / "digits").unlink()
    (tmp_path / "digits.yaml").write_text("name: edited_copy\n")
    r = invoke("recipe", "check", "digits")  # the built-in, and a word about the copy it does not read
    assert r.exit_code == 0
    assert "name: digits" in r.output and "digits.yaml is not read" in r.output
    r = invoke("recipe", "check", "digits.yaml")
    assert r.exit_code == 0 and "name: edited_copy" in r.output


def test_a_missing_recipe_hints_at_the_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = invoke("recipe", "check", "recipes/digits.yaml")  # the README's path, from a folder without recipes/
    assert r.exit_code == 2
    assert "recipes/digits.yaml: no such file" in r.output
    assert "did you mean the built-in recipe 'digits'" in r.output and "asib recipe list" in r.output
    r = invoke("distill", "digitz")
    assert r.exit_code == 2 and "'digits'" in r.output
    assert list(tmp_path.iterdir()) == []


def test_names_resolve_only_to_shipped_files() -> None:
    recipes = builtin_recipes()
    assert all(r.path.is_file() and r.path.is_relative_to(RECIPES_DIR) for r in recipes)
    assert find_builtin("ladder/L0.yaml") == find_builtin("ladder/L0")
    assert find_builtin("../recipe") is None and find_builtin("L0") is None
    assert resolve_recipe("nope") == Path("nope")
    assert (ROOT / "recipes" / "digits.yaml").resolve() == (RECIPES_DIR / "digits.yaml").resolve()  # the repo path


def test_recipe_names_complete_in_the_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asib.cli._common import complete_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    (tmp_path / "notes.txt").write_text("")
    assert "study/fmnist_full" in complete_recipe("stu")
    assert complete_recipe("mi") == ["mine.yaml"]
    assert "digits" in complete_recipe("") and "notes.txt" not in complete_recipe("")
    # through Typer's completion hook, as the installed bash completion calls it
    env = {"_ASIB_COMPLETE": "complete_bash", "COMP_WORDS": "asib distill stu", "COMP_CWORD": "2"}
    r = runner.invoke(app, [], env=env, prog_name="asib")
    assert r.output.split() == ["study/fmnist_full", "study/fmnist_heldout", "study/fmnist_rest", "study/fmnist_transfer"]


# ---------------------------------------------------------------- --version, completion, examples


def test_version_completion_and_examples() -> None:
    import asib

    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"asib {asib.__version__}"
    r = invoke("--help")
    assert "--install-completion" in r.output and "--show-completion" in r.output
    for command in EXAMPLES:
        r = invoke(command, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output and f"asib {command} " in r.output, command
    for sub in ("list", "show", "check", "schema"):
        r = invoke("recipe", sub, "--help")
        assert r.exit_code == 0 and "Example" in r.output and f"asib recipe {sub}" in r.output, sub


def test_help_stays_fast_and_without_torch() -> None:
    code = "import sys; import asib.cli, asib.builtin_recipes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- packaging


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_extras_and_hints() -> None:
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    names = {extra: {d.split(">")[0].split("<")[0].split("[")[0].strip() for d in deps} for extra, deps in extras.items()}
    assert names["export"] == {"onnx", "onnxscript", "onnxruntime"}
    assert not names["dev"] & {"onnx", "onnxscript", "onnxruntime"}  # dev takes them through asib[export]
    assert any("export" in d and "report" in d for d in extras["all"])
    assert project["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert any(c.startswith("Topic ::") for c in project["classifiers"])
    pins = {d.split(">")[0]: d for d in project["dependencies"]}
    assert "<3" in pins["torch"] and "<3" in pins["pydantic"] and "<2" in pins["timm"]
    for path in (ROOT / "asib").rglob("*.py"):  # hints name an extra, never a development install
        text = path.read_text()
        assert "pip install -e" not in text, path
        assert "pip install onnx" not in text, path


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_the_licence(tmp_path: Path) -> None:
    """A wheel built from a copy of the sources holds every built-in recipe under asib/recipes/."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "asib", src / "asib", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w")],
        cwd=src, capture_output=True, text=True,
    )
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("no pip in this environment")
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("asib-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"asib/recipes/{r.path.relative_to(RECIPES_DIR).as_posix()}" for r in builtin_recipes()}
    assert shipped and shipped <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    for extra in ("export", "report", "all", "dev"):
        assert f"Provides-Extra: {extra}" in meta


# ---------------------------------------------------------------- asib evaluate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Digits at 8x8 prepared where the checkpoint's recipe says, and a resnet8 teacher whose header
    carries what the pipeline writes (classes, mean, std, image size, the recipe)."""
    from asib.data import prepare_data
    from asib.engine.checkpoint import save_model
    from asib.models import create_model
    from asib.recipe import DataSpec

    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data" / "digits8"
    info = prepare_data(DataSpec(source="digits", train_subset=300, val_fraction=0.2), data, "digits8")
    torch.manual_seed(0)
    model = create_model("resnet8", 10).eval()
    recipe = {"name": "digits8", "data": {"source": "digits", "dir": str(data), "train_subset": 300},
              "a_key_of_an_older_asib": 1}  # evaluate reads the data section only
    extras = {"classes": list(info.classes), "mean": list(info.mean), "std": list(info.std),
              "image_size": list(info.image_size), "recipe": recipe}
    path = save_model(root / "teacher.safetensors", model, "teacher", extras)
    return {"root": root, "data": data, "ckpt": path}


def test_evaluate_without_data_uses_the_recipes(ckpt: dict[str, Path]) -> None:
    r = invoke("evaluate", ckpt["ckpt"], "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["data"] == str(ckpt["data"]) and out["split"] == "test"
    assert out["units"]["top1"] == out["units"]["ece"] == "percent"
    assert 0.0 <= out["ece"] <= 100.0 and 0.0 <= out["top1"] <= 100.0
    assert [c["class"] for c in out["per_class"]] == [str(i) for i in range(10)]
    assert sum(c["n"] for c in out["per_class"]) == out["n"]
    confusion = out["confusion"]
    assert len(confusion) == 10 and all(len(row) == 10 for row in confusion)
    assert sum(map(sum, confusion)) == out["n"]
    assert sum(confusion[i][i] for i in range(10)) == pytest.approx(out["top1"] * out["n"] / 100, abs=1e-3)
    for i, c in enumerate(out["per_class"]):
        assert c["top1"] == pytest.approx(100 * confusion[i][i] / max(1, c["n"]), abs=1e-3)
    same = json.loads(invoke("evaluate", ckpt["ckpt"], "--data", ckpt["data"], "--json").output)
    assert same["top1"] == out["top1"] and same["ece"] == out["ece"]
    r = invoke("evaluate", ckpt["ckpt"], "--per-class")
    assert r.exit_code == 0 and "named by the checkpoint's recipe" in r.output and "ECE %" in r.output


def test_evaluate_plots_the_confusion_matrix(ckpt: dict[str, Path]) -> None:
    pytest.importorskip("matplotlib")
    png = ckpt["root"] / "plots" / "confusion.png"
    r = invoke("evaluate", ckpt["ckpt"], "--plot", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_without_data_when_the_recipes_is_not_there(ckpt: dict[str, Path], tmp_path: Path) -> None:
    from asib.engine.checkpoint import load_model, save_model

    model, info = load_model(ckpt["ckpt"])
    recipe = {"name": "elsewhere", "data": {"source": "digits"}}
    moved = save_model(tmp_path / "t.safetensors", model, "teacher",
                       {k: info.json_field(k) for k in ("classes", "mean", "std", "image_size")} | {"recipe": recipe})
    r = invoke("evaluate", moved)
    assert r.exit_code == 1
    assert "data/elsewhere, the data its recipe names, is not prepared here" in r.output and "--data" in r.output
    bare = save_model(tmp_path / "bare.safetensors", model, "teacher")  # a library user's checkpoint
    r = invoke("evaluate", bare)
    assert r.exit_code == 1 and "holds no recipe" in r.output and "--data" in r.output
    r = invoke("evaluate", bare, "--data", ckpt["data"], "--json")  # no size or normalisation to check: accepted
    assert r.exit_code == 0, r.output


def test_evaluate_refuses_data_of_another_size_or_normalisation(ckpt: dict[str, Path], tmp_path: Path) -> None:
    from asib.data import prepare_data
    from asib.recipe import DataSpec

    big = tmp_path / "digits16"
    prepare_data(DataSpec(source="digits", train_subset=300, val_fraction=0.2, image_size=16), big, "digits16")
    r = invoke("evaluate", ckpt["ckpt"], "--data", big)
    assert r.exit_code == 1
    line = next(x for x in r.output.splitlines() if x.startswith("error:"))
    assert "trained on 8x8 images" in line and f"{big} holds 16x16 images" in line  # one line naming both
    other = tmp_path / "digits_all"
    prepare_data(DataSpec(source="digits", val_fraction=0.2), other, "digits_all")  # the same size, other mean/std
    r = invoke("evaluate", ckpt["ckpt"], "--data", other)
    assert r.exit_code == 1 and "mean" in r.output and "std" in r.output and "Traceback" not in r.output
