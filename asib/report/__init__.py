"""Reports of finished runs: PNG plots from metrics.jsonl and a markdown table from summary.json.

One run (a distill folder, or a finetune-teacher folder ``runs/<name>/teachers/<t>``) gets
its curves: accuracy per epoch (the kept epoch marked, a zoom on the final figures), every
loss term of each phase on its own panel with the validation loss, the schedules that change
(IB beta, temperature, loss weights, learning rates; constants in a footnote) and the
attention each teacher receives. Several runs also get one accuracy comparison (distill runs
per student epoch, fine-tuning runs per epoch, on separate panels) and a comparison table in
which runs that differ only by ``seed`` (or share a recipe name, with ``group_by="name"``)
are one row: mean and sample standard deviation over the seeds.

matplotlib is imported only when plotting (``pip install 'asib[report]'``) and draws with
the Agg backend on ``matplotlib.figure.Figure`` objects, never through pyplot's global state.
Plots are PNG, or SVG / PDF (vector, for papers) with ``fmt``.

Modules: ``runs`` (reading run folders, grouping, stats), ``tables`` (markdown and JSON),
``plots`` (the figures); this one puts them together in ``make_report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from asib.engine.io import atomic_write_json, atomic_write_text
from asib.errors import AsibError, RunError
from asib.report.plots import (
    FORMATS,
    best_epoch,
    loss_keys,
    plot_accuracy,
    plot_attention,
    plot_comparison,
    plot_losses,
    plot_run,
    plot_schedules,
    run_name,
    student_epochs,
)
from asib.report.runs import Group, Run, Stat, group_runs, read_run, run_labels
from asib.report.tables import markdown_tables, report_json

__all__ = [
    "FORMATS",
    "Group",
    "Report",
    "Run",
    "Stat",
    "best_epoch",
    "group_runs",
    "loss_keys",
    "make_report",
    "markdown_tables",
    "plot_accuracy",
    "plot_attention",
    "plot_comparison",
    "plot_losses",
    "plot_run",
    "plot_schedules",
    "read_run",
    "report_json",
    "run_name",
    "student_epochs",
]


@dataclass
class Report:
    """What ``make_report`` read and wrote: the runs, their groups, the markdown table, the files."""

    out_dir: Path
    runs: list[Run]
    groups: list[Group]
    table: str
    files: list[Path]


def make_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, group_by: str = "recipe", plots: bool = True,
    fmt: str = "png",
) -> Report:
    """Plots of every run, the comparison table (``report.md``, ``report.json``) and, for several runs,
    the accuracy comparison, all under ``out_dir``. ``plots=False`` writes the table only; ``fmt``
    is the plots' format: png, svg or pdf."""
    if not run_dirs:
        raise AsibError("give at least one run folder")
    if fmt not in FORMATS:
        raise AsibError(f"plot format: expected one of {', '.join(FORMATS)} (given: {fmt!r})")
    unique: dict[Path, Path] = {}
    for p in run_dirs:
        unique.setdefault(Path(p).resolve(), Path(p))
    runs = [read_run(p) for p in unique.values()]
    for run, label in zip(runs, run_labels([r.path for r in runs]), strict=True):
        run.label = label
    empty = [str(r.path) for r in runs if not r.records]
    if empty:
        raise RunError(f"{empty[0]}: metrics.jsonl is empty; nothing to plot", hint="let the run finish an epoch first")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AsibError(f"--out {out_dir}: exists and is not a folder")
    groups = group_runs(runs, group_by)
    files: list[Path] = []
    for run in runs if plots else []:
        files += plot_run(run, out_dir / run.label, fmt)
    if plots and len(runs) > 1:
        files.append(plot_comparison(groups, out_dir / f"accuracy_compare.{fmt}"))
    table = markdown_tables(groups)
    title = "# asib report\n\n" + "".join(f"- `{r.path}`\n" for r in runs) + "\n"
    files.append(atomic_write_text(out_dir / "report.md", title + table))
    files.append(atomic_write_json(out_dir / "report.json", report_json(groups)))
    return Report(out_dir, runs, groups, table, files)
