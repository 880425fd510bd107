"""A run folder: recipe.yaml, metrics.jsonl (+ metrics.csv and the trackers' files), train.log,
summary.json, checkpoints and the train state."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from asib.engine.io import TEMP_PATTERN, append_jsonl, atomic_write_json, atomic_write_text
from asib.engine.tracking import CSV_FILE, WANDB_ID_FILE, CSVTracker, Tracker, open_trackers
from asib.errors import RunError, write_error
from asib.recipe import canonical_recipe

STATE_FILE = "train_state.safetensors"
LOCK_FILE = ".lock"
LOG_FILE = "train.log"

# What ``check`` found: a new run, a run to go on with, a run to begin again (--resume with
# no train state), or a finished run (--resume after the end: nothing to do).
Status = Literal["new", "resume", "restart", "done"]


class RunFolder:
    """The files of one training step; refuses to overwrite a run unless told to."""

    def __init__(self, path: str | Path, artifacts: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.artifacts = ("recipe.yaml", "metrics.jsonl", "summary.json", STATE_FILE, LOG_FILE, CSV_FILE,
                          WANDB_ID_FILE, *artifacts)
        self.writer = True  # False on torchrun ranks other than 0: they read, never write or lock
        self._lock_fd: int | None = None
        self._csv: CSVTracker | None = None  # metrics.csv, from ``start`` on
        self.trackers: list[Tracker] = []  # TensorBoard, wandb: ``open_tracking``

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def existing(self) -> list[str]:
        return [name for name in self.artifacts if os.path.lexists(self.path / name)]

    def check(self, force: bool, resume: bool, recipe_yaml: str | None = None) -> Status:
        """Before any work: is the folder free, or are we told to continue or replace it?

        With ``resume``: a train state is resumed ("resume"); a finished run (a summary, no
        train state) is left alone ("done"); a run stopped before its first train state, or
        no run at all, starts from the beginning ("restart"), so a preempted job can run the
        same command again. Either way the recipe must be the one the run started with
        (``recipe_yaml``, resolved).
        """
        if force and resume:
            raise RunError("--force and --resume exclude each other")
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise RunError(f"{self.path}: exists and is not a folder", hint="choose another --out")
        if resume:
            self._same_recipe(recipe_yaml)
            if os.path.lexists(self.state_path):
                return "resume"
            if (self.path / "summary.json").is_file():
                return "done"
            found = [name for name in self.existing() if name != "recipe.yaml"]
            if found and not os.path.lexists(self.path / "recipe.yaml"):  # files of a run, but whose?
                raise RunError(
                    f"{self.path}: holds {', '.join(found)} but no recipe.yaml, so it is not a run to resume",
                    hint="use --force to start over there, or choose another --out",
                )
            return "restart"
        found = self.existing()
        if found and not force:
            raise RunError(
                f"{self.path}: already holds a run ({', '.join(found)})",
                hint="use --resume to continue it or --force to start over",
            )
        return "new"

    def _same_recipe(self, recipe_yaml: str | None) -> None:
        saved = self.path / "recipe.yaml"
        if recipe_yaml is None or not os.path.lexists(saved):
            return
        try:
            text = saved.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            raise RunError(f"{saved}: cannot be read ({exc.strerror})", hint="use --force to start over") from None
        if text == recipe_yaml or canonical_recipe(text) == canonical_recipe(recipe_yaml):
            return
        old, new = text.splitlines(), recipe_yaml.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        shown = new[first].strip() if first < len(new) else "(end of recipe)"
        raise RunError(
            f"{self.path}: the recipe differs from the one the run started with (first at: {shown[:200]})",
            hint=f"resume with the same recipe and --set values (see {saved}), or use --force",
        )

    def lock(self) -> None:
        """Hold an exclusive lock on the folder until ``release``: two processes writing one
        run folder would corrupt each other's files.

        ``.lock`` is opened without following a symlink and must be a plain file of its own
        (one link): asib writes its PID into it, and never into anything else.
        """
        import fcntl

        if not self.writer or self._lock_fd is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        for _ in range(10):  # the file may be removed by its owner between open and lock: open again
            fd = self._open_lock()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(
                    f"{self.path}: another asib process (pid {owner[:20]}) is writing this run"
                ) from None
            try:
                current = os.stat(self.lock_path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        else:
            raise RunError(f"{self.lock_path}: could not be locked (it keeps being replaced)")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        except OSError as exc:
            os.close(fd)
            raise write_error(self.lock_path, exc) from None
        self._lock_fd = fd

    def _open_lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.lock_path, flags, 0o666)
        except OSError as exc:
            if os.path.islink(self.lock_path):
                raise RunError(
                    f"{self.lock_path}: is a symbolic link, not asib's lock file; asib will not follow it",
                    hint=f"remove {self.lock_path} (the file it points to is left alone)",
                ) from None
            raise write_error(self.lock_path, exc) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            regular = stat.S_ISREG(info.st_mode)
            what = "a plain file with other names (hard links)" if regular else "not a plain file"
            raise RunError(f"{self.lock_path}: is {what}, not asib's lock file",
                           hint=f"remove {self.lock_path} if no asib process is running there")
        return fd

    def release(self) -> None:
        """Close the trackers, remove ``.lock`` (while still holding it) and let go of it; safe to call twice."""
        self.close_tracking()
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if os.stat(self.lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    self.lock_path.unlink()
        finally:
            os.close(fd)

    def remove_temporaries(self) -> list[str]:
        """Remove the temporary files a killed run left (``.<artifact>.<random>.tmp``); needs the lock."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.path):
                match = TEMP_PATTERN.match(entry.name)
                if match and match["name"] in self.artifacts and not entry.is_dir(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(entry.name)
        return removed

    def start(self, recipe_yaml: str, force: bool, resume: bool) -> None:
        """Lock and create the folder (after ``check``); with ``force`` remove the old run's files
        only. Temporary files a killed run left behind are removed."""
        self.lock()
        if not self.writer:
            return
        try:
            self.remove_temporaries()
            if force:  # recipe.yaml goes last and comes first: a kill in between leaves a run to --resume
                for name in sorted(self.existing(), key=lambda name: name == "recipe.yaml"):
                    (self.path / name).unlink()
            atomic_write_text(self.path / "recipe.yaml", recipe_yaml)
            if not resume:
                atomic_write_text(self.metrics_path, "")
            self._csv = CSVTracker(self.path / CSV_FILE)
            if not resume:  # a resumed run says where it resumes once its train state has loaded
                self.log_line(f"run started (pid {os.getpid()})")
        except OSError as exc:
            self.release()
            raise write_error(exc.filename or self.path, exc) from None
        except BaseException:
            self.release()
            raise

    def log(self, record: dict[str, Any]) -> None:
        """One epoch record: a line of metrics.jsonl, a row of metrics.csv, and to every tracker."""
        if not self.writer:
            return
        append_jsonl(self.metrics_path, record)
        if self._csv is not None:
            self._csv.log(record)
        for tracker in self.trackers:
            tracker.log(record)

    def log_line(self, text: str) -> None:
        """Append what the run printed (an epoch line, a note, the final table) to train.log,
        each line after its local time; needs the folder started (it writes under the lock)."""
        if not self.writer or self._lock_fd is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        data = "".join(f"{stamp}  {line}\n" for line in text.splitlines() or [""]).encode("utf-8", "replace")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.log_path, flags, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            raise write_error(self.log_path, exc) from None

    def open_tracking(
        self, names: Iterable[str], *, resume: bool, name: str, config: dict[str, Any],
        note: Callable[[str], None] | None = None,
    ) -> None:
        """Start the recipe's trackers (TensorBoard, wandb) in this folder; ``log`` feeds them."""
        if self.writer:
            self.trackers = open_trackers(names, self.path, resume=resume, name=name, config=config, note=note)

    def close_tracking(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()

    def truncate_metrics(self, n_records: int, records: list[dict[str, Any]] | None = None) -> None:
        """On resume, keep the records the train state knows of (a crash may have written more);
        ``records`` (those records) rebuild metrics.csv to match."""
        if not self.writer:
            return
        lines = []
        if self.metrics_path.is_file():
            lines = self.metrics_path.read_bytes().decode("utf-8", errors="replace").splitlines()
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in lines[:n_records]))
        if records is not None:
            self._csv = CSVTracker(self.path / CSV_FILE, records)
            self._csv.write()

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.path / "summary.json", summary)

    def finish(self) -> None:
        """A finished run needs no train state, and holds its folder no longer."""
        if self.writer:
            self.close_tracking()
            try:
                self.state_path.unlink(missing_ok=True)
            except OSError as exc:
                raise write_error(self.state_path, exc) from None
            finally:
                self.release()

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` says (empty when it cannot be read)."""
        try:
            data = json.loads((self.path / "summary.json").read_bytes())
        except (OSError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
