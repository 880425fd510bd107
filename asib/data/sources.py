"""Raw image sources: each reads one dataset's official files into numpy arrays.

Every source returns a ``RawData``: uint8 images shaped (N, H, W, C) or (N, H, W), int64
labels, and the class names. ``asib.data.prepared`` turns that into the prepared format.
Heavy optional libraries (scikit-learn, PIL, torchvision) are imported inside the source
that needs them, so importing ``asib.data`` stays cheap.
"""

from __future__ import annotations

import codecs
import gzip
import io
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from asib.errors import DataError
from asib.recipe import DataSpec

SOURCES: tuple[str, ...] = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed, so every recipe sees the same digits test set


@dataclass(frozen=True)
class RawData:
    """One dataset as read from its files: train and test images, labels, class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def _raw(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: Any) -> RawData:
    """Build a RawData with the dtypes every caller relies on, checking the labels fit the classes."""
    data = RawData(
        train_images=np.require(train[0], np.uint8, ["C", "W"]),  # writable: torch.from_numpy wants that
        train_labels=np.asarray(train[1], dtype=np.int64),
        test_images=np.require(test[0], np.uint8, ["C", "W"]),
        test_labels=np.asarray(test[1], dtype=np.int64),
        classes=tuple(str(c) for c in classes),
    )
    for split, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        if images.ndim not in (3, 4) or len(images) != len(labels):
            raise DataError(
                f"{split}: {len(images)} images of shape {images.shape[1:]} but {len(labels)} labels"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(data.classes)):
            raise DataError(f"{split}: labels outside 0..{len(data.classes) - 1}")
    return data


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, stream: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held-out) with about ``fraction`` of every class held out.

    The held-out total is exactly round(fraction * N); per-class shares are rounded by
    largest remainder, so small classes are not starved. Both index arrays are sorted.
    ``stream`` keeps different splits drawn with one seed (subset, validation) independent.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, stream]))
    classes, counts = np.unique(labels, return_counts=True)
    want = fraction * counts
    take = np.floor(want).astype(np.int64)
    short = int(round(fraction * len(labels))) - int(take.sum())
    if short > 0:
        order = np.argsort(-(want - take), kind="stable")
        take[order[:short]] += 1
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    return kept_idx.astype(np.int64), held_idx.astype(np.int64)


# ---------------------------------------------------------------- digits


def load_digits() -> RawData:
    """scikit-learn's 8x8 digits, scaled to 0..255, with a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    classes = [str(int(c)) for c in bunch.target_names]
    return _raw((images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]), classes)


# ---------------------------------------------------------------- IDX (Fashion-MNIST)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode one IDX file: 2 zero bytes, a dtype code, the number of dims, big-endian uint32 dims, data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header < size:
        raise DataError(f"{name}: truncated IDX data ({len(data) - header} of {size} bytes for shape {dims})")
    if len(data) - header > size:
        raise DataError(f"{name}: {len(data) - header - size} unexpected bytes after the IDX data")
    return np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=header).reshape(dims)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (by its ``.gz`` suffix)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return parse_idx(data, str(path))


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(root: str | Path | None = None, download: bool = False) -> RawData:
    """Fashion-MNIST from the four IDX files in ``root`` (raw or .gz), or torchvision's downloader."""
    if download:
        return _torchvision_download("FashionMNIST", Path(root or "data/raw/fashion_mnist"))
    folder = Path(root or FASHION_MNIST_ROOT).expanduser()
    hint = (
        "run `make fashion-mnist`, set data.root to a folder with the IDX files, or set data.download: true"
    )
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST: no folder {folder}", hint=hint)
    arrays = {}
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        path = _find_idx(folder, stem)
        if path is None:
            raise DataError(f"Fashion-MNIST: {folder} has no {stem} (or {stem}.gz)", hint=hint)
        arrays[stem] = read_idx(path)
    for kind in ("train", "t10k"):
        images, labels = arrays[f"{kind}-images-idx3-ubyte"], arrays[f"{kind}-labels-idx1-ubyte"]
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
            raise DataError(f"Fashion-MNIST {kind}: expected uint8 images (N, H, W) and labels (N,)")
    return _raw(
        (arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]),
        (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
        FASHION_MNIST_CLASSES,
    )


# ---------------------------------------------------------------- CIFAR (restricted pickle)


def _numpy_reconstruct() -> Callable[..., Any]:
    """numpy's array-unpickling helper, from wherever this numpy version keeps it."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    return core.multiarray._reconstruct


def _numpy_frombuffer() -> Callable[..., Any]:
    """numpy's helper for arrays pickled with protocol 5 (an array built from a buffer)."""
    core = np._core if hasattr(np, "_core") else np.core
    return core.numeric._frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and plain containers; any other global is refused.

    CIFAR ships as pickles, and unpickling runs whatever callables the file names; this
    admits only what a dict of uint8 arrays and lists needs.
    """

    _ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,
        ("codecs", "encode"): lambda: codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        getter = self._ALLOWED.get((module, name))
        if getter is None:
            raise DataError(
                f"refusing to unpickle '{module}.{name}': only numpy arrays are allowed in data files"
            )
        return getter()


def _bytes_keys_to_str(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


def read_pickle(fh: IO[bytes], name: str) -> dict[str, Any]:
    """Unpickle one CIFAR file with the restricted unpickler; dict keys come back as str."""
    try:
        obj = RestrictedUnpickler(fh, encoding="latin1").load()
    except DataError as exc:
        raise DataError(f"{name}: {exc.message}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        OSError,
    ) as exc:
        raise DataError(f"{name}: not a readable CIFAR pickle ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: expected a dict, found {type(obj).__name__}")
    return _bytes_keys_to_str(obj)


@dataclass(frozen=True)
class _CifarLayout:
    """Where one CIFAR variant keeps its files and which keys hold labels and names."""

    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels: str
    names: str
    torchvision: str


_CIFAR = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        labels="labels",
        names="label_names",
        torchvision="CIFAR10",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        meta="meta",
        labels="fine_labels",
        names="fine_label_names",
        torchvision="CIFAR100",
    ),
}


class _FolderFiles:
    """Opens the CIFAR member files from an extracted folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, member: str) -> dict[str, Any]:
        path = self.folder / member
        if not path.is_file():
            raise DataError(
                f"{self.folder}: missing {member}", hint="the folder looks incomplete; re-extract it"
            )
        with open(path, "rb") as fh:
            return read_pickle(fh, str(path))


class _ArchiveFiles:
    """Reads the wanted CIFAR members straight from the .tar.gz in one pass, without extracting."""

    def __init__(self, archive: Path, folder: str, members: list[str]) -> None:
        self.archive, self.folder = archive, folder
        wanted = {f"{folder}/{m}": m for m in members}
        self.data: dict[str, bytes] = {}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for info in tar:
                    member = wanted.get(info.name.removeprefix("./"))
                    fh = tar.extractfile(info) if member is not None and info.isfile() else None
                    if fh is not None:
                        self.data[member] = fh.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{archive}: not a readable .tar.gz ({exc})") from None

    def read(self, member: str) -> dict[str, Any]:
        data = self.data.pop(member, None)
        if data is None:
            raise DataError(f"{self.archive}: no member {self.folder}/{member}")
        return read_pickle(io.BytesIO(data), f"{self.archive}:{self.folder}/{member}")


def _cifar_split(
    files: _FolderFiles | _ArchiveFiles, members: tuple[str, ...], label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for member in members:
        batch = files.read(member)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{member}: expected keys 'data' and '{label_key}', found {sorted(batch)}")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{member}: 'data' should be uint8 (N, 3072), found {data.dtype} {data.shape}")
        lab = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        if len(lab) != len(data):
            raise DataError(f"{member}: {len(data)} images but {len(lab)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(source: str, root: str | Path | None = None, download: bool = False) -> RawData:
    """CIFAR-10/100 from the official python folder or .tar.gz in ``root``, or torchvision's downloader."""
    layout = _CIFAR[source]
    base = Path(root or f"data/raw/{source}").expanduser()
    if download:
        return _torchvision_download(layout.torchvision, base)
    hint = "set data.download: true, or data.root to the folder holding the official python version"
    members = [layout.meta, *layout.train, *layout.test]
    if (base / layout.folder).is_dir():
        files: _FolderFiles | _ArchiveFiles = _FolderFiles(base / layout.folder)
    elif (base / layout.meta).is_file():
        files = _FolderFiles(base)
    elif (base / layout.archive).is_file():
        files = _ArchiveFiles(base / layout.archive, layout.folder, members)
    elif base.is_file() and base.name.endswith(".tar.gz"):
        files = _ArchiveFiles(base, layout.folder, members)
    else:
        raise DataError(f"{source}: found neither {layout.folder}/ nor {layout.archive} in {base}", hint=hint)
    meta = files.read(layout.meta)
    if layout.names not in meta:
        raise DataError(f"{source}: {layout.meta} has no '{layout.names}'")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names]]
    train = _cifar_split(files, layout.train, layout.labels)
    test = _cifar_split(files, layout.test, layout.labels)
    return _raw(train, test, classes)


def _torchvision_download(name: str, root: Path) -> RawData:
    """Let torchvision fetch and checksum the official files, then take its arrays."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        train, test = cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(
            f"{name}: download into {root} failed ({exc})", hint="check the network, or set data.root"
        ) from None
    return _raw(
        (np.asarray(train.data), np.asarray(train.targets)),
        (np.asarray(test.data), np.asarray(test.targets)),
        train.classes,
    )


# ---------------------------------------------------------------- image folder


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path, image_size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
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


# ---------------------------------------------------------------- dispatch


def load_source(spec: DataSpec) -> RawData:
    """Read the raw train and test data a DataSpec names."""
    if spec.source == "digits":
        return load_digits()
    if spec.source == "fashion_mnist":
        return load_fashion_mnist(spec.root, spec.download)
    if spec.source in ("cifar10", "cifar100"):
        return load_cifar(spec.source, spec.root, spec.download)
    if spec.source == "imagefolder":
        return load_imagefolder(spec.root, spec.image_size)
    raise DataError(f"unknown data source '{spec.source}' (have {', '.join(SOURCES)})")
