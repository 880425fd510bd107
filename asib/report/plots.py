"""The PNG figures of runs: accuracy, loss terms and schedules per epoch with the A-step and
B-step epochs shaded, the attention each teacher receives, and the overlaid accuracy of several
runs. matplotlib is imported only here, inside the functions, and draws with the Agg backend
on ``matplotlib.figure.Figure`` objects, never through pyplot's global state."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from asib.engine.io import atomic_write
from asib.errors import AsibError
from asib.report.runs import Group, Run

# Keys of a metrics record that are not loss terms (everything else numeric is one).
_NOT_LOSS = re.compile(
    r"^(epoch|stage|seconds|beta|tau|disagree|weighted_share|gate_open)$|^lr|_top1$|acc|^attn_t\d+$|_w$"
)
_LR = re.compile(r"^lr")
_WEIGHTS = re.compile(r"_w$")
_ATTN = re.compile(r"^attn_t(\d+)$")
PHASE_COLORS = {"A": "#f28e2b", "B": "#4e79a7"}
PHASE_NAMES = {"A": "A-step (teacher side)", "B": "B-step (student)"}


def _figure(rows: int = 1, cols: int = 1, width: float = 7.0, height: float = 3.6):
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
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _epoch_axis(axes: Sequence[Any], records: Sequence[dict[str, Any]], right_pad: float = 0.5) -> None:
    """The same epoch range and integer ticks on every panel."""
    from matplotlib.ticker import MaxNLocator

    epochs = [float(r.get("epoch", i + 1)) for i, r in enumerate(records)] or [1.0]
    for ax in axes:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + right_pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key``; empty when no record has it. Epochs without it are NaN, so
    the line breaks there (an A-step term is not drawn across the B-step epochs between stages)."""
    if not any(_number(r.get(key)) is not None for r in records):
        return [], []
    xs = [float(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    ys = [math.nan if (v := _number(r.get(key))) is None else v for r in records]
    return xs, ys


def _keys(records: Sequence[dict[str, Any]], accept: Callable[[str], bool]) -> list[str]:
    """Numeric keys of the records that ``accept`` admits, in order of first appearance."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and accept(k):
                keys.setdefault(k, None)
    return list(keys)


def loss_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every loss term logged (``loss`` first)."""
    keys = _keys(records, lambda k: not _NOT_LOSS.search(k))
    return sorted(keys, key=lambda k: (k != "loss", keys.index(k)))


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
        xs, ys = _series(records, key)
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


def plot_accuracy(run: Run, path: Path) -> Path:
    """Validation accuracy per epoch; teachers as flat lines; final test figures as markers."""
    fig, (ax,) = _figure(width=9.0)
    recs = run.records
    _shade_phases(ax, recs)
    if run.kind == "distill":
        _plot_keys(ax, recs, ["student_val_top1", "synergy_val_top1"],
                   {"student_val_top1": "student (val)", "synergy_val_top1": "synergy head (val)"})
        _plot_keys_faint(ax, recs, {"train_acc": "student (train batches)", "syn_train_acc": "synergy (train batches)"})
        summary = run.summary or {}
        val, test = summary.get("teacher_val_top1") or [], summary.get("teacher_test_top1") or []
        for i, name in enumerate(run.teacher_names()):
            color = f"C{i + 2}"
            if i < len(val) and val[i] is not None:
                ax.axhline(val[i], color=color, ls="--", lw=1.1, label=f"teacher {name} (val {val[i]:.2f})")
            if i < len(test) and test[i] is not None:
                ax.axhline(test[i], color=color, ls=":", lw=1.1, label=f"teacher {name} (test {test[i]:.2f})")
        _final_marker(ax, recs, run.figure("student_test_top1"), "C0", "student test")
        _final_marker(ax, recs, run.figure("synergy_test_top1"), "C1", "synergy test")
        title = f"{run.label}: accuracy ({(run.summary or {}).get('method', 'distill')})"
    else:
        _plot_keys(ax, recs, ["val_top1"], {"val_top1": f"{run.teacher or 'model'} (val)"})
        test = run.figure("test_top1")
        if test is not None:
            ax.axhline(test, color="C3", ls=":", lw=1.1, label=f"test top-1 of the best-on-val weights ({test:.2f})")
        title = f"{run.label}: accuracy"
    _finish_axes(ax, title, "top-1 (%)")
    _epoch_axis([ax], recs, right_pad=1.0)
    _phase_legend(ax, recs, loc="center left", outside=True)
    return _save(fig, path)


def _plot_keys_faint(ax: Any, records: Sequence[dict[str, Any]], labels: dict[str, str]) -> None:
    for i, (key, label) in enumerate(labels.items()):
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, color=f"C{i}", lw=0.9, alpha=0.45, ls="-.", label=label)


def _final_marker(ax: Any, records: Sequence[dict[str, Any]], value: float | None, color: str, label: str) -> None:
    if value is None or not records:
        return
    x = float(records[-1].get("epoch", len(records))) + 0.6
    ax.plot([x], [value], marker="*", ms=11, color=color, ls="none", label=f"{label} ({value:.2f})")


def plot_losses(run: Run, path: Path) -> Path:
    """Every loss term per epoch, one panel each, with the A/B phases shaded."""
    recs = run.records
    keys = loss_keys(recs) or ["loss"]
    cols = 2 if len(keys) > 1 else 1
    rows = math.ceil(len(keys) / cols)
    fig, axes = _figure(rows, cols, height=2.4)
    for i, (ax, key) in enumerate(zip(axes, keys, strict=False)):
        _shade_phases(ax, recs)
        _plot_keys(ax, recs, [key])
        _finish_axes(ax, key, "", xlabel="epoch" if i + cols >= len(keys) else "")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    _epoch_axis(axes[: len(keys)], recs)
    _phase_legend(axes[0], recs, loc="upper right")
    fig.suptitle(f"{run.label}: loss terms per epoch (epoch means)", fontsize=11)
    return _save(fig, path)


def plot_schedules(run: Run, path: Path) -> Path | None:
    """beta, tau, loss weights and learning rates per epoch (the panels that have data)."""
    recs = run.records
    panels = [
        ("IB beta (A-steps)", ["beta"]),
        ("temperature tau", ["tau"]),
        ("loss weights", _keys(recs, lambda k: bool(_WEIGHTS.search(k)))),
        ("learning rate (end of epoch)", _keys(recs, lambda k: bool(_LR.match(k)))),
    ]
    panels = [(title, keys) for title, keys in panels if any(_series(recs, k)[0] for k in keys)]
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


def plot_comparison(groups: Sequence[Group], path: Path) -> Path:
    """Validation accuracy per epoch of every run, one colour per group (seeds share it)."""
    fig, (ax,) = _figure(width=8.0, height=4.2)
    for gi, g in enumerate(groups):
        key = "student_val_top1" if g.kind == "distill" else "val_top1"
        for ri, run in enumerate(g.runs):
            xs, ys = _series(run.records, key)
            if not xs:
                continue
            seed = f" seed {run.seed}" if len(g.runs) > 1 and run.seed is not None else ""
            ax.plot(xs, ys, color=f"C{gi % 10}", lw=1.3, alpha=0.9 if ri == 0 else 0.6,
                    ls=["-", "--", ":", "-."][ri % 4], marker="o", ms=2.5, label=f"{g.label}{seed}")
    _finish_axes(ax, "validation top-1 per epoch (student of a distill run, model of a finetune run)", "top-1 (%)")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    return _save(fig, path)


def plot_run(run: Run, folder: Path) -> list[Path]:
    """Every plot of one run into ``folder``."""
    files = [plot_accuracy(run, folder / "accuracy.png"), plot_losses(run, folder / "losses.png")]
    for extra in (plot_schedules(run, folder / "schedules.png"), plot_attention(run, folder / "attention.png")):
        if extra is not None:
            files.append(extra)
    return files
