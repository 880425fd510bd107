"""Atomic file writes: a temporary name in the same folder, fsync, then ``os.replace``.

A crash in the middle of a write leaves the previous good file (or none), never half of one.
Temporary files are created new (``O_EXCL``, never through a symlink) with the permissions
the umask gives, like any other file the user writes, so a model on a shared machine can be
read by the group when the umask says so. An OS error while writing (a full disk, a
read-only folder, no permission) becomes a ``WriteError`` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asib.errors import write_error

# ``.<name>.<8 characters>.tmp``: the temporary file of ``name`` (earlier versions made the
# 8 characters with tempfile.mkstemp, hence letters, digits and underscores).
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def umask() -> int:
    """The process's umask (read without changing it where /proc says it)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_temp_file(path: Path) -> Path:
    """Create an empty ``.<name>.<random>.tmp`` beside ``path``: a new file of this process's
    own (never an existing file, never through a symlink), mode 0666 less the umask."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, _NEW_FILE, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def _finish_temp(tmp: Path) -> None:
    """Give the written temporary the umask's permissions (a writer such as safetensors may have
    replaced it with a private file of its own) and fsync it; anything that is no longer a
    plain file is refused."""
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "its temporary file was replaced by something that is not a plain file")
        os.fchmod(fd, 0o666 & ~umask())
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the result and move it onto ``path``.

    On any failure the temporary file is removed and ``path`` keeps its previous content; an
    OS error becomes a ``WriteError`` (one line naming ``path``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_file(path)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        write(tmp)
        _finish_temp(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the write failed already; that error is the one to report
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    with contextlib.suppress(OSError):  # the file is in place; a folder that cannot be fsynced changes nothing
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (the metrics log is append-only).

    The file is opened without following a symlink; a write that fails half-way is cut back,
    so the log never ends in half a line.
    """
    data = (json.dumps(record) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise write_error(path, exc) from None
    finally:
        os.close(fd)
