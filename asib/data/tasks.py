"""Data for library users: any torch dataset into the prepared format, and continual-learning task splits.

``prepare_dataset(dataset, out_dir)`` turns a map-style dataset that knows its ``classes``
(torchvision's CIFAR/MNIST/ImageFolder, or your own with ``ClassInfoMixin``) into the same
``{train,val,test}.safetensors`` + ``dataset.json`` folder ``asib prepare-data`` writes, using
the writer functions of ``asib.data.prepared``. ``get_split_loaders(data_dir, num_tasks, ...)``
cuts a prepared dataset into tasks over disjoint class subsets (split CIFAR-100: 10 or 20 tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from asib.data.loader import InMemoryLoader
from asib.data.prepared import DatasetInfo, _check_target, load_info, load_split, write_prepared
from asib.data.sources import RawData, _raw, stratified_split
from asib.errors import DataError
from asib.recipe import AugmentSpec, DataSpec, spec_from

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
    name: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    train_subset: int | None = None,
    split_seed: int = 0,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DatasetInfo:
    """Write a torch dataset (which has ``classes``) to ``out_dir`` in the prepared format.

    ``test_dataset`` is the test split; without it a seeded, stratified ``test_fraction`` of
    ``dataset`` is held out. Then, as in ``asib prepare-data``: ``train_subset``, the val
    split, resizing to ``image_size``, train mean/std, all written atomically (``force``
    replaces an existing dataset). Returns what ``dataset.json`` says.
    """
    out_dir = Path(out_dir)
    label = name or type(dataset).__name__
    say = progress or (lambda _msg: None)
    _check_target(out_dir, force)
    classes = _classes_of(dataset, label)
    say(f"reading {label}")
    train = _dataset_arrays(dataset, label)
    if test_dataset is not None:
        if _classes_of(test_dataset, f"{label} (test)") != classes:
            raise DataError(f"{label}: the test dataset's classes differ from the training dataset's")
        test = _dataset_arrays(test_dataset, f"{label} (test)")
    else:
        if not 0 < test_fraction < 1:
            raise DataError(f"test_fraction must be in (0, 1) without a test_dataset (given: {test_fraction})")
        keep, held = stratified_split(train[1], test_fraction, split_seed, stream=3)
        train, test = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
    raw = _raw(train, test, classes)
    return _write_prepared(raw, out_dir, label, val_fraction, image_size, train_subset, split_seed, force, say)


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
