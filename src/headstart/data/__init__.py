"""Data: datasets (folders, CSV), image reading and hygiene, transforms."""

from .datasets import Dataset, Splits, load_dataset, load_splits, scan_folder
from .images import IMAGE_EXTENSIONS, load_image
from .transforms import EvalTransform

__all__ = ["Dataset", "Splits", "load_dataset", "load_splits", "scan_folder", "IMAGE_EXTENSIONS", "load_image",
           "EvalTransform"]
