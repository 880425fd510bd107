"""Hostile and unlucky inputs, from the outside: the CLI entry point on crafted files in a
temporary folder. Every case ends in one clear line (exit 1, or 2 for a recipe), never a
traceback, and the user's files are still there byte for byte."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
import traceback
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from asib.cli import app

runner = CliRunner()
World = dict[str, Path]  # the shared prepared data, recipe and teacher checkpoint


# ---------------------------------------------------------------- helpers


def run(*args: object) -> Any:
    """Invoke the CLI in-process; any exception but an exit is a traceback the user would see."""
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("".join(traceback.format_exception(result.exception)))
    assert "Traceback" not in result.output
    return result


def fails(result: Any, code: int, *expected: str) -> str:
    """The run ended with ``code`` and one error line that holds every ``expected`` text."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    return result.output


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (hidden ones too): file bytes, link targets, folders."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = path.read_bytes()
    return out


def recipe(root: Path, name: str = "h", epochs: int = 1, **top: Any) -> dict[str, Any]:
    """Tiny digits (8x8, 200 images), one resnet8 teacher, a CE student: seconds per run."""
    return {
        "name": name,
        "device": "cpu",
        "out_dir": str(root / "runs" / name),
        "data": {"source": "digits", "dir": str(root / "data"), "train_subset": 200, "val_fraction": 0.2,
                 "image_size": 8},
        "teachers": [{"name": "t1", "arch": "resnet8",
                      "train": {"epochs": epochs, "batch_size": 32, "optim": {"name": "adamw", "lr": 3e-3}}}],
        "student": {"arch": "resnet8"},
        "distill": {"method": "ce", "num_stages": 1, "student_epochs": 1, "batch_size": 32},
        **top,
    }


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Prepared data and one finished teacher run, shared by the cases that only read them."""
    root = tmp_path_factory.mktemp("hostile")
    path = write_recipe(root / "r.yaml", recipe(root))
    assert run("prepare-data", path, "-q").exit_code == 0
    r = run("finetune-teacher", path, "-q")
    assert r.exit_code == 0, r.output
    return {"root": root, "recipe": path, "data": root / "data",
            "teacher": root / "runs" / "h" / "teachers" / "t1" / "model.safetensors"}


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def teacher_dir(root: Path, name: str = "h") -> Path:
    return root / "runs" / name / "teachers" / "t1"


def stopped_run(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A teacher run stopped (as by SIGTERM) after its first step, its train state saved."""
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, data=own_data(world)))
    with monkeypatch.context() as m:
        m.setattr("asib.engine.loop._agreed_stop", lambda stop, dist, steps: True)
        r = run("finetune-teacher", path, "-q")
    assert r.exit_code == 130, r.output
    folder = teacher_dir(tmp_path)
    assert (folder / "train_state.safetensors").is_file() and not (folder / ".lock").exists()
    return path, folder


def own_data(world: World) -> dict[str, Any]:
    """The shared prepared data, as a recipe's data section."""
    return {**recipe(world["root"])["data"]}


# ---------------------------------------------------------------- data loss


@pytest.mark.parametrize("case", ["user files", "prepared data plus a user file", "foreign dataset.json"])
def test_prepare_force_never_removes_what_asib_did_not_write(world: World, tmp_path: Path, case: str) -> None:
    out = tmp_path / "mine"
    if case == "user files":
        (out / "photos").mkdir(parents=True)
        (out / "notes.txt").write_text("my thesis")
        (out / "photos" / "cat.png").write_bytes(b"\x89PNG not really")
    elif case == "prepared data plus a user file":
        shutil.copytree(world["data"], out)
        (out / "notes.txt").write_text("my thesis")
    else:
        out.mkdir()
        (out / "dataset.json").write_text('{"mine": true}')
        (out / "train.safetensors").write_bytes(b"my own file")
    before, around = snapshot(out), sorted(p.name for p in tmp_path.iterdir())
    r = run("prepare-data", world["recipe"], "--out", out, "--force")
    output = fails(r, 1, "asib did not write", "asib leaves it alone")
    assert "--force" not in output.split("hint:")[-1]  # the refusal never suggests --force
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == around  # no .mine.tmp-* / .mine.old-* left


def test_prepare_out_dot_is_refused_and_leaves_nothing(world: World, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    before, around = snapshot(tmp_path), sorted(os.listdir(tmp_path))
    for args in (("--out", "."), ("--out", ".", "--force"), ("--out", "..", "--force")):
        fails(run("prepare-data", world["recipe"], *args), 1, "working folder")
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == around


def test_prepare_force_replaces_its_own_dataset_and_leftovers(world: World, tmp_path: Path,
                                                              umask_022: None) -> None:
    out = tmp_path / "data"
    shutil.copytree(world["data"], out)
    (tmp_path / ".data.tmp-killed").mkdir()  # a prepare-data killed while writing
    (tmp_path / ".data.tmp-killed" / "train.safetensors").write_bytes(b"half")
    (tmp_path / ".data.old-killed" / "data").mkdir(parents=True)  # ... or while swapping folders
    (tmp_path / ".data.old-killed" / "data" / "dataset.json").write_text("{}")
    (tmp_path / ".data.tmp-yours").mkdir()  # not asib's: stays
    (tmp_path / ".data.tmp-yours" / "notes.txt").write_text("keep")
    r = run("prepare-data", world["recipe"], "--out", out, "--force", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.tmp-yours", "data"]
    assert (tmp_path / ".data.tmp-yours" / "notes.txt").read_text() == "keep"
    # files honour the umask (0644 here), the folder too (0755): others on the machine can read them
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        name: 0o644 for name in ("dataset.json", "train.safetensors", "val.safetensors", "test.safetensors")}
    assert out.stat().st_mode & 0o777 == 0o755
    r = run("prepare-data", world["recipe"], "--out", out)
    fails(r, 1, "already prepared", "--force")


@pytest.mark.parametrize("plant", ["symlink", "hard link"])
def test_lock_never_follows_or_truncates_what_is_not_its_own(world: World, tmp_path: Path,
                                                             plant: str) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("not a pid")
    folder = teacher_dir(tmp_path)
    folder.mkdir(parents=True)
    if plant == "symlink":
        (folder / ".lock").symlink_to(outside)
    else:
        os.link(outside, folder / ".lock")
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, data=own_data(world)))
    fails(run("finetune-teacher", path, "-q"), 1, ".lock", "not asib's lock file")
    assert outside.read_text() == "not a pid"
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_orphan_temporaries_are_removed_by_force_and_resume(world: World, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path, folder = stopped_run(world, tmp_path, monkeypatch)
    orphans = [".model.safetensors.1a2b3c4d.tmp", ".train_state.safetensors.x_y9z0w1.tmp",
               ".summary.json.abcdefgh.tmp"]
    mine = folder / ".notes.1a2b3c4d.tmp"  # not a temporary of an asib file: stays
    for flag in ("--resume", "--force"):
        for name in orphans:
            (folder / name).write_bytes(b"half a file")
        mine.write_text("keep")
        r = run("finetune-teacher", path, "-q", flag)
        assert r.exit_code == 0, r.output
        assert not any((folder / name).exists() for name in orphans), flag
        assert mine.read_text() == "keep"
        assert not (folder / ".lock").exists()  # removed when the run ended


def test_files_honour_the_umask(world: World, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, data=own_data(world)))
    old = os.umask(0o002)
    try:
        r = run("finetune-teacher", path, "-q")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in teacher_dir(tmp_path).iterdir()}
    names = ("model.safetensors", "last.safetensors", "recipe.yaml", "metrics.jsonl", "summary.json",
             "metrics.csv", "train.log")
    assert modes == {name: 0o664 for name in names}


# ---------------------------------------------------------------- one line instead of a traceback


def test_markup_and_control_characters_in_user_strings(world: World, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # the table's title on one line, whatever the folder's length
    data = tmp_path / "a[" / "]b"  # the folder a[/]b
    shutil.copytree(world["data"], data)
    info = json.loads((data / "dataset.json").read_text())
    info["classes"] = ["[/]", "[red]x", "bell\x07", "esc\x1b[31mred", "rtl\u202eevil", *info["classes"][5:]]
    (data / "dataset.json").write_text(json.dumps(info))
    r = run("evaluate", world["teacher"], "--data", data, "--per-class")
    assert r.exit_code == 0, r.output
    assert "a[/]b" in r.output and "[/]" in r.output and "[red]x" in r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and "\u202e" not in r.output
    assert "\\x1b" in r.output
    teachers = [{"name": "[/]", "arch": "m", "x": 1}]
    bad = write_recipe(tmp_path / "r[" / "]x.yaml", {"name": "x", "teachers": teachers})
    fails(run("recipe", "check", bad), 2, "r[/]x.yaml", "teachers[0].x: unknown key")
    fails(run("evaluate", world["teacher"], "--data", tmp_path / "n[/]one"), 1, "n[/]one")
    fails(run("evaluate", tmp_path / "c[/]k.safetensors", "--data", data), 1, "c[/]k.safetensors")


def test_recipe_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: x\nteachers: []\nseed: \xff\xfe\n")
    before = snapshot(tmp_path)
    fails(run("prepare-data", path), 2, "not UTF-8", "line 3")
    assert snapshot(tmp_path) == before


def _rewrite(src: Path, dst: Path, meta: dict[str, str | None] | None = None,
             tensors: dict[str, Any] | None = None) -> Path:
    """A copy of a checkpoint with some header fields changed (None: removed) or other tensors."""
    with safe_open(str(src), framework="pt") as fh:
        header = dict(fh.metadata())
    for key, value in (meta or {}).items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata=header)
    return dst


@pytest.mark.parametrize("case, expected", [
    ("no arch", "no asib.arch"),
    ("classes not a number", "not a class count"),
    ("classes huge", "not a class count"),
    ("unknown arch", "unknown model"),
    ("other arch", "does not fit vgg8"),
    ("wrong shape", "does not fit resnet8"),
])
def test_checkpoint_headers_that_lie(world: World, tmp_path: Path, case: str, expected: str) -> None:
    src, dst = world["teacher"], tmp_path / "bad.safetensors"
    if case == "wrong shape":
        tensors = load_file(str(src))
        name = next(k for k, v in tensors.items() if v.ndim == 2)  # the classifier's weight
        tensors[name] = tensors[name][:, :3].contiguous()
        _rewrite(src, dst, tensors=tensors)
    else:
        meta = {"no arch": {"asib.arch": None}, "classes not a number": {"asib.num_classes": "ten"},
                "classes huge": {"asib.num_classes": "9" * 40}, "unknown arch": {"asib.arch": "resnet1522"},
                "other arch": {"asib.arch": "vgg8"}}[case]
        _rewrite(src, dst, meta)
    before = snapshot(tmp_path)
    fails(run("evaluate", dst, "--data", world["data"]), 1, "bad.safetensors", expected)
    assert snapshot(tmp_path) == before


def test_teacher_checkpoint_of_another_arch_is_refused(world: World, tmp_path: Path) -> None:
    data = recipe(tmp_path, data=own_data(world))
    data["teachers"][0].update(arch="vgg8", checkpoint=str(world["teacher"]))
    data["distill"] = {"method": "kd", "num_stages": 1, "student_epochs": 1, "batch_size": 32}
    path = write_recipe(tmp_path / "r.yaml", data)
    fails(run("distill", path, "-q"), 1, "teachers[0] (t1)", "holds a resnet8", "teacher is a vgg8")
    assert not (tmp_path / "runs").exists()


def _tamper(state: Path, case: str) -> None:
    with safe_open(str(state), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(state))
    skeleton = json.loads(meta["asib.train_state"])
    if case == "bad JSON":
        meta["asib.train_state"] = meta["asib.train_state"][:-7]
    elif case == "missing tensor":
        tensors.pop(next(iter(skeleton["task"]["model"].values()))["__tensor__"])
    elif case == "position of the wrong type":
        skeleton["position"]["epoch_index"] = "zero"
    elif case == "model of the wrong type":
        skeleton["task"]["model"] = 5
    elif case == "records of the wrong type":
        skeleton["records"] = {"not": "a list"}
    elif case == "tensor of the wrong shape":
        key = next(v["__tensor__"] for v in skeleton["task"]["model"].values() if isinstance(v, dict))
        tensors[key] = tensors[key].flatten()[:1].contiguous()
    if case not in ("bad JSON", "missing tensor"):
        meta["asib.train_state"] = json.dumps(skeleton)
    save_file(tensors, str(state), metadata=meta)


TAMPERINGS = ["bad JSON", "missing tensor", "position of the wrong type", "model of the wrong type",
              "records of the wrong type", "tensor of the wrong shape"]


@pytest.mark.parametrize("case", TAMPERINGS)
def test_tampered_train_state(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              case: str) -> None:
    path, folder = stopped_run(world, tmp_path, monkeypatch)
    _tamper(folder / "train_state.safetensors", case)
    before = snapshot(folder)
    fails(run("finetune-teacher", path, "-q", "--resume"), 1, "train_state.safetensors", "--force")
    assert snapshot(folder) == before


def checkpoints(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(".safetensors")}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_errors_while_writing_keep_the_last_good_files(world: World, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """The disk fills (or the folder turns read-only) at the second train-state save."""
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, epochs=2, data=own_data(world)))
    folder, real, seen = teacher_dir(tmp_path), os.replace, []
    kept: dict[str, bytes] = {}

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).name == "train_state.safetensors":
            seen.append(dst)
            if len(seen) == 2:
                kept.update(checkpoints(folder))
                raise OSError(code, os.strerror(code), str(dst))
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    output = fails(run("finetune-teacher", path, "-q"), 1, "train_state.safetensors", os.strerror(code))
    assert "hint:" in output
    assert checkpoints(folder) == kept
    assert set(kept) == {"model.safetensors", "train_state.safetensors"}
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary, no .lock


def test_read_only_run_folder(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, data=own_data(world)))
    folder, real = teacher_dir(tmp_path), os.open

    def open_(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(name).startswith(str(folder)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(name))
        return real(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    fails(run("finetune-teacher", path, "-q"), 1, str(folder), "Read-only file system", "another --out")


def test_unknown_device(world: World) -> None:
    r = run("evaluate", world["teacher"], "--data", world["data"], "--device", "tpu")
    fails(r, 1, "unknown device 'tpu'")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("side", [30000, 9000])
def test_image_that_declares_too_many_pixels(tmp_path: Path, side: int) -> None:
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "images" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / "cat" / "ok.png")
    (tmp_path / "images" / "train" / "cat" / "bomb.png").write_bytes(_png_header(side, side))
    path = write_recipe(tmp_path / "r.yaml", {"name": "img", "data": {
        "source": "imagefolder", "root": str(tmp_path / "images"), "dir": str(tmp_path / "data")}})
    before = snapshot(tmp_path)
    fails(run("prepare-data", path), 1, "bomb.png", f"{side}x{side}" if side < 10000 else "pixels")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- preemption-friendly resume


def test_resume_without_a_run_starts_from_the_beginning(world: World, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, data=own_data(world)))
    r = run("finetune-teacher", path, "-q", "--resume")
    assert r.exit_code == 0, r.output
    assert "starting the run from the beginning" in r.output
    assert (teacher_dir(tmp_path) / "summary.json").is_file()


def test_distill_resume_starts_then_finds_the_run_finished(world: World, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, data=own_data(world)))
    out = tmp_path / "runs" / "d"
    r = run("distill", path, "-q", "--resume", "--out", out)
    assert r.exit_code == 0 and "starting the run from the beginning" in r.output, r.output
    before = snapshot(out)
    r = run("distill", path, "-q", "--resume", "--out", out)
    assert r.exit_code == 0 and "the run has finished; nothing to resume" in r.output, r.output
    assert "student (ce)" not in r.output and snapshot(out) == before


def test_resume_refuses_run_files_without_a_recipe(world: World, tmp_path: Path) -> None:
    folder = teacher_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"whose?")
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, data=own_data(world)))
    before = snapshot(tmp_path)
    fails(run("finetune-teacher", path, "-q", "--resume"), 1, "no recipe.yaml", "--force")
    assert snapshot(tmp_path) == before


def _killed_before_first_state(world: World, tmp_path: Path) -> tuple[Path, Path]:
    """A run folder as a kill in the first epoch leaves it: recipe.yaml, an empty log, no train state."""
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, epochs=2, data=own_data(world)))
    assert run("finetune-teacher", path, "-q").exit_code == 0
    folder = teacher_dir(tmp_path)
    for name in ("summary.json", "last.safetensors", "model.safetensors"):
        (folder / name).unlink()
    (folder / "metrics.jsonl").write_text("")
    (folder / ".model.safetensors.deadbeef.tmp").write_bytes(b"half")
    return path, folder


def test_resume_after_a_kill_before_the_first_train_state(world: World, tmp_path: Path) -> None:
    path, folder = _killed_before_first_state(world, tmp_path)
    r = run("finetune-teacher", path, "-q", "--resume")
    assert r.exit_code == 0, r.output
    assert "no train state to resume; starting the run from the beginning" in r.output
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.safetensors", "metrics.csv", "metrics.jsonl", "model.safetensors", "recipe.yaml", "summary.json",
        "train.log"]


def test_resume_refuses_a_changed_recipe_without_a_train_state(world: World, tmp_path: Path) -> None:
    path, folder = _killed_before_first_state(world, tmp_path)
    before = snapshot(folder)
    fails(run("finetune-teacher", path, "-q", "--resume", "--set", "teachers.0.train.epochs=3"), 1,
          "differs from the one the run started with")
    assert snapshot(folder) == before


def test_resume_of_a_finished_run_exits_0_and_changes_nothing(world: World) -> None:
    folder = world["teacher"].parent
    before = snapshot(folder)
    r = run("finetune-teacher", world["recipe"], "--resume")
    assert r.exit_code == 0, r.output
    assert "the run has finished; nothing to resume" in r.output
    assert snapshot(folder) == before


def test_stop_then_resume_removes_the_lock(world: World, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path, folder = stopped_run(world, tmp_path, monkeypatch)  # checks .lock is gone after the stop
    r = run("finetune-teacher", path, "-q", "--resume")
    assert r.exit_code == 0, r.output
    assert not (folder / ".lock").exists() and not (folder / "train_state.safetensors").exists()


# ---------------------------------------------------------------- bounded work


@pytest.mark.parametrize("setting, bound", [
    ("teachers.0.train.epochs=1000000000000", "less than or equal to 10000"),
    ("teachers.0.train.epochs=1.0e+12", "less than or equal to 10000"),
    ("data.image_size=100000", "less than or equal to 4096"),
    ("teachers.0.train.batch_size=1000000000", "less than or equal to 65536"),
    ("distill.batch_size=1000000000", "less than or equal to 65536"),
])
def test_values_that_cannot_be_meant(world: World, tmp_path: Path, setting: str, bound: str) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path))
    before = snapshot(tmp_path)
    for command in ("prepare-data", "finetune-teacher", "distill"):
        r = run(command, path, "--set", setting)
        assert r.exit_code == 2 and bound in r.output, r.output
    assert snapshot(tmp_path) == before


def test_yaml_alias_bomb_is_a_short_error(tmp_path: Path) -> None:
    lines = ["name: x", "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    lines.append("distill: {teacher_weights: *l9}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: x\ndistill:\n  teacher_weights: &w [1, *w]\n")
    for bad, expected in ((path, "more than 100000 values"), (loop, "nested more than 32 levels")):
        began = time.monotonic()
        r = run("recipe", "check", bad)
        assert r.exit_code == 2 and expected in r.output, r.output
        assert len(r.output) < 2000 and time.monotonic() - began < 20


def test_error_lines_echo_a_few_hundred_characters_at_most(tmp_path: Path) -> None:
    data = {"name": "x y" + "z" * 100_000, "distill": {"method": "m" * 50_000}}
    path = write_recipe(tmp_path / "r.yaml", data)
    r = run("recipe", "check", path)
    assert r.exit_code == 2
    assert all(len(line) < 600 for line in r.output.splitlines()), max(map(len, r.output.splitlines()))


def test_duplicate_keys_are_refused_and_anchors_still_work(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\ndistill:\n  tau: 2\n  num_stages: 2\n  tau: 3\n")
    fails(run("recipe", "check", path), 2, "distill.tau: key 'tau' given twice (lines 3 and 5)")
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "name: x\n"
        "teachers:\n"
        "  - &t {name: a, arch: resnet8, train: &train {epochs: 2, batch_size: 16}}\n"
        "  - {<<: *t, name: b, train: {<<: *train, epochs: 3}}\n"
    )
    r = run("recipe", "check", merged)
    assert r.exit_code == 0, r.output
    teachers = yaml.safe_load(r.output)["teachers"]
    assert [(t["name"], t["train"]["epochs"], t["train"]["batch_size"]) for t in teachers] == [
        ("a", 2, 16), ("b", 3, 16)]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_save_every_below_one(world: World, value: str) -> None:
    for command in ("finetune-teacher", "distill"):
        fails(run(command, world["recipe"], "--save-every", value), 1, "--save-every: must be 1 or more")
