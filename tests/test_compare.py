"""``asib compare``: parsing, the paired statistics, and a whole tiny study through the real entry point."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from asib.cli import app
from asib.errors import RecipeError
from asib.pipeline.compare import Figures, Paired, parse_seeds, parse_tune, parse_variant

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- parsing


def test_parse_seeds() -> None:
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    assert parse_seeds("3") == [3]
    for bad in ("4-2", "a", "1,1"):
        with pytest.raises(RecipeError):
            parse_seeds(bad)


def test_parse_variant_and_tune() -> None:
    v = parse_variant("long:teacher_adapt_epochs=3,synergy_gate=false,teacher_weights=[1, 2]", "asib")
    assert v.name == "long" and v.method == "asib"
    assert v.sets == {"teacher_adapt_epochs": 3, "synergy_gate": False, "teacher_weights": [1, 2]}
    assert parse_variant("hot:method=avg_kd,tau=8", "asib").method == "avg_kd"
    grids = parse_tune(["dkd:tau=1,4", "dkd:dkd.beta=2,8", "avg_kd:tau=1,2,4"])
    assert grids == {"dkd": {"tau": [1, 4], "dkd.beta": [2, 8]}, "avg_kd": {"tau": [1, 2, 4]}}
    with pytest.raises(RecipeError, match="given twice"):
        parse_tune(["dkd:tau=1", "dkd:tau=2"])
    with pytest.raises(RecipeError, match="expected NAME:key=value"):
        parse_variant("no-colon", "asib")


# ---------------------------------------------------------------- statistics


def test_figures_and_paired_t_match_scipy() -> None:
    from scipy import stats

    arm = {0: 89.24, 1: 89.33, 2: 89.67, 3: 89.27, 4: 89.36}
    ref = {0: 89.32, 1: 89.12, 2: 89.06, 3: 88.71, 4: 88.93, 9: 50.0}  # seed 9 has no pair: left out
    f = Figures.of(arm)
    assert f.mean == pytest.approx(sum(arm.values()) / 5)
    assert f.sd == pytest.approx(stats.tstd(list(arm.values())))
    p = Paired.of(arm, ref)
    diffs = [arm[s] - ref[s] for s in range(5)]
    test = stats.ttest_rel([arm[s] for s in range(5)], [ref[s] for s in range(5)])
    assert p.n == 5 and p.wins == 4
    assert p.mean == pytest.approx(sum(diffs) / 5)
    assert p.t == pytest.approx(test.statistic) and p.p == pytest.approx(test.pvalue)
    half = stats.t.ppf(0.975, 4) * stats.tstd(diffs) / math.sqrt(5)
    assert (p.low, p.high) == (pytest.approx(p.mean - half), pytest.approx(p.mean + half))
    assert Paired.of({0: 1.0}, {0: 0.5}).low is None  # one seed: no interval
    assert Paired.of({}, ref).mean is None


# ---------------------------------------------------------------- a tiny study


def tiny(root: Path) -> dict:
    train = {"epochs": 1, "batch_size": 32, "optim": {"name": "adamw", "lr": 3e-3}, "augment": {"hflip": False}}
    return {
        "name": "study",
        "out_dir": str(root / "runs" / "study"),
        "device": "cpu",
        "data": {"source": "digits", "dir": str(root / "data"), "train_subset": 300, "val_fraction": 0.2},
        "teachers": [{"name": "t1", "arch": "resnet8", "train": train}, {"name": "t2", "arch": "vgg8", "train": train}],
        "student": {"arch": "resnet8"},
        "distill": {"method": "asib", "num_stages": 1, "student_epochs": 1, "teacher_adapt_epochs": 1,
                    "batch_size": 32, "ib_mbm": {"dim": 16, "heads": 2}, "student_optim": {"name": "adamw", "lr": 3e-3}},
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    recipe = root / "study.yaml"
    recipe.write_text(yaml.safe_dump(tiny(root)))
    assert invoke("prepare-data", recipe).exit_code == 0
    r = invoke("finetune-teacher", recipe, "--quiet")
    assert r.exit_code == 0, r.output
    return recipe


def test_a_study_runs_tunes_on_val_and_pairs_by_seed(prepared: Path) -> None:
    recipe, out = prepared, prepared.parent / "study_a"
    args = ["compare", recipe, "--methods", "ce,avg_kd", "--seeds", "0-1", "--tune", "avg_kd:tau=1,4",
            "--variant", "avg_kd_hot:method=avg_kd,tau=8", "--out", out, "--table-only"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "compare.json").read_text())
    assert (out / "study.json").exists() and (out / "compare.md").exists()
    arms = {a["arm"]: a for a in data["arms"]}
    assert set(arms) == {"ce", "avg_kd", "avg_kd_hot"} and data["reference"] == "avg_kd"
    tuned = arms["avg_kd"]["tuned"]
    vals = tuned["val_top1"]
    best = max(vals, key=lambda k: (vals[k], -list(vals).index(k)))
    assert tuned["chosen"] == best  # chosen on validation figures only
    tau = tuned["values"]["tau"]
    folders = arms["avg_kd"]["folders"]
    assert Path(folders["0"]).parent.name == tuned["chosen"]  # seed 0's run is the winning tuning run
    assert Path(folders["1"]) == out / "runs" / "avg_kd" / "s1"
    for seed in (0, 1):
        resolved = yaml.safe_load((Path(folders[str(seed)]) / "recipe.yaml").read_text())
        assert resolved["distill"]["tau"] == tau and resolved["seed"] == seed
        summary = json.loads((out / "runs" / "ce" / f"s{seed}" / "summary.json").read_text())
        assert arms["ce"]["test"]["values"][str(seed)] == summary["student_test_top1"]
    assert arms["ce"]["paired_test_vs_reference"]["n"] == 2
    assert "95%" in r.output and "avg_kd_hot" in r.output
    assert data["selection"].startswith("tuned values chosen on the validation split (first seed(s));")
    # a second call runs nothing and gives the same answer
    stamp = {p: p.stat().st_mtime for p in out.rglob("summary.json")}
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "to run" not in again.output
    assert {p: p.stat().st_mtime for p in out.rglob("summary.json")} == stamp
    assert json.loads((out / "compare.json").read_text())["arms"] == data["arms"]


def test_a_one_value_grid_is_said_to_be_given_not_chosen(prepared: Path) -> None:
    from dataclasses import asdict

    from asib.pipeline.compare import Figures, _selection, make_spec, markdown

    given = make_spec(prepared, methods=["ce", "avg_kd"], seeds=[0], tune=["avg_kd:tau=4"])
    assert _selection(given).startswith("every --tune grid holds one value: the values were given, not chosen")
    mixed = make_spec(prepared, methods=["ce", "avg_kd"], seeds=[0], tune=["avg_kd:tau=4", "ce:label_smoothing=0,0.1"])
    assert "(a one-value grid fixes its value)" in _selection(mixed)
    empty = asdict(Figures.of({}))
    arm = {"arm": "avg_kd", "method": "avg_kd", "test": empty, "val": empty, "synergy_test": None,
           "paired_test_vs_reference": None, "tuned": {"chosen": "tau=4", "val_top1": {"tau=4": 90.0}}}
    table = markdown({"reference": "avg_kd", "seeds": [0], "selection": _selection(given), "arms": [arm]})
    assert "- avg_kd: **tau=4: 90.00** (one value given: nothing chosen)" in table


def test_dry_run_lists_what_is_left_and_resumes_what_stopped(prepared: Path) -> None:
    recipe, out = prepared, prepared.parent / "study_b"
    args = ["compare", recipe, "--methods", "ce,asib", "--seeds", "0-1", "--out", out]
    r = invoke(*args, "--dry-run")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("asib distill")]
    assert len(lines) == 4 and all("--out" in x and "--set seed=" in x for x in lines)
    assert not out.exists()  # a dry run writes nothing
    assert invoke(*args, "--table-only").exit_code == 0
    stopped = out / "runs" / "asib" / "s1"
    (stopped / "summary.json").unlink()  # as if killed before its first save
    r = invoke(*args, "--dry-run")
    lines = [x for x in r.output.splitlines() if x.startswith("asib distill")]
    assert len(lines) == 1 and "--resume" in lines[0] and str(stopped) in lines[0]  # starts it again
    (stopped / "train_state.safetensors").write_bytes(b"")  # a saved train state: resume it
    r = invoke(*args, "--dry-run")
    assert "--resume" in r.output
    # --collect tabulates what finished and starts nothing
    stamp = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file() and out / "runs" in p.parents}
    r = invoke(*args, "--collect", "--table-only")
    assert r.exit_code == 0, r.output
    assert "1 of 4 runs not finished" in r.output and "95%" in r.output
    arms = {a["arm"]: a for a in json.loads((out / "compare.json").read_text())["arms"]}
    assert arms["asib"]["test"]["n"] == 1 and arms["ce"]["test"]["n"] == 2
    assert {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file() and out / "runs" in p.parents} == stamp
    r = invoke(*args, "--collect", "--dry-run")
    assert r.exit_code == 2 and "give one" in r.output
    r = invoke("compare", recipe, "--methods", "ce", "--seeds", "0", "--out", out.parent / "none", "--collect")
    assert r.exit_code == 1 and "no study folder" in r.output


def test_a_changed_recipe_is_not_mixed_into_a_study(prepared: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "study.yaml"
    shutil.copy(prepared, recipe)
    out = tmp_path / "study_c"
    assert invoke("compare", recipe, "--methods", "ce", "--seeds", "0", "--out", out, "--table-only").exit_code == 0
    data = yaml.safe_load(recipe.read_text())
    data["distill"]["student_optim"]["lr"] = 1e-2
    recipe.write_text(yaml.safe_dump(data))
    r = invoke("compare", recipe, "--methods", "ce", "--seeds", "0", "--out", out)
    assert r.exit_code == 1 and "hold a run of another recipe" in r.output
    # a change that the method does not read leaves its runs valid
    data["distill"]["student_optim"]["lr"] = 3e-3
    data["distill"]["ib_mbm"]["dim"] = 32
    recipe.write_text(yaml.safe_dump(data))
    r = invoke("compare", recipe, "--methods", "ce", "--seeds", "0", "--out", out, "--table-only")
    assert r.exit_code == 0 and "to run" not in r.output


def test_bad_arguments_are_recipe_errors(prepared: Path) -> None:
    r = invoke("compare", prepared, "--methods", "ce,avg_kd", "--tune", "dkd:tau=1,2", "--dry-run")
    assert r.exit_code == 2 and "--tune dkd: not a method or variant of this study" in r.output
    r = invoke("compare", prepared, "--methods", "ce,avgkd", "--dry-run")
    assert r.exit_code == 2 and "unknown method 'avgkd'" in r.output
