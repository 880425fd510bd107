"""``asib report``: plots and tables from real (tiny) digits runs made through the CLI, and the
seed aggregation on hand-written run folders."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from asib.cli import app
from asib.errors import AsibError
from asib.report import (
    Run,
    best_epoch,
    group_runs,
    loss_keys,
    make_report,
    plot_accuracy,
    plot_losses,
    plot_schedules,
    read_run,
    run_name,
    student_epochs,
)
from asib.report.plots import _loss_panels

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Digits 8x8 (240 images), two 1-epoch teachers, ASIB with seeds 0 and 1."""
    root = tmp_path_factory.mktemp("report")
    train = {"epochs": 1, "batch_size": 32, "optim": {"name": "adamw", "lr": 3e-3}, "augment": {"hflip": False}}
    recipe = {
        "name": "tiny",
        "out_dir": str(root / "runs" / "tiny"),
        "device": "cpu",
        "data": {"source": "digits", "dir": str(root / "data"), "train_subset": 240, "val_fraction": 0.2},
        "teachers": [{"name": "t1", "arch": "resnet8", "train": train}, {"name": "t2", "arch": "vgg8", "train": train}],
        "student": {"arch": "resnet8"},
        "distill": {"num_stages": 1, "student_epochs": 1, "teacher_adapt_epochs": 1, "batch_size": 32,
                    "ib_mbm": {"dim": 16, "heads": 2}, "student_optim": {"name": "adamw", "lr": 3e-3}},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for args in (
        ("prepare-data", path),
        ("finetune-teacher", path, "--quiet"),
        ("distill", path, "--quiet", "--out", root / "runs" / "s0"),
        ("distill", path, "--quiet", "--out", root / "runs" / "s1", "--set", "seed=1"),
    ):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
    return {"root": root, "s0": root / "runs" / "s0", "s1": root / "runs" / "s1",
            "t1": root / "runs" / "tiny" / "teachers" / "t1"}


def _png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_table_of_one_distill_run(runs: dict[str, Path]) -> None:
    out = runs["root"] / "rep_one"
    r = invoke("report", runs["s0"], "--out", out, "--table-only")
    assert r.exit_code == 0, r.output
    assert not list(out.rglob("*.png"))
    table = (out / "report.md").read_text()
    assert "| run" in r.output and "student test top-1" in r.output  # the table is printed too
    summary = _summary(runs["s0"])
    row = _row(table, "tiny")
    assert row[1] == "asib" and row[2] == "1" and row[3] == "0"
    assert row[4] == f"{summary['student_test_top1']:.2f}"
    assert row[5] == f"{summary['synergy_test_top1']:.2f}"
    assert row[6] == f"{summary['student_val_top1']:.2f}"
    data = json.loads((out / "report.json").read_text())["groups"][0]
    assert data["student_test_top1"]["values"] == [summary["student_test_top1"]]
    assert data["student_test_top1"]["std"] is None


def test_report_plots_and_aggregates_seeds(runs: dict[str, Path]) -> None:
    out = runs["root"] / "rep_many"
    r = invoke("report", runs["s0"], runs["s1"], runs["t1"], "--out", out)
    assert r.exit_code == 0, r.output
    assert "wrote 9 plots" in r.output
    _png(out / "accuracy_compare.png")
    for run in ("s0", "s1"):
        for name in ("accuracy", "losses", "attention"):
            _png(out / run / f"{name}.png")
    teacher = out / "tiny-teachers-t1"  # a finetune-teacher run: loss, val accuracy
    for name in ("accuracy", "losses"):
        _png(teacher / f"{name}.png")
    assert not (teacher / "attention.png").exists()
    # one epoch per phase: every schedule is flat, so no schedules panel at all
    assert not (teacher / "schedules.png").exists() and not (out / "s0" / "schedules.png").exists()

    table = (out / "report.md").read_text()
    seeds = [_summary(runs[s]) for s in ("s0", "s1")]
    asib = _row(table, "tiny")
    assert asib[2] == "2" and asib[3] == "0, 1"
    for column, key in ((4, "student_test_top1"), (5, "synergy_test_top1"), (6, "student_val_top1")):
        values = [s[key] for s in seeds]
        assert asib[column] == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    t1_row = _row(table, "tiny/t1")
    assert t1_row[4] == f"{_summary(runs['t1'])['test_top1']:.2f}"

    groups = json.loads((out / "report.json").read_text())["groups"]
    assert [g["kind"] for g in groups] == ["distill", "finetune"]
    stat = groups[0]["student_test_top1"]
    assert stat["values"] == [s["student_test_top1"] for s in seeds]
    assert stat["mean"] == pytest.approx(statistics.fmean(stat["values"]))
    assert stat["std"] == pytest.approx(statistics.stdev(stat["values"]))


def test_report_errors_are_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    r = invoke("report", runs["root"] / "runs" / "nope", "--out", tmp_path / "rep")
    assert r.exit_code == 1 and "no such run folder" in r.output
    r = invoke("report", runs["root"] / "runs" / "tiny", "--out", tmp_path / "rep")
    assert r.exit_code == 1 and "not a run folder" in r.output and "teachers" in r.output  # hint lists them
    assert "Traceback" not in r.output


# ---------------------------------------------------------------- hand-written runs (no training)


def _fake_run(path: Path, recipe: dict, student_test: float, seconds: float) -> Path:
    path.mkdir(parents=True)
    records = [
        {"epoch": 1, "phase": "A", "stage": 1, "loss": 2.0, "syn_ce": 2.0, "ib_kl": 5.0, "beta": 0.0, "tau": 4.0,
         "attn_t0": 0.4, "attn_t1": 0.6, "synergy_val_top1": 50.0},
        {"epoch": 2, "phase": "B", "stage": 1, "loss": 1.5, "ce": 1.0, "kd": 0.5, "kd_ens": 0.4, "tau": 4.0,
         "kd_w": 0.35, "train_acc": 40.0, "attn_t0": 0.5, "attn_t1": 0.5, "lr": 0.001, "student_val_top1": 60.0},
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = {"method": recipe["distill"]["method"], "teachers": ["a", "b"], "student_test_top1": student_test,
               "synergy_test_top1": 70.0, "student_val_top1": 60.0, "seconds": seconds,
               "teacher_test_top1": [80.0, 81.0], "teacher_val_top1": [82.0, 83.0]}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_seed_groups_and_name_grouping(tmp_path: Path) -> None:
    base = {"name": "L1", "seed": 0, "distill": {"method": "asib", "tau": 4.0}}
    paths = [
        _fake_run(tmp_path / "L1_s0", base, 70.0, 10.0),
        _fake_run(tmp_path / "L1_s1", {**base, "seed": 1, "out_dir": "elsewhere"}, 72.0, 12.0),
        _fake_run(tmp_path / "L1_s2", {**base, "seed": 2}, 74.0, 14.0),
        _fake_run(tmp_path / "L1_tau2", {**base, "distill": {"method": "asib", "tau": 2.0}}, 60.0, 9.0),
    ]
    runs = [read_run(p) for p in paths]
    for run in runs:
        run.label = run.path.name
    by_recipe = group_runs(runs)
    assert [len(g.runs) for g in by_recipe] == [3, 1]
    assert by_recipe[0].stat("student_test_top1").text() == "72.00 ± 2.00"
    assert by_recipe[0].stat("seconds").mean == pytest.approx(12.0)
    # same name, different recipes: told apart by what differs
    assert [g.label for g in by_recipe] == ["L1 (distill.tau=4.0)", "L1 (distill.tau=2.0)"]
    by_name = group_runs(runs, "name")
    assert [len(g.runs) for g in by_name] == [4]
    assert loss_keys(runs[0].records) == ["loss", "syn_ce", "ib_kl", "ce", "kd", "kd_ens"]

    report = make_report(paths, tmp_path / "rep", plots=False)
    row = _row(report.table, "L1 (distill.tau=4.0)")
    assert row[2] == "3" and row[3] == "0, 1, 2" and row[4] == "72.00 ± 2.00"
    assert (tmp_path / "rep" / "report.md").read_text().endswith(report.table)


def test_unfinished_run_is_plotted_and_marked(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "live", {"name": "live", "seed": 0, "distill": {"method": "asib"}}, 70.0, 1.0)
    (run / "summary.json").unlink()
    report = make_report([run], tmp_path / "rep", plots=False)
    row = _row(report.table, "live (1 unfinished)")
    assert row[4] == "—"
    live = read_run(run)
    live.label = "live"
    _png(plot_accuracy(live, tmp_path / "rep" / "accuracy.png"))  # no summary: no teacher lines, still a plot


# ---------------------------------------------------------------- what the plots show


def _ladder_run(path: Path, summary: bool = True) -> Path:
    """A hand-written ASIB run of 2 stages (A, B, B each) whose teachers are 0.3 points apart near
    90% while the student starts at 20%."""
    path.mkdir(parents=True)
    records, epoch = [], 0
    for stage in (1, 2):
        epoch += 1
        records.append({"epoch": epoch, "phase": "A", "stage": stage, "loss": 3.0 - stage, "syn_ce": 1.0,
                        "beta": 0.001 * stage, "tau": 4.0, "synergy_val_top1": 80.0 + stage, "seconds": 1.0})
        for _ in range(2):
            epoch += 1
            val = 20.0 + 30 * epoch
            records.append({"epoch": epoch, "phase": "B", "stage": stage, "loss": 0.5 / epoch, "ce": 1.0 / epoch,
                            "tau": 4.0, "kd_w": 0.35, "lr": 0.1 / epoch, "student_val_top1": min(val, 89.0),
                            "student_val_loss": 2.0 / epoch, "seconds": 2.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {"name": "ladder", "seed": 0, "student": {"arch": "resnet8"}, "distill": {"method": "asib"},
              "teachers": [{"name": "a", "arch": "resnet20"}, {"name": "b", "arch": "wrn_16_1"}]}
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if summary:
        (path / "summary.json").write_text(json.dumps({
            "method": "asib", "student_arch": "resnet8", "teachers": ["a", "b"], "best_epoch": 5,
            "student_test_top1": 88.7, "synergy_test_top1": 89.6, "student_val_top1": 89.0,
            "teacher_test_top1": [89.49, 89.23], "teacher_val_top1": [90.4, 90.2],
            "teacher_average_test_top1": 89.81, "seconds": 10.0}))
    return path


def _read(path: Path) -> Run:
    run = read_run(path)
    run.label = path.name
    return run


def test_losses_keep_a_and_b_steps_apart_and_show_val_loss(tmp_path: Path) -> None:
    run = _read(_ladder_run(tmp_path / "ladder"))
    panels = _loss_panels(run)
    titles = [t for t, _ in panels]
    assert titles == ["A-step (teacher side): loss", "A-step (teacher side): syn_ce", "B-step (student): loss",
                      "B-step (student): ce", "cross-entropy: validation and training"]
    for title, lines in panels:
        for _, key, records in lines:
            phases = {r["phase"] for r in records if key in r}
            assert phases == ({"A"} if title.startswith("A-step") else {"B"}), (title, key)  # never joined
    assert [label for label, _, _ in panels[-1][1]] == ["student val", "student train (B-step ce)"]
    assert best_epoch(run) == 5
    run.summary = None  # an unfinished run: the first best validation epoch
    assert best_epoch(run) == 3


def test_accuracy_zooms_on_close_final_figures_and_writes_vector_formats(tmp_path: Path) -> None:
    run = _read(_ladder_run(tmp_path / "ladder"))
    svg = plot_accuracy(run, tmp_path / "accuracy.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and 'id="axes_2"' in svg  # the zoom panel
    assert "best epoch 5 (kept)" in svg and "teacher average logits (test 89.81)" in svg
    pdf = plot_losses(run, tmp_path / "losses.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    flat = _read(_fake_run(tmp_path / "flat", {"name": "f", "seed": 0, "distill": {"method": "asib"}}, 81.0, 1.0))
    assert 'id="axes_2"' not in plot_accuracy(flat, tmp_path / "flat.svg").read_text()  # nothing to zoom on
    with pytest.raises(AsibError, match="png, svg, pdf"):
        plot_accuracy(run, tmp_path / "accuracy.jpg")


def test_flat_schedules_are_a_footnote(tmp_path: Path) -> None:
    run = _read(_ladder_run(tmp_path / "ladder"))
    svg = plot_schedules(run, tmp_path / "schedules.svg").read_text()
    assert "IB beta" in svg and "learning rate" in svg  # they change
    assert "temperature tau" not in svg and "loss weights" not in svg  # flat: no panel of their own
    assert "constant all run: tau = 4, kd_w = 0.35" in svg


def test_comparison_counts_student_epochs_and_names_models(tmp_path: Path) -> None:
    run = _read(_ladder_run(tmp_path / "ladder"))
    assert student_epochs(run.records) == ([1.0, 2.0, 3.0, 4.0], [80.0, 89.0, 89.0, 89.0])
    assert run_name(run) == "student resnet8 (asib)"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "phase": "train", "loss": 1.0}) + "\n")
    assert run_name(_read(tmp_path / "t")) == "teacher t (?)"  # a finetune run without summary or recipe
    out = make_report([run.path, _ladder_run(tmp_path / "other")], tmp_path / "rep", fmt="svg")
    compare = (tmp_path / "rep" / "accuracy_compare.svg").read_text()
    assert "student epoch (B-step epochs; A-steps not counted)" in compare
    assert "student resnet8 (asib), recipe ladder" in compare
    assert not [p for p in out.files if p.suffix == ".png"]
    with pytest.raises(AsibError, match="plot format"):
        make_report([run.path], tmp_path / "rep2", fmt="gif")


def test_report_format_option(runs: dict[str, Path]) -> None:
    out = runs["root"] / "rep_pdf"
    r = invoke("report", runs["s0"], "--out", out, "--format", "pdf")
    assert r.exit_code == 0, r.output
    assert "wrote 3 plots" in r.output
    assert (out / "s0" / "accuracy.pdf").read_bytes().startswith(b"%PDF")
