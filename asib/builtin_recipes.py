"""The built-in recipes: the YAML files shipped in ``asib/recipes/``, known by name.

A name is a file's path under that folder without ``.yaml`` (``digits``, ``study/fmnist_full``).
Wherever a command expects a recipe file it also takes a name, and a path wins: a name is
looked up only when no file of that path exists. In a source checkout ``recipes/`` at the
repository root is a link to the same folder, so ``recipes/digits.yaml`` works there too.
Standard library only: ``asib --help`` and ``asib recipe list`` stay fast.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SUFFIXES = (".yaml", ".yml")
SUMMARY_WIDTH = 100


@dataclass(frozen=True)
class BuiltinRecipe:
    """One shipped recipe: its name, its file, and the first line of its leading comment."""

    name: str
    path: Path

    @property
    def summary(self) -> str:
        """What the recipe is: the first sentence of its leading comment, on one line of at most
        ``SUMMARY_WIDTH`` characters ('' when the file starts without a comment)."""
        words: list[str] = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                text = line.strip()
                if not text.startswith("#") or not text.lstrip("#").strip():
                    break  # the comment block ends at YAML or at an empty comment line
                words += text.lstrip("#").split()
        sentence = " ".join(words)
        end = next((i + 1 for i, ch in enumerate(sentence) if ch == "." and sentence[i + 1 : i + 2] in ("", " ")),
                   len(sentence))
        sentence = sentence[:end]
        if len(sentence) <= SUMMARY_WIDTH:
            return sentence
        return sentence[: SUMMARY_WIDTH - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def builtin_recipes() -> list[BuiltinRecipe]:
    """Every shipped recipe, sorted by name (top-level ones first, then sub-folders)."""
    if not RECIPES_DIR.is_dir():
        return []
    found = [p for p in RECIPES_DIR.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    recipes = [BuiltinRecipe(p.relative_to(RECIPES_DIR).with_suffix("").as_posix(), p) for p in found]
    return sorted(recipes, key=lambda r: (r.name.count("/"), r.name))


def find_builtin(name: str) -> BuiltinRecipe | None:
    """The shipped recipe called ``name`` (``.yaml`` may be given), or None."""
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return next((r for r in builtin_recipes() if r.name == name), None)


def resolve_recipe(text: str | Path) -> Path:
    """What a command's RECIPE argument names: the file when it exists, else the built-in
    recipe of that name, else the path as given (reading it then fails with a hint)."""
    path = Path(text)
    if path.exists():
        return path
    found = find_builtin(str(text))
    return found.path if found is not None else path


def shadowed_file(text: str | Path) -> Path | None:
    """``NAME.yaml`` in the working folder when ``text`` is a bare name that resolved to a
    built-in recipe: the user may have meant that copy (``asib recipe show NAME > NAME.yaml``)."""
    path = Path(text)
    if path.exists() or path.suffix in SUFFIXES or find_builtin(str(text)) is None:
        return None
    local = path.with_name(path.name + ".yaml")
    return local if local.is_file() else None


def missing_hint(text: str | Path) -> str:
    """The hint for a recipe that is neither a file nor a built-in name."""
    names = [r.name for r in builtin_recipes()]
    given = Path(text).as_posix()
    for suffix in SUFFIXES:
        given = given.removesuffix(suffix)
    # recipes/digits.yaml from a folder without recipes/: the built-in of that name
    exact = [n for n in names if given == n or given.endswith("/" + n)]
    close = exact[:1] or difflib.get_close_matches(given, names, n=1, cutoff=0.6)
    listing = "asib recipe list shows the built-in recipes, used by name (asib recipe check digits)"
    return f"did you mean the built-in recipe '{close[0]}'? {listing}" if close else listing
