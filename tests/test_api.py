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
from asib.errors import DataError, RecipeError
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
    asib.prepare_dataset(Blobs(), out, val_fraction=0.25)
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


# ---------------------------------------------------------------- the README example


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = README.read_text()
    section = text[text.index("<!-- api:start -->"): text.index("<!-- api:end -->")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md (api example)", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "A-step syn_ce" in out and re.search(r"student val top-1 \d+\.\d%", out)
