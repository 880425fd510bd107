"""The comparison tables of grouped runs: markdown (``report.md``, printed by ``asib report``)
and the same figures as numbers (``report.json``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asib.report.runs import Group, Run

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
