"""Reading run folders and grouping them: ``Run`` (metrics.jsonl, summary.json, recipe.yaml of
one folder), ``Group`` (runs that differ only by seed, or share a recipe name) and ``Stat``
(mean and sample standard deviation of one figure over a group)."""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from asib.errors import AsibError, RunError

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


def run_labels(paths: Sequence[Path]) -> list[str]:
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
