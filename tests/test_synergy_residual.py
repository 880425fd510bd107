"""ASIB's ``synergy_residual``: the synergy logits are the synergy path's teacher average plus
the head's output, the head's last layer starting at zero; trained, saved and evaluated as such."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_crossfit import (
    first,
    fold_batch,
    make_spec,
    make_task,
    same,
    snapshot,
    tiny,
    world,  # noqa: F401  (the module's fixture: prepared digits and two teachers)
)
from typer.testing import CliRunner

from asib.cli import app
from asib.engine.checkpoint import load_synergy_predictor, read_info, save_model
from asib.engine.runtime import make_runtime
from asib.methods.base import Artifacts
from asib.methods.losses import teacher_average
from asib.models import SynergyHead, synergy_target

runner = CliRunner()


def eval_mode(m) -> None:
    for module in (m.student, m.teachers, m.synergy_teachers, *[x for pair in m.fusion_paths() for x in pair]):
        module.eval()


def test_off_by_default_and_a_plain_head_takes_no_base() -> None:
    assert make_spec().synergy_residual is False
    head = SynergyHead(8, 3)
    with pytest.raises(ValueError, match="not residual"):
        head(torch.zeros(2, 8), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="needs the teacher average"):
        SynergyHead(8, 3, residual=True)(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="do not fit"):
        SynergyHead(8, 3, residual=True)(torch.zeros(5, 8), torch.zeros(2, 3))


def test_the_base_is_tiled_over_noise_samples() -> None:
    head = SynergyHead(8, 3, residual=True)
    torch.nn.init.normal_(head.net[-1].weight)
    z, base = torch.randn(3 * 2, 8), torch.randn(2, 3)
    want = head.net(z) + torch.cat([base, base, base])
    assert torch.allclose(head(z, base), want)


@pytest.mark.parametrize("schedule", [None, [1, 1]])
def test_the_synergy_starts_as_the_teacher_average(schedule: list[int] | None) -> None:
    task = make_task(make_spec(synergy_residual=True, teacher_freeze_schedule=schedule))
    m = task.m
    eval_mode(m)
    x = fold_batch([0, 1, 2, 3]).x
    with torch.no_grad():
        t_bar = teacher_average([t(x) for t in m.synergy_teachers])
        assert torch.allclose(m.synergy_logits(x), t_bar, atol=1e-6)
        out = m.ib_mbm(m.student.features(x), [t.features(x) for t in m.synergy_teachers])
        q = synergy_target(m.ib_mbm, m.synergy_head, out, 2.0, 4, ib=True, base=t_bar)  # noise samples too
        assert torch.allclose(q, F.softmax(t_bar / 2.0, dim=-1), atol=1e-6)
    plain = make_task(make_spec(teacher_freeze_schedule=schedule)).m  # the same seed, not residual
    eval_mode(plain)
    with torch.no_grad():
        assert not torch.allclose(plain.synergy_logits(x), t_bar, atol=1e-2)


def test_a_steps_learn_a_correction_and_the_b_step_target_uses_it() -> None:
    task = make_task(make_spec(synergy_residual=True))
    m = task.m
    ep = first(task, "A")
    task.begin_epoch(ep)
    batches = iter(task.batches(ep))
    ib_before = snapshot(m.ib_mbm)
    task.step(ep, next(batches))
    assert m.synergy_head.net[-1].weight.abs().sum() > 0  # the correction left zero
    task.step(ep, next(batches))
    assert not same(snapshot(m.ib_mbm), ib_before)  # and then the fusion learns through it
    eval_mode(m)
    x = fold_batch([0, 1, 2, 3]).x
    with torch.no_grad():
        t_bar = teacher_average([t(x) for t in m.teachers])
        g = m.synergy_logits(x)
        assert not torch.allclose(g, t_bar, atol=1e-4)
        h_s = m.student.features(x)
        out = m.ib_mbm(h_s, [t.features(x) for t in m.teachers])
        correction = m.synergy_head.net(out.mu)
        assert torch.allclose(g, t_bar + correction, atol=1e-5)


@pytest.mark.parametrize("extra", [{"synergy_crossfit": True}, {"teacher_freeze_schedule": [1, 1]}])
def test_the_saved_synergy_predicts_the_trained_logits(tmp_path: Path, extra: dict) -> None:
    task = make_task(make_spec(synergy_residual=True, teacher_weights=[2.0, 1.0], **extra))
    m = task.m
    ep = first(task, "A")
    task.begin_epoch(ep)
    for batch in task.batches(ep):  # an A-epoch: the correction and (with the schedule) teacher blocks move
        task.step(ep, batch)
    teachers = [save_model(tmp_path / f"t{k}.safetensors", t, "teacher") for k, t in enumerate(m.teachers)]
    student = save_model(tmp_path / "student.safetensors", m.student, "student")
    m.save_artifacts(Artifacts(tmp_path, student, teachers, 1))
    predict = load_synergy_predictor(read_info(tmp_path / "synergy.safetensors"), make_runtime("cpu"))
    eval_mode(m)
    x = fold_batch(list(range(8))).x
    with torch.no_grad():
        want = m.synergy_logits(x)
        t_bar = teacher_average([t(x) for t in m.synergy_teachers], [2.0, 1.0])
    assert not torch.allclose(want, t_bar, atol=1e-3)
    assert torch.allclose(predict(x), want, atol=1e-5)


@pytest.mark.parametrize("extra", [{"synergy_crossfit": True}, {"synergy_crossfit": False,
                                                                 "teacher_freeze_schedule": [1, 1]}])
def test_evaluate_reproduces_the_residual_synergy(world: Path, extra: dict) -> None:  # noqa: F811
    name = "residual_" + ("cf" if extra["synergy_crossfit"] else "adapted")
    data = tiny(world, name, synergy_residual=True, teacher_weights=[2.0, 1.0], **extra)
    recipe = world / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["distill", str(recipe), "--quiet"])
    assert r.exit_code == 0, r.output
    folder = world / name
    summary = json.loads((folder / "summary.json").read_text())
    info = read_info(folder / "synergy.safetensors")
    assert info.json_field("synergy_residual") == pytest.approx([2 / 3, 1 / 3])
    r = runner.invoke(app, ["evaluate", str(info.path), "--data", str(world / "data"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["top1"] == pytest.approx(summary["synergy_test_top1"], abs=1e-9)


def test_a_malformed_residual_header_is_refused(world: Path) -> None:  # noqa: F811
    from asib.engine.checkpoint import load_tensors, save_tensors

    folder = world / "residual_cf"
    if not (folder / "synergy.safetensors").exists():
        data = tiny(world, "residual_cf", synergy_residual=True)
        (world / "residual_cf.yaml").write_text(yaml.safe_dump(data))
        assert runner.invoke(app, ["distill", str(world / "residual_cf.yaml"), "--quiet"]).exit_code == 0
    info = read_info(folder / "synergy.safetensors")
    meta = dict(info.meta)
    meta["asib.synergy_residual"] = json.dumps([1.0])  # one weight for two teachers
    bad = folder / "bad_synergy.safetensors"
    save_tensors(bad, load_tensors(info.path), meta)
    r = runner.invoke(app, ["evaluate", str(bad), "--data", str(world / "data")])
    assert r.exit_code != 0 and "asib.synergy_residual" in r.output and "Traceback" not in r.output
