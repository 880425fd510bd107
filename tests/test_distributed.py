"""Data-parallel runs: two CPU processes (gloo) match one process with the same global batch.

The workers go through the torchrun code path: RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous address in the environment, then the plain engine entry points.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from asib.cli import app
from asib.engine.checkpoint import save_model
from asib.engine.distributed import Dist, convert_sync_bn, init_distributed
from asib.engine.loop import TIMING_KEYS, LoopConfig, MetricSums
from asib.engine.progress import Progress
from asib.engine.runfolder import read_metrics
from asib.errors import Interrupted, RecipeError
from asib.models import create_model, register_model, zoo
from asib.models.cifar import CifarNet
from asib.pipeline.distill import distill
from asib.pipeline.finetune import finetune_teacher
from asib.recipe import Recipe

WORLD = 2
NO_AUG = {"crop_padding": 0, "hflip": False}


class TinyNoBN(CifarNet):
    """Two convolutions without BatchNorm or dropout: per-sample losses, so sharding the batch is exact."""

    block_names = ("stem", "layer1")

    def __init__(self, num_classes: int, drop_rate: float = 0.0, arch: str = "ddp_tiny") -> None:
        super().__init__(arch, num_classes)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self._finish(16, drop_rate)


@contextmanager
def tiny_model_registered() -> Iterator[None]:
    """The BN-free test model in the zoo for the duration (other tests list the zoo)."""
    register_model("ddp_tiny", feature_dim=16)(TinyNoBN)
    try:
        yield
    finally:
        zoo.ZOO.pop("ddp_tiny")


def make_recipe(root: Path, name: str) -> dict[str, Any]:
    teacher = {"arch": "ddp_tiny", "train": {"epochs": 1, "batch_size": 16, "augment": NO_AUG,
                                             "label_smoothing": 0.0}}
    return {
        "name": name,
        "out_dir": str(root / name),
        "device": "cpu",
        "deterministic": True,
        "data": {"source": "digits", "dir": str(root / "data"), "train_subset": 160, "val_fraction": 0.2,
                 "image_size": 12},
        "teachers": [
            {**teacher, "name": "t1", "checkpoint": str(root / f"{name}_t1.safetensors")},
            {**teacher, "name": "t2", "checkpoint": str(root / "fixed_t2.safetensors")},
        ],
        "student": {"arch": "ddp_tiny"},
        "distill": {
            "num_stages": 1, "student_epochs": 1, "teacher_adapt_epochs": 1, "batch_size": 16, "augment": NO_AUG,
            # Deterministic fusion (no IB noise, no dropout) and per-sample-mean losses only (KL
            # KD: DIST's intra-class relation spans the batch each process sees, docs/distributed.md).
            "ib": False, "synergy_target": "mu", "disagreement": "none", "kd_loss": "kl",
            "ib_mbm": {"dim": 16, "heads": 2, "dropout": 0.0, "head_dropout": 0.0},
        },
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, finetune_recipe: dict, distill_recipe: dict, pids: str) -> None:
    """One torchrun rank: fine-tune a teacher for one epoch (also stopped after 3 steps and
    resumed), then one distill stage."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    Path(pids, f"rank{rank}.pid").write_text(str(os.getpid()))
    quiet = Progress(enabled=False)
    with tiny_model_registered():
        ft = Recipe.model_validate(finetune_recipe)
        finetune_teacher(ft, ft.teachers[0], progress=quiet)
        stopped = Recipe.model_validate({**finetune_recipe, "out_dir": finetune_recipe["out_dir"] + "_resumed"})
        with pytest.raises(Interrupted):
            finetune_teacher(stopped, stopped.teachers[0], progress=quiet, loop=LoopConfig(stop_after_steps=3))
        finetune_teacher(stopped, stopped.teachers[0], progress=quiet, resume=True)
        distill(Recipe.model_validate(distill_recipe), progress=quiet)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process reference and a two-process run of the same recipe."""
    root = tmp_path_factory.mktemp("ddp")
    ref = make_recipe(root, "ref")
    path = root / "ref.yaml"
    path.write_text(yaml.safe_dump(ref))
    result = CliRunner().invoke(app, ["prepare-data", str(path)])
    assert result.exit_code == 0, result.output
    with tiny_model_registered():
        torch.manual_seed(0)
        save_model(root / "fixed_t2.safetensors", create_model("ddp_tiny", 10), "teacher")
        recipe = Recipe.model_validate(ref)
        finetune_teacher(recipe, recipe.teachers[0], progress=Progress(enabled=False))
        distill(recipe, progress=Progress(enabled=False))

    dist_ft = make_recipe(root, "ddp")
    dist_kd = {**make_recipe(root, "ddp_kd"), "teachers": ref["teachers"]}  # the reference's teachers
    (root / "pids").mkdir()
    torch.multiprocessing.spawn(_worker, args=(WORLD, _free_port(), dist_ft, dist_kd, str(root / "pids")),
                                nprocs=WORLD, join=True)
    return root


def assert_same_records(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key, va in ra.items():
            if key in TIMING_KEYS:  # the epoch's wall-clock time
                continue
            if isinstance(va, float):
                assert va == pytest.approx(rb[key], abs=tol), (key, ra, rb)
            else:
                assert va == rb[key], key


def test_finetune_two_ranks_match_one_process(runs: Path) -> None:
    ref, ddp = runs / "ref" / "teachers" / "t1", runs / "ddp" / "teachers" / "t1"
    assert_same_records(read_metrics(ref / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl"))
    resumed = runs / "ddp_resumed" / "teachers" / "t1" / "metrics.jsonl"  # stopped mid-epoch, resumed
    assert_same_records(read_metrics(ref / "metrics.jsonl"), read_metrics(resumed))
    assert (runs / "ddp_t1.safetensors").exists()
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["epochs"] == 1


def test_distill_two_ranks_match_one_process(runs: Path) -> None:
    ref, ddp = read_metrics(runs / "ref" / "metrics.jsonl"), read_metrics(runs / "ddp_kd" / "metrics.jsonl")
    assert [r["phase"] for r in ddp] == ["A", "B"]
    assert_same_records(ref, ddp)
    assert json.loads((runs / "ddp_kd" / "summary.json").read_text())["method"] == "asib"


def test_rank_zero_alone_writes(runs: Path) -> None:
    pairs = ((runs / "ref" / "teachers" / "t1", runs / "ddp" / "teachers" / "t1"), (runs / "ref", runs / "ddp_kd"))
    for ref, ddp in pairs:
        assert not (ddp / ".lock").exists()  # rank 0 alone locked the folder, and let it go at the end
        assert {p.name for p in ddp.iterdir()} == {p.name for p in ref.iterdir()} - {"teachers"}
        assert not (ddp / "train_state.safetensors").exists()


def test_batch_must_divide_by_world_size() -> None:
    with pytest.raises(RecipeError, match="does not divide by the world size 3"):
        Dist(world_size=3).per_rank_batch(16, "distill.batch_size")
    assert Dist(world_size=4).per_rank_batch(16, "distill.batch_size") == 4


def test_sync_bn_on_cpu_is_one_clear_error() -> None:
    with pytest.raises(RecipeError, match="sync_bn: SyncBatchNorm needs CUDA"):
        convert_sync_bn(nn.BatchNorm2d(4), Dist(world_size=2), enabled=True)
    assert isinstance(convert_sync_bn(nn.BatchNorm2d(4), Dist(), enabled=True), nn.BatchNorm2d)


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = init_distributed("cpu")
    assert (dist.rank, dist.world_size, dist.is_main, dist.enabled) == (0, 1, True, False)
    sums = MetricSums(dist)
    sums.add({"loss": torch.tensor(2.0), "tau": 4.0}, 8, 0)
    assert sums.read() == ({"tau": 4.0, "loss": 2.0}, {})
