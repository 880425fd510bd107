"""The prepared-data format: uint8 tensors in safetensors plus ``dataset.json``.

``prepare_data`` reads a source once, carves the seeded splits, resizes, computes the
train mean/std and writes ``{train,val,test}.safetensors`` + ``dataset.json`` into a
folder atomically. Training reads only this folder (``load_info``, ``load_split``), so it
is fast, offline and the same on every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from asib.data.sources import RawData, load_source, stratified_split
from asib.errors import DataError, WriteError, first_line, write_error
from asib.recipe import DataSpec

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
INFO_FILE = "dataset.json"
PREPARE_HINT = "run `asib prepare-data RECIPE` first"
_CHUNK = 512  # images per resize / statistics batch, to bound memory


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says about a prepared dataset."""

    source: str
    name: str
    classes: tuple[str, ...]
    num_classes: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split_seed: int
    val_fraction: float
    train_subset: int | None
    counts: Mapping[str, int]
    sha256: Mapping[str, str]
    channels: int = 3
    format_version: int = FORMAT_VERSION
    transfer_subset: int | None = None
    transfer_split: str = "subset"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"], out["image_size"] = list(self.classes), list(self.image_size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["counts"], out["sha256"] = dict(self.counts), dict(self.sha256)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = INFO_FILE) -> DatasetInfo:
        """Build from parsed JSON, with a DataError naming the file for anything missing or odd."""
        if not isinstance(data, Mapping):
            raise DataError(f"{where}: expected a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{where}: format_version {version!r}, this asib reads {FORMAT_VERSION}", hint=PREPARE_HINT
            )
        try:
            info = cls(
                source=str(data["source"]),
                name=str(data["name"]),
                classes=tuple(str(c) for c in data["classes"]),
                num_classes=int(data["num_classes"]),
                image_size=(int(data["image_size"][0]), int(data["image_size"][1])),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                split_seed=int(data["split_seed"]),
                val_fraction=float(data["val_fraction"]),
                train_subset=None if data["train_subset"] is None else int(data["train_subset"]),
                counts={str(k): int(v) for k, v in data["counts"].items()},
                sha256={str(k): str(v) for k, v in data["sha256"].items()},
                channels=int(data["channels"]),
                format_version=int(version),
                transfer_subset=None if data.get("transfer_subset") is None else int(data["transfer_subset"]),
                transfer_split=str(data.get("transfer_split", "subset")),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise DataError(
                f"{where}: malformed ({exc.__class__.__name__}: {first_line(exc, 150)})", hint=PREPARE_HINT
            ) from None
        if (
            len(info.classes) != info.num_classes
            or len(info.mean) != info.channels
            or len(info.std) != info.channels
        ):
            raise DataError(
                f"{where}: classes, mean or std do not match num_classes/channels", hint=PREPARE_HINT
            )
        return info

    @classmethod
    def from_json(cls, text: str, where: str = INFO_FILE) -> DatasetInfo:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{where}: not valid JSON ({first_line(exc, 150)})", hint=PREPARE_HINT) from None
        return cls.from_dict(data, where)


# ---------------------------------------------------------------- preparing


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> uint8 (N, 3, H, W); grayscale is repeated to 3 channels."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        t = t[:, None]
    else:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    elif t.shape[1] == 4:
        t = t[:, :3]
    if t.shape[1] != 3:
        raise DataError(f"images have {t.shape[1]} channels; expected 1, 3 or 4")
    return t.contiguous()


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (N, 3, H, W) to (N, 3, size, size), in batches."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, images.shape[0], _CHUNK):
        chunk = images[i : i + _CHUNK].float()
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[i : i + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) of uint8 (N, C, H, W) on the 0..1 scale."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for i in range(0, images.shape[0], _CHUNK):
        chunk = images[i : i + _CHUNK].to(torch.float64) / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = max(1, images.shape[0] * images.shape[2] * images.shape[3])
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return [float(v) for v in mean], [float(v) for v in std]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PREPARED_FILES = frozenset({INFO_FILE, *(f"{split}.safetensors" for split in SPLITS)})


def _foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` asib did not write as a prepared dataset: every entry but plain files
    named as its files (folders get a trailing ``/``); all of it when dataset.json is not asib's."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    foreign = [
        e.name + ("/" if e.is_dir(follow_symlinks=False) else "")
        for e in entries
        if e.name not in PREPARED_FILES or not e.is_file(follow_symlinks=False)
    ]
    if not foreign and entries and not _is_asib_info(folder / INFO_FILE):
        foreign = [e.name for e in entries]
    return foreign


def _is_asib_info(path: Path) -> bool:
    """Whether ``path`` is a dataset.json that asib wrote (of this format version or an older one)."""
    try:
        data = json.loads(path.read_bytes()[: 64 << 20])
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"format_version", "source", "classes", "sha256"} <= set(data)


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(n if len(n) <= 60 else n[:57] + "..." for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_target(out_dir: Path, force: bool) -> None:
    """May ``out_dir`` receive a prepared dataset? A missing or empty folder may; a dataset that
    asib prepared may with ``force``; anything else never (``force`` removes only asib's files)."""
    if not os.path.lexists(out_dir):
        return
    here = Path.cwd().resolve()
    target = out_dir.resolve()
    if target == here or target in here.parents:
        raise DataError(
            f"{out_dir}: is the working folder (or holds it); a prepared dataset needs a folder of its own",
            hint="give --out data/NAME (or data.dir in the recipe)",
        )
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder", hint="choose another --out (or data.dir)")
    try:
        foreign = _foreign_entries(out_dir)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot be read ({exc.strerror})") from None
    if foreign:
        raise DataError(
            f"{out_dir}: holds files that asib did not write ({_listing(foreign)}); it is not a prepared dataset,"
            " so asib leaves it alone",
            hint="choose another --out (or data.dir), or move those files away",
        )
    if any(out_dir.iterdir()) and not force:
        raise DataError(f"{out_dir}: already prepared; use --force to prepare it again")


def _holds_only_prepared(folder: Path) -> bool:
    return all(e.name in PREPARED_FILES and e.is_file(follow_symlinks=False) for e in os.scandir(folder))


def _remove_leftovers(out_dir: Path) -> list[str]:
    """Remove the ``.<name>.tmp-*`` and ``.<name>.old-*`` folders that a killed prepare-data
    left beside ``out_dir``, when they hold nothing but a prepared dataset's files."""
    out_dir = Path(os.path.abspath(out_dir))
    name, removed = out_dir.name, []
    if not out_dir.parent.is_dir():
        return removed
    for entry in os.scandir(out_dir.parent):
        if not entry.is_dir(follow_symlinks=False):
            continue
        left = Path(entry.path)
        if entry.name.startswith(f".{name}.tmp-"):
            ours = _holds_only_prepared(left)
        elif entry.name.startswith(f".{name}.old-"):
            inner = os.listdir(left)
            ours = not inner or (inner == [name] and not (left / name).is_symlink() and (left / name).is_dir()
                                 and _holds_only_prepared(left / name))
        else:
            continue
        if ours:
            shutil.rmtree(left)
            removed.append(entry.name)
    return removed


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder ``tmp`` onto ``out_dir``; an old ``out_dir`` is removed only after
    that, and put back if the move fails (a prepared dataset here, an hf export in ``asib export``)."""
    out_dir = Path(os.path.abspath(out_dir))
    if not os.path.lexists(out_dir):
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(old / out_dir.name, out_dir)  # put the previous folder back
        old.rmdir()
        raise
    shutil.rmtree(old)


def _carve_splits(
    raw: RawData, spec: DataSpec, say: Callable[[str], None]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """train_subset, then the val split, then transfer_subset (all seeded, stratified), then 3 channels and resizing.

    ``transfer_split`` 'rest' keeps the training images the transfer subset leaves out instead.
    Also returns the images mean/std are computed on: the training split before
    ``transfer_subset``, so the transfer set and its rest are normalised alike.
    """
    train_x, train_y = raw.train_images, raw.train_labels
    if spec.train_subset is not None and spec.train_subset < len(train_y):
        _, keep = stratified_split(train_y, spec.train_subset / len(train_y), spec.split_seed, stream=1)
        train_x, train_y = train_x[keep], train_y[keep]
    train_idx, val_idx = stratified_split(train_y, spec.val_fraction, spec.split_seed, stream=2)
    stats_idx = train_idx
    if spec.transfer_subset is not None and spec.transfer_subset < len(train_idx):
        rest, subset = stratified_split(
            train_y[train_idx], spec.transfer_subset / len(train_idx), spec.split_seed, stream=3
        )
        train_idx = train_idx[rest if spec.transfer_split == "rest" else subset]
    elif spec.transfer_split == "rest":
        raise DataError(
            f"{spec.source}: transfer_subset {spec.transfer_subset} takes all {len(train_idx)} training images,"
            " so transfer_split 'rest' would keep none"
        )
    arrays = {
        "train": (train_x[train_idx], train_y[train_idx]),
        "val": (train_x[val_idx], train_y[val_idx]),
        "test": (raw.test_images, raw.test_labels),
    }
    tensors = {}
    for split, (x, y) in arrays.items():
        images = _to_nchw(x)
        if spec.image_size is not None:
            say(f"resizing {split} to {spec.image_size}x{spec.image_size}")
            images = resize_uint8(images, spec.image_size)
        tensors[split] = (images, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))
    if len(tensors["train"][1]) == 0:
        raise DataError(f"{spec.source}: the train split is empty after train_subset and val_fraction")
    stats = tensors["train"][0]
    if len(stats_idx) != len(train_idx):
        stats = _to_nchw(train_x[stats_idx])
        if spec.image_size is not None:
            stats = resize_uint8(stats, spec.image_size)
    return tensors, stats


def _umask() -> int:
    """The process's umask, read from /proc where it can be (without changing it)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_split(folder: Path, split: str, images: torch.Tensor, labels: torch.Tensor) -> str:
    """Write one split's safetensors file, flushed to disk; returns its sha256."""
    path = folder / f"{split}.safetensors"
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(path))
    with open(path, "rb+") as fh:
        os.fchmod(fh.fileno(), 0o666 & ~_umask())  # safetensors writes private files; the umask decides
        os.fsync(fh.fileno())
    return _sha256(path)


def prepare_data(
    spec: DataSpec,
    out_dir: str | Path,
    name: str,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> DatasetInfo:
    """Read ``spec``'s source and write the prepared dataset into ``out_dir``.

    ``train_subset`` is drawn (seeded, stratified) from train before the val split is carved
    out; mean/std come from the final train split only. ``progress`` receives one short
    line per stage. Nothing appears in ``out_dir`` until every file is complete; an existing
    dataset there is replaced only with ``force``.
    """
    out_dir = Path(out_dir)
    say = progress or (lambda _msg: None)
    _check_target(out_dir, force)
    say(f"reading {spec.source}")
    raw = load_source(spec)
    return write_prepared(raw, spec, out_dir, name, spec.source, force, say)


def write_prepared(
    raw: RawData,
    spec: DataSpec,
    out_dir: Path,
    name: str,
    source: str,
    force: bool,
    say: Callable[[str], None],
) -> DatasetInfo:
    """The writing half of ``prepare_data``: carve the splits, compute mean/std on train,
    write every file into a temporary folder and move it into place."""
    tensors, stats_images = _carve_splits(raw, spec, say)
    say("computing mean and std on train")
    mean, std = channel_stats(stats_images)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if force:
            _remove_leftovers(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{Path(os.path.abspath(out_dir)).name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise write_error(exc.filename or out_dir.parent, exc) from None
    try:
        info = _write_folder(tmp, tensors, raw, spec, source, name, mean, std, say)
        _check_target(out_dir, force)  # someone may have prepared it meanwhile
        replace_dir(tmp, out_dir)
    except OSError as exc:
        raise write_error(out_dir, exc) from None
    except SafetensorError as exc:  # safetensors reports a failed write as its own error
        raise WriteError(f"{out_dir}: cannot write ({first_line(exc)})",
                         hint="the previous files are kept") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # a write failed already: that is the error to report
    say(f"prepared {out_dir}")
    return info


def _write_folder(
    tmp: Path,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    raw: RawData,
    spec: DataSpec,
    source: str,
    name: str,
    mean: list[float],
    std: list[float],
    say: Callable[[str], None],
) -> DatasetInfo:
    """Write the splits and dataset.json into the private folder ``tmp``, then give it the
    permissions the umask says (mkdtemp makes it private to the owner)."""
    sha = {}
    for split, (images, labels) in tensors.items():
        say(f"writing {split} ({len(labels)} images)")
        sha[split] = _write_split(tmp, split, images, labels)
    height, width = tensors["train"][0].shape[-2:]
    info = DatasetInfo(
        source=source,
        name=name,
        classes=raw.classes,
        num_classes=len(raw.classes),
        image_size=(int(height), int(width)),
        mean=tuple(mean),
        std=tuple(std),
        split_seed=spec.split_seed,
        val_fraction=spec.val_fraction,
        train_subset=spec.train_subset,
        transfer_subset=spec.transfer_subset,
        transfer_split=spec.transfer_split,
        counts={split: len(labels) for split, (_, labels) in tensors.items()},
        sha256=sha,
    )
    (tmp / INFO_FILE).write_text(info.to_json())
    os.chmod(tmp, 0o777 & ~_umask())
    return info


# ---------------------------------------------------------------- loading


def load_info(data_dir: str | Path) -> DatasetInfo:
    """Read ``dataset.json`` of a prepared dataset."""
    path = Path(data_dir) / INFO_FILE
    if not path.is_file():
        raise DataError(f"{data_dir}: no prepared dataset ({INFO_FILE} missing)", hint=PREPARE_HINT)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (at byte {exc.start})",
                        hint=PREPARE_HINT + " (with --force)") from None
    return DatasetInfo.from_json(text, str(path))


def load_split(data_dir: str | Path, split: str, verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) and int64 labels (N,) of one split; ``verify`` checks the sha256 first."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (have {', '.join(SPLITS)})")
    info = load_info(data_dir)
    path = Path(data_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: missing", hint=PREPARE_HINT + " (with --force to rebuild it)")
    if verify and _sha256(path) != info.sha256.get(split):
        raise DataError(
            f"{path}: checksum does not match {INFO_FILE}; the file changed or is damaged", hint=PREPARE_HINT
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: truncated or corrupt ({exc})", hint=PREPARE_HINT + " (with --force)"
        ) from None
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or labels is None:
        raise DataError(
            f"{path}: expected tensors 'images' and 'labels', found {sorted(tensors)}", hint=PREPARE_HINT
        )
    if (
        images.dtype != torch.uint8
        or labels.dtype != torch.int64
        or images.ndim != 4
        or images.shape[1] != info.channels
        or tuple(images.shape[2:]) != info.image_size
        or labels.shape != (images.shape[0],)
    ):
        raise DataError(
            f"{path}: images {images.dtype} {tuple(images.shape)} / labels {labels.dtype} {tuple(labels.shape)} "
            f"do not match {INFO_FILE}",
            hint=PREPARE_HINT + " (with --force)",
        )
    return images, labels
