"""CIFAR-10 and CIFAR-100 from the official python version (folder or .tar.gz), or torchvision's downloader.

CIFAR ships as pickles; they are read with ``RestrictedUnpickler``, which builds only numpy
arrays and plain containers and refuses any other global.
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from asib.data.sources.base import RawData, _raw, register_source, torchvision_download
from asib.errors import DataError
from asib.recipe import DataSpec


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
        return torchvision_download(layout.torchvision, base)
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


@register_source("cifar10", "cifar100")
def _from_spec(spec: DataSpec) -> RawData:
    """``data.source: cifar10`` or ``cifar100``, with ``data.root`` and ``data.download``."""
    return load_cifar(spec.source, spec.root, spec.download)
