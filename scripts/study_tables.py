"""The README's study tables, from the run folders (runs/study, or the snapshot studies/fmnist).

    python scripts/study_tables.py [ROOT] [--yardstick B]

Prints, in markdown: every tuning run (seed 0, validation and test top-1), and ASIB's
validation search stage by stage. The paired seed table is `asib compare ... --collect`'s.
Only finished runs count (a summary.json and no train state); others show as not finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# ASIB's validation search, stage by stage (seed 0). Each stage's variants change one or two
# knobs of the previous stage's winner on validation; the settings of each run are in its
# recipe.yaml. Stages 1-5 (in search/) ran from ASIB's earlier defaults (kd_loss kl, weights
# 0.3/0.35/0.35, tau 1); stage 6 (in search-res/) from the shipped ones, skd_dist4's settings.
SEARCH_STAGES = [
    ("1", "search", ["asib", "a3", "skd", "a3_skd"]),
    ("2 (on skd)", "search", ["skd_t2", "skd_kd7", "skd_ls0", "skd_ib2", "skd_ens7", "skd_cf"]),
    ("3 (on skd_cf)", "search", ["skd_cf_ens7", "skd_cf_kd7", "skd_cf_t4"]),
    ("4 (DIST's relations)", "search", ["skd_cf_dist4", "skd_dist4"]),
    ("5 (on skd_dist4)", "search", ["skd_dist4_e7", "skd_dist4_t2"]),
    ("6 (on the shipped defaults)", "search-res", ["res"]),
]


def summary(folder: Path) -> dict | None:
    if not (folder / "summary.json").exists() or (folder / "train_state.safetensors").exists():
        return None
    return json.loads((folder / "summary.json").read_text())


def cells(s: dict | None, synergy: bool = False) -> str:
    if s is None:
        return "not finished | |" + (" |" if synergy else "")
    out = f"{s['student_val_top1']:.2f} | {s['student_test_top1']:.2f} |"
    return out + (f" {s['synergy_test_top1']:.2f} |" if synergy else "")


def tuning(root: Path) -> list[str]:
    lines = ["| method: candidate | val top-1 | test top-1 |", "|---|---|---|"]
    for step in sorted(p for p in root.iterdir() if p.name.startswith("lr")):
        student = step.name.partition("-")[2]
        for run in sorted((step / "tune" / "ce").glob("*/s0"), key=lambda p: float(p.parent.name.split("=")[1])):
            label = f"ce{', student ' + student if student else ''}: lr {run.parent.name.split('=')[1]}"
            lines.append(f"| {label} | {cells(summary(run))}")
    for method in ("avg_kd", "dkd", "ca_mkd", "dist"):
        for run in sorted((root / "main" / "tune" / method).glob("*/s0")):
            label = run.parent.name.replace("+dkd.beta=", ", beta ").replace("tau=", "tau ")
            lines.append(f"| {method}: {label} | {cells(summary(run))}")
    return lines


def search(root: Path) -> list[str]:
    lines = ["| stage | ASIB variant (seed 0) | val top-1 | test top-1 | synergy test |", "|---|---|---|---|---|"]
    for stage, step, names in SEARCH_STAGES:
        for name in names:
            folder = root / step / "runs" / name / "s0"
            if folder.exists():
                lines.append(f"| {stage} | {name} | {cells(summary(folder), synergy=True)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="runs/study", help="runs/study or studies/fmnist")
    parser.add_argument("--yardstick", default="B")
    args = parser.parse_args()
    root = Path(args.root) / args.yardstick
    print("\n".join(tuning(root)))
    print()
    print("\n".join(search(root)))


if __name__ == "__main__":
    main()
