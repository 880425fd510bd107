"""Data: raw sources, the prepared-tensor format, and the in-memory loader with batched augmentation."""

from asib.data.loader import Batch, InMemoryLoader, make_loader
from asib.data.prepared import SPLITS, DatasetInfo, load_info, load_split, prepare_data
from asib.data.sources import SOURCES

__all__ = [
    "SOURCES",
    "SPLITS",
    "Batch",
    "DatasetInfo",
    "InMemoryLoader",
    "load_info",
    "load_split",
    "make_loader",
    "prepare_data",
]
