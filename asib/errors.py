"""The errors a user can cause, each with its exit code. Standard library only.

Everything raised as an ``AsibError`` is shown as one red line (plus a hint) by the CLI;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AsibError(Exception):
    """A problem the user can fix: bad input, a missing file, a run folder in the way."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class RecipeError(AsibError):
    """A recipe that does not validate: one line per problem, each with its YAML path."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None, hint: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.problems), hint)


class DataError(AsibError):
    """Missing, malformed or unprepared data."""


class CheckpointError(AsibError):
    """A checkpoint that is missing, truncated, of the wrong kind, or does not fit the data."""


class RunError(AsibError):
    """A run that cannot start or go on: a folder in the way, a loss that is not finite."""


class WriteError(AsibError):
    """A file that cannot be written: a full disk, a read-only folder, no permission.

    The file it was to replace (the last good checkpoint, the last train state) is kept.
    """


def write_error(path: object, exc: OSError) -> WriteError:
    """One line for an OS error while writing ``path``, with a hint that fits its cause."""
    import errno

    why = exc.strerror or first_line(exc, 150)
    hints = {
        errno.ENOSPC: "free some disk space (or choose another --out); the previous files are kept",
        errno.EDQUOT: "free some space under your quota (or choose another --out); the previous files are kept",
        errno.EROFS: "the folder is on a read-only file system; choose another --out",
        errno.EACCES: "no permission to write there; choose another --out or fix the folder's permissions",
        errno.EPERM: "no permission to write there; choose another --out or fix the folder's permissions",
    }
    return WriteError(f"{path}: cannot write ({why})", hint=hints.get(exc.errno or 0))


class Interrupted(AsibError):
    """A run stopped by a signal after writing its state; the exit code follows the signal."""

    def __init__(self, message: str, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


def clip(text: str, limit: int = 300) -> str:
    """At most ``limit`` characters of ``text``: an error line echoes a value, never all of a huge one."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def first_line(exc: BaseException, limit: int = 150) -> str:
    """The first line of an exception's text, clipped (for errors raised by libraries on bad files)."""
    lines = str(exc).splitlines()
    return clip(lines[0] if lines else exc.__class__.__name__, limit)


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` in at most about ``limit`` characters, without walking all of a huge value."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    return clip(r.repr(value), limit)


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str], n: int = 1) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    import difflib

    word = str(word)
    if len(word) > 100:  # no name is that long; comparing it would only cost time
        return ""
    close = difflib.get_close_matches(word, sorted(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


class ModelError(AsibError):
    """An unknown architecture, or weights that do not fit the model."""
