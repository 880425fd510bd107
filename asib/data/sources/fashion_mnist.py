"""Fashion-MNIST from its four IDX files (raw or gzip), or through torchvision's downloader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from asib.data.sources.base import RawData, _raw, register_source, torchvision_download
from asib.errors import DataError
from asib.recipe import DataSpec

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

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
        return torchvision_download("FashionMNIST", Path(root or "data/raw/fashion_mnist"))
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


@register_source("fashion_mnist")
def _from_spec(spec: DataSpec) -> RawData:
    """``data.source: fashion_mnist``, with ``data.root`` and ``data.download``."""
    return load_fashion_mnist(spec.root, spec.download)
