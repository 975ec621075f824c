"""Retrieval data: annotation readers, the split type, caption cleaning, datasets, transforms."""

from __future__ import annotations

from harma.data.cache import ImageCache
from harma.data.captions import clean_caption
from harma.data.datasets import ImageDataset, PairDataset
from harma.data.images import IMAGE_EXTENSIONS, open_image, verify_images
from harma.data.readers import FORMATS, detect_format, load_split
from harma.data.split import CARVES, RetrievalSplit, carve, carve_block_split, carve_split, image_classes, scene_names
from harma.data.synthetic import write_synthetic_dataset
from harma.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform
from harma.errors import DatasetError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageCache",
    "ImageDataset",
    "PairDataset",
    "RetrievalSplit",
    "CARVES",
    "carve",
    "carve_block_split",
    "carve_split",
    "image_classes",
    "scene_names",
    "clean_caption",
    "detect_format",
    "eval_transform",
    "load_split",
    "open_image",
    "train_transform",
    "verify_images",
    "write_synthetic_dataset",
]
