"""ASIB's ``synergy_crossfit``: two fusion paths, each trained on one fold of the training
images (index % 2), each image's B-step target from the path that never trained on it, the
mean of both outside the training split, and all of it saved, evaluated and resumed exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from asib.cli import app
from asib.data import Batch, InMemoryLoader
from asib.engine.checkpoint import load_tensors, read_info, save_model
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan, LoopConfig, without_timings
from asib.engine.progress import Progress
from asib.engine.runtime import make_runtime
from asib.errors import DataError, Interrupted
from asib.methods import build_method
from asib.methods.losses import kd_to_distribution
from asib.models import create_model, synergy_target
from asib.pipeline.distill import DistillTask, distill
from asib.recipe import DistillSpec, Recipe

runner = CliRunner()
NUM_CLASSES = 5
BASE = {"num_stages": 2, "student_epochs": 1, "teacher_adapt_epochs": 1, "batch_size": 16,
        "ib_mbm": {"dim": 16, "heads": 2, "head_dropout": 0.0}}


def make_spec(**kw: object) -> DistillSpec:
    return DistillSpec.model_validate({**BASE, **kw})


def make_loaders(n: int = 32) -> SplitLoaders:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % NUM_CLASSES

    def loader(shuffle: bool) -> InMemoryLoader:
        return InMemoryLoader(images, labels, batch_size=16, mean=[0.5] * 3, std=[0.25] * 3, augment=None,
                              shuffle=shuffle, seed=0, device="cpu", drop_last=False, num_classes=NUM_CLASSES)

    return SplitLoaders(info=None, train=loader(True), val=loader(False), test=loader(False))  # type: ignore[arg-type]


def make_task(spec: DistillSpec) -> DistillTask:
    torch.manual_seed(0)
    teachers = [create_model(a, NUM_CLASSES).eval() for a in ("resnet8", "vgg8")]
    method = build_method(spec, teachers, create_model("resnet8", NUM_CLASSES))
    return DistillTask(method, make_loaders(), make_runtime("cpu"), lambda _epoch: None, Progress(enabled=False),
                       [50.0, 60.0])


def at(phase: str, stage: int = 0, phase_epoch: int = 0, stage_epoch: int = 0) -> EpochPlan:
    return EpochPlan(0, phase, stage, phase_epoch, stage_epoch)


def first(task: DistillTask, phase: str) -> EpochPlan:
    return next(ep for ep in task.plan() if ep.phase == phase)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def crossfit_task(**kw: object):
    return make_task(make_spec(synergy_crossfit=True, **kw))


def fold_batch(idx: list[int]) -> Batch:
    """A batch of the training split's images ``idx`` (the test loaders' images, unaugmented)."""
    loader = make_loaders().train
    index = torch.tensor(idx)
    x = torch.addcmul(loader._bias, loader.images.index_select(0, index), loader._inv)  # type: ignore[union-attr]
    return Batch(x, loader.labels.index_select(0, index), idx=index)


# ---------------------------------------------------------------- the switch and the batch


def test_off_by_default_and_the_first_path_is_unchanged() -> None:
    assert make_spec().synergy_crossfit is False
    torch.manual_seed(3)
    plain = make_task(make_spec())
    state = torch.get_rng_state()
    torch.manual_seed(3)
    both = crossfit_task()
    assert torch.equal(state, torch.get_rng_state())  # the second path draws from a stream of its own
    assert same(snapshot(plain.m.ib_mbm), snapshot(both.m.ib_mbm))
    assert same(snapshot(plain.m.synergy_head), snapshot(both.m.synergy_head))
    assert plain.m.ib_mbm1 is None and "ib_mbm1" not in plain.m.trained_modules()
    assert not same(snapshot(both.m.ib_mbm), snapshot(both.m.ib_mbm1))  # independently initialised
    assert {"ib_mbm1", "head1"} <= set(both.m.trained_modules())
    side = both.optimizers["A"].param_groups
    n_side = sum(p.numel() for g in side for p in g["params"])
    assert n_side == 2 * sum(p.numel() for m in (plain.m.ib_mbm, plain.m.synergy_head) for p in m.parameters())


def test_loader_batches_carry_their_indices() -> None:
    loader = make_loaders().train
    seen = []
    for batch in loader.batches(0):
        assert batch.idx is not None and batch.idx.shape == batch.y.shape
        assert torch.equal(loader.labels.index_select(0, batch.idx), batch.y)
        seen += batch.idx.tolist()
    assert sorted(seen) == list(range(loader.num_images))
    assert Batch(torch.zeros(1), torch.zeros(1)).idx is None


def test_a_batch_without_indices_is_a_data_error() -> None:
    task = crossfit_task()
    ep = first(task, "A")
    task.begin_epoch(ep)
    x, y = fold_batch([0, 1, 2, 3])[:2]
    with pytest.raises(DataError, match="synergy_crossfit needs each batch's image indices") as info:
        task.m(ep, Batch(x, y))
    assert "\n" not in info.value.message


def test_frozen_teachers_only() -> None:
    with pytest.raises(ValueError, match="synergy_crossfit needs frozen teachers"):
        make_spec(synergy_crossfit=True, teacher_freeze_schedule=[1, 1])


# ---------------------------------------------------------------- A-step: each path learns from its fold only


def _a_grads(task, batch: Batch, stage: int = 1) -> tuple[list, list, torch.Tensor]:
    ep = at("A", stage=stage, phase_epoch=5)  # CCCP and the IB both on
    task.begin_epoch(ep)
    terms = task.m(ep, batch)
    task.optimizers["A"].zero_grad(set_to_none=True)
    terms["loss"].backward()
    grads = [[p.grad for m in pair for p in m.parameters()] for pair in task.m.fusion_paths()]
    assert len(grads) == 2
    return grads[0], grads[1], terms["loss"].detach()


@pytest.mark.parametrize("kd", [0.0, 1.0])
def test_a_step_path_gets_no_gradient_from_the_other_fold(kd: float) -> None:
    task = crossfit_task(synergy_kd_alpha=kd)
    g0, g1, loss = _a_grads(task, fold_batch([0, 2, 4, 6, 8, 10]))  # fold 0 only
    assert torch.isfinite(loss)
    assert all(g is None or not g.any() for g in g1)
    assert any(g is not None and g.abs().sum() > 0 for g in g0)
    g0, g1, loss = _a_grads(task, fold_batch([1, 3, 5, 7]))  # fold 1 only
    assert torch.isfinite(loss)
    assert all(g is None or not g.any() for g in g0)
    assert any(g is not None and g.abs().sum() > 0 for g in g1)


def test_a_step_path_gradient_is_that_of_its_own_images() -> None:
    """On a mixed batch, path 1's gradient equals its gradient on the batch's fold-1 images alone
    (no IB noise, no dropout: the step is deterministic)."""
    task = crossfit_task(ib=False)
    mixed = fold_batch([0, 1, 2, 3, 5, 8])
    alone = fold_batch([1, 3, 5])
    _, g_mixed, _ = _a_grads(task, mixed)
    _, g_alone, _ = _a_grads(task, alone)
    for a, b in zip(g_mixed, g_alone, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- B-step: the target comes from the other path


def test_b_step_target_of_each_image_comes_from_the_other_fold_path() -> None:
    task = crossfit_task(synergy_target="mu", kd_alpha=0.0, ce_alpha=0.0, kd_loss="kl")
    m = task.m
    ep = first(task, "B")
    task.begin_epoch(ep)
    m.gate_open = True
    batch = fold_batch([0, 1, 2, 3, 4, 7])
    tau = m.tau_at(ep.phase_epoch)
    with torch.no_grad():
        h_s = m.student.features(batch.x)
        s = m.student.head(h_s).float()
        feats = [t.features(batch.x) for t in m.teachers]
        q = [synergy_target(ib, head, ib(h_s, feats), tau, 1, mode="mu") for ib, head in m.fusion_paths()]
    fold = batch.idx.remainder(2)
    crossed = torch.where((fold == 0)[:, None], q[1], q[0])
    own = torch.where((fold == 0)[:, None], q[0], q[1])
    assert not torch.allclose(crossed, own)
    for target in q:  # each path's target is the head's softmax of mu
        assert torch.allclose(target.sum(1), torch.ones(len(fold)))
    terms = m(ep, batch)
    expected = kd_to_distribution(s, crossed, tau)
    assert float(terms["kd_ens"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["kd_ens"]) != pytest.approx(float(kd_to_distribution(s, own, tau)), rel=1e-3)


def test_synergy_outside_the_training_split_is_the_mean_of_both_paths() -> None:
    task = crossfit_task()
    m = task.m
    x = fold_batch([0, 1, 2]).x
    m.student.eval()
    m.teachers.eval()
    for ib, head in m.fusion_paths():
        ib.eval()
        head.eval()
    with torch.no_grad():
        h_s = m.student.features(x)
        feats = [t.features(x) for t in m.teachers]
        both = [head(ib(h_s, feats).mu) for ib, head in m.fusion_paths()]
        assert torch.allclose(m.synergy_logits(x), (both[0] + both[1]) / 2, atol=1e-6)
    assert not torch.allclose(both[0], both[1])


# ---------------------------------------------------------------- end to end: evaluate, resume, recipe


def tiny(root: Path, name: str, **distill_kw: object) -> dict:
    """A deterministic asib run on 8x8 digits with two fixed random teachers: 2 stages, 40 steps."""
    return {
        "name": name,
        "out_dir": str(root / name),
        "device": "cpu",
        "deterministic": True,
        "data": {"source": "digits", "dir": str(root / "data"), "train_subset": 200, "val_fraction": 0.2,
                 "image_size": 8},
        "teachers": [
            {"name": "t1", "arch": "resnet8", "checkpoint": str(root / "t1.safetensors")},
            {"name": "t2", "arch": "vgg8", "checkpoint": str(root / "t2.safetensors")},
        ],
        "student": {"arch": "resnet8"},
        "distill": {
            "num_stages": 2, "student_epochs": 1, "teacher_adapt_epochs": 1, "batch_size": 16,
            "ib_mbm": {"dim": 16, "heads": 2}, "student_optim": {"name": "adamw", "lr": 3e-3},
            "synergy_crossfit": True, **distill_kw,
        },
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crossfit")
    recipe = root / "prepare.yaml"
    recipe.write_text(yaml.safe_dump(tiny(root, "prepare")))
    r = runner.invoke(app, ["prepare-data", str(recipe)])
    assert r.exit_code == 0, r.output
    torch.manual_seed(0)
    for name, arch in (("t1", "resnet8"), ("t2", "vgg8")):
        save_model(root / f"{name}.safetensors", create_model(arch, 10), "teacher")
    return root


def run(root: Path, name: str, **kw: object) -> Path:
    recipe = Recipe.model_validate(tiny(root, name))
    distill(recipe, progress=Progress(enabled=False), **kw)
    return root / name


@pytest.fixture(scope="module")
def reference(world: Path) -> Path:
    return run(world, "reference")


def test_evaluate_reproduces_the_crossfit_synergy(world: Path, reference: Path) -> None:
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["synergy_test_top1"] is not None
    info = read_info(reference / "synergy.safetensors")
    assert info.json_field("synergy_paths") == 2
    tensors = load_tensors(info.path)
    ours = {k for k in tensors if k.startswith(("ib_mbm.", "head."))}
    assert ours and {f"path1.{k}" for k in ours} == {k for k in tensors if k.startswith("path1.")}
    r = runner.invoke(app, ["evaluate", str(info.path), "--data", str(world / "data"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["top1"] == pytest.approx(summary["synergy_test_top1"], abs=1e-9)
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in records] == ["A", "B", "A", "B"]
    assert all(x["syn_ce"] > 0 and "synergy_val_top1" in x for x in records if x["phase"] == "A")


def test_a_stopped_crossfit_run_resumes_to_the_same_end(world: Path, reference: Path) -> None:
    with pytest.raises(Interrupted):
        run(world, "stopped", loop=LoopConfig(stop_after_steps=25))  # mid stage 2's A-epoch
    run(world, "stopped", resume=True)
    stopped = world / "stopped"
    for name in ("summary.json",):
        a, b = (json.loads((folder / name).read_text()) for folder in (reference, stopped))
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    metrics = [[without_timings(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]
               for folder in (reference, stopped)]
    assert metrics[0] == metrics[1]
    for name in ("student.safetensors", "synergy.safetensors"):
        a, b = load_tensors(reference / name), load_tensors(stopped / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_crossfit_under_another_method_is_refused(world: Path) -> None:
    data = tiny(world, "avg")
    data["distill"] = {"method": "avg_kd", "synergy_crossfit": True}
    recipe = world / "avg.yaml"
    recipe.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["distill", str(recipe), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "distill.synergy_crossfit: not used by method avg_kd" in r.output
    assert not (world / "avg").exists()
    r = runner.invoke(app, ["recipe", "schema"])
    keys = json.loads(r.output)["x-asib-method-keys"]
    assert "synergy_crossfit" in keys["asib"] and "synergy_crossfit" not in keys["avg_kd"]
