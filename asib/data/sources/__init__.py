"""Raw image sources: each reads one dataset's official files into numpy arrays.

One module per source (``digits``, ``fashion_mnist``, ``cifar``, ``imagefolder``); what they
share (``RawData``, ``stratified_split``, the registry behind ``load_source``) is in ``base``.
Every source returns a ``RawData``: uint8 images shaped (N, H, W, C) or (N, H, W), int64
labels, and the class names. ``asib.data.prepared`` turns that into the prepared format.
Heavy optional libraries (scikit-learn, PIL, torchvision) are imported inside the source
that needs them, so importing ``asib.data`` stays cheap.

Adding a source: a module here whose loader carries ``@register_source("name")``, and its
import below (the imports register the sources, in this order).
"""

# isort: off
from asib.data.sources.base import LOADERS, RawData, load_source, register_source, stratified_split
from asib.data.sources.base import _raw as _raw  # asib.data.tasks builds RawData with it
from asib.data.sources.digits import DIGITS_TEST_FRACTION, DIGITS_TEST_SEED, load_digits
from asib.data.sources.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    load_fashion_mnist,
    parse_idx,
    read_idx,
)
from asib.data.sources.cifar import RestrictedUnpickler, load_cifar, read_pickle
from asib.data.sources.imagefolder import IMAGE_EXTENSIONS, load_imagefolder
# isort: on

SOURCES: tuple[str, ...] = tuple(LOADERS)  # "digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder"

__all__ = [
    "DIGITS_TEST_FRACTION",
    "DIGITS_TEST_SEED",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMAGE_EXTENSIONS",
    "LOADERS",
    "SOURCES",
    "RawData",
    "RestrictedUnpickler",
    "load_cifar",
    "load_digits",
    "load_fashion_mnist",
    "load_imagefolder",
    "load_source",
    "parse_idx",
    "read_idx",
    "read_pickle",
    "register_source",
    "stratified_split",
]
