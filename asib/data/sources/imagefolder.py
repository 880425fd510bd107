"""An image folder of ``*.png|jpg|jpeg|bmp|webp`` files, read with PIL as RGB, in the layouts people have:

- ``root/<class>/*`` (torchvision's ImageFolder, one split): a seeded, stratified test split is
  carved out (``data.test_fraction``, default 0.2; ``data.split_seed``);
- ``root/train/<class>/*`` and ``root/test/<class>/*``;
- ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet's): ``val/`` is the test split,
  unless ``test/`` exists too, in which case ``val/`` is not read (prepare-data says so);
- ``root/train/<class>/*`` alone: the test split is carved as for one split.

The validation split is always carved from the training images (``data.val_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asib.data.sources.base import RawData, _raw, register_source, stratified_split
from asib.errors import DataError, first_line
from asib.recipe import DataSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Pixels one image may declare (8192 x 8192, below PIL's own decompression-bomb threshold): an
# image file is read from disk, and its header alone could ask for gigabytes.
MAX_PIXELS = 8192 * 8192


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path, image_size: int | None) -> np.ndarray:
    import struct

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise DataError(
                    f"{path}: declares {width}x{height} pixels, more than the {MAX_PIXELS:,} asib reads"
                    " from one image",
                    hint="resize the image (or remove it); a file this large is often damaged"
                    " or a decompression bomb",
                )
            rgb = img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"{path}: declares more pixels than any image asib reads ({first_line(exc, 120)})"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as exc:
        raise DataError(f"{path}: not a readable image ({first_line(exc, 120)})") from None
    if image_size is not None and rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


DEFAULT_TEST_FRACTION = 0.2  # share carved out as the test split when the folder has none
TEST_STREAM = 4  # stratified_split stream of the carved test split (prepared data uses 1-3)
HINT = ("data.root is a folder of class folders (root/<class>/*.png), or holds train/<class>/ with test/<class>/"
        " or val/<class>/ beside it")


@dataclass(frozen=True)
class Layout:
    """Where an image folder's splits are: the training folder, the test folder or a share to
    carve from the training images, and what is present but not read."""

    root: Path
    train: Path
    test: Path | None  # None: carve ``test_fraction`` of the training images
    test_fraction: float | None
    ignored: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line on how the folder is read, for prepare-data to print."""
        if self.train == self.root:
            how = "one folder of class folders"
        else:
            how = "train/"
        if self.test is None:
            pct = f"{100 * (self.test_fraction or 0):g}%"
            what = f"{how}; a seeded, stratified {pct} of it is carved out as the test split (data.test_fraction)"
        elif self.test.name == "val":
            what = f"{how} and val/; val/ is the test split (there is no test/)"
        else:
            what = f"{how} and test/"
        if self.ignored:
            what += f"; {', '.join(n + '/' for n in self.ignored)} not read (validation is carved from train/ by" \
                    " data.val_fraction)"
        return f"imagefolder {self.root}: {what}"


def find_layout(root: str | Path | None, test_fraction: float | None = None) -> Layout:
    """How ``root`` is laid out: ``train/`` + ``test/`` (a ``val/`` beside them is not read),
    ``train/`` + ``val/`` (ImageNet's: ``val/`` is the test split), ``train/`` alone, or
    torchvision's ImageFolder layout ``root/<class>/*`` (one split). Without a test folder a
    seeded, stratified ``test_fraction`` (default 0.2) is carved out; with one, giving
    ``test_fraction`` is an error."""
    if root is None:
        raise DataError("imagefolder: data.root is not set", hint=HINT)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"imagefolder: no folder {base}", hint=HINT)
    has = {name: (base / name).is_dir() for name in ("train", "val", "test")}
    if has["train"]:
        test = base / "test" if has["test"] else base / "val" if has["val"] else None
        ignored = ("val",) if has["test"] and has["val"] else ()
        train = base / "train"
    else:
        if has["test"] or has["val"]:
            found = "test/" if has["test"] else "val/"
            raise DataError(f"imagefolder: {base} has {found} but no train/", hint=HINT)
        loose = _image_files(base)
        if loose:
            raise DataError(f"imagefolder: {base} holds images directly ({loose[0].name}, ...); each class's images"
                            " go in a folder of their own, root/<class>/", hint=HINT)
        test, ignored, train = None, (), base
    if test is not None and test_fraction is not None:
        raise DataError(
            f"imagefolder: data.test_fraction is set but {base} has its own test split ({test.name}/)",
            hint="remove data.test_fraction, or the folder",
        )
    fraction = None if test is not None else (DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction)
    return Layout(base, train, test, fraction, ignored)


def load_imagefolder(
    root: str | Path | None, image_size: int | None = None, test_fraction: float | None = None, seed: int = 0
) -> RawData:
    """An image folder as RGB, classes sorted, in any layout ``find_layout`` reads; a carved test
    split is drawn with ``seed`` (the recipe's ``data.split_seed``)."""
    layout = find_layout(root, test_fraction)
    classes = _class_folders(layout.train)
    where = "" if layout.train == layout.root else "train/ of "
    if not classes:
        raise DataError(f"imagefolder: {where}{layout.root} has no class folders", hint=HINT)
    if layout.test is not None:
        test_classes = _class_folders(layout.test)
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            split = layout.test.name
            raise DataError(
                f"imagefolder: train and {split} have different classes (only in train: {only_train};"
                f" only in {split}: {only_test})"
            )
    train = _read_split(layout.train, classes, image_size, allow_empty_class=False)
    if layout.test is None:
        kept, held = stratified_split(train[1], layout.test_fraction or 0.0, seed, stream=TEST_STREAM)
        if not len(held) or not len(kept):
            raise DataError(f"imagefolder: {layout.root} has {len(train[1])} images, too few to carve a test split",
                            hint="add images, or a test/ folder")
        train, test = (train[0][kept], train[1][kept]), (train[0][held], train[1][held])
    else:
        test = _read_split(layout.test, classes, image_size, allow_empty_class=True)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataError("imagefolder: train and test images differ in size", hint="set data.image_size")
    return _raw(train, test, classes)


def _read_split(
    folder: Path, classes: list[str], image_size: int | None, allow_empty_class: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Every image of one split folder, labelled by its class folder; all must share one size."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for label, name in enumerate(classes):
        files = _image_files(folder / name)
        if not files and not allow_empty_class:
            raise DataError(f"imagefolder: {folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for path in files:
            img = _read_image(path, image_size)
            first = first or (path, img.shape)
            if img.shape != first[1]:
                raise DataError(
                    f"imagefolder: {path} is {img.shape[1]}x{img.shape[0]} but {first[0]} is "
                    f"{first[1][1]}x{first[1][0]}",
                    hint="set data.image_size to resize every image",
                )
            images.append(img)
            labels.append(label)
    if not images:
        raise DataError(f"imagefolder: {folder} holds no images")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


@register_source("imagefolder")
def _from_spec(spec: DataSpec) -> RawData:
    """``data.source: imagefolder``: ``data.root``, ``data.image_size``, ``data.test_fraction``."""
    return load_imagefolder(spec.root, spec.image_size, spec.test_fraction, spec.split_seed)
