"""Datasets, image loading and transforms (caches live in adapt/data/cache.py)."""
from adapt.data.dataset import BadDataWarning, Record, TrainDataset, build_dataset, collate_examples
from adapt.data.images import (
    IMAGE_EXTENSIONS,
    TransformResult,
    TransformSettings,
    image_size,
    load_image,
    to_rgb,
    transform_pair,
)
from adapt.data.sources import compose_caption
from adapt.data.spec import DatasetSpec, SubsetSpec, dataset_spec_from_dict, folder_spec, load_dataset_file

__all__ = [
    "BadDataWarning", "DatasetSpec", "IMAGE_EXTENSIONS", "Record", "SubsetSpec", "TrainDataset", "TransformResult",
    "TransformSettings", "build_dataset", "collate_examples", "compose_caption", "dataset_spec_from_dict", "folder_spec",
    "image_size", "load_dataset_file", "load_image", "to_rgb", "transform_pair",
]
