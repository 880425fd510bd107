"""Data for library users: any torch dataset into the prepared format, and continual-learning task splits.

``tensor_loader(images, labels, ...)`` is an in-memory loader over tensors, arrays or a torch
dataset, with no file written: your normalisation (``mean``/``std``), padding, and a seeded
validation split. ``prepare_dataset(dataset, out_dir)`` turns a map-style dataset that knows
its ``classes`` (torchvision's CIFAR/MNIST/ImageFolder, or your own with ``ClassInfoMixin``)
into the same ``{train,val,test}.safetensors`` + ``dataset.json`` folder ``asib prepare-data``
writes, using the writer functions of ``asib.data.prepared``. ``get_split_loaders(data_dir,
num_tasks, ...)`` cuts a prepared dataset into tasks over disjoint class subsets (split
CIFAR-100: 10 or 20 tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from asib.data.loader import InMemoryLoader
from asib.data.prepared import (
    DatasetInfo,
    _check_target,
    load_info,
    load_split,
    write_prepared,
)
from asib.data.sources import RawData, _raw, stratified_split
from asib.errors import DataError
from asib.recipe import AugmentSpec, DataSpec, spec_from

MAX_PAD = 256  # pixels of zero padding per side, as the recipe's crop_padding

# ---------------------------------------------------------------- class names


class ClassInfoMixin:
    """Gives a custom dataset the ``classes`` list ``prepare_dataset`` needs, and its derived lookups.

    Call ``self.set_classes(names)`` in ``__init__`` (or define ``classes`` yourself); then
    ``num_classes``, ``class_to_idx`` and ``class_name(i)`` come for free.
    """

    classes: Sequence[str]

    def set_classes(self, names: Sequence[str]) -> None:
        names = [str(n) for n in names]
        if not names:
            raise DataError("a dataset needs at least one class name")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"class names must be unique; repeated: {', '.join(dup)}")
        self.classes = names

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def class_name(self, index: int) -> str:
        return str(self.classes[int(index)])


# ---------------------------------------------------------------- any dataset -> prepared


def _image_array(image: Any, where: str) -> np.ndarray:
    """A PIL image, uint8/float tensor (C, H, W) or array (H, W[, C]) as uint8 (H, W[, C])."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image, without importing PIL
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # CHW as transforms.ToTensor gives
            t = t.permute(1, 2, 0)
        if t.is_floating_point():  # ToTensor's 0..1 scale
            t = (t.clamp(0, 1) * 255).round()
        return t.to(torch.uint8).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DataError(f"{where}: numpy images must be uint8, got {image.dtype}")
        return image
    raise DataError(
        f"{where}: cannot read an image of type {type(image).__name__}",
        hint="return a PIL image, a tensor (C, H, W) or a uint8 array (H, W[, C]) from __getitem__",
    )


def _dataset_arrays(dataset: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W[, C]) and int64 labels of a map-style dataset.

    torchvision's array-backed datasets (``data`` + ``targets``, no transform) are read
    directly; anything else item by item. Every image must have the same size.
    """
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if data is not None and targets is not None and getattr(dataset, "transform", None) is None:
        images = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        if images.dtype == np.uint8 and images.ndim in (3, 4) and len(images) == len(targets):
            return images, np.asarray(targets, dtype=np.int64)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(f"{name}: expected a map-style dataset (with __len__ and __getitem__)")
    images, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{name}[{i}]: expected an (image, label) pair, got {type(item).__name__}")
        images.append(_image_array(item[0], f"{name}[{i}]"))
        labels.append(int(item[1]))
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(
            f"{name}: images of different shapes ({', '.join(str(s) for s in sorted(shapes)[:3])}...)",
            hint="resize them in the dataset, e.g. with a torchvision Resize transform",
        )
    if not images:
        raise DataError(f"{name}: the dataset is empty")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _classes_of(dataset: Any, name: str) -> tuple[str, ...]:
    classes = getattr(dataset, "classes", None)
    if classes is None or isinstance(classes, str) or len(classes) == 0:
        raise DataError(
            f"{name}: the dataset has no 'classes' list",
            hint="give it one, e.g. with asib.data.tasks.ClassInfoMixin and self.set_classes([...])",
        )
    return tuple(str(c) for c in classes)


def prepare_dataset(
    dataset: Any,
    out_dir: str | Path,
    *,
    test_dataset: Any | None = None,
    test_fraction: float | None = None,
    val_fraction: float = 0.1,
    name: str | None = None,
    image_size: int | None = None,
    pad: int = 0,
    train_subset: int | None = None,
    split_seed: int = 0,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DatasetInfo:
    """Write a torch dataset (which has ``classes``) to ``out_dir`` in the prepared format.

    The test split is ``test_dataset``, or, without one, a seeded, stratified ``test_fraction``
    of ``dataset`` (say which: ``test_fraction=0`` holds none out and leaves the test split
    empty). Then, as in ``asib prepare-data``: ``train_subset``, the ``val_fraction`` split
    (0: none), zero ``pad`` pixels on every side (28x28 to 32x32 with 2), resizing to
    ``image_size``, train mean/std, all written atomically (``force`` replaces an existing
    dataset). Returns what ``dataset.json`` says. ``tensor_loader`` needs no files at all.
    """
    out_dir = Path(out_dir)
    label = name or type(dataset).__name__
    say = progress or (lambda _msg: None)
    _check_pad(pad)
    _check_target(out_dir, force)
    classes = _classes_of(dataset, label)
    if test_dataset is None and test_fraction is None:
        raise DataError(
            f"{label}: no test_dataset, and no test_fraction to hold out of it",
            hint="give test_dataset=..., or test_fraction=0.2 (a seeded, stratified fifth), or test_fraction=0 (none)",
        )
    if test_dataset is not None and test_fraction:
        raise DataError(f"{label}: give a test_dataset or a test_fraction, not both")
    say(f"reading {label}")
    train = _dataset_arrays(dataset, label)
    if test_dataset is not None:
        if _classes_of(test_dataset, f"{label} (test)") != classes:
            raise DataError(f"{label}: the test dataset's classes differ from the training dataset's")
        test = _dataset_arrays(test_dataset, f"{label} (test)")
    elif test_fraction == 0:
        test = (train[0][:0], train[1][:0])
    else:
        assert test_fraction is not None
        if not 0 < test_fraction < 1:
            raise DataError(f"test_fraction must be in [0, 1) (given: {test_fraction})")
        keep, held = stratified_split(train[1], test_fraction, split_seed, stream=3)
        train, test = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
    if pad:
        train, test = (_pad_hw(train[0], pad), train[1]), (_pad_hw(test[0], pad), test[1])
    raw = _raw(train, test, classes)
    return _write_prepared(raw, out_dir, label, val_fraction, image_size, train_subset, split_seed, force, say)


def _check_pad(pad: int) -> None:
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad <= MAX_PAD:
        raise DataError(f"pad must be a whole number of pixels from 0 to {MAX_PAD} (given: {pad!r})")


def _pad_hw(images: np.ndarray, pad: int) -> np.ndarray:
    """Zero-pad uint8 (N, H, W[, C]) images by ``pad`` pixels on every side."""
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
    return np.pad(images, widths)


def _write_prepared(
    raw: RawData,
    out_dir: Path,
    name: str,
    val_fraction: float,
    image_size: int | None,
    train_subset: int | None,
    split_seed: int,
    force: bool,
    say: Callable[[str], None],
) -> DatasetInfo:
    """The writing half of ``prepare_data`` for data that does not come from a recipe source."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1) (given: {val_fraction})")
    # The carving helpers read these fields only; the source is a dataset class, not a recipe source name.
    spec = DataSpec.model_construct(
        source=name, val_fraction=val_fraction, image_size=image_size, train_subset=train_subset, split_seed=split_seed
    )
    return write_prepared(raw, spec, out_dir, out_dir.name, f"dataset:{name}", force, say)


# ---------------------------------------------------------------- in-memory data -> a loader


def _channel_axis(shape: tuple[int, ...], channels_first: bool) -> int:
    """Where the channels are in a 4-d image batch: 1 (N, C, H, W) or 3 (N, H, W, C)."""
    first, last = shape[1] in (1, 3, 4), shape[3] in (1, 3, 4)
    if first and (channels_first or not last):
        return 1
    if last:
        return 3
    raise DataError(f"images of shape {shape}: no axis of 1, 3 or 4 channels", hint="give (N, C, H, W) images")


def image_tensor(images: Any, where: str = "images") -> torch.Tensor:
    """uint8 (N, C, H, W) from a tensor (N, C, H, W) or (N, H, W), a uint8 array (N, H, W[, C])
    as torchvision datasets hold them, or float images on ToTensor's 0..1 scale. No copy when
    the input is already uint8 (a channels-last array comes back as a permuted view)."""
    is_tensor = isinstance(images, torch.Tensor)
    if not is_tensor:
        array = np.asarray(images)
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"{where}: arrays must be uint8 (0..255) or float (0..1), got {array.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(array))
    t = images.detach()
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4:
        raise DataError(f"{where}: expected a batch of images (N, C, H, W), got shape {tuple(t.shape)}")
    if _channel_axis(tuple(t.shape), channels_first=is_tensor) == 3:
        t = t.permute(0, 3, 1, 2)
    if t.is_floating_point():
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise DataError(f"{where}: float images must be on the 0..1 scale (ToTensor's); give uint8 0..255 otherwise")
        t = (t * 255).round_().to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise DataError(f"{where}: images must be uint8 (0..255) or float (0..1), got {t.dtype}")
    return t


def tensor_loader(
    images: Any,
    labels: Any = None,
    *,
    batch_size: int,
    train: bool = False,
    augment: bool | AugmentSpec | dict[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pad: int = 0,
    val_fraction: float = 0.0,
    split: Literal["train", "val"] = "train",
    split_seed: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    num_classes: int | None = None,
) -> InMemoryLoader:
    """An in-memory loader over your own data, with nothing written to disk.

    ``images``: uint8 (or 0..1 float) tensors (N, C, H, W) or (N, H, W), arrays (N, H, W[, C]),
    or a map-style torch dataset of (image, label) items with ``labels`` left out. ``mean`` /
    ``std`` (0..1 scale) normalise; by default they are measured on the training part of
    these images. ``pad`` zero-pads every image once (28x28 to 32x32 with 2); ``augment``
    (True: crop after 4-pixel padding and flip; or an ``AugmentSpec``/dict) applies only with
    ``train``, which also shuffles and drops a last partial batch. ``val_fraction`` carves a
    seeded, stratified validation part (``split_seed``) and ``split`` picks which part this
    loader serves, so two calls give a train and a val loader with the same normalisation.
    """
    x, y = _images_and_labels(images, labels)
    _check_pad(pad)
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val' (given: {split!r})")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1) (given: {val_fraction})")
    if split == "val" and val_fraction == 0:
        raise DataError("split='val' needs a val_fraction above 0")
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither (then they are measured on the training images)")
    train_idx = torch.arange(len(y))
    if val_fraction > 0:
        kept, held = (torch.from_numpy(i) for i in stratified_split(y.numpy(), val_fraction, split_seed, stream=2))
        train_idx, part = kept, kept if split == "train" else held
    if mean is None or std is None:
        mean, std = _stats(x, train_idx)
    if val_fraction > 0:
        x, y = x[part], y[part]
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    aug = _augment_of(augment) if train else None
    return InMemoryLoader(
        x, y, batch_size=batch_size, mean=mean, std=std, augment=aug, shuffle=train, seed=seed, device=device,
        drop_last=train and len(y) > batch_size, num_classes=num_classes, channels_last=channels_last,
    )


def _stats(images: torch.Tensor, rows: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) of ``images[rows]``, a chunk at a time (no copy of the rows)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64, device=images.device)
    total_sq = torch.zeros(channels, dtype=torch.float64, device=images.device)
    for i in range(0, len(rows), chunk):
        part = images[rows[i : i + chunk].to(images.device)].to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = max(1, len(rows) * images.shape[2] * images.shape[3])
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return [float(v) for v in mean], [float(v) for v in std]


def _images_and_labels(images: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) images and int64 labels from tensors/arrays, or from a dataset."""
    if labels is None:
        if isinstance(images, torch.Tensor | np.ndarray):
            raise DataError("images need labels (or give a torch dataset of (image, label) items)")
        arrays, labels = _dataset_arrays(images, type(images).__name__)
        images = arrays
    x = image_tensor(images)
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels), dtype=torch.int64)
    if y.shape != (x.shape[0],):
        raise DataError(f"{x.shape[0]} images but labels of shape {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise DataError("labels must be class indices from 0")
    return x, y


def _augment_of(augment: bool | AugmentSpec | dict[str, Any] | None) -> AugmentSpec | None:
    if augment is None or augment is False:
        return None
    return AugmentSpec() if augment is True else spec_from(AugmentSpec, augment)


# ---------------------------------------------------------------- continual-learning tasks


class TaskSplit(NamedTuple):
    """The loaders of one task: ``train, val = task``."""

    train: InMemoryLoader
    val: InMemoryLoader


def task_classes(num_classes: int, num_tasks: int, seed: int | None = None) -> list[list[int]]:
    """Class indices of every task: consecutive blocks of the class order (shuffled with ``seed``).

    With ``num_classes`` not divisible by ``num_tasks`` the first tasks get one class more.
    """
    if not 1 <= num_tasks <= num_classes:
        raise DataError(f"num_tasks must be between 1 and the {num_classes} classes (given: {num_tasks})")
    order = np.arange(num_classes)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(num_classes)
    return [sorted(int(c) for c in block) for block in np.array_split(order, num_tasks)]


def get_split_loaders(
    data_dir: str | Path,
    num_tasks: int,
    batch_size: int,
    augment: bool | AugmentSpec | dict[str, Any] = True,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    class_order_seed: int | None = None,
    eval_split: str = "val",
    eval_batch_size: int | None = None,
) -> list[TaskSplit]:
    """Per task, (train, val) loaders over that task's classes only (class-incremental split).

    Labels keep their dataset-wide indices, so one classifier head covers every task. The
    tasks take consecutive class blocks (``class_order_seed`` shuffles the order first);
    ``augment`` is True (the default augmentation), False, or an ``AugmentSpec``/dict.
    ``eval_split`` picks the split behind each task's ``val`` loader ("val" or "test").
    """
    info = load_info(data_dir)
    aug = AugmentSpec() if augment is True else None if augment is False else spec_from(AugmentSpec, augment)
    if eval_split not in ("val", "test"):
        raise DataError(f"eval_split must be 'val' or 'test' (given: {eval_split!r})")
    if info.counts.get(eval_split, 0) == 0:
        raise DataError(
            f"{data_dir}: the {eval_split} split is empty", hint="prepare with val_fraction > 0, or use eval_split='test'"
        )
    train_x, train_y = load_split(data_dir, "train")
    eval_x, eval_y = load_split(data_dir, eval_split)
    tasks = []
    for t, classes in enumerate(task_classes(info.num_classes, num_tasks, class_order_seed)):
        wanted = torch.tensor(classes)
        tr, ev = torch.isin(train_y, wanted), torch.isin(eval_y, wanted)
        common = {"mean": info.mean, "std": info.std, "device": device, "num_classes": info.num_classes}
        n_train = int(tr.sum())
        if n_train == 0:
            raise DataError(f"{data_dir}: task {t} (classes {classes}) has no training images")
        train = InMemoryLoader(train_x[tr], train_y[tr], batch_size=batch_size, augment=aug, shuffle=True,
                               seed=seed + t, drop_last=n_train > batch_size, **common)
        val = InMemoryLoader(eval_x[ev], eval_y[ev], batch_size=eval_batch_size or max(batch_size, 256),
                             augment=None, shuffle=False, seed=0, drop_last=False, **common)
        tasks.append(TaskSplit(train, val))
    return tasks
