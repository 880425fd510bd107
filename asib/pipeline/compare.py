"""The ``compare`` step: a study of methods x seeds (x variants) on one recipe, and its answer.

Every run is an ordinary ``asib distill`` run, started as its own process in its own folder
under the study folder, so a study survives being stopped and started again (finished runs
are skipped, unfinished ones resumed), runs ``jobs`` at a time, and can be handed to a
cluster scheduler instead (``dry_run``: the commands, one a line). A run is identified by its
resolved recipe: a finished run is reused only when its ``recipe.yaml`` is exactly what the
study asks for now, so methods, seeds and variants can be added to a study, and a run whose
recipe changed (the recipe file, a ``--set``, a tuned value) is refused, never mixed in.

Tuning is a step of its own: for each ``tune`` grid, every value is run on the validation
split (the first seed, or every seed) and the best mean validation top-1 is kept; the test
split is never used to choose anything. The result is, per arm (a method, or a named
variant of one), the mean and sample standard deviation over seeds of validation and test
top-1, and the paired difference of every arm against a reference arm with a 95%
confidence interval over seeds (paired t): at one seed, every method starts from the same
student and sees the same batches, so seeds pair runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from asib.engine.io import atomic_write_json, atomic_write_text
from asib.errors import Interrupted, RecipeError, RunError
from asib.recipe import canonical_recipe, load_recipe

SUMMARY, STATE = "summary.json", "train_state.safetensors"


# ------------------------------------------------------------------ parsing the command line


def parse_seeds(text: str) -> list[int]:
    """``0-4``, ``0,2,5`` or ``3`` (ranges and lists may mix: ``0-2,7``)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise RecipeError([f"--seeds: empty range {part}"])
            seeds.extend(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", part):
            seeds.append(int(part))
        else:
            raise RecipeError([f"--seeds: '{part}' is not a seed or a range like 0-4"])
    if len(set(seeds)) != len(seeds):
        raise RecipeError([f"--seeds: a seed is listed twice ({text})"])
    return seeds


_PAIR_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w.]*\s*=)")


def _pairs(text: str, where: str) -> dict[str, str]:
    """``key=value,key=value`` (a value may hold commas, e.g. a YAML list) -> {key: raw value}."""
    out: dict[str, str] = {}
    for item in _PAIR_SPLIT.split(text):
        if "=" not in item:
            raise RecipeError([f"{where}: expected key=value, got '{item}'"])
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RecipeError([f"{where}: empty key in '{item}'"])
        out[key] = raw.strip()
    return out


@dataclass(frozen=True)
class Variant:
    """A named arm: a method with distill overrides (``--variant NAME:key=value,...``)."""

    name: str
    method: str
    sets: dict[str, Any]


def parse_variant(text: str, default_method: str) -> Variant:
    name, sep, rest = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise RecipeError([f"--variant {text}: expected NAME:key=value,... (NAME of letters, digits, _ . + -)"])
    sets = {k: yaml.safe_load(v) for k, v in _pairs(rest, f"--variant {name}").items()}
    method = str(sets.pop("method", default_method))
    return Variant(name, method, sets)


def parse_tune(texts: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """``--tune ARM:key=v1,v2`` (repeatable; several keys of one arm make a grid)."""
    grids: dict[str, dict[str, list[Any]]] = {}
    for text in texts:
        arm, sep, rest = text.partition(":")
        key, eq, values = rest.partition("=")
        if not sep or not eq or not arm or not key.strip():
            raise RecipeError([f"--tune {text}: expected ARM:key=v1,v2,... (ARM a method or variant name)"])
        parsed = yaml.safe_load(f"[{values}]")
        if not isinstance(parsed, list) or not parsed:
            raise RecipeError([f"--tune {text}: no values"])
        grid = grids.setdefault(arm, {})
        if key.strip() in grid:
            raise RecipeError([f"--tune {arm}:{key.strip()} is given twice"])
        grid[key.strip()] = parsed
    return grids


# ------------------------------------------------------------------ the study


@dataclass(frozen=True)
class RunSpec:
    """One ``asib distill`` run of the study."""

    arm: str
    method: str
    seed: int
    sets: tuple[str, ...]  # every --set, in order (the study's, the variant's, the tuned values)
    folder: Path
    kind: str = "seed"  # "seed" or "tune"
    candidate: str = ""  # tune runs: the candidate's label

    def command(self, recipe: Path, *, resume: bool = False, exe: Sequence[str] = ("asib",)) -> list[str]:
        cmd = [*exe, "distill", str(recipe), "--method", self.method]
        for item in self.sets:
            cmd += ["--set", item]
        cmd += ["--set", f"seed={self.seed}", "--out", str(self.folder), "--quiet"]
        if resume:  # a train state is resumed; none (killed before its first save): started again
            cmd.append("--resume")
        return cmd

    @property
    def label(self) -> str:
        what = f"tune {self.arm} {self.candidate}" if self.kind == "tune" else self.arm
        return f"{what} seed {self.seed}"


@dataclass
class StudySpec:
    """What defines a study; written to ``study.json`` in the study folder."""

    recipe: str
    recipe_sha256: str
    sets: list[str]
    methods: list[str]
    variants: list[Variant]
    seeds: list[int]
    tune: dict[str, dict[str, list[Any]]]
    tune_seeds: str  # "first" or "all"
    against: str

    @property
    def arms(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(arm name, method, distill overrides) of every arm, methods first."""
        return [(m, m, {}) for m in self.methods] + [(v.name, v.method, dict(v.sets)) for v in self.variants]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "variants": [asdict(v) for v in self.variants]}


def _distill_sets(overrides: dict[str, Any]) -> list[str]:
    return [f"distill.{k}={json.dumps(v)}" for k, v in overrides.items()]


def _candidate_label(values: dict[str, Any]) -> str:
    return "+".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text.replace('"', ""))


class Study:
    """The runs of a study, their state on disk, and the figures they produced."""

    def __init__(self, spec: StudySpec, folder: Path) -> None:
        self.spec, self.folder = spec, folder
        self.recipe_path = Path(spec.recipe)

    # -------------------------------------------------------------- runs

    def tune_runs(self) -> list[RunSpec]:
        runs = []
        seeds = self.tune_seeds()
        for arm, method, overrides in self.spec.arms:
            grid = self.spec.tune.get(arm)
            if not grid:
                continue
            keys = list(grid)
            for combo in itertools.product(*(grid[k] for k in keys)):
                values = dict(zip(keys, combo, strict=True))
                label = _candidate_label(values)
                sets = [*self.spec.sets, *_distill_sets({**overrides, **values})]
                for seed in seeds:
                    folder = self.folder / "tune" / arm / _folder_name(label) / f"s{seed}"
                    runs.append(RunSpec(arm, method, seed, tuple(sets), folder, "tune", label))
        return runs

    def chosen(self) -> dict[str, dict[str, Any]]:
        """Per tuned arm: the grid value with the best mean validation top-1 (first listed on a tie),
        the validation figures of every candidate, and whether tuning is complete."""
        out: dict[str, dict[str, Any]] = {}
        by_arm: dict[str, dict[str, list[RunSpec]]] = {}
        for run in self.tune_runs():
            by_arm.setdefault(run.arm, {}).setdefault(run.candidate, []).append(run)
        for arm, candidates in by_arm.items():
            table, complete = {}, True
            for label, runs in candidates.items():
                vals = [read_summary(r.folder).get("student_val_top1") for r in runs]
                if any(v is None for v in vals):
                    complete = False
                    table[label] = None
                else:
                    table[label] = sum(vals) / len(vals)
            best = None
            if complete:
                best = max(candidates, key=lambda c: (table[c], -list(candidates).index(c)))
            grid = self.spec.tune[arm]
            values = None
            if best is not None:
                values = dict(zip(grid, next(v for v in itertools.product(*grid.values())
                                              if _candidate_label(dict(zip(grid, v, strict=True))) == best), strict=True))
            out[arm] = {"complete": complete, "val_top1": table, "chosen": best, "values": values}
        return out

    def tune_seeds(self) -> list[int]:
        return self.spec.seeds[:1] if self.spec.tune_seeds == "first" else list(self.spec.seeds)

    def seed_runs(self, chosen: dict[str, dict[str, Any]] | None = None) -> list[RunSpec] | None:
        """The runs of every arm and seed; None while some tuning is not finished.

        A tuned arm's run at a seed it was tuned on is the chosen candidate's tuning run (the
        same recipe): it is reused, not run again.
        """
        chosen = self.chosen() if chosen is None else chosen
        runs = []
        for arm, method, overrides in self.spec.arms:
            tuned = chosen.get(arm)
            if tuned is not None and not tuned["complete"]:
                return None
            values = tuned["values"] if tuned else {}
            sets = [*self.spec.sets, *_distill_sets({**overrides, **(values or {})})]
            for seed in self.spec.seeds:
                folder = self.folder / "runs" / arm / f"s{seed}"
                if tuned and tuned["chosen"] is not None and seed in self.tune_seeds():
                    folder = self.folder / "tune" / arm / _folder_name(tuned["chosen"]) / f"s{seed}"
                runs.append(RunSpec(arm, method, seed, tuple(sets), folder))
        return runs

    def expected_recipe(self, run: RunSpec) -> str:
        """The resolved recipe.yaml the run's folder holds (or will hold)."""
        recipe = load_recipe(self.recipe_path, [*run.sets, f"seed={run.seed}"], run.method)
        return recipe.to_yaml()

    def status(self, run: RunSpec) -> str:
        """'done', 'resume' (a train state), 'fresh' (nothing), 'restart' (killed before its first save),
        or 'stale' (a run whose recipe is not the one the study now asks for)."""
        folder = run.folder
        saved = folder / "recipe.yaml"
        if saved.exists() and canonical_recipe(saved.read_text()) != self.expected_recipe(run):
            return "stale"
        if (folder / STATE).exists():
            return "resume"
        if (folder / SUMMARY).exists():
            return "done"
        return "restart" if saved.exists() else "fresh"


def read_summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY
    if not path.exists() or (folder / STATE).exists():
        return {}
    return json.loads(path.read_text())


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ statistics


def t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass
class Figures:
    """Mean and sample standard deviation of a figure over seeds."""

    n: int
    mean: float | None
    sd: float | None
    values: dict[int, float]

    @classmethod
    def of(cls, values: dict[int, float]) -> Figures:
        xs = list(values.values())
        n = len(xs)
        mean = sum(xs) / n if n else None
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 and mean is not None else None
        return cls(n, mean, sd, dict(values))

    def text(self) -> str:
        if self.mean is None:
            return "-"
        return f"{self.mean:.2f} ± {self.sd:.2f}" if self.sd is not None else f"{self.mean:.2f}"


@dataclass
class Paired:
    """The paired difference (arm - reference) over the seeds both have, with a 95% t interval."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None
    t: float | None
    p: float | None
    wins: int

    @classmethod
    def of(cls, arm: dict[int, float], ref: dict[int, float]) -> Paired:
        seeds = sorted(set(arm) & set(ref))
        diffs = [arm[s] - ref[s] for s in seeds]
        n = len(diffs)
        wins = sum(d > 0 for d in diffs)
        if n == 0:
            return cls(0, None, None, None, None, None, None, 0)
        mean = sum(diffs) / n
        if n == 1:
            return cls(1, mean, None, None, None, None, None, wins)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
        se = sd / math.sqrt(n)
        half = t_quantile(0.975, n - 1) * se
        if se == 0:
            t_stat, p = (math.inf if mean else 0.0), (0.0 if mean else 1.0)
        else:
            from scipy.stats import t as t_dist

            t_stat = mean / se
            p = float(2 * t_dist.sf(abs(t_stat), n - 1))
        return cls(n, mean, sd, mean - half, mean + half, t_stat, p, wins)

    def text(self) -> str:
        if self.mean is None:
            return "-"
        if self.low is None:
            return f"{self.mean:+.2f} (1 seed)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


# ------------------------------------------------------------------ running


@dataclass
class Outcome:
    run: RunSpec
    code: int
    seconds: float


@dataclass
class Runner:
    """Starts runs as processes, ``jobs`` at a time, each with ``threads`` CPU threads."""

    recipe: Path
    jobs: int = 1
    threads: int | None = None
    say: Callable[[str], None] = print
    exe: tuple[str, ...] = (sys.executable, "-m", "asib")
    _live: dict[int, tuple[subprocess.Popen, RunSpec, float, Any]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(self.threads)
        return env

    def run_all(self, todo: list[tuple[RunSpec, str]], eta: Callable[[int], str]) -> list[Outcome]:
        """Run every (run, status); returns their outcomes. SIGINT/SIGTERM are passed on to the
        runs (which save their train state) and end the study with Interrupted."""
        outcomes: list[Outcome] = []
        queue = list(todo)
        stop: list[int] = []
        previous = {}

        def handler(signum: int, _frame: object) -> None:
            if stop:  # a second signal: stop the runs at once
                for proc, *_ in self._live.values():
                    proc.kill()
            stop.append(signum)
            for proc, *_ in self._live.values():
                proc.send_signal(signum)

        if threading.current_thread() is threading.main_thread():  # where Python lets handlers be set
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        try:
            total = len(queue)
            while queue or self._live:
                while queue and len(self._live) < self.jobs and not stop:
                    run, status = queue.pop(0)
                    self._start(run, status, total - len(queue), total, eta(len(queue) + len(self._live)))
                if not self._live:
                    break
                outcomes += self._reap()
                time.sleep(0.2)
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        if stop:
            name = signal.Signals(stop[0]).name
            raise Interrupted(f"study stopped by {name}; every run saved its train state",
                              exit_code=128 + stop[0], hint="run the same asib compare command to continue")
        return outcomes

    def _start(self, run: RunSpec, status: str, i: int, total: int, eta: str) -> None:
        run.folder.mkdir(parents=True, exist_ok=True)
        cmd = run.command(self.recipe, resume=status in ("resume", "restart"), exe=self.exe)
        log = open(run.folder / "compare.log", "a")  # noqa: SIM115 (closed when the run ends)
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env())
        how = {"resume": " (resuming)", "restart": " (restarting: it stopped before its first save)"}.get(status, "")
        self.say(f"[{i}/{total}] {run.label}{how} -> {run.folder}  {eta}")
        self._live[proc.pid] = (proc, run, time.time(), log)

    def _reap(self) -> list[Outcome]:
        done = []
        for pid, (proc, run, began, log) in list(self._live.items()):
            code = proc.poll()
            if code is None:
                continue
            log.close()
            del self._live[pid]
            seconds = time.time() - began
            summary = read_summary(run.folder)
            if code == 0 and summary:
                self.say(f"    done {run.label} in {_duration(seconds)}: val {_pct(summary.get('student_val_top1'))}"
                         f" test {_pct(summary.get('student_test_top1'))}")
            elif code not in (130, 143):
                tail = (run.folder / "compare.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                self.say(f"    FAILED {run.label} (exit {code}): {tail[0]}  [log: {run.folder / 'compare.log'}]")
            done.append(Outcome(run, code, seconds))
        return done


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ------------------------------------------------------------------ the command's function


@dataclass
class CompareResult:
    folder: Path
    table: str  # markdown
    data: dict[str, Any]
    files: list[Path]
    failed: list[str]
    pending: bool  # some runs are not finished (dry run, or tuning still to do)


def make_spec(
    recipe: Path, *, methods: Sequence[str], seeds: Sequence[int], sets: Sequence[str] = (),
    variants: Sequence[str] = (), tune: Sequence[str] = (), tune_seeds: str = "first", against: str | None = None,
) -> StudySpec:
    """Check everything that can be checked before a run starts; one recipe error line per problem."""
    base = load_recipe(recipe, list(sets))  # the recipe itself, as written, must be valid
    problems = []
    parsed_variants = [parse_variant(v, base.distill.method) for v in variants]
    arms = [*methods, *(v.name for v in parsed_variants)]
    dup = sorted({a for a in arms if arms.count(a) > 1})
    if dup:
        problems.append(f"--variant: names must differ from each other and from the methods ({', '.join(dup)})")
    grids = parse_tune(tune)
    for arm in grids:
        if arm not in arms:
            problems.append(f"--tune {arm}: not a method or variant of this study ({', '.join(arms)})")
    if tune_seeds not in ("first", "all"):
        problems.append(f"--tune-seeds: 'first' or 'all', not '{tune_seeds}'")
    ref = against or ("avg_kd" if "avg_kd" in arms else arms[0] if arms else "")
    if ref not in arms:
        problems.append(f"--against {ref}: not a method or variant of this study ({', '.join(arms)})")
    if not methods and not parsed_variants:
        problems.append("--methods: no method to run")
    if problems:
        raise RecipeError(problems)
    spec = StudySpec(str(recipe), file_sha256(recipe), list(sets), list(methods), parsed_variants, list(seeds), grids,
                     tune_seeds, ref)
    study = Study(spec, Path("."))
    for run in [*study.tune_runs(), *(study.seed_runs({}) or [])]:  # every arm's recipe validates
        load_recipe(recipe, [*run.sets, f"seed={run.seed}"], run.method)
    return spec


def _check_teachers(spec: StudySpec) -> None:
    """Fail before any run when the data or a teacher checkpoint is missing."""
    from asib.data import load_info
    from asib.methods import method_class

    recipe = load_recipe(Path(spec.recipe), spec.sets)
    load_info(recipe.data_dir)  # a DataError naming prepare-data when it is not prepared
    if any(method_class(m).uses_teachers for _, m, _ in spec.arms):
        missing = [str(recipe.teacher_checkpoint(t)) for t in recipe.teachers if not recipe.teacher_checkpoint(t).exists()]
        if missing:
            raise RunError(f"no teacher checkpoint at {', '.join(missing)}",
                           hint=f"run `asib finetune-teacher {spec.recipe}` first")


def _write_spec(spec: StudySpec, folder: Path) -> None:
    """study.json: the spec of the latest invocation (what each run is, its own recipe.yaml says)."""
    atomic_write_json(folder / "study.json", spec.to_json())


def compare(
    spec: StudySpec,
    folder: Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    dry_run: bool = False,
    collect_only: bool = False,
    plots: bool = True,
    say: Callable[[str], None] = print,
) -> CompareResult:
    """Run (or, with ``dry_run``, list) every tuning run, then every arm x seed; then the answer.

    ``collect_only``: start nothing, and write the answer from the runs that have finished
    (runs made elsewhere from ``dry_run``'s commands, or a study still under way)."""
    if jobs < 1:
        raise RecipeError([f"--jobs: at least 1 (given: {jobs})"])
    if dry_run and collect_only:
        raise RecipeError(["--dry-run and --collect: give one (--dry-run lists the runs, --collect tabulates them)"])
    study = Study(spec, folder)
    runner = Runner(Path(spec.recipe), jobs, threads, say)
    if dry_run:
        return _dry_run(study, say)
    if collect_only:
        return _collect_only(study, plots, say)
    _check_teachers(spec)
    _write_spec(spec, folder)
    failed: list[str] = []
    for phase in ("tune", "seed"):
        runs = study.tune_runs() if phase == "tune" else study.seed_runs()
        assert runs is not None  # tuning is complete here, or it failed below
        todo = _todo(study, runs)
        if todo:
            say(f"{phase} runs: {len(todo)} to run of {len(runs)}")
            outcomes = runner.run_all(todo, _eta_text(runs, jobs))
            failed += [o.run.label for o in outcomes if o.code != 0]
        if phase == "tune":
            for arm, tuned in study.chosen().items():
                if tuned["complete"]:
                    say(f"tuned {arm} on validation: {tuned['chosen']} "
                        f"({', '.join(f'{k}: {_pct(v)}' for k, v in tuned['val_top1'].items())})")
            if failed:
                break
    return _finish(study, failed, plots, say)


def _todo(study: Study, runs: list[RunSpec]) -> list[tuple[RunSpec, str]]:
    todo, stale = [], []
    for run in runs:
        status = study.status(run)
        if status == "stale":
            stale.append(str(run.folder))
        elif status != "done":
            todo.append((run, status))
    if stale:
        raise RunError(
            f"{len(stale)} run folder(s) hold a run of another recipe than the study now asks for: {stale[0]}",
            hint="the recipe file or a tuned value changed; start the study in a new --out folder",
        )
    return todo


def _eta_text(runs: list[RunSpec], jobs: int) -> Callable[[int], str]:
    """An ETA from the mean time of this phase's finished runs."""

    def eta(remaining: int) -> str:
        done = [s for r in runs if (s := read_summary(r.folder).get("seconds")) is not None]
        if not done or remaining == 0:
            return ""
        return f"(about {_duration(sum(done) / len(done) * remaining / jobs)} left)"

    return eta


def _dry_run(study: Study, say: Callable[[str], None]) -> CompareResult:
    tune = study.tune_runs()
    lines = []
    for run in tune:
        status = study.status(run)
        if status != "done":
            lines.append(shlex.join(run.command(study.recipe_path, resume=status in ("resume", "restart"))))
    seeds = study.seed_runs()
    if seeds is None:
        lines.append("# the runs of the tuned arms wait for the tuning runs above: run --dry-run again once they are done")
    else:
        for run in seeds:
            status = study.status(run)
            if status != "done":
                lines.append(shlex.join(run.command(study.recipe_path, resume=status in ("resume", "restart"))))
    for line in lines:
        say(line)
    return CompareResult(study.folder, "", {}, [], [], pending=True)


def _collect_only(study: Study, plots: bool, say: Callable[[str], None]) -> CompareResult:
    if not study.folder.is_dir():
        raise RunError(f"no study folder at {study.folder}", hint="give the --out of the study to collect")
    seeds = study.seed_runs()
    runs = study.tune_runs() + (seeds or [])
    left = _todo(study, runs)  # refuses folders of another recipe, as a run would
    if seeds is None:
        say("tuning is not finished: the tuned arms have no seed runs yet")
    if left:
        say(f"{len(left)} of {len(runs)} runs not finished: the table counts the finished ones")
    return _finish(study, [], plots, say)


# ------------------------------------------------------------------ the answer


def collect(study: Study) -> dict[str, Any]:
    """Per arm: figures over seeds; paired differences against the reference arm; tuning."""
    spec = study.spec
    chosen = study.chosen()
    runs = study.seed_runs(chosen) or []
    by_arm: dict[str, dict[str, dict[int, float]]] = {}
    folders: dict[str, dict[int, str]] = {}
    for run in runs:
        folders.setdefault(run.arm, {})[run.seed] = str(run.folder)
        s = read_summary(run.folder)
        figs = by_arm.setdefault(run.arm, {"test": {}, "val": {}, "synergy": {}})
        for key, name in (("student_test_top1", "test"), ("student_val_top1", "val"), ("synergy_test_top1", "synergy")):
            if s.get(key) is not None:
                figs[name][run.seed] = float(s[key])
    arms = []
    ref = by_arm.get(spec.against, {"test": {}, "val": {}})
    for arm, method, overrides in spec.arms:
        figs = by_arm.get(arm, {"test": {}, "val": {}, "synergy": {}})
        tuned = chosen.get(arm)
        arms.append({
            "arm": arm,
            "method": method,
            "overrides": overrides,
            "tuned": tuned,
            "folders": folders.get(arm, {}),
            "test": asdict(Figures.of(figs["test"])),
            "val": asdict(Figures.of(figs["val"])),
            "synergy_test": asdict(Figures.of(figs["synergy"])) if figs["synergy"] else None,
            "paired_test_vs_reference": asdict(Paired.of(figs["test"], ref["test"])) if arm != spec.against else None,
            "paired_val_vs_reference": asdict(Paired.of(figs["val"], ref["val"])) if arm != spec.against else None,
        })
    return {
        "study": spec.to_json(),
        "reference": spec.against,
        "seeds": spec.seeds,
        "pairing": "runs of one seed share the student's initial weights and the student's data order and "
                   "augmentations; differences are paired by seed",
        "selection": _selection(spec),
        "arms": arms,
    }


def _selection(spec: StudySpec) -> str:
    """How the study's knobs were set, in one sentence (a one-value grid chooses nothing)."""
    sizes = [len(grid) for by_arm in spec.tune.values() for grid in by_arm.values()]
    if sizes and all(n == 1 for n in sizes):
        return "every --tune grid holds one value: the values were given, not chosen here; the test split chose nothing"
    fixed = " (a one-value grid fixes its value)" if 1 in sizes else ""
    return (f"tuned values chosen on the validation split ({spec.tune_seeds} seed(s)){fixed}; "
            "the test split chose nothing")


def markdown(data: dict[str, Any]) -> str:
    ref = data["reference"]
    head = ["arm", "method", "seeds", "test top-1", "val top-1", "synergy test", f"test - {ref} (95% CI)", "wins"]
    rows = []
    for a in data["arms"]:
        test, val = Figures(**a["test"]), Figures(**a["val"])
        syn = Figures(**a["synergy_test"]).text() if a["synergy_test"] else "-"
        paired = Paired(**a["paired_test_vs_reference"]) if a["paired_test_vs_reference"] else None
        diff = "(reference)" if paired is None else paired.text()
        wins = "" if paired is None or paired.n == 0 else f"{paired.wins}/{paired.n}"
        rows.append([a["arm"], a["method"], str(test.n), test.text(), val.text(), syn, diff, wins])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    tuned = [a for a in data["arms"] if a["tuned"]]
    if tuned:
        lines.append("")
        lines.append("Tuned on validation (mean student val top-1 per candidate; the chosen one in bold):")
        lines.append("")
        for a in tuned:
            parts = [f"**{k}: {_pct(v)}**" if k == a["tuned"]["chosen"] else f"{k}: {_pct(v)}"
                     for k, v in a["tuned"]["val_top1"].items()]
            given = " (one value given: nothing chosen)" if len(parts) == 1 else ""
            lines.append(f"- {a['arm']}: " + ", ".join(parts) + given)
    lines.append("")
    lines.append(f"Test and validation top-1 in percent, mean ± sample sd over seeds {data['seeds']}; "
                 f"differences paired by seed (same initial student and data order), 95% interval from the paired t "
                 f"distribution; wins = seeds where the arm beats {ref} on test. {data['selection']}.")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> Path | None:
    """Test top-1 per seed and arm, and the paired differences with their 95% intervals."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arms = data["arms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(arms) + 2.2), sharey=True)
    for i, a in enumerate(arms):
        values = list(a["test"]["values"].values())
        left.scatter(values, [i] * len(values), s=18, color="tab:blue", alpha=0.7)
        if a["test"]["mean"] is not None:
            left.plot([a["test"]["mean"]] * 2, [i - 0.3, i + 0.3], color="black")
        p = a["paired_test_vs_reference"]
        if p and p["mean"] is not None:
            lo = p["low"] if p["low"] is not None else p["mean"]
            hi = p["high"] if p["high"] is not None else p["mean"]
            color = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray"
            right.errorbar([p["mean"]], [i], xerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="o", color=color, capsize=4)
    left.set_yticks(range(len(arms)), [a["arm"] for a in arms])
    left.set_xlabel("student test top-1 (%)")
    left.set_title("per seed (dots) and mean (bar)")
    right.axvline(0.0, color="black", linewidth=0.8)
    right.set_xlabel(f"test top-1 minus {data['reference']} (points), 95% CI")
    right.set_title("paired by seed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish(study: Study, failed: list[str], plots: bool, say: Callable[[str], None]) -> CompareResult:
    data = collect(study)
    table = markdown(data)
    folder = study.folder
    files = [atomic_write_text(folder / "compare.md", table), atomic_write_json(folder / "compare.json", data)]
    if plots:
        png = plot(data, folder / "compare.png")
        if png is not None:
            files.append(png)
        else:
            say("no plot: matplotlib is not installed (pip install 'asib[report]')")
    pending = study.seed_runs() is None or any(study.status(r) != "done" for r in study.seed_runs() or [])
    return CompareResult(folder, table, data, files, failed, pending)
