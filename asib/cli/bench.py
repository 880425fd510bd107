"""``asib bench RECIPE``: throughput of the engine's steps against bare PyTorch, and of the data pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from asib.cli._common import QuietOpt, RecipeArg, SetOpt, err_console, handle_errors, load, out_console, shown


@handle_errors
def bench(
    recipe: RecipeArg,
    steps: Annotated[
        int | None, typer.Option(min=1, help="steps per timed block (default 4 on CPU, 10 on CUDA)")
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="warm-up steps per variant (compilation happens here)")] = 2,
    repeats: Annotated[int, typer.Option(min=1, help="interleaved engine/bare blocks; figures are medians")] = 15,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: the recipe's device)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="also write the figures as JSON to FILE")
    ] = None,
    synthetic: Annotated[
        int | None, typer.Option(min=1, help="use N random images of the recipe's shape instead of the prepared data")
    ] = None,
    classes: Annotated[
        int | None, typer.Option(min=1, help="class count of --synthetic data when no prepared data exists")
    ] = None,
    workers: Annotated[str, typer.Option(help="DataLoader workers of the PIL pipeline, comma-separated")] = "0,2",
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads while benchmarking (1 is steadier on a busy machine)")
    ] = None,
    max_overhead: Annotated[
        float | None, typer.Option(help="exit 1 when an engine/bare time ratio is above this (e.g. 1.15)")
    ] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Images/s and peak memory of data loading, fine-tuning, A-step, B-step and kd steps (engine vs bare
    loops), where a step's time goes, and one step of every method.
    """
    r = load(recipe, set_)
    from asib.bench import BenchConfig, run_bench
    from asib.errors import RecipeError

    if device is not None and device not in ("cpu", "cuda"):
        raise RecipeError([f"--device: expected cpu or cuda (given: {device!r})"])
    worker_counts = tuple(int(w) for w in workers.split(",") if w.strip())
    cfg = BenchConfig(steps=steps, warmup=warmup, repeats=repeats, device=device, synthetic=synthetic,
                      classes=classes, workers=worker_counts, threads=threads)
    err = err_console()
    report = run_bench(r, cfg, say=None if quiet else lambda msg: err.print(f"[dim]{msg}[/dim]"))
    figures = report.to_dict()
    if output is not None:
        from asib.engine.io import atomic_write_json

        atomic_write_json(output, figures)
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
    else:
        print_tables(figures)
    worst = {name: ratio for name, ratio in report.ratios.items() if max_overhead is not None and ratio > max_overhead}
    if worst:
        listed = ", ".join(f"{name} {ratio:.3f}" for name, ratio in worst.items())
        err.print(f"[red]error:[/red] engine/bare ratio above {max_overhead}: {listed}")
        raise typer.Exit(1)


def print_tables(f: dict[str, Any]) -> None:
    """The figures as rich tables: setting, data, steps (with compile), breakdown."""
    from rich.table import Table

    console = out_console()
    s = f["setting"]
    p = s["precision"]
    console.print(
        f"[bold]asib bench {shown(s['recipe'])}[/bold] on {s['device']} (torch {s['torch']}, {s['threads']} threads); "
        f"data: {shown(s['data'])}; batch {s['batch_size']['distill']} (fine-tuning {s['batch_size']['finetune']})"
    )
    console.print(
        f"precision: train {p['train']}, frozen teachers {p['teachers']}, bare twins' teachers "
        f"{' and '.join(p['bare_teachers'])} (the fastest kept), channels_last {p['channels_last']}, "
        f"compile {p['compile']}; memory: {s['memory']}; {s['steps']} steps x {s['repeats']} interleaved repeats "
        f"after {s['warmup']} warm-up, medians",
        markup=False,
    )
    for name, source in s["teachers"].items():
        plan = s["inference"].get(name)
        runs = f"; runs {_plan_text(plan)}" if plan else ""
        console.print(f"teacher {name}: {source}{runs}", markup=False)
    for note in dict.fromkeys(plan["note"] for plan in s["inference"].values() if plan.get("note")):
        console.print(f"  ({note})", markup=False)
    if s["student"]:
        console.print(f"student: {s['student']}", markup=False)

    data = Table(title="1. data pipeline (batches of the distill step)")
    for col in ("pipeline", "images/s", "ms/batch", "peak MiB", "in-memory speedup"):
        data.add_column(col, justify="left" if col == "pipeline" else "right")
    for name, fig in f["data"].items():
        if not isinstance(fig, dict):
            continue
        w = name.rsplit("_w", 1)[-1] if name.startswith("dataloader") else None
        label = "InMemoryLoader (recipe augmentation)" if w is None else f"DataLoader + PIL, {w} workers"
        speed = "" if w is None else f"{f['data'][f'speedup_vs_w{w}']:.1f}x"
        data.add_row(label, f"{fig['images_per_s']:,.0f}", f"{fig['ms_per_step']:.2f}", f"{fig['peak_mib']:.1f}", speed)
    console.print(data)

    steps = Table(title="2. training steps: engine vs bare PyTorch (same models, batches, precision)")
    cols = ["step", "engine img/s", "bare img/s", "engine/bare", "engine MiB", "bare MiB", "bare teachers"]
    compiled = any("compile" in c for c in f["steps"].values())
    if compiled:
        cols += ["eager img/s", "compile speedup", "compile s"]
    for col in cols:
        steps.add_column(col, justify="left" if col == "step" else "right")
    for name, c in f["steps"].items():
        row = [name, f"{c['engine']['images_per_s']:,.1f}", f"{c['bare']['images_per_s']:,.1f}", f"{c['ratio']:.3f}",
               f"{c['engine']['peak_mib']:.1f}", f"{c['bare']['peak_mib']:.1f}", c["bare_teachers"] or "-"]
        if compiled:
            k = c["compile"]
            row += [f"{k['eager']['images_per_s']:,.1f}", f"{k['speedup']:.2f}x", f"{k['compile_s']:.1f}"]
        steps.add_row(*row)
    console.print(steps)
    for name, c in f["steps"].items():
        syncs = "" if c["syncs_per_step"] is None else f" ({c['syncs_per_step']} host-device syncs per engine step)"
        console.print(f"  {name}: {c['what']}{syncs}", markup=False)
        if len(c["bare_by_teacher_precision"]) > 1:
            timed = ", ".join(f"{k} teachers {v['images_per_s']:,.1f} img/s" for k, v in c["bare_by_teacher_precision"].items())
            console.print(f"    bare twins: {timed}; kept: {c['bare_teachers']}", markup=False)
    if f["max_ratio"] is not None:
        console.print(f"largest engine/bare ratio: {f['max_ratio']:.3f}")

    parts = Table(title="3. where a step's time goes (ms per batch, each part timed alone)")
    columns = list(f["breakdown"])
    parts.add_column("part")
    for col in columns:
        parts.add_column(col, justify="right")
    names = list(dict.fromkeys(k for col in columns for k in f["breakdown"][col]))
    for name in names:
        parts.add_row(name, *(_ms(f["breakdown"][col].get(name)) for col in columns))
    total = [sum(v for k, v in f["breakdown"][col].items() if "reference" not in k) for col in columns]
    parts.add_row("sum of parts", *(f"{t:.1f}" for t in total))
    whole = {"finetune": "finetune", "asib A-step": "asib A-step", "asib B-step": "asib B-step"}
    parts.add_row("whole engine step (section 2)", *(
        _ms(f["steps"][whole[col]]["engine"]["ms_per_step"]) if whole.get(col) in f["steps"] else "-" for col in columns
    ))
    console.print(parts)

    if f.get("methods"):
        methods = Table(title="4. one training step of each method (engine, interleaved)")
        for col in ("method", "images/s", "ms/step", "peak MiB"):
            methods.add_column(col, justify="left" if col == "method" else "right")
        for name, fig in f["methods"].items():
            methods.add_row(name, f"{fig['images_per_s']:,.1f}", f"{fig['ms_per_step']:.1f}", f"{fig['peak_mib']:.1f}")
        console.print(methods)


def _plan_text(plan: dict[str, Any]) -> str:
    """A teacher's inference plan in words: precision, layout, and the figures that chose them."""
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(plan["dtype"], plan["dtype"])
    text = f"{dtype} {'channels_last' if plan['channels_last'] else 'nchw'}"
    if not plan["ms"]:
        return f"{text} ({plan['chosen_by']})"
    figures = ", ".join(f"{k} {v:.1f}" for k, v in sorted(plan["ms"].items(), key=lambda kv: kv[1]))
    how = "cached measurement" if plan["cached"] else "measured"
    return f"{text} ({how}, ms per batch: {figures})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
