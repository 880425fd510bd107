"""Experiment tracking of a run's epoch records: ``metrics.csv`` always (one row per epoch, like
timm's summary.csv), TensorBoard event files (``tracking: [tensorboard]``, through
``torch.utils.tensorboard``) and Weights & Biases (``tracking: [wandb]``; offline when no API key
is set up). The run folder hands every record of metrics.jsonl to each tracker once.

The tracker packages are extras (``pip install 'asib[tensorboard]'``, ``'asib[wandb]'``):
``check_tracking`` turns a missing one into one error line before any work, and each tracker
imports its package only when it opens.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import netrc
import os
import platform
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from asib.engine.io import atomic_write_text
from asib.errors import AsibError

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
# The first and last columns of metrics.csv; the others are in order of first appearance.
CSV_FIRST = ("epoch", "phase", "stage")
CSV_LAST = ("seconds",)
# tracker name -> (the module that must import, the extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
_PHASE_GROUP = {"train": "train", "A": "train_A-step", "B": "train_B-step"}


class Tracker(Protocol):
    """What the run folder calls: ``log`` once per epoch record, ``close`` at the end of the run."""

    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def check_tracking(names: Iterable[str]) -> None:
    """Every tracker the recipe names can be imported; otherwise one line naming the extra."""
    for name in dict.fromkeys(names):
        module, extra = PACKAGES[name]
        if not _importable(module):
            raise AsibError(
                f"tracking: {name} needs the {module} package, which is not installed",
                hint=f"pip install 'asib[{extra}]', or remove {name} from the recipe's tracking list",
            )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or without a spec
        return False


# ---------------------------------------------------------------- metrics.csv


def csv_text(records: Sequence[dict[str, Any]]) -> str:
    """One row per record; the columns are every key of any record (empty where a record lacks it),
    so A-step and B-step epochs of a distill run share one table."""
    columns: dict[str, None] = dict.fromkeys(k for k in CSV_FIRST if any(k in r for r in records))
    for record in records:
        columns.update(dict.fromkeys(k for k in record if k not in CSV_LAST))
    columns.update(dict.fromkeys(k for k in CSV_LAST if any(k in r for r in records)))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(v) for k, v in record.items()})
    return out.getvalue()


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


class CSVTracker:
    """``metrics.csv``, rewritten whole at every record (atomically), so it always matches
    metrics.jsonl, resumes included; columns may grow as new keys appear."""

    def __init__(self, path: Path, records: Sequence[dict[str, Any]] = ()) -> None:
        self.path = path
        self.records = list(records)

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        atomic_write_text(self.path, csv_text(self.records))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- TensorBoard and wandb


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a record: the epoch is the step; tags are grouped by what they
    measure, and training terms by phase, since an A-step and a B-step loss are different
    objectives (``train_A-step/loss``, ``train_B-step/loss``, ``val/student_val_top1``, ``lr/lr``)."""
    step = int(record.get("epoch", 0))
    group = _PHASE_GROUP.get(str(record.get("phase", "train")), "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in CSV_FIRST or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if "val_" in key or key.startswith("val"):
            tag = f"val/{key}"
        elif key.startswith("lr"):
            tag = f"lr/{key}"
        elif key == "seconds":
            tag = "time/epoch_seconds"
        else:
            tag = f"{group}/{key}"
        out[tag] = float(value)
    return step, out


class TensorBoardTracker:
    """Event files in ``<run>/tensorboard`` through ``torch.utils.tensorboard.SummaryWriter``.

    A new run removes the event files a previous run left there; a resumed run opens its writer
    at its first record with ``purge_step`` there, so TensorBoard drops what a killed process
    logged past the saved train state."""

    def __init__(self, folder: Path, resume: bool) -> None:
        self.folder = folder / TENSORBOARD_DIR
        self.resume = resume
        self.writer: Any = None
        if not resume and self.folder.is_dir():
            for entry in self.folder.iterdir():
                if entry.name.startswith("events.out.tfevents.") and entry.is_file() and not entry.is_symlink():
                    entry.unlink()

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=step if self.resume else None)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def wandb_mode() -> str | None:
    """``WANDB_MODE`` when set (wandb reads it); otherwise offline unless an API key is set up
    (``WANDB_API_KEY`` or a netrc entry for the wandb host), so a run never waits for a login."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    return "offline"


class WandbTracker:
    """A Weights & Biases run under ``<run>/wandb`` (project ``asib`` or ``WANDB_PROJECT``, named
    after the recipe, the resolved recipe as its config), opened at the first record. Its id is
    kept in ``<run>/wandb_run_id``: a resumed run continues the same W&B run; a new run
    (``--force``) starts another."""

    def __init__(self, folder: Path, resume: bool, name: str, config: dict[str, Any],
                 note: Callable[[str], None] | None = None) -> None:
        self.folder, self.resume, self.name, self.config, self.note = folder, resume, name, config, note
        self.run: Any = None

    def _open(self) -> None:
        import wandb

        id_file = self.folder / WANDB_ID_FILE
        run_id = None
        if self.resume and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        if run_id is None:
            run_id = secrets.token_hex(4)  # 8 of [0-9a-f]: a valid W&B run id
            atomic_write_text(id_file, run_id + "\n")
        mode = wandb_mode()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "asib"), name=self.name, id=run_id, resume="allow",
            dir=str(self.folder), config=self.config, mode=mode,
            settings=wandb.Settings(silent=True, console="off"),
        )
        if self.note is not None:
            where = self.folder / "wandb"
            how = f"offline in {where}; upload it with `wandb sync`" if mode == "offline" else "online"
            self.note(f"wandb: run {run_id}, {how}")

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            self._open()
        step, values = scalars(record)
        self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_trackers(
    names: Iterable[str], folder: Path, *, resume: bool, name: str, config: dict[str, Any],
    note: Callable[[str], None] | None = None,
) -> list[Tracker]:
    """The trackers a recipe asks for (``check_tracking`` first), in the run folder ``folder``; each
    writes its first file at the first record, so a resume refused on its train state writes none."""
    names = list(dict.fromkeys(names))
    check_tracking(names)
    trackers: list[Tracker] = []
    for tracker in names:
        if tracker == "tensorboard":
            trackers.append(TensorBoardTracker(folder, resume))
        elif tracker == "wandb":
            trackers.append(WandbTracker(folder, resume, name, config, note))
    return trackers


# ---------------------------------------------------------------- where a run ran


def environment(device: Any) -> dict[str, Any]:
    """The versions and device a run used, for summary.json: asib, torch, CUDA (on a CUDA device)."""
    import torch

    try:
        from importlib.metadata import PackageNotFoundError, version

        asib_version = version("asib")
    except PackageNotFoundError:
        import asib

        asib_version = getattr(asib, "__version__", "unknown")
    device = torch.device(device)
    versions = {"asib": asib_version, "torch": torch.__version__}
    name = _cpu_name()
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
        name = torch.cuda.get_device_name(device)
    elif device.type != "cpu":
        name = str(device)
    return {"versions": versions, "device": {"type": device.type, "name": name}}


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "cpu"
