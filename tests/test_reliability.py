"""Reliability: resume after SIGKILL, clean stops on SIGINT, atomic writes, the NaN guard,
pre-flight checks, no pickle, and bit-for-bit repeatable CPU runs."""

from __future__ import annotations

import ast
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from asib.cli import app
from asib.data import Batch
from asib.engine.checkpoint import load_tensors, read_info, save_model
from asib.engine.loop import TIMING_KEYS, EpochPlan, LoopConfig, MetricSums, run_plan, without_timings
from asib.engine.progress import Progress
from asib.engine.runfolder import RunFolder
from asib.errors import CheckpointError, RunError, WriteError
from asib.models import create_model

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def resume_recipe(root: Path, name: str) -> dict:
    """A deterministic asib run of about 100 steps: long enough to be killed in the middle."""
    return {
        "name": name,
        "out_dir": str(root / name),
        "device": "cpu",
        "deterministic": True,
        "data": {"source": "digits", "dir": str(root / "data"), "train_subset": 400, "val_fraction": 0.2,
                 "image_size": 12},
        "teachers": [
            {"name": "t1", "arch": "resnet8", "checkpoint": str(root / "t1.safetensors")},
            {"name": "t2", "arch": "wrn_16_1", "checkpoint": str(root / "t2.safetensors")},
        ],
        "student": {"arch": "resnet8"},
        "distill": {
            "num_stages": 2, "student_epochs": 3, "teacher_adapt_epochs": 1, "batch_size": 16,
            "ib_mbm": {"dim": 16, "heads": 2}, "disagreement": "any_wrong",
            "student_optim": {"name": "adamw", "lr": 3e-3},
        },
    }


@pytest.fixture(scope="module")
def resume_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(resume_recipe(root, "reference")))
    assert runner.invoke(app, ["prepare-data", str(recipe)]).exit_code == 0
    torch.manual_seed(0)
    for name, arch in (("t1", "resnet8"), ("t2", "wrn_16_1")):
        save_model(root / f"{name}.safetensors", create_model(arch, 10), "teacher")
    return root


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "asib", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def start(*args: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "asib", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for_save(state: Path, before: int | None, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until the run writes a train state newer than ``before`` (or ends)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if state.exists() and state.stat().st_mtime_ns != before:
            return
        assert time.monotonic() < deadline, f"{state} was not written"
        time.sleep(0.02)


def mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def metrics_without_timings(run: Path) -> list[dict]:
    """metrics.jsonl less its wall-clock fields (``TIMING_KEYS``: each epoch's ``seconds``), the
    only part two runs of a deterministic recipe may differ in."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(set(TIMING_KEYS) <= set(r) for r in records)  # every epoch is timed
    return [without_timings(r) for r in records]


def comparable(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("seconds")
    return {
        "summary": summary,
        "metrics": metrics_without_timings(run),
        "student": load_tensors(run / "student.safetensors"),
        "synergy": load_tensors(run / "synergy.safetensors"),
    }


def assert_same_run(a: Path, b: Path) -> None:
    x, y = comparable(a), comparable(b)
    assert x["summary"] == y["summary"]
    assert x["metrics"] == y["metrics"]
    for key in ("student", "synergy"):
        assert x[key].keys() == y[key].keys()
        assert all(torch.equal(x[key][k], y[key][k]) for k in x[key]), key


def write(root: Path, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(resume_recipe(root, name)))
    return path


@pytest.fixture(scope="module")
def reference(resume_world: Path) -> Path:
    """An uninterrupted run, and a second one that must write identical metrics."""
    root = resume_world
    for name in ("reference", "again"):
        r = cli("distill", write(root, name), "-q")
        assert r.returncode == 0, r.stderr
    return root / "reference"


def test_same_recipe_twice_gives_identical_files(reference: Path) -> None:
    """Identical metrics.jsonl but for the epochs' wall-clock ``seconds``, identical weights."""
    again = reference.parent / "again"
    assert metrics_without_timings(reference) == metrics_without_timings(again)
    assert [json.dumps(r) for r in metrics_without_timings(reference)] == [
        json.dumps(r) for r in metrics_without_timings(again)]  # the same keys in the same order too
    assert_same_run(reference, again)


def test_sigkill_three_times_then_resume_equals_uninterrupted(reference: Path) -> None:
    root = reference.parent
    recipe = write(root, "killed")
    state = root / "killed" / "train_state.safetensors"
    rng = random.Random(7)
    kills = 0
    args: tuple = ("distill", recipe, "-q", "--save-every", "3")
    while True:
        proc = start(*args)
        wait_for_save(state, mtime(state), proc)  # this process has trained and saved at least once
        if kills < 3:
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None and kills < 3:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            args = ("distill", recipe, "-q", "--save-every", "3", "--resume")
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        break
    assert kills == 3, "the run ended before it could be killed three times"
    assert not state.exists()
    assert_same_run(reference, root / "killed")


def test_sigint_saves_and_resumes(reference: Path) -> None:
    root = reference.parent
    recipe = write(root, "interrupted")
    state = root / "interrupted" / "train_state.safetensors"
    proc = start("distill", recipe, "-q", "--save-every", "2")
    wait_for_save(state, None, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "--resume" in err and "Traceback" not in err
    assert state.exists()
    r = cli("distill", recipe, "-q", "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_run(reference, root / "interrupted")


def test_resume_refuses_a_changed_recipe(resume_world: Path) -> None:
    root = resume_world
    recipe = write(root, "changed")
    state = root / "changed" / "train_state.safetensors"
    proc = start("distill", recipe, "-q", "--save-every", "2")
    wait_for_save(state, None, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    r = cli("distill", recipe, "-q", "--resume", "--set", "distill.tau=1")
    assert r.returncode == 1 and "differs from the one the run started with" in r.stderr


def test_crash_during_checkpoint_write_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    model = create_model("resnet8", 10)
    path = save_model(tmp_path / "m.safetensors", model, "student")
    good = load_tensors(path)
    real = safetensors.torch.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:  # a partial file, then the "crash"
            fh.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(WriteError, match="No space left on device"):
        save_model(path, model, "student")
    after = load_tensors(path)
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_truncated_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m.safetensors", create_model("resnet8", 10), "teacher")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_tensors(path)
    (tmp_path / "h.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_info(tmp_path / "h.safetensors")
    r = runner.invoke(app, ["evaluate", str(path), "--data", str(tmp_path)])
    assert r.exit_code == 1 and "Traceback" not in r.output


class _NaNAt:
    """A task whose loss and its term 'ce' turn NaN at a given step of its second epoch."""

    def __init__(self, bad_step: int) -> None:
        self.bad_step = bad_step
        self.w = torch.nn.Parameter(torch.ones(()))

    def plan(self) -> list[EpochPlan]:
        return [EpochPlan(i, "train", 0, i, i) for i in range(3)]

    def steps(self, ep: EpochPlan) -> int:
        return 5

    def batches(self, ep: EpochPlan, start: int = 0):
        for _ in range(start, 5):
            yield Batch(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))

    def begin_epoch(self, ep: EpochPlan) -> None:
        self.epoch = ep.index
        self.count = 0

    def step(self, ep: EpochPlan, batch: Batch) -> dict:
        bad = self.epoch == 1 and self.count == self.bad_step
        self.count += 1
        value = torch.tensor(float("nan")) if bad else self.w.detach() * 2
        return {"loss": value * 0.5, "ce": value, "beta": 0.1}  # 'loss' first: the guard names its term

    def end_epoch(self, ep: EpochPlan, record: dict) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"w": self.w.detach()}

    def load_state_dict(self, state: dict) -> None:
        self.w.data.copy_(state["w"])


def test_nan_guard_names_step_and_term(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run", ())
    folder.start("x: 1\n", force=False, resume=False)
    with pytest.raises(RunError, match=r"loss term 'ce' is not finite at step 3 of epoch 2"):
        run_plan(_NaNAt(3), folder, Progress(enabled=False), torch.device("cpu"))
    lines = folder.metrics_path.read_text().splitlines()
    assert len(lines) == 1  # the good first epoch stays logged; the bad one is not
    assert folder.state_path.exists()  # the last good train state stays


def test_metric_sums_terms_that_come_and_go() -> None:
    sums = MetricSums()
    nan, inf = float("nan"), float("inf")
    steps = [
        {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "lr": 0.1},
        {"b": torch.tensor(nan), "c": torch.tensor(3.0, dtype=torch.bfloat16)},  # new term, other order
        {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(1.0)},
        {"a": torch.tensor(inf), "b": torch.tensor(nan), "c": torch.tensor(1.0)},  # b stays first bad at 1
    ]
    for i, terms in enumerate(steps):
        sums.add(terms, 2, i)
    expect_bad = {"a": 3, "b": 1}
    means, bad = sums.read()
    assert bad == expect_bad and means["lr"] == pytest.approx(0.025) and means["c"] == pytest.approx(1.25)
    again = MetricSums()
    again.load_state_dict(sums.state_dict(), torch.device("cpu"))
    again.add({"a": torch.tensor(0.0), "c": torch.tensor(3.0)}, 2, 4)
    means, bad = again.read()
    assert bad == expect_bad and means["c"] == pytest.approx(16 / 10) and sums.count + 2 == again.count


def test_stop_after_steps_then_resume_matches(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run", ())
    folder.start("x: 1\n", force=False, resume=False)
    from asib.errors import Interrupted

    with pytest.raises(Interrupted):
        run_plan(_NaNAt(99), folder, Progress(enabled=False), torch.device("cpu"), config=LoopConfig(stop_after_steps=7))
    result = run_plan(_NaNAt(99), folder, Progress(enabled=False), torch.device("cpu"), resume=True)
    assert [r["epoch"] for r in result.records] == [1, 2, 3]
    assert all(r["ce"] == 2.0 and r["beta"] == pytest.approx(0.1) for r in result.records)


def test_no_pickle_and_safe_torch_load_in_package() -> None:
    """torch.load only with weights_only=True; pickle only in the restricted CIFAR reader
    (elsewhere at most its exception class, to turn a refused file into a clear line)."""
    offenders = []
    for path in sorted((ROOT / "asib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if getattr(node.func.value, "id", None) == "torch" and node.func.attr == "load":
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "pickle":
                if path.relative_to(ROOT).as_posix() != "asib/data/sources/cifar.py" and node.attr not in {"UnpicklingError", "PickleError"}:
                    offenders.append(f"{path}:{node.lineno} pickle.{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in {"dill", "cloudpickle", "joblib", "shelve"} for n in names):
                    offenders.append(f"{path}:{node.lineno} imports a pickle-based module")
                if isinstance(node, ast.ImportFrom) and node.module == "pickle" and path.relative_to(ROOT).as_posix() != "asib/data/sources/cifar.py":
                    offenders.append(f"{path}:{node.lineno} from pickle import ...")
    assert offenders == []


def test_second_process_on_a_run_folder_is_refused(tmp_path: Path) -> None:
    first = RunFolder(tmp_path / "run", ())
    first.start("x: 1\n", force=False, resume=False)
    code = (
        "import sys; from asib.engine.runfolder import RunFolder; from asib.errors import RunError\n"
        f"f = RunFolder({str(tmp_path / 'run')!r}, ())\n"
        "try:\n    f.lock()\nexcept RunError as e:\n    print(e.message); sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 3 and f"pid {os.getpid()}" in out.stdout
