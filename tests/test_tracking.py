"""During a run: the progress display (one bar and ETA for the whole run), train.log, metrics.csv,
the epoch's time in metrics.jsonl, TensorBoard and wandb trackers, and the versions in summary.json.
Fake tasks on the real loop and run folder: no model, a second or two each."""

from __future__ import annotations

import csv
import io
import json
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from asib.data import Batch
from asib.engine.loop import TIMING_KEYS, EpochPlan, LoopConfig, run_plan, without_timings
from asib.engine.progress import Progress
from asib.engine.runfolder import RunFolder
from asib.engine.tracking import check_tracking, csv_text, environment, scalars, wandb_mode
from asib.errors import AsibError, Interrupted

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ")


class ToyTask:
    """Three epochs (A, B, B over two stages) of four steps; the terms depend on epoch and step only."""

    def plan(self) -> list[EpochPlan]:
        return [EpochPlan(0, "A", 0, 0, 0), EpochPlan(1, "B", 0, 0, 0), EpochPlan(2, "B", 1, 1, 0)]

    def steps(self, ep: EpochPlan) -> int:
        return 4

    def batches(self, ep: EpochPlan, start: int = 0) -> Iterator[Batch]:
        for i in range(start, 4):
            yield Batch(torch.full((2, 1), float(i)), torch.zeros(2, dtype=torch.long))

    def begin_epoch(self, ep: EpochPlan) -> None:
        pass

    def step(self, ep: EpochPlan, batch: Batch) -> dict[str, Any]:
        value = torch.tensor(1.0 + ep.index + float(batch.x[0, 0]) / 10)
        return {"loss": value, "ce": value / 2} if ep.phase == "B" else {"loss": value, "syn_ce": value * 2}

    def end_epoch(self, ep: EpochPlan, record: dict[str, Any]) -> dict[str, Any]:
        return {"lr": 0.1 / (ep.index + 1), "student_val_top1": 50.0 + ep.index} if ep.phase == "B" else {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def started(path: Path, resume: bool = False) -> RunFolder:
    folder = RunFolder(path, ())
    folder.start("x: 1\n", force=False, resume=resume)
    return folder


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- metrics.jsonl, metrics.csv, train.log


def test_records_csv_and_train_log(tmp_path: Path) -> None:
    folder = started(tmp_path / "run")
    sink = []
    progress = Progress(enabled=False)
    progress.sink = sink.append  # restored after the run
    result = run_plan(ToyTask(), folder, progress, torch.device("cpu"), summary_keys=["epoch", "phase", "loss"])
    folder.finish()
    assert progress.sink == sink.append and not sink  # the loop's lines went to train.log, quiet or not

    records = jsonl(folder.metrics_path)
    assert records == result.records and [r["phase"] for r in records] == ["A", "B", "B"]
    assert all(isinstance(r["seconds"], float) and r["seconds"] >= 0 for r in records)  # the epoch's time
    assert TIMING_KEYS == {"seconds"} and "seconds" not in without_timings(records[0])

    rows = list(csv.DictReader(io.StringIO((folder.path / "metrics.csv").read_text())))
    assert len(rows) == 3  # one row per epoch, A and B epochs in one table
    header = list(rows[0])
    assert header[:3] == ["epoch", "phase", "stage"] and header[-1] == "seconds"
    assert set(header) == {k for r in records for k in r}
    assert rows[0]["syn_ce"] != "" and rows[0]["ce"] == "" and rows[1]["ce"] != "" and rows[1]["syn_ce"] == ""
    assert float(rows[2]["student_val_top1"]) == records[2]["student_val_top1"]

    log = (folder.path / "train.log").read_text().splitlines()
    assert all(STAMP.match(line) for line in log)
    assert "run started" in log[0]
    epoch_lines = [line for line in log if "epoch=" in line]
    assert len(epoch_lines) == 3 and "phase=A" in epoch_lines[0] and "s" in epoch_lines[0].rsplit("(", 1)[1]


def test_resume_appends_train_log_and_rebuilds_csv(tmp_path: Path) -> None:
    folder = started(tmp_path / "run")
    with pytest.raises(Interrupted):
        run_plan(ToyTask(), folder, Progress(enabled=False), torch.device("cpu"), config=LoopConfig(stop_after_steps=6))
    folder.release()
    # a crash after the save may have written a record the train state does not know of
    with (folder.metrics_path).open("a") as fh:
        fh.write(json.dumps({"epoch": 99, "phase": "B", "stage": 9, "loss": 0.0}) + "\n")
    folder = started(tmp_path / "run", resume=True)
    result = run_plan(ToyTask(), folder, Progress(enabled=False), torch.device("cpu"), resume=True)
    folder.finish()
    assert [r["epoch"] for r in jsonl(folder.metrics_path)] == [1, 2, 3]
    rows = list(csv.DictReader(io.StringIO((folder.path / "metrics.csv").read_text())))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    log = (folder.path / "train.log").read_text()
    assert log.count("run started") == 1 and log.count("resuming at epoch 2/3, step 2") == 1
    assert log.count("epoch=") == 3  # one line per epoch over both processes

    reference = started(tmp_path / "ref")
    plain = run_plan(ToyTask(), reference, Progress(enabled=False), torch.device("cpu"))
    reference.finish()
    assert [without_timings(r) for r in result.records] == [without_timings(r) for r in plain.records]


def test_csv_text_of_changing_columns() -> None:
    text = csv_text([{"epoch": 1, "phase": "A", "stage": 1, "a": 1.5, "seconds": 2.0},
                     {"epoch": 2, "phase": "B", "stage": 1, "b": 3, "gates": [True, False], "seconds": 1.0}])
    assert text.splitlines() == ["epoch,phase,stage,a,b,gates,seconds", "1,A,1,1.5,,,2.0",
                                 '2,B,1,,3,"[true, false]",1.0']


# ---------------------------------------------------------------- the progress display


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_run_eta_over_every_plan() -> None:
    progress = Progress(enabled=True, stream=io.StringIO())
    progress.expect([10, 10, 10])  # three teachers, estimated
    progress.begin_plan(12, label="teacher a")  # the exact count replaces the estimate
    assert (progress._total, progress._done) == (32, 0)
    assert progress.eta() is None and progress.eta_text() == ""
    progress.start("epoch 1/1", 12)
    progress.advance(12)
    progress.end_plan()
    progress.skip_plan()  # the second teacher had finished before
    assert (progress._total, progress._done) == (22, 12)
    eta = progress.eta()
    assert eta is not None and eta >= 0 and progress.eta_text().startswith("run ETA ")
    progress.begin_plan(10, done=4, label="teacher c")  # resumed: 4 steps done before
    assert (progress._total, progress._done) == (22, 16)


def test_plain_lines_when_piped_and_quiet_keeps_the_sink() -> None:
    piped = io.StringIO()
    progress = Progress(enabled=True, stream=piped)
    assert not progress.live
    progress.status("loading teachers")  # a terminal's business only
    progress.begin_plan(4)
    progress.start("epoch 1/1", 4)
    progress.advance(4)
    progress.stop()
    progress.line("epoch=1 loss=1")
    progress.end_plan()
    assert piped.getvalue() == "epoch=1 loss=1\n"

    quiet, kept = io.StringIO(), []
    progress = Progress(enabled=False, stream=quiet)
    progress.sink = kept.append
    progress.line("epoch=1 loss=1")
    assert quiet.getvalue() == "" and kept == ["epoch=1 loss=1"]


def test_terminal_shows_the_run_row_with_its_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    screen = Terminal()
    progress = Progress(enabled=True, stream=screen)
    assert progress.live
    progress.status("loading 2 teachers")
    progress.expect([8])
    progress.begin_plan(8, label="distill (asib)")
    progress.start("stage 1 B-step 1/2", 4)
    progress.advance(4)
    progress._bar.refresh()
    progress.stop()
    shown = screen.getvalue()
    progress.close()
    assert "loading 2 teachers" in shown and "distill (asib)" in shown
    assert "4/8 steps" in shown and "ETA" in shown and "stage 1 B-step 1/2" in shown
    assert progress._bar is None


# ---------------------------------------------------------------- trackers


def test_missing_tracker_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(AsibError) as info:
            check_tracking([name])
        assert info.value.message == f"tracking: {name} needs the {name} package, which is not installed"
        assert f"pip install 'asib[{name}]'" in info.value.hint
    check_tracking([])


def test_scalar_tags_keep_phases_apart() -> None:
    step, a = scalars({"epoch": 1, "phase": "A", "stage": 1, "loss": 2.0, "synergy_val_top1": 40.0,
                       "lr_teacher_side": 0.1, "seconds": 1.5, "gate_open": True})
    assert step == 1
    assert a == {"train_A-step/loss": 2.0, "val/synergy_val_top1": 40.0, "lr/lr_teacher_side": 0.1,
                 "time/epoch_seconds": 1.5}
    _, b = scalars({"epoch": 2, "phase": "B", "stage": 1, "loss": 1.0, "student_val_loss": 0.5})
    assert b == {"train_B-step/loss": 1.0, "val/student_val_loss": 0.5}
    _, t = scalars({"epoch": 3, "phase": "train", "stage": 1, "loss": 1.0, "val_loss": 0.7, "val_top1": 9.0})
    assert t == {"train/loss": 1.0, "val/val_loss": 0.7, "val/val_top1": 9.0}


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_record(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    folder = started(tmp_path / "run")
    folder.open_tracking(["tensorboard"], resume=False, name="toy", config={})
    with pytest.raises(Interrupted):
        run_plan(ToyTask(), folder, Progress(enabled=False), torch.device("cpu"), config=LoopConfig(stop_after_steps=6))
    folder.release()
    folder = started(tmp_path / "run", resume=True)
    folder.open_tracking(["tensorboard"], resume=True, name="toy", config={})
    result = run_plan(ToyTask(), folder, Progress(enabled=False), torch.device("cpu"), resume=True)
    folder.finish()

    found = _tensorboard_scalars(folder.path / "tensorboard")
    for record in result.records:
        step, values = scalars(record)
        for tag, value in values.items():
            assert (step, pytest.approx(value)) in found[tag], tag
    assert [s for s, _ in found["train_B-step/loss"]] == [2, 3]  # once each, across the resume
    assert [s for s, _ in found["train_A-step/loss"]] == [1]
    assert "train_A-step/syn_ce" in found and "val/student_val_top1" in found

    again = started(tmp_path / "run", resume=False)  # --force: a new run starts new event files
    again.open_tracking(["tensorboard"], resume=False, name="toy", config={})
    again.log({"epoch": 1, "phase": "train", "stage": 1, "loss": 9.0})
    again.finish()
    assert _tensorboard_scalars(folder.path / "tensorboard") == {"train/loss": [(1, 9.0)]}


def _wandb_history(path: Path) -> list[dict[str, Any]]:
    """The history records of an offline .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, out = path.read_bytes(), 7, b"", []  # a 7-byte W&B header first
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        chunk += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # a full record, or the last part of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return out


def test_wandb_offline_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None  # the user's choice is wandb's to read
    monkeypatch.delenv("WANDB_MODE")

    folder = started(tmp_path / "run")
    notes: list[str] = []
    folder.open_tracking(["wandb"], resume=False, name="toy", config={"seed": 0}, note=notes.append)
    result = run_plan(ToyTask(), folder, Progress(enabled=False), torch.device("cpu"))
    folder.finish()
    assert notes and "offline" in notes[0] and "wandb sync" in notes[0]
    run_id = (folder.path / "wandb_run_id").read_text().strip()
    files = list((folder.path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    history = _wandb_history(files[0])
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, record in zip(history, result.records, strict=True):
        _, values = scalars(record)
        assert {k: h[k] for k in values} == pytest.approx(values)


def test_environment_names_versions_and_device() -> None:
    env = environment("cpu")
    assert set(env["versions"]) == {"asib", "torch"} and env["versions"]["torch"] == torch.__version__
    assert env["device"]["type"] == "cpu" and env["device"]["name"]
