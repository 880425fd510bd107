"""``asib bench`` through the real entry point, on synthetic images and tiny models: every figure is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from asib.cli import app
from asib.cli.bench import print_tables

runner = CliRunner()

STEPS = ("finetune", "asib A-step", "asib B-step", "kd step")


def tiny_recipe(root: Path) -> dict:
    """Two cheap teachers of different families, a resnet8 student, batches of 8; no prepared data."""
    train = {"batch_size": 8, "optim": {"name": "sgd", "lr": 0.05}, "augment": {"crop_padding": 1, "hflip": True}}
    return {
        "name": "tiny_bench",
        "out_dir": str(root / "runs"),
        "device": "cpu",
        "data": {"source": "digits", "dir": str(root / "no_data"), "image_size": 8},
        "teachers": [{"name": "t1", "arch": "resnet8", "train": train}, {"name": "t2", "arch": "vgg8", "train": train}],
        "student": {"arch": "resnet8"},
        "distill": {
            "num_stages": 2,
            "student_epochs": 1,
            "teacher_adapt_epochs": 1,
            "batch_size": 8,
            "ib_mbm": {"dim": 16, "heads": 2},
            "ib_target_samples": 2,
            "augment": {"crop_padding": 1, "hflip": True},
        },
    }


def numbers(tree: object, path: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON tree by its path (booleans are not figures)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{path}.{key}").items()}
    if isinstance(tree, bool) or not isinstance(tree, int | float):
        return {}
    return {path: float(tree)}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The teachers' inference plans are cached here, not in the user's cache folder."""
    monkeypatch.setenv("ASIB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bench_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    args = ["bench", str(recipe), "--synthetic", "32", "--steps", "2", "--warmup", "1", "--repeats", "2",
            "--threads", "1", "--json", "--quiet", "--max-overhead", "0.01", "--output", str(tmp_path / "b.json")]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output  # no engine step is 100x faster than bare PyTorch
    assert "engine/bare ratio above 0.01" in r.stderr
    figures = json.loads(r.stdout)
    assert json.loads((tmp_path / "b.json").read_text()) == figures  # --output: the same figures, kept

    setting = figures["setting"]
    assert setting["data"].startswith("synthetic: 32 random images 8x8, 10 classes")
    assert setting["threads"] == 1
    assert set(setting["teachers"]) == {"t1", "t2"} and all("fresh" in v for v in setting["teachers"].values())
    assert set(figures["data"]) == {"in_memory", "dataloader_pil_w0", "dataloader_pil_w2", "speedup_vs_w0",
                                    "speedup_vs_w2"}
    assert tuple(figures["steps"]) == STEPS
    for name in STEPS:
        step = figures["steps"][name]
        for side in ("engine", "bare"):
            assert set(step[side]) == {"images_per_s", "ms_per_step", "peak_mib"}, (name, side)
        assert step["ratio"] > 0
    # Which precision and layout each frozen teacher ran in, and what the bare twins ran theirs in.
    inference = setting["inference"]
    assert set(inference) == {"t1", "t2"}
    for plan in inference.values():
        assert plan["dtype"] in ("float32", "bfloat16") and isinstance(plan["channels_last"], bool)
        assert plan["chosen_by"] == "measurement" and plan["ms"] and all(v > 0 for v in plan["ms"].values())
    assert figures["steps"]["finetune"]["bare_teachers"] is None  # no frozen teacher there
    for name in STEPS[1:]:
        step = figures["steps"][name]
        assert step["bare_teachers"] in setting["precision"]["bare_teachers"], name
        assert set(step["bare_by_teacher_precision"]) == set(setting["precision"]["bare_teachers"]), name
    assert set(figures["breakdown"]) == {"finetune", "asib A-step", "asib B-step"}
    parts = figures["breakdown"]["asib B-step"]
    for part in ("data", "teacher t1 forward", "teacher t2 forward", "student forward+backward",
                 "fusion forward + synergy target", "optimizer (student)"):
        assert part in parts, part
    assert {"student forward (no grad)", "fusion forward+backward"} <= set(figures["breakdown"]["asib A-step"])

    assert set(figures["methods"]) == {"ce", "kd", "avg_kd", "dkd", "ca_mkd", "dist", "asib", "asib (teacher side)"}

    values = numbers({k: figures[k] for k in ("data", "steps", "breakdown", "methods")})
    assert len(values) > 50
    bad = {k: v for k, v in values.items() if not v > 0}
    assert not bad, bad
    assert figures["max_ratio"] == max(figures["steps"][n]["ratio"] for n in STEPS)

    print_tables(figures)  # the table view of the same figures
    table = capsys.readouterr().out
    for text in ("1. data pipeline", "engine/bare", "asib B-step", "sum of parts", "teacher t2: fresh vgg8",
                 f"runs {inference['t1']['dtype'].replace('float32', 'fp32').replace('bfloat16', 'bf16')}",
                 "bare twins' teachers",
                 "4. one training step of each method", "ca_mkd"):
        assert text in table, text


def test_bench_user_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    r = runner.invoke(app, ["bench", str(recipe)])
    assert r.exit_code == 1 and "prepare-data" in r.output  # no prepared data and no --synthetic
    r = runner.invoke(app, ["bench", str(recipe), "--device", "tpu"])
    assert r.exit_code == 2 and "--device" in r.output


def test_bare_twins_per_teacher_precision_keep_the_fastest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bf16 may be chosen (here: pretended), every distill step has a bare twin with fp32
    teachers and one with bf16 teachers, and its engine/bare ratio is taken against the faster."""
    from asib.bench import BenchConfig, MemoryMeter, build_setting, compare_steps
    from asib.engine import inference
    from asib.recipe import recipe_from_dict

    monkeypatch.setattr(inference, "bf16_supported", lambda: True)
    recipe = recipe_from_dict(tiny_recipe(tmp_path))
    cfg = BenchConfig(steps=1, warmup=1, repeats=3, synthetic=16)
    setting = build_setting(recipe, cfg)
    assert set(setting.inference["t1"]["ms"]) == {"fp32 channels_last", "bf16 channels_last", "bf16 nchw",
                                                  "fp32 nchw"}
    steps = {c.name: c for c in compare_steps(setting, cfg, MemoryMeter(setting.runtime.device), lambda _m: None)}
    assert steps["finetune"].bare_teachers is None and not steps["finetune"].bare_all
    for name in STEPS[1:]:
        c = steps[name]
        assert set(c.bare_all) == {"fp32", "bf16"}, name
        fastest = min(c.bare_all, key=lambda k: c.bare_all[k].seconds)
        assert c.bare_teachers == fastest and c.bare is c.bare_all[fastest], name
