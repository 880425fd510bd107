"""Reports of finished runs: PNG plots from metrics.jsonl and a markdown table from summary.json.

One run (a distill folder, or a finetune-teacher folder ``runs/<name>/teachers/<t>``) gets
its curves: accuracy per epoch, every loss term with the A-step and B-step epochs shaded,
the schedules (IB beta, temperature, loss weights, learning rates) and the attention each
teacher receives. Several runs also get one overlaid accuracy plot and a comparison table
in which runs that differ only by ``seed`` (or share a recipe name, with
``group_by="name"``) are one row: mean and sample standard deviation over the seeds.

matplotlib is imported only when plotting (``pip install 'asib[report]'``) and draws with
the Agg backend on ``matplotlib.figure.Figure`` objects, never through pyplot's global state.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from asib.engine.io import atomic_write, atomic_write_json, atomic_write_text
from asib.errors import AsibError, RunError

# Keys of a metrics record that are not loss terms (everything else numeric is one).
_NOT_LOSS = re.compile(
    r"^(epoch|stage|seconds|beta|tau|disagree|weighted_share|gate_open)$|^lr|_top1$|acc|^attn_t\d+$|_w$"
)
_LR = re.compile(r"^lr")
_WEIGHTS = re.compile(r"_w$")
_ATTN = re.compile(r"^attn_t(\d+)$")
PHASE_COLORS = {"A": "#f28e2b", "B": "#4e79a7"}
PHASE_NAMES = {"A": "A-step (teacher side)", "B": "B-step (student)"}


# ---------------------------------------------------------------- reading runs


@dataclass
class Run:
    """One run folder as read from disk."""

    path: Path
    kind: str  # "distill" or "finetune"
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None  # None while the run is unfinished
    recipe: dict[str, Any]
    label: str = ""  # unique, file-name safe; set by the caller

    @property
    def seed(self) -> int | None:
        seed = self.recipe.get("seed")
        return seed if isinstance(seed, int) else None

    @property
    def name(self) -> str:
        return str(self.recipe.get("name") or self.path.name)

    @property
    def teacher(self) -> str | None:
        """The teacher a finetune run trained."""
        if self.summary and self.summary.get("teacher"):
            return str(self.summary["teacher"])
        return self.path.name if self.kind == "finetune" else None

    def teacher_names(self) -> list[str]:
        if self.summary and self.summary.get("teachers"):
            return [str(t) for t in self.summary["teachers"]]
        return [str(t.get("name", i)) for i, t in enumerate(self.recipe.get("teachers") or [])]

    def figure(self, key: str) -> float | None:
        """A final figure from summary.json (None when missing or unfinished)."""
        value = (self.summary or {}).get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}:{number}: expected a JSON object per line")
        records.append(record)
    return records


def read_run(path: str | Path) -> Run:
    """Read a distill or finetune-teacher run folder (metrics.jsonl, summary.json, recipe.yaml)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no such run folder")
    if not path.is_dir():
        raise RunError(f"{path}: is a file; give the run folder that holds metrics.jsonl")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        inside = sorted(p.parent for p in path.glob("*/metrics.jsonl")) + sorted(
            p.parent for p in path.glob("*/*/metrics.jsonl")
        )
        hint = "run folders in it: " + ", ".join(str(p) for p in inside[:4]) if inside else None
        raise RunError(f"{path}: not a run folder (no metrics.jsonl)", hint=hint)
    records = _read_jsonl(metrics)
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunError(f"{path / 'summary.json'}: not valid JSON ({exc.msg})") from None
    recipe: dict[str, Any] = {}
    if (path / "recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise RunError(f"{path / 'recipe.yaml'}: not valid YAML") from None
    phases = {r.get("phase") for r in records}
    is_distill = (summary is not None and "method" in summary) or bool(phases & {"A", "B"})
    if not is_distill and not records and summary is None:
        is_distill = (path / "student.safetensors").exists()
    return Run(path, "distill" if is_distill else "finetune", records, summary, recipe)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short, unique, file-name-safe labels: each path relative to the runs' common parent folder."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return [_safe(resolved[0].name)]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    labels = [_safe(str(p.relative_to(common))) for p in resolved]
    return labels


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.replace(os.sep, "-")).strip("-") or "run"


# ---------------------------------------------------------------- aggregation


@dataclass
class Stat:
    """Mean and sample standard deviation of one figure over the runs of a group."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int = 2) -> str:
        if self.mean is None:
            return "—"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


@dataclass
class Group:
    """Runs of one recipe (seeds apart), reported as one row."""

    key: str
    kind: str
    runs: list[Run] = field(default_factory=list)
    label: str = ""

    def stat(self, key: str) -> Stat:
        return Stat([v for v in (r.figure(key) for r in self.runs) if v is not None])

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]


def _recipe_key(run: Run, group_by: str) -> str:
    """What runs of one group share: the recipe without seed and output folder (or the recipe name)."""
    if group_by == "name":
        body: Any = run.name
    else:
        body = {k: v for k, v in run.recipe.items() if k not in ("seed", "out_dir", "name")}
        if not run.recipe:  # no recipe.yaml: a group of its own
            body = str(run.path.resolve())
    return json.dumps([run.kind, run.teacher, body], sort_keys=True, default=str)


def group_runs(runs: Sequence[Run], group_by: str = "recipe") -> list[Group]:
    """Groups in order of first appearance; labels are recipe names, made unique when needed."""
    if group_by not in ("recipe", "name"):
        raise AsibError(f"--group-by: expected 'recipe' or 'name' (given: {group_by!r})")
    groups: dict[str, Group] = {}
    for run in runs:
        key = _recipe_key(run, group_by)
        groups.setdefault(key, Group(key, run.kind)).runs.append(run)
    out = list(groups.values())
    for g in out:
        first = g.runs[0]
        g.label = first.name if g.kind == "distill" else f"{first.name}/{first.teacher}"
    by_label: dict[str, list[Group]] = {}
    for g in out:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) > 1:
            _tell_apart(same)
    return out


def _flat(data: Any, path: str = "") -> dict[str, Any]:
    """``{"distill": {"tau": 2}, "teachers": [{"arch": "x"}]}`` -> ``{"distill.tau": 2, "teachers[0].arch": "x"}``."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            if not path and key in ("seed", "out_dir", "name"):
                continue
            out.update(_flat(value, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flat(value, f"{path}[{i}]"))
        return out
    return {path: data}


def _short(value: Any, limit: int = 32) -> str:
    text = str(value)
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def _tell_apart(groups: Sequence[Group]) -> None:
    """Groups sharing a recipe name get the recipe values they differ in: ``L1 (distill.tau=2.0)``."""
    flats = [_flat(g.runs[0].recipe) for g in groups]
    keys = sorted({k for f in flats for k in f})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    differ.sort(key=lambda k: (not k.startswith("distill."), not k.startswith(("student", "teachers")), k))
    for g, f in zip(groups, flats, strict=True):
        shown = ", ".join(f"{k}={_short(f.get(k))}" for k in differ[:1]) + (", ..." if len(differ) > 1 else "")
        g.label = f"{g.label} ({shown or g.runs[0].label})"


# ---------------------------------------------------------------- tables

DISTILL_COLUMNS: list[tuple[str, str]] = [
    ("student test top-1", "student_test_top1"),
    ("synergy test top-1", "synergy_test_top1"),
    ("student val top-1", "student_val_top1"),
    ("seconds", "seconds"),
]
FINETUNE_COLUMNS: list[tuple[str, str]] = [
    ("test top-1", "test_top1"),
    ("val top-1", "val_top1"),
    ("seconds", "seconds"),
]


def _row_note(group: Group) -> str:
    unfinished = sum(r.summary is None for r in group.runs)
    return f" ({unfinished} unfinished)" if unfinished else ""


def _seeds_text(group: Group) -> str:
    seeds = [s for s in group.seeds if s is not None]
    return ", ".join(str(s) for s in seeds) if seeds else "—"


def markdown_tables(groups: Sequence[Group]) -> str:
    """The comparison tables: distill groups (the ablation table) and finetune groups."""
    parts = []
    distill = [g for g in groups if g.kind == "distill"]
    finetune = [g for g in groups if g.kind == "finetune"]
    if distill:
        head = ["run", "method", "n", "seeds"] + [name for name, _ in DISTILL_COLUMNS]
        rows = []
        for g in distill:
            method = str((g.runs[0].summary or {}).get("method") or g.runs[0].recipe.get("distill", {}).get("method", "?"))
            cells = [g.label + _row_note(g), method, str(len(g.runs)), _seeds_text(g)]
            cells += [g.stat(key).text(1 if key == "seconds" else 2) for _, key in DISTILL_COLUMNS]
            rows.append(cells)
        parts.append(_markdown(head, rows))
    if finetune:
        head = ["run", "arch", "n", "seeds"] + [name for name, _ in FINETUNE_COLUMNS]
        rows = []
        for g in finetune:
            arch = str((g.runs[0].summary or {}).get("arch") or _recipe_arch(g.runs[0]))
            cells = [g.label + _row_note(g), arch, str(len(g.runs)), _seeds_text(g)]
            cells += [g.stat(key).text(1 if key == "seconds" else 2) for _, key in FINETUNE_COLUMNS]
            rows.append(cells)
        parts.append(_markdown(head, rows))
    return "\n\n".join(parts) + "\n"


def _recipe_arch(run: Run) -> str:
    """A finetune run's architecture from its recipe (an unfinished run has no summary yet)."""
    for teacher in run.recipe.get("teachers") or []:
        if isinstance(teacher, dict) and teacher.get("name") == run.teacher:
            return str(teacher.get("arch", "?"))
    return "?"


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    right = [False, False, True, False] + [True] * (len(head) - 4)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)) + "|"
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


def report_json(groups: Sequence[Group]) -> dict[str, Any]:
    """Every group's figures as numbers (the table's source), for scripts."""
    out = []
    for g in groups:
        keys = DISTILL_COLUMNS if g.kind == "distill" else FINETUNE_COLUMNS
        out.append({
            "label": g.label,
            "kind": g.kind,
            "runs": [str(r.path) for r in g.runs],
            "seeds": g.seeds,
            **{key: g.stat(key).to_dict() for _, key in keys},
        })
    return {"groups": out}


# ---------------------------------------------------------------- plotting


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


# ---------------------------------------------------------------- the report


@dataclass
class Report:
    out_dir: Path
    runs: list[Run]
    groups: list[Group]
    table: str
    files: list[Path]


def plot_run(run: Run, folder: Path) -> list[Path]:
    """Every plot of one run into ``folder``."""
    files = [plot_accuracy(run, folder / "accuracy.png"), plot_losses(run, folder / "losses.png")]
    for extra in (plot_schedules(run, folder / "schedules.png"), plot_attention(run, folder / "attention.png")):
        if extra is not None:
            files.append(extra)
    return files


def make_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, group_by: str = "recipe", plots: bool = True
) -> Report:
    """Plots of every run, the comparison table (``report.md``, ``report.json``) and, for several runs,
    the overlaid accuracy plot, all under ``out_dir``. ``plots=False`` writes the table only."""
    if not run_dirs:
        raise AsibError("give at least one run folder")
    unique: dict[Path, Path] = {}
    for p in run_dirs:
        unique.setdefault(Path(p).resolve(), Path(p))
    runs = [read_run(p) for p in unique.values()]
    for run, label in zip(runs, _labels([r.path for r in runs]), strict=True):
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
        files += plot_run(run, out_dir / run.label)
    if plots and len(runs) > 1:
        files.append(plot_comparison(groups, out_dir / "accuracy_compare.png"))
    table = markdown_tables(groups)
    title = "# asib report\n\n" + "".join(f"- `{r.path}`\n" for r in runs) + "\n"
    files.append(atomic_write_text(out_dir / "report.md", title + table))
    files.append(atomic_write_json(out_dir / "report.json", report_json(groups)))
    return Report(out_dir, runs, groups, table, files)
