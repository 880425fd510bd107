"""scikit-learn's 8x8 handwritten digits: the offline source the demo recipes use."""

from __future__ import annotations

import numpy as np

from asib.data.sources.base import RawData, _raw, register_source, stratified_split
from asib.recipe import DataSpec

DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed, so every recipe sees the same digits test set


def load_digits() -> RawData:
    """scikit-learn's 8x8 digits, scaled to 0..255, with a fixed stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    classes = [str(int(c)) for c in bunch.target_names]
    return _raw((images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]), classes)


@register_source("digits")
def _from_spec(spec: DataSpec) -> RawData:
    """``data.source: digits``; no other data field is read."""
    return load_digits()
