"""Data: dataset contracts (``dataset``: tensors, ``images``: files), image sources (``loader``), ``sampling``."""

from metriclab.data.dataset import (
    IDX_FILES,
    Dataset,
    default_data_dir,
    find_idx_files,
    load_idx_dataset,
    read_idx,
)
from metriclab.data.images import ImageFiles, StreamingDataset
from metriclab.data.loader import ImageSource, is_streaming
from metriclab.data.loading import load_dataset

__all__ = [
    "IDX_FILES",
    "Dataset",
    "ImageFiles",
    "ImageSource",
    "StreamingDataset",
    "default_data_dir",
    "find_idx_files",
    "is_streaming",
    "load_dataset",
    "load_idx_dataset",
    "read_idx",
]
