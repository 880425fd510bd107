"""asib.data: every source on tiny files in the real formats, the prepared format, the loader."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from asib.data import (
    SOURCES,
    Batch,
    DatasetInfo,
    InMemoryLoader,
    load_info,
    load_split,
    make_loader,
    prepare_data,
)
from asib.data.prepared import channel_stats
from asib.data.sources import (
    FASHION_MNIST_CLASSES,
    load_cifar,
    load_digits,
    load_fashion_mnist,
    load_imagefolder,
    parse_idx,
    read_pickle,
    stratified_split,
)
from asib.errors import DataError
from asib.recipe import AugmentSpec, DataSpec

# ---------------------------------------------------------------- writers of the real formats


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: two zero bytes, dtype code 0x08 (ubyte), ndim, big-endian uint32 dims, then the data."""
    data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def fashion_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 7, 6), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(20, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 7, 6), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(10, dtype=np.uint8),
    }


@pytest.fixture(params=["raw", "gz"])
def fashion_root(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = fashion_arrays()
    for stem, array in arrays.items():
        write_idx(tmp_path / (stem + (".gz" if request.param == "gz" else "")), array)
    return tmp_path, arrays


def cifar_batch(n: int, label_key: str, rng: np.random.Generator, num_classes: int) -> dict[bytes, object]:
    """One batch in the official layout (as a Python 2 pickle reads under Python 3: bytes keys)."""
    batch: dict[bytes, object] = {
        b"batch_label": b"training batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key.encode(): [int(v) for v in rng.integers(0, num_classes, n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [0] * n
    return batch


def dump(path: Path, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the official files are protocol-2 pickles


def write_cifar10(root: Path, per_batch: int = 3) -> Path:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", cifar_batch(per_batch, "labels", rng, 10))
    dump(folder / "test_batch", cifar_batch(4, "labels", rng, 10))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump(
        folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    )
    return folder


def write_cifar100(root: Path) -> Path:
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump(folder / "train", cifar_batch(12, "fine_labels", rng, 100))
    dump(folder / "test", cifar_batch(5, "fine_labels", rng, 100))
    names = [f"class_{i:03d}" for i in range(100)]
    dump(
        folder / "meta",
        {b"fine_label_names": names, b"coarse_label_names": [f"super_{i}" for i in range(20)]},
    )
    return folder


def py2_str(data: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle wrote it (SHORT_BINSTRING or BINSTRING)."""
    return b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<I", len(data)) + data


def py2_pickle(entries: dict[bytes, np.ndarray | list[int] | list[bytes]]) -> bytes:
    """A protocol-2 pickle of a dict as Python 2 wrote the official CIFAR files: str keys,
    uint8 arrays through ``numpy.core.multiarray._reconstruct``, lists of ints or str."""
    out = b"\x80\x02}("
    for key, value in entries.items():
        out += py2_str(key)
        if isinstance(value, np.ndarray):
            shape = b"(" + b"".join(b"J" + struct.pack("<i", d) for d in value.shape) + b"t"
            dtype = b"cnumpy\ndtype\n" + py2_str(b"u1") + b"\x89\x88\x87R"
            dtype += b"(K\x03" + py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            out += (
                b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_str(b"b") + b"\x87R"
            )
            out += b"(K\x01" + shape + dtype + b"\x89" + py2_str(value.tobytes()) + b"tb"
        else:
            items = [py2_str(v) if isinstance(v, bytes) else b"J" + struct.pack("<i", v) for v in value]
            out += b"](" + b"".join(items) + b"e"
    return out + b"u."


def make_archive(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def write_png(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)


def write_imagefolder(root: Path, size: tuple[int, int] = (6, 5)) -> Path:
    for split, n in (("train", 3), ("test", 1), ("val", 2)):
        for cls in ("zebra", "ant"):
            for i in range(n):
                write_png(root / split / cls / f"{i}.png", size, 10 * i + (100 if cls == "zebra" else 0))
    write_png(root / "train" / "ant" / "gray.png", size, 77, mode="L")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------- sources


def test_sources_named() -> None:
    assert set(SOURCES) == {"digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder"}


def test_fashion_mnist_reads_idx(fashion_root: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, arrays = fashion_root
    raw = load_fashion_mnist(root)
    assert raw.train_images.shape == (20, 7, 6) and raw.train_images.dtype == np.uint8
    np.testing.assert_array_equal(raw.train_images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert raw.train_labels.dtype == np.int64
    assert raw.classes == FASHION_MNIST_CLASSES and raw.classes[0] == "T-shirt/top"


def test_idx_bad_magic_and_truncation(tmp_path: Path) -> None:
    good = bytes([0, 0, 8, 1]) + np.asarray([4], ">u4").tobytes() + bytes(4)
    assert parse_idx(good).shape == (4,)
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x12\x34" + good[2:])
    with pytest.raises(DataError, match="truncated"):
        parse_idx(good[:-1])
    with pytest.raises(DataError, match="truncated"):
        parse_idx(good[:6])
    for stem, array in fashion_arrays().items():
        write_idx(tmp_path / stem, array)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: truncated"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "make fashion-mnist" in (err.value.hint or "")
    for stem, array in fashion_arrays().items():
        if stem != "t10k-images-idx3-ubyte":
            write_idx(tmp_path / stem, array)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        load_fashion_mnist(tmp_path)


def check_cifar_pixels(images: np.ndarray, folder: Path, member: str) -> None:
    """Row i of 'data' is the red plane, then green, then blue, each 32x32 row-major."""
    with open(folder / member, "rb") as fh:
        data = pickle.load(fh, encoding="bytes")[b"data"]
    np.testing.assert_array_equal(
        images[0, 5, 7], data[0, [5 * 32 + 7, 1024 + 5 * 32 + 7, 2048 + 5 * 32 + 7]]
    )


def test_cifar10_folder_and_archive(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path / "root")
    raw = load_cifar("cifar10", tmp_path / "root")
    assert raw.train_images.shape == (15, 32, 32, 3) and raw.test_images.shape == (4, 32, 32, 3)
    assert raw.classes[0] == "airplane" and len(raw.classes) == 10
    check_cifar_pixels(raw.train_images, folder, "data_batch_1")
    assert load_cifar("cifar10", folder).train_images.shape[0] == 15  # root may be the batches folder itself

    archive_root = tmp_path / "archived"
    archive_root.mkdir()
    make_archive(folder, archive_root / "cifar-10-python.tar.gz")
    from_tar = load_cifar("cifar10", archive_root)
    np.testing.assert_array_equal(from_tar.train_images, raw.train_images)
    np.testing.assert_array_equal(from_tar.test_labels, raw.test_labels)
    assert load_cifar("cifar10", archive_root / "cifar-10-python.tar.gz").classes == raw.classes


def test_cifar_reads_python2_pickles(tmp_path: Path) -> None:
    """The official files were written by Python 2; read them as they are, without warnings."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(7)
    data = {f"data_batch_{i}": rng.integers(0, 256, (2, 3072), dtype=np.uint8) for i in range(1, 6)}
    data["test_batch"] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    for name, array in data.items():
        labels = [int(v) for v in rng.integers(0, 10, len(array))]
        (folder / name).write_bytes(py2_pickle({b"batch_label": [b"x"], b"data": array, b"labels": labels}))
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    raw = load_cifar("cifar10", tmp_path)
    assert raw.classes == tuple(f"c{i}" for i in range(10))
    np.testing.assert_array_equal(raw.test_images[2, 1, 3], data["test_batch"][2, [35, 1024 + 35, 2048 + 35]])
    assert raw.train_images.shape == (10, 32, 32, 3)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = write_cifar100(tmp_path)
    raw = load_cifar("cifar100", tmp_path)
    assert raw.train_images.shape == (12, 32, 32, 3) and len(raw.classes) == 100
    with open(folder / "train", "rb") as fh:
        fine = pickle.load(fh, encoding="bytes")[b"fine_labels"]
    np.testing.assert_array_equal(raw.train_labels, fine)
    make_archive(folder, tmp_path / "cifar-100-python.tar.gz")
    (folder / "train").rename(tmp_path / "moved")
    folder.rename(tmp_path / "hidden")
    np.testing.assert_array_equal(load_cifar("cifar100", tmp_path).train_labels, fine)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_forbidden_global_is_refused(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    dump(folder / "batches.meta", {b"label_names": _Evil(marker)})
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()
    with open(folder / "test_batch", "rb") as fh:
        assert set(read_pickle(fh, "test_batch")) >= {"data", "labels"}


def test_cifar_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_cifar("cifar100", tmp_path)
    assert "data.download" in (err.value.hint or "")
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00")
    with pytest.raises(DataError, match="test_batch"):
        load_cifar("cifar10", tmp_path)


def test_imagefolder(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "imgs")
    raw = load_imagefolder(root)
    assert raw.classes == ("ant", "zebra")  # sorted
    assert raw.train_images.shape == (7, 5, 6, 3)  # 3 + 1 grayscale ants, 3 zebras; val/ ignored
    assert raw.test_images.shape == (2, 5, 6, 3)
    assert raw.train_labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    gray = raw.train_images[3]  # ant/gray.png sorts after 0..2.png
    assert (gray == 77).all()
    write_png(root / "train" / "ant" / "big.png", (9, 9), 5)
    with pytest.raises(DataError, match="big.png is 9x9") as err:
        load_imagefolder(root)
    assert "image_size" in (err.value.hint or "")
    assert load_imagefolder(root, image_size=4).train_images.shape == (8, 4, 4, 3)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root"):
        load_imagefolder(None)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_imagefolder(tmp_path)
    write_png(tmp_path / "train" / "cat" / "a.png", (4, 4), 1)
    write_png(tmp_path / "test" / "dog" / "a.png", (4, 4), 1)
    with pytest.raises(DataError, match="different classes"):
        load_imagefolder(tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "test" / "cat").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_imagefolder(tmp_path)


def write_flat_folder(root: Path, per_class: int = 10) -> Path:
    """torchvision's ImageFolder layout: root/<class>/*.png, one split; each image a distinct value."""
    for c, cls in enumerate(("cat", "dog")):
        for i in range(per_class):
            write_png(root / cls / f"{i:02d}.png", (4, 4), 100 * c + i)
    return root


def test_imagefolder_flat_layout_carves_a_seeded_stratified_test_split(tmp_path: Path) -> None:
    from asib.data.sources.imagefolder import find_layout

    root = write_flat_folder(tmp_path / "pets")
    raw = load_imagefolder(root)
    assert raw.classes == ("cat", "dog")
    assert len(raw.test_labels) == 4 and raw.test_labels.tolist() == [0, 0, 1, 1]  # 20%, stratified
    assert len(raw.train_labels) == 16
    seen = {int(x[0, 0, 0]) for x in np.concatenate([raw.train_images, raw.test_images])}
    assert len(seen) == 20  # every image once, in one split or the other
    again = load_imagefolder(root)
    np.testing.assert_array_equal(again.test_images, raw.test_images)  # seeded
    other = load_imagefolder(root, seed=1)
    assert not np.array_equal(other.test_images, raw.test_images)
    assert len(load_imagefolder(root, test_fraction=0.5).test_labels) == 10
    assert "one folder of class folders" in find_layout(root).describe()
    assert "20%" in find_layout(root).describe()
    # through a recipe: data.test_fraction and data.split_seed
    spec = DataSpec(source="imagefolder", root=str(root), test_fraction=0.3, val_fraction=0.0, split_seed=3)
    info = prepare_data(spec, tmp_path / "prepared", "pets")
    assert info.counts == {"train": 14, "val": 0, "test": 6}


def test_imagefolder_train_and_val_layout(tmp_path: Path) -> None:
    from asib.data.sources.imagefolder import find_layout

    root = write_imagefolder(tmp_path / "imgs")
    (tmp_path / "imgs" / "test").rename(tmp_path / "test_moved")  # ImageNet's layout: train/ + val/
    raw = load_imagefolder(root)
    assert raw.test_images.shape == (4, 5, 6, 3)  # val/ (2 per class) is the test split
    layout = find_layout(root)
    assert layout.test == root / "val" and not layout.ignored
    assert "val/ is the test split" in layout.describe()
    (tmp_path / "imgs" / "val").rename(tmp_path / "val_moved")  # train/ alone: a test split is carved
    assert find_layout(root).test is None
    assert len(load_imagefolder(root).test_labels) == 1  # round(20% of 7 images)


def test_imagefolder_says_val_is_not_read_when_test_exists(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from asib.cli import app
    from asib.data.sources.imagefolder import find_layout

    root = write_imagefolder(tmp_path / "imgs")
    layout = find_layout(root)
    assert layout.test == root / "test" and layout.ignored == ("val",)
    assert "val/ not read" in layout.describe()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "imgs", "data": {
        "source": "imagefolder", "root": str(root), "dir": str(tmp_path / "data"), "val_fraction": 0.0}}))
    r = CliRunner().invoke(app, ["prepare-data", str(recipe), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "val/ not read" in r.output  # said even with --quiet


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    from asib.errors import RecipeError
    from asib.recipe import recipe_from_dict

    write_png(tmp_path / "a" / "test" / "cat" / "0.png", (4, 4), 1)
    with pytest.raises(DataError, match="has test/ but no train/"):
        load_imagefolder(tmp_path / "a")
    write_png(tmp_path / "b" / "loose.png", (4, 4), 1)
    write_png(tmp_path / "b" / "cat" / "0.png", (4, 4), 1)
    with pytest.raises(DataError, match="holds images directly"):
        load_imagefolder(tmp_path / "b")
    root = write_imagefolder(tmp_path / "c")
    with pytest.raises(DataError, match="test_fraction is set but .* has its own test split"):
        load_imagefolder(root, test_fraction=0.3)
    with pytest.raises(DataError, match="no folder"):
        load_imagefolder(tmp_path / "missing")
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"name": "x", "data": {"source": "digits", "test_fraction": 0.3}})
    assert err.value.problems[0].startswith("data.test_fraction: source digits has its own test split")


def test_digits_split() -> None:
    raw = load_digits()
    assert len(raw.train_labels) + len(raw.test_labels) == 1797
    assert len(raw.test_labels) == round(0.2 * 1797)
    assert raw.train_images.shape[1:] == (8, 8) and raw.train_images.max() == 255
    assert raw.classes == tuple(str(i) for i in range(10))
    np.testing.assert_array_equal(load_digits().test_labels, raw.test_labels)  # fixed split


def test_stratified_split() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    kept, held = stratified_split(labels, 0.1, seed=3)
    assert len(held) == 10 and len(kept) == 90 and not set(kept) & set(held)
    assert np.bincount(labels[held]).tolist() == [1, 2, 3, 4]
    assert stratified_split(labels, 0.1, seed=3)[1].tolist() == held.tolist()
    assert stratified_split(labels, 0.1, seed=4)[1].tolist() != held.tolist()
    assert len(stratified_split(labels, 0.0, seed=3)[1]) == 0


# ---------------------------------------------------------------- prepared format


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "digits"
    prepare_data(DataSpec(source="digits", val_fraction=0.1, split_seed=5), out, "digits-test")
    return out


def test_prepare_writes_format(digits_dir: Path) -> None:
    assert sorted(p.name for p in digits_dir.iterdir()) == [
        "dataset.json",
        "test.safetensors",
        "train.safetensors",
        "val.safetensors",
    ]
    meta = json.loads((digits_dir / "dataset.json").read_text())
    assert meta["source"] == "digits" and meta["name"] == "digits-test" and meta["format_version"] == 1
    assert meta["num_classes"] == 10 and meta["classes"] == [str(i) for i in range(10)]
    assert meta["image_size"] == [8, 8] and meta["channels"] == 3
    assert meta["split_seed"] == 5 and meta["val_fraction"] == 0.1 and meta["train_subset"] is None
    assert set(meta["sha256"]) == {"train", "val", "test"}
    assert sum(meta["counts"].values()) == 1797 and meta["counts"]["test"] == 359
    assert meta["counts"]["val"] == round(0.1 * 1438)
    for split in ("train", "val", "test"):
        images, labels = load_split(digits_dir, split, verify=True)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (meta["counts"][split], 3, 8, 8) and labels.shape == (images.shape[0],)
    info = load_info(digits_dir)
    assert DatasetInfo.from_json(info.to_json()) == info


def test_prepare_stats_and_split(digits_dir: Path) -> None:
    info = load_info(digits_dir)
    train, train_y = load_split(digits_dir, "train")
    mean, std = channel_stats(train)
    assert info.mean == pytest.approx(mean) and info.std == pytest.approx(std)
    flat = train.double().div(255)
    assert info.mean[0] == pytest.approx(flat[:, 0].mean().item())
    assert info.std[1] == pytest.approx(flat[:, 1].std(unbiased=False).item())
    test, _ = load_split(digits_dir, "test")
    assert channel_stats(test)[0] != pytest.approx(mean)  # computed on train, not test
    assert torch.equal(train[:, 0], train[:, 1]) and torch.equal(
        train[:, 0], train[:, 2]
    )  # gray -> 3 channels
    _, val_y = load_split(digits_dir, "val")
    share = (
        torch.bincount(val_y, minlength=10).double() / torch.bincount(torch.cat([train_y, val_y])).double()
    )
    assert share.min() > 0.07 and share.max() < 0.13  # stratified


def test_prepare_subset_resize_and_empty_val(tmp_path: Path) -> None:
    spec = DataSpec(source="digits", train_subset=200, val_fraction=0.25, image_size=12)
    said: list[str] = []
    info = prepare_data(spec, tmp_path / "d", "small", progress=said.append)
    assert any("resizing" in line for line in said) and said[-1].startswith("prepared")
    assert info.counts["train"] + info.counts["val"] == 200 and info.counts["val"] == 50
    assert info.image_size == (12, 12) and info.train_subset == 200
    images, labels = load_split(tmp_path / "d", "train")
    _, val_labels = load_split(tmp_path / "d", "val")
    assert images.shape[1:] == (3, 12, 12)
    assert torch.bincount(torch.cat([labels, val_labels])).tolist() == [20] * 10  # stratified subset
    info0 = prepare_data(DataSpec(source="digits", val_fraction=0.0), tmp_path / "e", "e")
    assert info0.counts["val"] == 0 and load_split(tmp_path / "e", "val")[0].shape == (0, 3, 8, 8)


def test_transfer_subset_keeps_val_and_test_and_the_teachers_normalisation(tmp_path: Path) -> None:
    full = prepare_data(DataSpec(source="digits", val_fraction=0.2), tmp_path / "full", "full")
    small = prepare_data(DataSpec(source="digits", val_fraction=0.2, transfer_subset=300), tmp_path / "small", "small")
    assert small.counts["train"] == 300 and small.transfer_subset == 300
    assert small.counts["val"] == full.counts["val"] and small.counts["test"] == full.counts["test"]
    for split in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(load_split(tmp_path / "full", split),
                                                       load_split(tmp_path / "small", split), strict=True))
    assert small.mean == full.mean and small.std == full.std  # the statistics of the data the teachers saw
    full_x, _ = load_split(tmp_path / "full", "train")
    small_x, small_y = load_split(tmp_path / "small", "train")
    rows = {tuple(x.flatten().tolist()) for x in full_x}
    assert all(tuple(x.flatten().tolist()) in rows for x in small_x)  # a subset of the full training split
    assert all(abs(c - 30) <= 1 for c in torch.bincount(small_y).tolist())  # stratified


def test_prepare_other_sources(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "c10")
    info = prepare_data(
        DataSpec(source="cifar10", root=str(tmp_path / "c10"), val_fraction=0.2), tmp_path / "a", "c"
    )
    assert info.counts == {"train": 12, "val": 3, "test": 4} and info.image_size == (32, 32)
    write_imagefolder(tmp_path / "imgs")
    spec = DataSpec(source="imagefolder", root=str(tmp_path / "imgs"), val_fraction=0.0, image_size=8)
    info = prepare_data(spec, tmp_path / "b", "i")
    assert info.classes == ("ant", "zebra") and info.image_size == (8, 8)
    (tmp_path / "fm").mkdir()
    for stem, array in fashion_arrays().items():
        write_idx(tmp_path / "fm" / (stem + ".gz"), array)
    info = prepare_data(DataSpec(source="fashion_mnist", root=str(tmp_path / "fm")), tmp_path / "f", "f")
    images, _ = load_split(tmp_path / "f", "test")
    assert images.shape == (10, 3, 7, 6) and torch.equal(images[:, 0], images[:, 2])


def test_prepare_refuses_existing_and_force_replaces(tmp_path: Path) -> None:
    out = tmp_path / "d"
    prepare_data(DataSpec(source="digits", train_subset=100), out, "x")
    with pytest.raises(DataError, match="already prepared; use --force"):
        prepare_data(DataSpec(source="digits", train_subset=100), out, "x")
    info = prepare_data(DataSpec(source="digits", train_subset=50), out, "x", force=True)
    assert load_info(out) == info and info.train_subset == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders left behind


def test_prepare_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        prepare_data(DataSpec(source="cifar10", root=str(tmp_path / "none")), tmp_path / "out", "x")
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_prepared(tmp_path: Path, digits_dir: Path) -> None:
    with pytest.raises(DataError) as err:
        load_info(tmp_path / "nothing")
    assert "asib prepare-data" in (err.value.hint or "")
    with pytest.raises(DataError, match="prepare-data|dataset.json"):
        load_split(tmp_path / "nothing", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_split(digits_dir, "holdout")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in digits_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = (copy / "train.safetensors").read_bytes()
    (copy / "train.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train\.safetensors: truncated or corrupt"):
        load_split(copy, "train")
    tampered = bytearray((copy / "test.safetensors").read_bytes())
    tampered[-1] ^= 0xFF
    (copy / "test.safetensors").write_bytes(bytes(tampered))
    load_split(copy, "test")  # checksums are checked only when asked
    with pytest.raises(DataError, match="checksum"):
        load_split(copy, "test", verify=True)
    (copy / "val.safetensors").unlink()
    with pytest.raises(DataError, match="val.safetensors: missing"):
        load_split(copy, "val")
    (copy / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_info(copy)


# ---------------------------------------------------------------- loader


def toy(n: int = 50, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images whose label is their own index, so batches tell which samples they hold."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8), torch.arange(n)


def loader(images: torch.Tensor, labels: torch.Tensor, **kw: object) -> InMemoryLoader:
    args: dict[str, object] = dict(
        batch_size=8, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, augment=None, shuffle=True, seed=0,
        device="cpu", drop_last=False,
    )  # fmt: skip
    args.update(kw)
    return InMemoryLoader(images, labels, **args)  # type: ignore[arg-type]


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(p.x, q.x)
        and torch.equal(p.y, q.y)
        and p.lam == q.lam
        and (
            (p.y2 is None and q.y2 is None)
            or (p.y2 is not None and q.y2 is not None and torch.equal(p.y2, q.y2))
        )
        for p, q in zip(a, b, strict=True)
    )


AUG = AugmentSpec(crop_padding=2, hflip=True, mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.7)


def test_loader_reproducible_and_epochs_differ() -> None:
    images, labels = toy()
    a, b = loader(images, labels, augment=AUG, seed=3), loader(images, labels, augment=AUG, seed=3)
    assert same(list(a.batches(2)), list(b.batches(2)))
    assert not same(list(a.batches(2)), list(loader(images, labels, augment=AUG, seed=4).batches(2)))
    assert a.indices(0).tolist() != a.indices(1).tolist()
    plain = loader(images, labels, shuffle=False)
    assert plain.indices(0).tolist() == list(range(50)) == plain.indices(7).tolist()


def test_loader_covers_every_sample_once() -> None:
    images, labels = toy(50)
    ld = loader(images, labels, batch_size=7)
    assert len(ld) == 8
    seen = torch.cat([b.y for b in ld.batches(4)])
    assert sorted(seen.tolist()) == list(range(50))
    dropped = loader(images, labels, batch_size=7, drop_last=True)
    assert len(dropped) == 7 and all(len(b.y) == 7 for b in dropped.batches(0))


def test_loader_shards_disjoint_and_covering() -> None:
    images, labels = toy(51)
    shards = [
        set(torch.cat([b.y for b in loader(images, labels, rank=r, world_size=2).batches(1)]).tolist())
        for r in (0, 1)
    ]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(51))
    even = [loader(images, labels, rank=r, world_size=2, drop_last=True, batch_size=5) for r in (0, 1)]
    assert len(even[0]) == len(even[1]) == 5
    ids = [set(torch.cat([b.y for b in ld.batches(1)]).tolist()) for ld in even]
    assert not ids[0] & ids[1]


def test_loader_resume_mid_epoch() -> None:
    images, labels = toy()
    ld = loader(images, labels, augment=AUG, seed=11)
    full = list(ld.batches(5))
    assert same(list(ld.batches(5, start=3)), full[3:])
    assert list(ld.batches(5, start=len(ld))) == []
    with pytest.raises(DataError):
        list(ld.batches(5, start=len(ld) + 1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_and_flip_change_images_keep_shape(channels_last: bool) -> None:
    images, labels = toy(16, size=6)
    pad = 2
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    # every 6x6 window of every zero-padded image, as (16, 25, C, 6, 6)
    windows = torch.stack([padded[:, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)], 1)
    for hflip in (False, True):
        crop = loader(
            images, labels, shuffle=False, batch_size=16, channels_last=channels_last,
            augment=AugmentSpec(crop_padding=pad, hflip=hflip),
        )  # fmt: skip
        x = next(iter(crop)).x
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        x = x.round().to(torch.uint8)
        assert x.shape == images.shape and not torch.equal(x, images)
        # every output is a window of its own zero-padded image, mirrored or not
        found = [any(torch.equal(x[i], w) for w in windows[i]) for i in range(16)]
        mirrored = [any(torch.equal(x[i], w.flip(2)) for w in windows[i]) for i in range(16)]
        assert all(f or m for f, m in zip(found, mirrored, strict=True))
        assert any(not f for f in found) == hflip
    flip = loader(
        images, labels, shuffle=False, batch_size=16, channels_last=channels_last,
        augment=AugmentSpec(crop_padding=0, hflip=True),
    )  # fmt: skip
    x = next(iter(flip)).x.round().to(torch.uint8)
    flipped = [torch.equal(x[i], images[i].flip(2)) for i in range(16)]
    kept = [torch.equal(x[i], images[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_layout_does_not_change_values() -> None:
    images, labels = toy(40)
    for aug in (None, AUG, AugmentSpec(crop_padding=0, hflip=False, mixup_alpha=0.5)):
        a, b = (list(loader(images, labels, augment=aug, channels_last=cl).batches(1)) for cl in (False, True))
        assert same(a, b)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixing(mode: str) -> None:
    images, labels = toy(64)
    alphas = {"mixup_alpha": 0.5} if mode == "mixup" else {"cutmix_alpha": 1.0}
    aug = AugmentSpec(crop_padding=0, hflip=False, mix_prob=1.0, **alphas)
    ld = loader(images, labels, augment=aug, batch_size=16, shuffle=False)
    lams = []
    for batch in ld.batches(0):
        assert batch.y2 is not None and 0.0 <= batch.lam <= 1.0
        assert sorted(batch.y2.tolist()) == sorted(batch.y.tolist())
        lams.append(batch.lam)
    assert len(set(lams)) > 1
    never = loader(images, labels, augment=aug.model_copy(update={"mix_prob": 0.0}), batch_size=16)
    assert all(b.y2 is None and b.lam == 1.0 for b in never.batches(0))


def test_cutmix_lam_is_kept_share() -> None:
    images, labels = toy(8)
    aug = AugmentSpec(crop_padding=0, hflip=False, cutmix_alpha=1.0)
    ld = loader(images, labels, augment=aug, batch_size=8, shuffle=False)
    for epoch in range(5):
        batch = next(ld.batches(epoch))
        assert batch.y2 is not None
        moved = batch.y2 != batch.y  # labels are indices; a sample paired with itself looks unmixed
        own = (batch.x == images.float()).all(dim=1)[moved]
        partner = (batch.x == images[batch.y2].float()).all(dim=1)[moved]
        assert own.float().mean().item() == pytest.approx(batch.lam, abs=1e-3)
        assert (own | partner).all()


def test_normalisation_zero_mean_and_options(digits_dir: Path) -> None:
    info = load_info(digits_dir)
    ld = make_loader(digits_dir, "train", batch_size=100, device="cpu", channels_last=True)
    assert not ld.shuffle and ld.augment is None
    xs = [b.x for b in ld]
    assert xs[0].is_contiguous(memory_format=torch.channels_last)
    x = torch.cat(xs)
    assert x.shape == (info.counts["train"], 3, 8, 8) and x.dtype == torch.float32
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    train = make_loader(digits_dir, "train", batch_size=64, device="cpu", train=True, augment=AUG, seed=1)
    assert train.drop_last and len(train) == info.counts["train"] // 64
    with pytest.raises(DataError, match="classes"):
        make_loader(digits_dir, "test", batch_size=10, device="cpu", num_classes=5)
    with pytest.raises(DataError, match="no full batch"):
        make_loader(digits_dir, "val", batch_size=10_000, device="cpu", train=True)


def test_transfer_split_rest_is_the_complement_of_the_transfer_set(tmp_path: Path) -> None:
    full = prepare_data(DataSpec(source="digits", val_fraction=0.2), tmp_path / "full", "full")
    subset = prepare_data(DataSpec(source="digits", val_fraction=0.2, transfer_subset=300), tmp_path / "sub", "sub")
    rest = prepare_data(
        DataSpec(source="digits", val_fraction=0.2, transfer_subset=300, transfer_split="rest"), tmp_path / "rest", "rest"
    )
    assert rest.transfer_split == "rest" and subset.transfer_split == "subset"
    assert rest.counts["train"] + subset.counts["train"] == full.counts["train"]
    assert rest.mean == subset.mean == full.mean and rest.std == full.std  # normalised alike
    for split in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(load_split(tmp_path / "rest", split),
                                                       load_split(tmp_path / "sub", split), strict=True))

    def rows(folder: str) -> list[tuple[float, ...]]:
        return [tuple(x.flatten().tolist()) for x in load_split(tmp_path / folder, "train")[0]]

    full_rows, sub_rows, rest_rows = rows("full"), rows("sub"), rows("rest")
    assert sorted(sub_rows + rest_rows) == sorted(full_rows)  # disjoint, and together the training split
    assert DatasetInfo.from_dict(json.loads((tmp_path / "rest" / "dataset.json").read_text())).transfer_split == "rest"
    with pytest.raises(ValueError, match="needs transfer_subset"):
        DataSpec(source="digits", transfer_split="rest")
    with pytest.raises(DataError, match="would keep none"):
        prepare_data(DataSpec(source="digits", val_fraction=0.2, transfer_subset=5000, transfer_split="rest"),
                     tmp_path / "none", "none")
