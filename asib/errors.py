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


class Interrupted(AsibError):
    """A run stopped by a signal after writing its state; the exit code follows the signal."""

    def __init__(self, message: str, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str], n: int = 1) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    import difflib

    close = difflib.get_close_matches(str(word), sorted(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


class ModelError(AsibError):
    """An unknown architecture, or weights that do not fit the model."""
