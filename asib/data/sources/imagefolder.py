"""An image folder: ``root/{train,test}/<class>/*.png|jpg|jpeg|bmp|webp``, read with PIL as RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asib.data.sources.base import RawData, _raw, register_source
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


def load_imagefolder(root: str | Path | None, image_size: int | None = None) -> RawData:
    """``root/{train,test}/<class>/*.png|jpg|jpeg|bmp|webp`` as RGB; classes sorted; ``val/`` is ignored."""
    hint = "set data.root to a folder with train/<class>/*.png and test/<class>/*.png"
    if root is None:
        raise DataError("imagefolder: data.root is not set", hint=hint)
    base = Path(root).expanduser()
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise DataError(f"imagefolder: no folder {base / split}", hint=hint)
    classes = _class_folders(base / "train")
    if not classes:
        raise DataError(f"imagefolder: {base / 'train'} has no class folders", hint=hint)
    test_classes = _class_folders(base / "test")
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"imagefolder: train and test have different classes (only in train: {only_train}; only in test: {only_test})"
        )
    train = _read_split(base / "train", classes, image_size, allow_empty_class=False)
    test = _read_split(base / "test", classes, image_size, allow_empty_class=True)
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
    """``data.source: imagefolder``, with ``data.root`` and ``data.image_size``."""
    return load_imagefolder(spec.root, spec.image_size)
