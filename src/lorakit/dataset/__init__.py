"""kohya-style DreamBooth datasets: folders -> checked plan -> buckets -> resumable batches.

Importing this package does not import torch: the folder scan (for `lorakit check` and the
GUI) is usable alone; the torch-side names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .buckets import BucketManager, Placement, make_bucket_resolutions
from .captions import process_caption
from .folders import DatasetPlan, Sample, balance_reg_repeats, parse_folder_name, scan_dataset

if TYPE_CHECKING:
    from .cache import CachedLatents, cache_latents
    from .loader import Batch, DreamBoothDataset, build_dataset

_LAZY = {
    "Batch": "loader",
    "DreamBoothDataset": "loader",
    "build_dataset": "loader",
    "CachedLatents": "cache",
    "cache_latents": "cache",
}

__all__ = [
    "Batch",
    "BucketManager",
    "CachedLatents",
    "DatasetPlan",
    "DreamBoothDataset",
    "Placement",
    "Sample",
    "balance_reg_repeats",
    "build_dataset",
    "cache_latents",
    "make_bucket_resolutions",
    "parse_folder_name",
    "process_caption",
    "scan_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
