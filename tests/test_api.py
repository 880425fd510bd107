"""``asib.api``: every row of the README's API table is called here, and the README example runs."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import asib.api as asib
from asib.data import Batch
from asib.engine.loaders import SplitLoaders
from asib.engine.loop import EpochPlan
from asib.engine.progress import Progress
from asib.engine.runtime import make_runtime
from asib.errors import DataError, ModelError, RecipeError
from asib.pipeline.distill import DistillTask

README = Path(__file__).resolve().parents[1] / "README.md"
SPEC = {"num_stages": 2, "student_epochs": 1, "teacher_adapt_epochs": 1, "batch_size": 16,
        "ib_mbm": {"dim": 16, "heads": 2, "head_dropout": 0.0}}


class Blobs(asib.ClassInfoMixin):
    """``n`` 8x8 RGB images in 4 classes told apart by brightness; items are (HWC uint8 array, label)."""

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        self.set_classes(["a", "b", "c", "d"])
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % 4
        self.images = (self.labels[:, None, None, None] * 60 + rng.integers(0, 40, (n, 8, 8, 3))).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api") / "blobs"
    asib.prepare_dataset(Blobs(), out, val_fraction=0.25, test_fraction=0.2)
    return out


def make_distiller(spec: dict = SPEC) -> asib.DistillMethod:
    torch.manual_seed(0)
    teachers = [asib.create_teacher_by_name(a, 4).eval() for a in ("resnet8", "vgg8")]
    student = asib.create_student_by_name("resnet8", 4)
    return asib.build_method(spec, teachers, student)


def params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# ---------------------------------------------------------------- models and fusion


def test_build_models_by_name() -> None:
    x = torch.randn(2, 3, 8, 8)
    for model in (asib.build_model("resnet8", num_classes=5), asib.create_teacher_by_name("vgg8", 5),
                  asib.create_student_by_name("wrn_16_1", 5)):
        assert model.eval()(x).shape == (2, 5)


def test_fuse_teachers_from_a_plain_dict() -> None:
    d = make_distiller()
    assert d.spec.ib_mbm.dim == 16  # the dict was validated into a DistillSpec
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    terms = d(EpochPlan(0, "A", 0, 0, 0), Batch(x, y))
    assert {"loss", "syn_ce", "ib_kl", "attn_t0", "attn_t1"} <= set(terms)
    assert d.synergy_logits(x).shape == (4, 4)
    ib_mbm, head = asib.build_ib_mbm_from_teachers(list(d.teachers), d.student, SPEC)
    assert ib_mbm.teacher_dims == d.ib_mbm.teacher_dims and head.net[-1].out_features == 4
    with pytest.raises(RecipeError, match="unknown key"):
        asib.build_method({"tua": 2}, d.teachers, d.student)


# ---------------------------------------------------------------- training


def test_optimizers_are_the_engines(data_dir: Path) -> None:
    d = make_distiller()
    opts = asib.create_optimizers_and_schedulers(d, SPEC, steps_per_epoch=3)
    t_opt, t_sched, s_opt, s_sched = opts  # also a plain 4-tuple
    assert isinstance(t_opt, torch.optim.AdamW) and isinstance(s_opt, torch.optim.AdamW)
    loader = asib.make_loader(data_dir, "train", batch_size=16, device="cpu", train=True)
    engine = DistillTask(d, SplitLoaders(None, loader, None, loader), make_runtime("cpu"),  # type: ignore[arg-type]
                         lambda _e: None, Progress(enabled=False))
    for ours, theirs in ((t_opt, engine.optimizers["A"]), (s_opt, engine.optimizers["B"])):
        assert [len(g["params"]) for g in ours.param_groups] == [len(g["params"]) for g in theirs.param_groups]
        assert ours.defaults["lr"] == theirs.defaults["lr"]
    assert s_sched.get_last_lr() == engine.schedulers["B"].get_last_lr()
    with pytest.raises(RecipeError, match="differs"):
        asib.create_optimizers_and_schedulers(d, {**SPEC, "tau": 1.0}, 3)


def test_one_epoch_a_step_and_b_step(data_dir: Path) -> None:
    d = make_distiller()
    loader = asib.make_loader(data_dir, "train", batch_size=16, device="cpu", train=True)
    opts = asib.create_optimizers_and_schedulers(d, None, len(loader))
    student, fusion = params(d.student), params(d.ib_mbm)
    a = asib.teacher_adaptive_update(d, loader, opts, epoch=0)
    assert {"loss", "syn_ce", "ib_kl", "beta"} <= set(a) and all(np.isfinite(list(a.values())))
    assert torch.equal(params(d.student), student) and not torch.equal(params(d.ib_mbm), fusion)
    fusion = params(d.ib_mbm)
    b = asib.student_distillation_update(d, loader, opts, epoch=0)
    assert {"loss", "ce", "kd", "kd_ens", "tau"} <= set(b)
    assert not torch.equal(params(d.student), student) and torch.equal(params(d.ib_mbm), fusion)
    assert opts.student_scheduler.last_epoch == len(loader)  # one scheduler step per batch


def test_a_step_needs_asib(data_dir: Path) -> None:
    spec = {"num_stages": 2, "student_epochs": 1, "batch_size": 16, "method": "kd"}
    torch.manual_seed(0)
    teachers = [asib.create_teacher_by_name("resnet8", 4)]
    d = asib.build_method(spec, teachers, asib.create_student_by_name("resnet8", 4))
    loader = asib.make_loader(data_dir, "train", batch_size=16, device="cpu", train=True)
    opts = asib.create_optimizers_and_schedulers(d, spec, len(loader))
    assert opts.teacher_optimizer is None
    with pytest.raises(RecipeError, match="no teacher-side"):
        asib.teacher_adaptive_update(d, loader, opts)
    assert "kd" in asib.student_distillation_update(d, loader, opts)


def test_run_training_stages_returns_accuracy_and_logs(data_dir: Path, tmp_path: Path) -> None:
    d = make_distiller()
    train = asib.make_loader(data_dir, "train", batch_size=16, device="cpu", train=True)
    val = asib.make_loader(data_dir, "val", batch_size=64, device="cpu")
    top1 = asib.run_training_stages(d, SPEC, train, val, run_dir=tmp_path / "run")
    assert isinstance(top1, float) and 0.0 <= top1 <= 100.0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["A", "B", "A", "B"]
    best = max(r["student_val_top1"] for r in records if r["phase"] == "B")
    assert top1 == pytest.approx(best, abs=1e-3)  # the best-on-val weights are the ones kept
    student, _ = asib.load_model(tmp_path / "run" / "student.safetensors")
    assert asib.compute_accuracy(*_logits(student, val)) == pytest.approx(top1, abs=1e-3)
    with pytest.raises(DataError, match="val_loader or a test_loader"):
        asib.run_training_stages(d, None, train, None)


def _logits(model: torch.nn.Module, loader: asib.InMemoryLoader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    with torch.inference_mode():
        return torch.cat([model.eval()(b.x) for b in batches]), torch.cat([b.y for b in batches])


# ---------------------------------------------------------------- freezing, losses, schedules


def test_freeze_schedule_and_levels() -> None:
    students, teachers = asib.setup_partial_freeze_schedule({**SPEC, "student_freeze_schedule": [-1, 1]}, 2)
    assert students == [-1, 1] and teachers == [0, 0]
    model = asib.create_student_by_name("resnet8", 4)
    asib.apply_freeze_level(model, 0)
    assert asib.count_trainable_parameters(model) == sum(p.numel() for p in model.classifier.parameters())
    asib.apply_freeze_level(model, -1)
    assert asib.count_trainable_parameters(model) == sum(p.numel() for p in model.parameters())


def test_losses_and_schedules() -> None:
    mu, logvar = torch.zeros(3, 5), torch.zeros(3, 5)
    assert asib.ib_loss(mu, logvar, 0.5).item() == pytest.approx(0.0)
    assert asib.ib_loss(torch.ones(3, 5), logvar, 0.5).item() == pytest.approx(0.5 * 0.5 * 5)
    logits = torch.randn(4, 6)
    assert asib.kd_loss_fn(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert asib.kd_loss_fn(logits, -logits, 4.0).item() > 0
    assert asib.get_tau(0, {"tau_start": 4.0, "tau_end": 1.0}, 4) == pytest.approx(4.0)
    assert asib.get_tau(3, {"tau_start": 4.0, "tau_end": 1.0}, 4) == pytest.approx(1.0)
    assert asib.get_beta(0, {"ib_beta": 1e-3, "ib_beta_warmup_epochs": 2}) == pytest.approx(5e-4)
    with pytest.raises(RecipeError, match="tau_end"):
        asib.get_tau(0, {"tau_start": 4.0}, 4)


# ---------------------------------------------------------------- data


def test_prepare_dataset_writes_the_prepared_format(data_dir: Path, tmp_path: Path) -> None:
    info = asib.load_info(data_dir)
    assert info.classes == ("a", "b", "c", "d") and info.image_size == (8, 8)
    assert sum(info.counts.values()) == 96 and info.counts["val"] > 0
    assert asib.make_loader(data_dir, "test", batch_size=8, device="cpu").num_samples == info.counts["test"]

    class ArrayBacked:  # like torchvision's CIFAR: data + targets + classes, no transform
        classes = ["x", "y"]
        transform = None
        data = np.zeros((20, 6, 6, 3), np.uint8)
        targets = [0, 1] * 10

    test = ArrayBacked()
    out = asib.prepare_dataset(ArrayBacked(), tmp_path / "arr", test_dataset=test, val_fraction=0.0)
    assert out.counts == {"train": 20, "val": 0, "test": 20}

    class Nameless:
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(3, 4, 4), 0

    with pytest.raises(DataError, match="no 'classes' list") as err:
        asib.prepare_dataset(Nameless(), tmp_path / "none")
    assert "ClassInfoMixin" in (err.value.hint or "")
    with pytest.raises(DataError, match="already prepared"):
        asib.prepare_dataset(Blobs(), data_dir)


def test_split_loaders_cover_disjoint_classes(data_dir: Path) -> None:
    tasks = asib.get_split_loaders(data_dir, num_tasks=2, batch_size=8, augment=False)
    assert len(tasks) == 2
    seen = []
    for train, val in tasks:
        classes = set(train.labels.tolist())
        assert classes == set(val.labels.tolist())
        seen.append(classes)
        batch = next(iter(train.batches(0)))
        assert batch.x.shape[1:] == (3, 8, 8) and set(batch.y.tolist()) <= classes
    assert seen == [{0, 1}, {2, 3}]
    assert asib.task_classes(100, 10)[3] == list(range(30, 40))  # split CIFAR-100: 10 tasks of 10 classes
    shuffled = asib.task_classes(100, 20, seed=1)
    assert sorted(c for t in shuffled for c in t) == list(range(100)) and all(len(t) == 5 for t in shuffled)
    with pytest.raises(DataError, match="num_tasks"):
        asib.get_split_loaders(data_dir, num_tasks=5, batch_size=8)


# ---------------------------------------------------------------- utilities


def test_accuracy_seed_and_parameter_count() -> None:
    outputs = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    assert asib.compute_accuracy(outputs, torch.tensor([0, 1, 1, 1])) == pytest.approx(75.0)
    asib.set_random_seed(3)
    a = torch.rand(3)
    asib.set_random_seed(3)
    assert torch.equal(a, torch.rand(3))
    assert asib.count_trainable_parameters(torch.nn.Linear(3, 2)) == 8


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_hides_when_not_a_tty() -> None:
    piped = io.StringIO()
    assert list(asib.track(range(5), "work", stream=piped)) == [0, 1, 2, 3, 4]
    assert piped.getvalue() == ""  # nothing at all in a log file or a pipe
    assert not Progress(stream=piped).live
    tty = FakeTTY()
    assert list(asib.track(range(3), "work", stream=tty)) == [0, 1, 2]
    assert "work" in tty.getvalue()


def test_experiment_logger(tmp_path: Path) -> None:
    log = asib.ExperimentLogger(tmp_path / "exp", config={"lr": 0.1})
    log.update_metric("val_top1", 50.0, step=1)
    log.update_metric("val_top1", 60.0, step=2)
    log.update_metric("note", "ok")
    saved = json.loads(log.save_results().read_text())
    assert saved["status"] == "running" and saved["metrics"] == {"val_top1": 60.0, "note": "ok"}
    log.logger.info("hello")
    done = json.loads(log.finalize().read_text())
    assert done["status"] == "finished" and [h["value"] for h in done["history"]["val_top1"]] == [50.0, 60.0]
    assert done["config"] == {"lr": 0.1}
    assert "hello" in (tmp_path / "exp" / "log.txt").read_text()
    logger = asib.get_logger(tmp_path / "exp2", "DEBUG")
    assert asib.get_logger(tmp_path / "exp2") is logger and len(logger.handlers) == 2  # no doubled lines


# ---------------------------------------------------------------- a library user's own loop (the five findings)


class OwnCNN(torch.nn.Module):
    """A user's student: its own ``.features`` attribute (no clash: asib wraps it), logits from ``fc``."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), torch.nn.BatchNorm2d(2 * width),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


KD_SPEC = {"method": "kd", "num_stages": 2, "student_epochs": 1, "batch_size": 16,
           "student_optim": {"name": "sgd", "lr": 0.1}}


def tv_teacher(num_classes: int = 4) -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes)


def test_speed_the_api_trains_in_the_clis_runtime(data_dir: Path) -> None:
    """Finding 1: without a runtime the API computes as ``asib distill`` does (precision, channels_last)."""
    torch.manual_seed(0)
    cli = asib.make_runtime("cpu")  # what distill() builds from a recipe's defaults on this machine
    assert asib.default_runtime("cpu") == cli and isinstance(cli, asib.Runtime)
    student = asib.create_student_by_name("resnet8", 4)
    method = asib.build_method(KD_SPEC, [asib.create_teacher_by_name("resnet8", 4)], student)
    assert asib.Distiller(method, steps_per_epoch=3).runtime == cli
    loader = asib.make_loader(data_dir, "train", batch_size=16, device="cpu", train=True)
    opts = asib.create_optimizers_and_schedulers(method, None, len(loader))
    asib.student_distillation_update(method, loader, opts)  # the epoch helpers too
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == cli.channels_last
    for name in ("Runtime", "make_runtime", "default_runtime", "Distiller"):
        assert name in asib.__all__
    section = README.read_text().split("<!-- api:start -->")[1]
    assert "make_runtime(device" in section and "default_runtime(device)" in section


def test_step_is_one_optimizer_step_without_a_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 2: ``Distiller.step`` is one step of the method, built once; terms stay on the device."""
    torch.manual_seed(0)
    method = asib.build_method(KD_SPEC, [tv_teacher()], OwnCNN())
    distiller = asib.Distiller(method, steps_per_epoch=2)
    opt, sched = distiller.optimizers.student_optimizer, distiller.optimizers.student_scheduler
    assert isinstance(opt, torch.optim.SGD) and distiller.optimizers.teacher_optimizer is None
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    assert distiller.inference is None
    first = distiller.step(x, y, epoch=0)
    assert {"loss", "ce", "kd"} <= set(first) and not first["loss"].requires_grad
    # the first step gave the frozen teacher its precision and layout the way asib distill does
    assert set(distiller.inference) == {"teacher0"} and distiller.inference["teacher0"]["ms"]
    assert distiller.runtime.plans.find(method.teachers[0]) is not None
    before = params(method.student)
    with monkeypatch.context() as m:  # no value is read back to the host inside a step
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, lambda *_a, **_k: pytest.fail("a step read a tensor on the host"))
        terms = distiller.step(x, y, epoch=0)
    assert all(isinstance(v, torch.Tensor) for k, v in terms.items() if k in ("loss", "ce", "kd"))
    assert not torch.equal(params(method.student), before)
    assert sched.last_epoch == 2 and distiller.optimizers.student_optimizer is opt  # one scheduler step per call
    method.student.eval()  # the user validated mid-epoch: the next step trains again
    distiller.step(x, y, epoch=1)
    assert method.student.training and distiller._epoch is not None and distiller._epoch.stage == 1  # placed by plan
    with pytest.raises(RecipeError, match="past the spec's 2 B-epochs"):
        distiller.step(x, y, epoch=2)
    with pytest.raises(RecipeError, match="has B steps, not 'A'"):
        distiller.step(x, y, phase="A")


def test_epoch_helpers_are_built_on_the_step(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 2: ``epoch`` and the old one-epoch helpers go through ``Distiller``'s step; ASIB's A-step too."""
    calls: list[str] = []
    step = asib.Distiller._step

    def counted(self: asib.Distiller, ep: EpochPlan, batch: Batch) -> dict:
        calls.append(ep.phase)
        return step(self, ep, batch)

    monkeypatch.setattr(asib.Distiller, "_step", counted)
    d = make_distiller()
    loader = asib.make_loader(data_dir, "train", batch_size=16, device="cpu", train=True)
    distiller = asib.Distiller(d, steps_per_epoch=len(loader))
    a = distiller.epoch(loader, phase="A", epoch=0)
    b = distiller.epoch([(batch.x, batch.y) for batch in loader.batches(0)], phase="B", epoch=0)
    assert {"syn_ce", "ib_kl"} <= set(a) and {"ce", "kd", "kd_ens"} <= set(b)
    assert calls == ["A"] * len(loader) + ["B"] * len(loader)
    calls.clear()
    asib.student_distillation_update(d, loader, asib.create_optimizers_and_schedulers(d, None, len(loader)))
    assert calls == ["B"] * len(loader)
    assert distiller.step(next(iter(loader)), phase="A", epoch=1)["syn_ce"].ndim == 0  # a Batch; stage 1's A-epoch


def test_any_module_is_a_teacher_or_student() -> None:
    """Finding 3: plain modules are adapted in build_method, keep their tensors, freeze by block, or are refused."""
    torch.manual_seed(0)
    teacher, student = tv_teacher(), OwnCNN()
    mine = {id(p) for p in student.parameters()}
    method = asib.build_method(KD_SPEC, [teacher], student)
    adapted = method.student
    assert isinstance(adapted, asib.FeatureClassifier) and adapted.model is student
    assert {id(p) for p in adapted.parameters()} == mine and adapted.classifier is student.fc
    assert adapted.feature_dim == 16 and adapted.num_classes == 4
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(adapted.eval()(x), student(x)) and adapted.features(x).shape == (3, 16)
    assert [n for n, _ in adapted.named_blocks()] == ["model.features.0+model.features.1",
                                                      "model.features.3+model.features.4"]
    blocks = [n for n, _ in method.teachers[0].named_blocks()]
    assert blocks == ["model.conv1+model.bn1", "model.layer1", "model.layer2", "model.layer3", "model.layer4"]
    asib.apply_freeze_level(adapted, 1)  # the last block and the classifier train
    trainable = {id(p) for p in student.features[3:].parameters()} | {id(p) for p in student.fc.parameters()}
    assert {id(p) for p in student.parameters() if p.requires_grad} == trainable
    adapted.train()
    assert not student.features[1].training and student.features[4].training  # frozen BatchNorm stays in eval
    asib.apply_freeze_level(adapted, -1)

    with pytest.raises(ModelError, match=r"^student: Sequential has no nn.Linear classifier") as err:
        asib.build_method(KD_SPEC, [teacher], torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match=r"teachers\[0\]: ResNet has 10 classes but the student OwnCNN has 4"):
        asib.build_method(KD_SPEC, [tv_teacher(10)], OwnCNN())
    with pytest.raises(ModelError, match=r"fc has 4 outputs, not 10 classes"):
        asib.as_feature_classifier(OwnCNN(), num_classes=10)

    class LogSoftmaxNet(OwnCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(super().forward(x), 1)

    with pytest.raises(ModelError, match="not its classifier fc's output"):
        asib.as_feature_classifier(LogSoftmaxNet()).features(x)


def test_adapted_timm_model_and_ddp_routing(tmp_path: Path) -> None:
    """Finding 3: timm's forward_features/forward_head and group_matcher; adapted models under DDP's route."""
    import timm
    import torch.distributed as tdist

    from asib.engine.distributed import DDPRoute, Dist

    torch.manual_seed(0)
    inner = timm.create_model("resnet10t", num_classes=4)
    model = asib.as_feature_classifier(inner)
    assert model.timm_like and model.classifier is inner.get_classifier()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), inner.eval()(x), atol=1e-5)
    names = [n for n, _ in model.named_blocks()]
    assert names[0].startswith("model.conv1") and names[-1] == "model.layer4" and "fc" not in "".join(names)

    method = asib.build_method(KD_SPEC, [inner], OwnCNN())
    distiller = asib.Distiller(method, steps_per_epoch=2)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distiller.task.routed = route = DDPRoute(method, Dist(), find_unused_parameters=True)
        before = params(method.student)
        terms = distiller.step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
        assert route._ddp is not None and torch.isfinite(terms["loss"])
        assert not torch.equal(params(method.student), before)
    finally:
        tdist.destroy_process_group()


def test_optimizer_spec_expresses_plain_sgd() -> None:
    """Finding 4: nesterov and the norm/bias decay exemption are options; together they give torch's SGD."""
    from asib.engine.optim import build_optimizer

    spec = {**KD_SPEC, "student_optim": {"name": "sgd", "lr": 0.1, "weight_decay": 0.01, "nesterov": False,
                                         "decay_norms_and_biases": True, "schedule": "constant"}}
    torch.manual_seed(0)
    method = asib.build_method(spec, [asib.create_teacher_by_name("resnet8", 4)], OwnCNN())
    opt = asib.create_optimizers_and_schedulers(method, None, 2).student_optimizer
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.param_groups[0]["nesterov"] is False
    default = asib.create_optimizers_and_schedulers(make_distiller(), None, 2).student_optimizer
    assert [g["weight_decay"] for g in default.param_groups] == [5e-4, 0.0]  # AdamW, norms and biases exempt

    ours, theirs = OwnCNN(), OwnCNN()
    theirs.load_state_dict(ours.state_dict())
    plain = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    built = build_optimizer([ours], spec["student_optim"])
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for model, opt in ((ours, built), (theirs, plain)):
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert torch.allclose(params(ours), params(theirs), atol=1e-6)
    nesterov = build_optimizer([OwnCNN()], {"name": "sgd"})
    assert nesterov.param_groups[0]["nesterov"] and len(nesterov.param_groups) == 2


def test_data_in_memory_tensors_without_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 5: tensors, arrays or a dataset into a loader with your mean/std, padding and split; no files."""
    monkeypatch.chdir(tmp_path)
    labels = torch.arange(40) % 4
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = asib.tensor_loader(images, labels, batch_size=16, mean=mean, std=std, pad=2)
    batch = next(iter(loader))
    assert batch.x.shape == (16, 3, 12, 12) and torch.equal(batch.y, labels[:16])
    expected = (images[:16].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(batch.x[:, :, 2:-2, 2:-2], expected, atol=1e-5)

    split = {"val_fraction": 0.25, "split_seed": 3}
    train = asib.tensor_loader(images, labels, batch_size=8, train=True, augment={"crop_padding": 2}, **split)
    val = asib.tensor_loader(images, labels, batch_size=64, split="val", **split)
    assert (train.num_images, val.num_images) == (30, 10)
    assert all(c in (2, 3) for c in torch.bincount(val.labels, minlength=4).tolist())  # stratified
    seen = {bytes(im.numpy()) for im in images}
    val_images = {bytes(im.numpy()) for im in val.images}  # type: ignore[union-attr]
    assert len(val_images) == 10 and val_images <= seen
    plain_train = asib.tensor_loader(images, labels, batch_size=8, **split)  # the same part, unaugmented
    train_images = {bytes(im.numpy()) for im in plain_train.images}  # type: ignore[union-attr]
    assert not train_images & val_images and len(train_images | val_images) == 40  # disjoint, all of them
    assert torch.equal(train._inv, val._inv) and torch.equal(train._bias, val._bias)  # the train part's mean/std
    assert len(train) == 3 and next(train.batches(0)).x.shape == (8, 3, 8, 8)

    hwc = images.permute(0, 2, 3, 1).numpy()  # as torchvision datasets hold them
    from_array = asib.tensor_loader(hwc, labels.numpy(), batch_size=40, mean=mean, std=std)
    assert torch.equal(next(iter(from_array)).x, next(iter(asib.tensor_loader(images, labels, batch_size=40,
                                                                               mean=mean, std=std))).x)
    from_dataset = asib.tensor_loader(Blobs(24), batch_size=8, num_classes=4)
    assert from_dataset.num_images == 24 and next(iter(from_dataset)).x.shape == (8, 3, 8, 8)
    floats = asib.tensor_loader(images.float() / 255, labels, batch_size=8, mean=mean, std=std)
    assert torch.allclose(next(iter(floats)).x, next(iter(loader)).x[:8, :, 2:-2, 2:-2], atol=1e-5)
    assert list(tmp_path.iterdir()) == []  # nothing was written

    with pytest.raises(DataError, match="split='val' needs a val_fraction"):
        asib.tensor_loader(images, labels, batch_size=8, split="val")
    with pytest.raises(DataError, match="0..1 scale"):
        asib.tensor_loader(images.float(), labels, batch_size=8)
    with pytest.raises(DataError, match="both mean and std"):
        asib.tensor_loader(images, labels, batch_size=8, mean=mean)


def test_data_split_and_padding_choices_are_explicit(data_dir: Path, tmp_path: Path) -> None:
    """Finding 5: prepare_dataset holds nothing out silently, pads on request; make_loader takes mean/std/pad."""
    with pytest.raises(DataError, match="no test_dataset, and no test_fraction") as err:
        asib.prepare_dataset(Blobs(), tmp_path / "a")
    assert "test_fraction=0" in (err.value.hint or "")
    info = asib.prepare_dataset(Blobs(), tmp_path / "b", test_fraction=0, val_fraction=0, pad=2)
    assert info.counts == {"train": 96, "val": 0, "test": 0} and info.image_size == (12, 12)
    with pytest.raises(DataError, match="not both"):
        asib.prepare_dataset(Blobs(), tmp_path / "c", test_dataset=Blobs(8), test_fraction=0.2)

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    loader = asib.make_loader(data_dir, "val", batch_size=64, device="cpu", mean=mean, std=std, pad=1)
    batch = next(iter(loader))
    assert batch.x.shape[-2:] == (10, 10)
    assert torch.allclose(batch.x[:, :, 0, 0], torch.full_like(batch.x[:, :, 0, 0], -2.0))  # a padded zero pixel


# ---------------------------------------------------------------- the README example


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The API section's blocks, run in order in one namespace: a torchvision teacher, the user's
    own CNN, in-memory tensors and the per-step call; then ASIB's stages through the loop."""
    text = README.read_text()
    section = text[text.index("<!-- api:start -->"): text.index("<!-- api:end -->")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    assert "torchvision.models.resnet18(num_classes=10)" in blocks[0] and "distiller.step(" in blocks[0]
    namespace = {"__name__": "readme_example"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md (api example {i + 1})", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"epoch 1: loss \d+\.\d+, kd \d+\.\d+", out) and re.search(r"^student val top-1 \d+\.\d%", out, re.M)
    assert re.search(r"ASIB student val top-1 \d+\.\d%", out)
    assert str(asib.make_runtime("cpu")) in out  # the example's Distiller runs in the CLI's runtime
