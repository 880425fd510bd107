"""The figures of runs: accuracy, loss terms and schedules per epoch with the A-step and B-step
epochs shaded and the kept (best-on-val) epoch marked, the attention each teacher receives, and
the validation accuracy of several runs. PNG by default; SVG or PDF (vector, for papers) by the
file's suffix. matplotlib is imported only here, inside the functions, and draws on
``matplotlib.figure.Figure`` objects (Agg canvas), never through pyplot's global state.

Meanings kept apart: an A-step loss (teacher side) and a B-step loss (student) are different
objectives, so they never share a line; a distill run's plan epochs (A and B) and a fine-tuning
run's epochs never share an axis (the comparison counts a distill run in student epochs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from asib.engine.io import atomic_write
from asib.errors import AsibError
from asib.report.runs import Group, Run

FORMATS = ("png", "svg", "pdf")
# Keys of a metrics record that are not training loss terms (everything else numeric is one).
_NOT_LOSS = re.compile(
    r"^(epoch|stage|seconds|beta|tau|disagree|weighted_share|gate_open)$|^lr|_top1$|acc|^attn_t\d+$|_w$|val_loss$"
)
_LR = re.compile(r"^lr")
_WEIGHTS = re.compile(r"_w$")
_ATTN = re.compile(r"^attn_t(\d+)$")
PHASE_COLORS = {"A": "#f28e2b", "B": "#4e79a7"}
PHASE_NAMES = {"A": "A-step (teacher side)", "B": "B-step (student)", "train": "training"}
BEST_COLOR = "black"


def _figure(rows: int = 1, cols: int = 1, width: float = 7.0, height: float = 3.6, **grid: Any):
    """A figure and its axes on the Agg canvas (no pyplot, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AsibError(
            "asib report needs matplotlib, which is not installed", hint="pip install 'asib[report]'"
        ) from None
    fig = Figure(figsize=(width * (1 if cols == 1 else cols * 0.62), height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **grid)
    return fig, [ax for row in axes for ax in row]


def _epoch_axis(axes: Sequence[Any], records: Sequence[dict[str, Any]], right_pad: float = 0.5) -> None:
    """The same epoch range and integer ticks on every panel."""
    from matplotlib.ticker import MaxNLocator

    epochs = [float(r.get("epoch", i + 1)) for i, r in enumerate(records)] or [1.0]
    for ax in axes:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + right_pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    """Write the figure in the format its suffix names (png, svg, pdf)."""
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise AsibError(f"{path}: plots are written as {', '.join(FORMATS)}, not {fmt or 'a file without suffix'}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    return path


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over every record (NaN where a record lacks it); empty when no
    record has it."""
    if not any(_number(r.get(key)) is not None for r in records):
        return [], []
    xs = [float(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    ys = [math.nan if (v := _number(r.get(key))) is None else v for r in records]
    return xs, ys


def _points(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records that have ``key``: one line through them."""
    pairs = [(float(r.get("epoch", i + 1)), v) for i, r in enumerate(records) if (v := _number(r.get(key))) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _keys(records: Sequence[dict[str, Any]], accept: Callable[[str], bool]) -> list[str]:
    """Numeric keys of the records that ``accept`` admits, in order of first appearance."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and accept(k):
                keys.setdefault(k, None)
    return list(keys)


def loss_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every training loss term logged (``loss`` first); validation losses are not among them."""
    keys = _keys(records, lambda k: not _NOT_LOSS.search(k))
    return sorted(keys, key=lambda k: (k != "loss", keys.index(k)))


def _phase(record: dict[str, Any]) -> str:
    return str(record.get("phase") or "train")


def best_epoch(run: Run) -> int | None:
    """The epoch whose weights the run kept: summary.json's, else the first best validation epoch."""
    best = run.figure("best_epoch")
    if best:
        return int(best)
    key = "student_val_top1" if run.kind == "distill" else "val_top1"
    scored = [(v, int(r.get("epoch", i + 1))) for i, r in enumerate(run.records) if (v := _number(r.get(key))) is not None]
    if not scored:
        return None
    top = max(v for v, _ in scored)
    return next(e for v, e in scored if v == top)


def _mark_best(ax: Any, epoch: int | None, label: bool = True) -> None:
    if epoch is not None:
        ax.axvline(epoch, color=BEST_COLOR, ls="-.", lw=1.0, alpha=0.6,
                   label=f"best epoch {epoch} (kept)" if label else None)


def _shade_phases(ax: Any, records: Sequence[dict[str, Any]]) -> None:
    """Shade runs of A-step and B-step epochs; a dotted line where a new stage starts."""
    spans: list[tuple[str, float, float]] = []
    for i, r in enumerate(records):
        phase, epoch = r.get("phase"), float(r.get("epoch", i + 1))
        if phase not in PHASE_COLORS:
            continue
        if spans and spans[-1][0] == phase and spans[-1][2] == epoch - 1:
            spans[-1] = (phase, spans[-1][1], epoch)
        else:
            spans.append((phase, epoch, epoch))
    for phase, start, end in spans:
        ax.axvspan(start - 0.5, end + 0.5, color=PHASE_COLORS[phase], alpha=0.12, lw=0)
    for prev, r in zip(records, records[1:], strict=False):
        if r.get("stage") != prev.get("stage"):
            ax.axvline(float(r.get("epoch", 0)) - 0.5, color="0.4", ls=":", lw=0.8)


def _phase_legend(ax: Any, records: Sequence[dict[str, Any]], loc: str = "best", outside: bool = False) -> None:
    from matplotlib.patches import Patch

    phases = [p for p in ("A", "B") if any(r.get("phase") == p for r in records)]
    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color=PHASE_COLORS[p], alpha=0.25) for p in phases]
    labels += [PHASE_NAMES[p] for p in phases]
    if handles:
        anchor = {"bbox_to_anchor": (1.01, 0.5)} if outside else {}
        ax.legend(handles, labels, fontsize=7, loc=loc, framealpha=0.85, **anchor)


def _plot_keys(ax: Any, records: Sequence[dict[str, Any]], keys: Iterable[str], labels: dict[str, str] | None = None) -> int:
    drawn = 0
    for key in keys:
        xs, ys = _points(records, key)  # one line through the epochs that have it
        if xs:  # overlapping curves (two equal weights) stay visible through their line styles
            ax.plot(xs, ys, marker="os^D"[drawn % 4], ms=3.5, lw=1.4, ls=["-", "--", ":", "-."][drawn % 4],
                    label=(labels or {}).get(key, key))
            drawn += 1
    return drawn


def _finish_axes(ax: Any, title: str, ylabel: str, xlabel: str = "epoch") -> None:
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def _fit_y(ax: Any, values: Iterable[float | None], floor: float = 0.6) -> None:
    """A y-range around ``values`` with room above and below, at least ``floor`` wide, so lines a
    few tenths apart stay apart."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    pad = max(floor / 2, 0.2 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)


# ---------------------------------------------------------------- accuracy


def plot_accuracy(run: Run, path: Path) -> Path:
    """Validation accuracy per epoch with teachers as flat lines, final test figures as stars and
    the kept epoch marked; a second panel zooms on the final figures when the curves' range would
    press them together."""
    recs = run.records
    finals = _final_figures(run)
    full_span = _span([v for k in _accuracy_keys(run) for v in _series(recs, k)[1]] + finals)
    zoom = len(finals) >= 2 and full_span > 2.5 * max(_span(finals), 0.6)
    fig, axes = _figure(2 if zoom else 1, 1, width=9.0, height=3.4 if zoom else 3.6)
    for i, ax in enumerate(axes):
        _draw_accuracy(ax, run, legend=i == 0)
        if i == 1:
            _fit_y(ax, finals)
            _finish_axes(ax, "zoom on the final figures", "top-1 (%)")
        else:
            what = (run.summary or {}).get("method", "distill") if run.kind == "distill" else run.teacher or "model"
            _finish_axes(ax, f"{run.label}: accuracy ({what})", "top-1 (%)", xlabel="" if zoom else "epoch")
    _epoch_axis(axes, recs, right_pad=1.0)
    _phase_legend(axes[0], recs, loc="center left", outside=True)
    return _save(fig, path)


def _accuracy_keys(run: Run) -> list[str]:
    return ["student_val_top1", "synergy_val_top1"] if run.kind == "distill" else ["val_top1"]


def _final_figures(run: Run) -> list[float]:
    """The figures the zoom panel must keep apart: teachers, ensembles, final and best scores."""
    s = run.summary or {}
    out = [v for v in (s.get("teacher_val_top1") or []) + (s.get("teacher_test_top1") or []) if _number(v) is not None]
    for key in ("teacher_average_test_top1", "student_test_top1", "synergy_test_top1", "student_val_top1",
                "val_top1", "test_top1"):
        if (v := run.figure(key)) is not None:
            out.append(v)
    return [float(v) for v in out]


def _span(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return max(vals) - min(vals) if vals else 0.0


def _draw_accuracy(ax: Any, run: Run, legend: bool) -> None:
    recs = run.records
    _shade_phases(ax, recs)
    if run.kind == "distill":
        labels = {"student_val_top1": "student (val)", "synergy_val_top1": "synergy head (val)"}
        _plot_keys(ax, recs, ["student_val_top1", "synergy_val_top1"], labels if legend else {
            k: f"_{v}" for k, v in labels.items()})
        _plot_keys_faint(ax, recs, {"train_acc": "student (train batches)", "syn_train_acc": "synergy (train batches)"},
                         legend)
        summary = run.summary or {}
        val, test = summary.get("teacher_val_top1") or [], summary.get("teacher_test_top1") or []
        for i, name in enumerate(run.teacher_names()):
            color = f"C{i + 2}"
            if i < len(val) and val[i] is not None:
                ax.axhline(val[i], color=color, ls="--", lw=1.1, label=f"teacher {name} (val {val[i]:.2f})" if legend else None)
            if i < len(test) and test[i] is not None:
                ax.axhline(test[i], color=color, ls=":", lw=1.1, label=f"teacher {name} (test {test[i]:.2f})" if legend else None)
        average = run.figure("teacher_average_test_top1")
        if average is not None:
            ax.axhline(average, color="0.35", ls=(0, (1, 1)), lw=1.1,
                       label=f"teacher average logits (test {average:.2f})" if legend else None)
        _final_marker(ax, recs, run.figure("student_test_top1"), "C0", "student test", legend)
        _final_marker(ax, recs, run.figure("synergy_test_top1"), "C1", "synergy test", legend)
    else:
        _plot_keys(ax, recs, ["val_top1"], {"val_top1": f"{run.teacher or 'model'} (val)"} if legend else
                   {"val_top1": "_val"})
        test = run.figure("test_top1")
        if test is not None:
            ax.axhline(test, color="C3", ls=":", lw=1.1,
                       label=f"test top-1 of the best-on-val weights ({test:.2f})" if legend else None)
    _mark_best(ax, best_epoch(run), label=legend)


def _plot_keys_faint(ax: Any, records: Sequence[dict[str, Any]], labels: dict[str, str], legend: bool = True) -> None:
    for i, (key, label) in enumerate(labels.items()):
        xs, ys = _points(records, key)
        if xs:
            ax.plot(xs, ys, color=f"C{i}", lw=0.9, alpha=0.45, ls="-.", label=label if legend else None)


def _final_marker(ax: Any, records: Sequence[dict[str, Any]], value: float | None, color: str, label: str,
                  legend: bool = True) -> None:
    if value is None or not records:
        return
    x = float(records[-1].get("epoch", len(records))) + 0.6
    ax.plot([x], [value], marker="*", ms=11, color=color, ls="none", label=f"{label} ({value:.2f})" if legend else None)


# ---------------------------------------------------------------- losses


def _loss_panels(run: Run) -> list[tuple[str, list[tuple[str, str, list[dict[str, Any]]]]]]:
    """(title, [(label, key, records)]) per panel: every training term of every phase on a panel of
    its own (an A-step and a B-step loss are different objectives), then the validation loss
    beside the training cross-entropy it can be compared with."""
    recs = run.records
    panels: list[tuple[str, list[tuple[str, str, list[dict[str, Any]]]]]] = []
    phases = [p for p in ("A", "B", "train") if any(_phase(r) == p for r in recs)]
    for phase in phases:
        of_phase = [r for r in recs if _phase(r) == phase]
        for key in loss_keys(of_phase):
            title = key if phase == "train" else f"{PHASE_NAMES[phase]}: {key}"
            panels.append((title, [(key, key, of_phase)]))
    val_key = "student_val_loss" if run.kind == "distill" else "val_loss"
    if any(_number(r.get(val_key)) is not None for r in recs):
        train = [r for r in recs if _phase(r) in ("B", "train")]
        train_key = "ce" if run.kind == "distill" else "loss"
        who = "student" if run.kind == "distill" else (run.teacher or "model")
        lines = [(f"{who} val", val_key, recs)]
        if any(_number(r.get(train_key)) is not None for r in train):
            lines.append((f"{who} train ({'B-step ce' if run.kind == 'distill' else 'loss'})", train_key, train))
        panels.append(("cross-entropy: validation and training", lines))
    return panels


def plot_losses(run: Run, path: Path) -> Path:
    """Every loss term per epoch, one panel per term and phase, the validation loss on its own
    panel, the A/B phases shaded and the kept epoch marked."""
    recs = run.records
    panels = _loss_panels(run) or [("loss", [("loss", "loss", recs)])]
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = _figure(rows, cols, height=2.4)
    best = best_epoch(run)
    for i, (ax, (title, lines)) in enumerate(zip(axes, panels, strict=False)):
        _shade_phases(ax, recs)
        values: list[float] = []
        for n, (label, key, of) in enumerate(lines):
            xs, ys = _points(of, key)
            if xs:
                ax.plot(xs, ys, marker="os^D"[n % 4], ms=3.5, lw=1.4, ls=["-", "--"][n % 2], label=label)
                values += ys
        _mark_best(ax, best, label=i == 0)
        if values and min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")  # a first epoch far above the rest would flatten every later one
        _finish_axes(ax, title, "", xlabel="epoch" if i + cols >= len(panels) else "")
        if len(lines) > 1:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    _epoch_axis(axes[: len(panels)], recs)
    _phase_legend(axes[0], recs, loc="upper right")
    note = "\nA-step and B-step terms are different objectives: each has its own panel" if run.kind == "distill" else ""
    fig.suptitle(f"{run.label}: loss terms per epoch (epoch means){note}", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------- schedules and attention


def _flat(records: Sequence[dict[str, Any]], key: str) -> float | None:
    """The one value ``key`` keeps over the run, or None when it changes."""
    values = {v for r in records if (v := _number(r.get(key))) is not None}
    return values.pop() if len(values) == 1 else None


def plot_schedules(run: Run, path: Path) -> Path | None:
    """beta, tau, loss weights and learning rates per epoch: a panel for what changes; a value
    that stays the same all run is one line of the footnote instead (None when nothing changes)."""
    recs = run.records
    groups = [
        ("IB beta (A-steps)", ["beta"]),
        ("temperature tau", ["tau"]),
        ("loss weights", _keys(recs, lambda k: bool(_WEIGHTS.search(k)))),
        ("learning rate (end of epoch)", _keys(recs, lambda k: bool(_LR.match(k)))),
    ]
    panels: list[tuple[str, list[str]]] = []
    constants: dict[str, float] = {}
    for title, keys in groups:
        present = [k for k in keys if _series(recs, k)[0]]
        moving = [k for k in present if _flat(recs, k) is None]
        constants.update({k: v for k in present if k not in moving and (v := _flat(recs, k)) is not None})
        if moving:
            panels.append((title, moving))
    if not panels:
        return None
    fig, axes = _figure(len(panels), 1, height=2.2)
    for i, (ax, (title, keys)) in enumerate(zip(axes, panels, strict=True)):
        _shade_phases(ax, recs)
        _plot_keys(ax, recs, keys)
        _finish_axes(ax, title, "", xlabel="epoch" if i == len(panels) - 1 else "")
        ax.legend(fontsize=7, loc="best")
    _epoch_axis(axes, recs)
    fig.suptitle(f"{run.label}: schedules", fontsize=11)
    if constants:
        text = ", ".join(f"{k} = {v:.4g}" for k, v in constants.items())
        fig.text(0.01, 0.0, f"constant all run: {text}", fontsize=7, ha="left", va="bottom", wrap=True)
        fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    return _save(fig, path)


def plot_attention(run: Run, path: Path) -> Path | None:
    """Mean attention weight of the student's query on each teacher, per epoch."""
    recs = run.records
    keys = sorted(_keys(recs, lambda k: bool(_ATTN.match(k))), key=lambda k: int(_ATTN.match(k).group(1)))  # type: ignore[union-attr]
    if not keys:
        return None
    names = run.teacher_names()
    index = {k: int(_ATTN.match(k).group(1)) for k in keys}  # type: ignore[union-attr]
    labels = {k: f"teacher {names[i]}" if i < len(names) else k for k, i in index.items()}
    fig, (ax,) = _figure()
    _shade_phases(ax, recs)
    _plot_keys(ax, recs, keys, labels)
    ax.axhline(1.0 / len(keys), color="0.5", lw=0.8, ls="--", label="uniform")
    ax.set_ylim(0, 1)
    _finish_axes(ax, f"{run.label}: attention weight per teacher", "mean attention")
    _epoch_axis([ax], recs)
    _phase_legend(ax, recs)
    return _save(fig, path)


# ---------------------------------------------------------------- several runs


def student_epochs(records: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """A distill run's student validation top-1 per student (B-step) epoch: 1, 2, ... whatever
    the teacher-side epochs between them."""
    ys = [v for r in records if _phase(r) == "B" and (v := _number(r.get("student_val_top1"))) is not None]
    return [float(i + 1) for i in range(len(ys))], ys


def run_name(run: Run) -> str:
    """What a run trained, by model: ``student resnet8 (asib)``, ``teacher t1 (resnet20)``."""
    summary, recipe = run.summary or {}, run.recipe
    if run.kind == "distill":
        arch = summary.get("student_arch") or (recipe.get("student") or {}).get("arch") or "?"
        method = summary.get("method") or (recipe.get("distill") or {}).get("method") or "?"
        return f"student {arch} ({method})"
    arch = summary.get("arch") or next((t.get("arch") for t in recipe.get("teachers") or []
                                        if isinstance(t, dict) and t.get("name") == run.teacher), "?")
    return f"teacher {run.teacher} ({arch})"


def plot_comparison(groups: Sequence[Group], path: Path) -> Path:
    """Validation top-1 of every run, one colour per group (seeds share it): distill runs per
    student epoch and fine-tuning runs per epoch, each kind on a panel of its own."""
    kinds = [k for k in ("distill", "finetune") if any(g.kind == k for g in groups)]
    fig, axes = _figure(1, len(kinds), width=8.0 if len(kinds) == 1 else 7.0, height=4.2)
    titles = {"distill": ("distilled students: validation top-1", "student epoch (B-step epochs; A-steps not counted)"),
              "finetune": ("fine-tuned models: validation top-1", "epoch")}
    from matplotlib.ticker import MaxNLocator

    for ax, kind in zip(axes, kinds, strict=True):
        for gi, g in enumerate(groups):
            if g.kind != kind:
                continue
            for ri, run in enumerate(g.runs):
                xs, ys = student_epochs(run.records) if kind == "distill" else _points(run.records, "val_top1")
                if not xs:
                    continue
                seed = f", seed {run.seed}" if len(g.runs) > 1 and run.seed is not None else ""
                recipe = g.label.replace(f"/{run.teacher}", "", 1) if kind == "finetune" else g.label
                ax.plot(xs, ys, color=f"C{gi % 10}", lw=1.3, alpha=0.9 if ri == 0 else 0.6,
                        ls=["-", "--", ":", "-."][ri % 4], marker="o", ms=2.5,
                        label=f"{run_name(run)}, recipe {recipe}{seed}")
        title, xlabel = titles[kind]
        _finish_axes(ax, title, "top-1 (%)", xlabel=xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_run(run: Run, folder: Path, fmt: str = "png") -> list[Path]:
    """Every plot of one run into ``folder``, as ``fmt`` (png, svg or pdf)."""
    files = [plot_accuracy(run, folder / f"accuracy.{fmt}"), plot_losses(run, folder / f"losses.{fmt}")]
    for extra in (plot_schedules(run, folder / f"schedules.{fmt}"), plot_attention(run, folder / f"attention.{fmt}")):
        if extra is not None:
            files.append(extra)
    return files
