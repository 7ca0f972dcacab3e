"""Data: the dataset contract and its readers (``dataset``), epoch orders and shards (``sampling``)."""

from metriclab.data.dataset import (
    IDX_FILES,
    Dataset,
    default_data_dir,
    find_idx_files,
    load_idx_dataset,
    read_idx,
)
from metriclab.data.loading import load_dataset

__all__ = ["IDX_FILES", "Dataset", "default_data_dir", "find_idx_files", "load_dataset", "load_idx_dataset", "read_idx"]
