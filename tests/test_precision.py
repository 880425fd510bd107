"""Frozen models' inference precision and layout, chosen by measurement (``asib.engine.inference``):
the choice from injected timings, what each setting measures, the cache, and the summary record."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from asib.cli import app
from asib.engine import inference
from asib.engine.inference import Candidate, InferenceCache, cache_path, candidates, choose, plan_inference
from asib.engine.runtime import architecture_key, inference_plan, make_runtime
from asib.methods.base import frozen_outputs
from asib.models import create_model

FP32, BF16 = torch.float32, torch.bfloat16
CANDS = [Candidate(FP32, True), Candidate(BF16, True), Candidate(BF16, False), Candidate(FP32, False)]
X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test here caches into its own folder, never the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ASIB_CACHE_DIR", str(folder))
    return folder


def ms(fp32_cl: float, bf16_cl: float, bf16_nchw: float, fp32_nchw: float) -> dict[str, float]:
    return {"fp32 channels_last": fp32_cl, "bf16 channels_last": bf16_cl, "bf16 nchw": bf16_nchw,
            "fp32 nchw": fp32_nchw}


class FakeTimer:
    """Injected timings; records what it was asked to time."""

    def __init__(self, figures: dict[str, float]) -> None:
        self.figures, self.asked = figures, []

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, cands: list[Candidate], device: torch.device
                 ) -> dict[str, float]:
        self.asked.append([c.label for c in cands])
        return {c.label: self.figures[c.label] for c in cands}


def failing_timer(*_args: object) -> dict[str, float]:
    raise AssertionError("nothing should be measured here")


def teacher(arch: str = "resnet8") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(arch, 5).eval()


def cpu(monkeypatch: pytest.MonkeyPatch, bf16: bool, **kw: object):
    """A CPU runtime (precision auto unless said), with or without oneDNN bf16 kernels."""
    monkeypatch.setattr(inference, "bf16_supported", lambda: bf16)
    return make_runtime("cpu", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the choice


def test_choice_follows_the_timings() -> None:
    assert choose(ms(10, 5, 6, 11), CANDS, True) == Candidate(BF16, True)  # faster bf16 -> bf16
    assert choose(ms(10, 20, 21, 11), CANDS, True) == Candidate(FP32, True)  # faster fp32 -> fp32
    assert choose(ms(10, 9.8, 9.9, 11), CANDS, True) == Candidate(FP32, True)  # a 2% gain does not pay for bf16
    assert choose(ms(10, 20, 21, 8), CANDS, True) == Candidate(FP32, False)  # NCHW 20% faster, conversion included
    assert choose(ms(10, 20, 21, 9.9), CANDS, True) == Candidate(FP32, True)  # 1%: the batch's layout stays
    assert choose(ms(10, 6, 4, 11), CANDS, True) == Candidate(BF16, False)
    fp32_only = [Candidate(FP32, True), Candidate(FP32, False)]
    assert choose({"fp32 channels_last": 10, "fp32 nchw": 12}, fp32_only, True) == Candidate(FP32, True)


def test_candidates_per_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    cands, note = candidates(cpu(monkeypatch, bf16=True))
    assert cands == CANDS and note == ""
    cands, note = candidates(cpu(monkeypatch, bf16=False))
    assert cands == [Candidate(FP32, True), Candidate(FP32, False)] and "no bf16 kernels" in note
    for kw in ({"precision": "fp32"}, {"precision": "bf16"}, {"deterministic": True}):
        assert candidates(cpu(monkeypatch, True, **kw))[0] == [], kw


# ---------------------------------------------------------------- planning a run's teachers


def test_faster_bf16_is_chosen_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = cpu(monkeypatch, bf16=True)
    t1, t2 = teacher("resnet8"), teacher("vgg8")
    timer = FakeTimer(ms(10, 5, 6, 11))
    lines: list[str] = []
    record = plan_inference(rt, {"t1": t1, "t2": t2}, X, lines.append, timer=timer)
    assert len(timer.asked) == 2 and timer.asked[0] == [c.label for c in CANDS]  # one measurement per architecture
    assert record["t1"] == {"dtype": "bfloat16", "channels_last": True, "ms": ms(10, 5, 6, 11), "cached": False,
                            "chosen_by": "measurement"}
    assert len(lines) == 2 and lines[0].startswith("inference: t1 runs bf16 channels_last (measured in")
    assert "bf16 channels_last 5.0" in lines[0]
    with torch.no_grad():
        reference = t1(X.float())
    with rt.inference_precision():
        _, logits = frozen_outputs([t1], X)
    assert logits[0].dtype == BF16
    assert torch.allclose(logits[0].float(), reference, atol=0.1, rtol=0.1)
    _, plain = frozen_outputs([t1], X)  # outside a step: nothing changes
    assert plain[0].dtype == FP32
    copy_of_t1 = copy.deepcopy(t1)  # ASIB's synergy-path teachers, the bench's copies: found by architecture
    with rt.inference_precision():
        assert inference_plan(copy_of_t1) == rt.plan_of(t1)
        assert inference_plan(teacher("resnet20")).chosen_by == "rule"  # an architecture nothing measured


def test_faster_fp32_and_its_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = cpu(monkeypatch, bf16=True)
    t1 = teacher()
    record = plan_inference(rt, {"t1": t1}, X, timer=FakeTimer(ms(10, 20, 21, 8)))
    assert (record["t1"]["dtype"], record["t1"]["channels_last"]) == ("float32", False)
    conv = next(m for m in t1.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    rt.prepare(t1)  # the first training step keeps the plan's layout
    assert conv.weight.is_contiguous()
    with rt.inference_precision():
        feats, logits = frozen_outputs([t1], X)  # the channels_last batch is converted for it
    assert logits[0].dtype == FP32


def test_no_bf16_support_means_fp32_without_timing_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = cpu(monkeypatch, bf16=False)
    timer = FakeTimer(ms(10, 1, 1, 11))  # bf16 would win, were it timed
    lines: list[str] = []
    record = plan_inference(rt, {"t1": teacher()}, X, lines.append, timer=timer)
    assert timer.asked == [["fp32 channels_last", "fp32 nchw"]]
    assert record["t1"]["dtype"] == "float32" and record["t1"]["channels_last"] is True
    assert "no bf16 kernels" in record["t1"]["note"] and "no bf16 kernels" in lines[0]


@pytest.mark.parametrize(("kw", "dtype", "channels_last"), [
    ({"precision": "fp32"}, "float32", True),
    ({"precision": "bf16"}, "bfloat16", True),
    ({"deterministic": True}, "float32", False),
])
def test_forced_precision_and_deterministic_measure_nothing(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path, kw: dict, dtype: str, channels_last: bool
) -> None:
    rt = cpu(monkeypatch, True, **kw)
    rt_channels_last = rt.channels_last
    t1 = teacher()
    record = plan_inference(rt, {"t1": t1}, X, timer=failing_timer)
    assert record["t1"]["dtype"] == dtype and record["t1"]["ms"] == {} and not record["t1"]["cached"]
    assert record["t1"]["channels_last"] is channels_last == rt_channels_last
    with rt.inference_precision():
        _, logits = frozen_outputs([t1], X)
    assert logits[0].dtype == getattr(torch, dtype)
    assert not cache_dir.exists()


# ---------------------------------------------------------------- the cache


def test_cache_hit_and_key(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    timer = FakeTimer(ms(10, 5, 6, 11))
    plan_inference(cpu(monkeypatch, True), {"t1": teacher()}, X, timer=timer)
    entries = json.loads((cache_dir / "inference.json").read_text())["entries"]
    (key,) = entries
    for part in (architecture_key(teacher()), "3x8x8 channels_last float32", "batch 16",
                 f"torch {torch.__version__}", f"{torch.get_num_threads()} threads", inference.cpu_model()):
        assert part in key, part
    assert entries[key]["choice"] == "bf16 channels_last"

    lines: list[str] = []
    again = cpu(monkeypatch, True)  # a second run: a fresh runtime and model, the same key
    t1 = teacher()
    record = plan_inference(again, {"t1": t1}, X, lines.append, timer=failing_timer)
    assert record["t1"]["cached"] is True and record["t1"]["dtype"] == "bfloat16"
    assert record["t1"]["ms"] == ms(10, 5, 6, 11) and "cached measurement" in lines[0]
    with again.inference_precision():
        assert frozen_outputs([t1], X)[1][0].dtype == BF16

    plan_inference(cpu(monkeypatch, True), {"t1": teacher()}, X[:8], timer=timer)  # another batch size: measured
    assert len(timer.asked) == 2
    assert len(json.loads((cache_dir / "inference.json").read_text())["entries"]) == 2


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"format": 1, "entries": []}', b"\xff\xfe",
                                     b'{"format": 1, "entries": {"k": 3}}', b"[" * 100_000])
def test_corrupt_cache_is_ignored_and_rewritten(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, content: bytes) -> None:
    cache_dir.mkdir()
    (cache_dir / "inference.json").write_bytes(content)
    timer = FakeTimer(ms(10, 5, 6, 11))
    record = plan_inference(cpu(monkeypatch, True), {"t1": teacher()}, X, timer=timer)
    assert len(timer.asked) == 1 and record["t1"]["cached"] is False
    data = json.loads((cache_dir / "inference.json").read_text())
    assert data["format"] == 1 and len(data["entries"]) == 1


def test_nonsense_cache_entry_is_measured_again(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    timer = FakeTimer(ms(10, 5, 6, 11))
    plan_inference(cpu(monkeypatch, True), {"t1": teacher()}, X, timer=timer)
    path = cache_dir / "inference.json"
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["ms"]["fp32 nchw"] = -1
    path.write_text(json.dumps(data))
    assert plan_inference(cpu(monkeypatch, True), {"t1": teacher()}, X, timer=timer)["t1"]["cached"] is False
    assert len(timer.asked) == 2


def test_unwritable_cache_is_a_line_not_a_crash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    lines: list[str] = []
    cache = InferenceCache(blocker / "inference.json")  # its folder is a file
    record = plan_inference(cpu(monkeypatch, True), {"t1": teacher()}, X, lines.append,
                            timer=FakeTimer(ms(10, 5, 6, 11)), cache=cache)
    assert record["t1"]["dtype"] == "bfloat16"
    assert any("not cached" in line for line in lines)


def test_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_path() == tmp_path / "cache" / "inference.json"
    monkeypatch.delenv("ASIB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "asib" / "inference.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_path() == Path.home() / ".cache" / "asib" / "inference.json"


# ---------------------------------------------------------------- the real measurement


def test_real_timing_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = cpu(monkeypatch, bf16=False)
    model = teacher().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = plan_inference(rt, {"t": model}, X)
    assert set(record["t"]["ms"]) == {"fp32 channels_last", "fp32 nchw"}
    assert all(v > 0 for v in record["t"]["ms"].values())
    assert model.training  # its mode is kept, its batch-norm statistics untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.is_inference() for p in model.parameters())  # it can still train
    model(X).sum().backward()


# ---------------------------------------------------------------- the summary record


def test_distill_records_each_teachers_plan_in_the_summary(tmp_path: Path) -> None:
    from asib.engine.checkpoint import save_model

    runner = CliRunner()
    teachers = []
    for name, arch in (("t1", "resnet8"), ("t2", "vgg8")):
        torch.manual_seed(0)
        path = save_model(tmp_path / f"{name}.safetensors", create_model(arch, 10), "teacher")
        teachers.append({"name": name, "arch": arch, "checkpoint": str(path)})
    recipe = {
        "name": "tiny", "out_dir": str(tmp_path / "runs"), "device": "cpu",
        "data": {"source": "digits", "dir": str(tmp_path / "data"), "train_subset": 128, "val_fraction": 0.25},
        "teachers": teachers, "student": {"arch": "resnet8"},
        "distill": {"method": "kd", "num_stages": 1, "student_epochs": 1, "batch_size": 32},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert (r := runner.invoke(app, ["prepare-data", str(path)])).exit_code == 0, r.output
    summaries = []
    for _ in range(2):
        r = runner.invoke(app, ["distill", str(path), "--force"])
        assert r.exit_code == 0, r.output
        assert "inference: t1 runs" in r.output
        summaries.append(json.loads((tmp_path / "runs" / "summary.json").read_text()))
    first, second = (s["inference"] for s in summaries)
    assert set(first) == {"t1", "t2"}
    for name in ("t1", "t2"):
        assert {"dtype", "channels_last", "ms", "cached"} <= set(first[name])
        assert first[name]["cached"] is False and second[name]["cached"] is True  # the second run measures nothing
        assert first[name]["ms"] == second[name]["ms"] and first[name]["dtype"] == second[name]["dtype"]
