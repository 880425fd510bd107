"""Recipes: validation, overrides, error lines, and the no-torch rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from asib.errors import RecipeError
from asib.recipe import DistillSpec, Recipe, apply_overrides, load_recipe, recipe_from_dict, spec_from

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_recipes_validate() -> None:
    found = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert len(found) >= 3
    for path in found:
        recipe = load_recipe(path)
        assert isinstance(recipe, Recipe)


def test_defaults_and_paths(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, {"teachers": [{"name": "a", "arch": "resnet8"}]}))
    assert r.name == "r"  # from the file name
    assert r.run_dir == Path("runs/r")
    assert r.data_dir == Path("data/r")
    assert r.teacher_checkpoint(r.teachers[0]) == Path("runs/r/teachers/a/model.safetensors")
    d = r.distill  # ASIB's shipped defaults (README, "The study")
    assert (d.ce_alpha, d.kd_alpha, d.kd_ens_alpha, d.tau) == (1.0, 0.5, 0.5, 4.0)
    assert d.kd_loss == "dist" and d.synergy_kd_alpha == 1.0 and d.synergy_crossfit is False


def test_unknown_key_gets_path_and_suggestion(tmp_path: Path) -> None:
    data = {"name": "x", "teachers": [{"name": "a", "arch": "resnet8"}, {"name": "b", "arch": "vgg8", "smal_input": True}]}
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, data))
    assert err.value.problems == ["teachers[1].smal_input: unknown key; did you mean 'small_input'?"]
    assert err.value.exit_code == 2


def test_wrong_type_names_value(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, {"name": "x", "distill": {"num_stages": "four"}}))
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("distill.num_stages:")
    assert "'four'" in err.value.problems[0]


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    data = {"name": "x", "seed": "a", "data": {"sourse": "digits", "val_fraction": 2}}
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, data))
    paths = sorted(p.split(":")[0] for p in err.value.problems)
    assert paths == ["data.sourse", "data.val_fraction", "seed"]


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "x", "teachers": [{"name": "a", "arch": "resnet8"}, {"name": "b", "arch": "vgg8"}]})
    r = load_recipe(path, ["teachers.1.arch=resnet20", "distill.tau=2", "teachers[0].train.optim.lr=0.01",
                           "distill.student_freeze_schedule=[-1, 0, 0, 0]"])
    assert r.teachers[1].arch == "resnet20"
    assert r.distill.tau == 2.0
    assert r.teachers[0].train.optim.lr == 0.01
    assert r.distill.student_freeze_schedule == [-1, 0, 0, 0]
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["teachers.5.arch=x"])
    assert "not an index" in err.value.problems[0]
    with pytest.raises(RecipeError):
        load_recipe(path, ["distill.tua=2"])  # the typo reaches validation, which refuses it


def test_apply_overrides_leaves_input_alone() -> None:
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2", "a.c=[1, 2]"])
    assert data == {"a": {"b": 1}}
    assert out == {"a": {"b": 2, "c": [1, 2]}}


def test_cross_field_checks() -> None:
    with pytest.raises(RecipeError, match="student_epochs has 2 entries"):
        recipe_from_dict({"name": "x", "distill": {"num_stages": 3, "student_epochs": [1, 2]}})
    with pytest.raises(RecipeError, match="tau_start and tau_end"):
        recipe_from_dict({"name": "x", "distill": {"tau_start": 4}})
    with pytest.raises(RecipeError, match="unique"):
        recipe_from_dict({"name": "x", "teachers": [{"name": "a", "arch": "m"}, {"name": "a", "arch": "m"}]})
    with pytest.raises(RecipeError, match="divisible"):
        recipe_from_dict({"name": "x", "distill": {"ib_mbm": {"dim": 10, "heads": 3}}})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)


def test_spec_from_dict_uses_recipe_errors() -> None:
    assert spec_from(DistillSpec, {"tau": 2}).tau == 2
    with pytest.raises(RecipeError, match="tua: unknown key; did you mean 'tau'"):
        spec_from(DistillSpec, {"tua": 2})


def test_recipe_is_frozen() -> None:
    r = recipe_from_dict({"name": "x"})
    with pytest.raises(pydantic.ValidationError):
        r.seed = 3  # type: ignore[misc]


def test_find_teacher_by_name_or_index() -> None:
    r = recipe_from_dict({"name": "x", "teachers": [{"name": "a", "arch": "m"}, {"name": "b", "arch": "m"}]})
    assert r.find_teacher("b").name == "b"
    assert r.find_teacher("0").name == "a"
    with pytest.raises(RecipeError, match="did you mean 'b'"):
        r.find_teacher("bb")


def test_import_recipe_leaves_torch_out() -> None:
    code = "import sys, asib.recipe, asib.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
