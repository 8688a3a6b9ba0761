"""Datasets, transforms, COCO-panoptic file I/O and collation.

A dataset item is a dict: image (3, H, W) float in [0, 1], semantic / instance (H, W) int64,
crowd (H, W) bool, image_id, file_name, orig_size; datasets expose ``.metadata``.
"""

from .cityscapes import CityscapesPanoptic
from .coco import CocoPanoptic, CocoPanopticDataset
from .collate import collate_panoptic
from .image_folder import ImageFolderDataset
from .mapillary import MapillaryVistasPanoptic
from .meta import PanopticMetadata, check_metadata_compatible, cityscapes_metadata
from .panoptic_io import (
    PanopticFormatError,
    PanopticWriter,
    decode_panoptic,
    encode_panoptic,
    encode_prediction,
    id_to_rgb,
    image_to_tensor,
    read_image,
    read_panoptic_json,
    read_panoptic_png,
    rgb_to_id,
    write_image,
    write_json,
    write_panoptic_png,
)
from .synthetic import SyntheticPanoptic, synthetic_metadata
from .transforms import build_classification_transforms, build_eval_transforms, build_train_transforms

__all__ = [
    "CityscapesPanoptic",
    "CocoPanoptic",
    "CocoPanopticDataset",
    "ImageFolderDataset",
    "MapillaryVistasPanoptic",
    "PanopticFormatError",
    "PanopticMetadata",
    "PanopticWriter",
    "SyntheticPanoptic",
    "build_classification_transforms",
    "build_eval_transforms",
    "build_train_transforms",
    "check_metadata_compatible",
    "cityscapes_metadata",
    "collate_panoptic",
    "decode_panoptic",
    "encode_panoptic",
    "encode_prediction",
    "id_to_rgb",
    "image_to_tensor",
    "read_image",
    "read_panoptic_json",
    "read_panoptic_png",
    "rgb_to_id",
    "synthetic_metadata",
    "write_image",
    "write_json",
    "write_panoptic_png",
]
