"""Datasets stored in COCO-panoptic format: the generic base (any category list, e.g. custom data)
and COCO panoptic itself in its usual layout.

The JSON is read and checked once when the dataset is made (structure, categories of every
segment, no image twice, not empty: :func:`~.panoptic_io.check_panoptic_json`); images and PNGs
are read per item, each PNG checked against its JSON entry both ways (ids in the PNG but not the
JSON and the reverse), and every problem names the file at fault. ``pq`` runs the same checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .meta import PanopticMetadata
from .panoptic_io import (
    PanopticFormatError,
    check_panoptic_json,
    decode_panoptic,
    image_to_tensor,
    read_image,
    read_panoptic_json,
    read_panoptic_png,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class CocoPanopticDataset(Dataset):
    """Images + COCO-panoptic JSON + PNG folder, with the JSON's own category list.

    Args:
        image_dir: folder of the images (``images[].file_name`` of the JSON is relative to it).
        json_path: the panoptic JSON (``annotations``, ``categories``, optionally ``images``).
        png_dir: folder of the panoptic PNGs (``annotations[].file_name``).
        name: dataset name for the metadata.
        metadata: use these classes instead of the JSON's; its ``category_ids`` must cover
            every category the annotations use.
        label_divisor, ignore_label: for the metadata built from the JSON.
        transform: callable applied to the sample dict.
        split: the split's name, for error messages (an empty split is refused).

    Contiguous class ids follow the JSON categories sorted by id. Items are dicts (see
    ``axial_deeplab.data``); thing segments get instance ids 1..K in ``segments_info`` order.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        json_path: str | os.PathLike,
        png_dir: str | os.PathLike,
        name: str = "coco_panoptic",
        metadata: PanopticMetadata | None = None,
        label_divisor: int = 1000,
        ignore_label: int = 255,
        transform: Callable[[dict], dict] | None = None,
        split: str | None = None,
    ):
        self.image_dir = Path(image_dir)
        self.json_path = Path(json_path)
        self.png_dir = Path(png_dir)
        self.transform = transform
        for folder, what in ((self.image_dir, "image folder"), (self.png_dir, "panoptic PNG folder")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: {what} not found")
        data = read_panoptic_json(self.json_path, require_categories=metadata is None)
        if metadata is None:
            metadata = PanopticMetadata.from_coco_categories(
                data["categories"],
                name=name,
                label_divisor=label_divisor,
                ignore_label=ignore_label,
                source=str(self.json_path),
            )
        self.metadata = metadata
        self.split = split
        images = {}
        for i, img in enumerate(data.get("images") or []):
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                raise PanopticFormatError(f"{self.json_path}: images[{i}] needs 'id' and 'file_name'")
            images[img["id"]] = img
        check_panoptic_json(
            data,
            self.json_path,
            metadata.category_ids or range(metadata.num_classes),
            what="panoptic JSON",
            split=split,
            folders=(self.image_dir, self.png_dir),
        )
        self.items: list[tuple[dict, dict | None]] = [(ann, images.get(ann["image_id"])) for ann in data["annotations"]]

    def __len__(self) -> int:
        return len(self.items)

    def json_image_id(self, image_id: str):
        """The JSON's own ``image_id`` (an int for COCO) of a sample's str ``image_id``."""
        if not hasattr(self, "_json_ids"):
            self._json_ids = {str(ann["image_id"]): ann["image_id"] for ann, _ in self.items}
        return self._json_ids[str(image_id)]

    # -- paths (subclasses adapt them to their layouts) ------------------------------------------
    def image_path(self, ann: dict, image_info: dict | None) -> Path:
        if image_info is not None:
            return self.image_dir / image_info["file_name"]
        stem = Path(ann["file_name"]).stem
        for suffix in IMAGE_SUFFIXES:
            p = self.image_dir / (stem + suffix)
            if p.is_file():
                return p
        return self.image_dir / (stem + ".jpg")

    def png_path(self, ann: dict) -> Path:
        return self.png_dir / ann["file_name"]

    # -- items -----------------------------------------------------------------------------------
    def load(self, index: int) -> dict[str, Any]:
        """Numpy arrays of one item: image (H, W, 3) uint8, semantic, instance, crowd."""
        ann, info = self.items[index]
        img_path = self.image_path(ann, info)
        png_path = self.png_path(ann)
        if not img_path.is_file():
            raise FileNotFoundError(
                f"{img_path}: image of image_id {ann['image_id']!r} (from {self.json_path}) not found"
            )
        if not png_path.is_file():
            raise FileNotFoundError(
                f"{png_path}: panoptic PNG of image_id {ann['image_id']!r} (from {self.json_path}) not found"
            )
        image = read_image(img_path)
        ids = read_panoptic_png(png_path)
        if ids.shape != image.shape[:2]:
            raise PanopticFormatError(
                f"{png_path}: label size {ids.shape[1]}x{ids.shape[0]} differs from image {img_path} "
                f"size {image.shape[1]}x{image.shape[0]}"
            )
        if info is not None and "height" in info and "width" in info:
            if (int(info["height"]), int(info["width"])) != image.shape[:2]:
                raise PanopticFormatError(
                    f"{img_path}: size {image.shape[1]}x{image.shape[0]} differs from {self.json_path} "
                    f"({info['width']}x{info['height']})"
                )
        semantic, instance, crowd = decode_panoptic(
            ids,
            ann["segments_info"],
            self.metadata,
            source=f"{png_path} (image_id {ann['image_id']!r} of JSON {self.json_path})",
        )
        return {
            "image": image,
            "semantic": semantic,
            "instance": instance,
            "crowd": crowd,
            "image_id": str(ann["image_id"]),
            "file_name": str(img_path),
        }

    def __getitem__(self, index: int) -> dict:
        d = self.load(index)
        h, w = d["image"].shape[:2]
        sample = {
            "image": image_to_tensor(d["image"]),
            "semantic": torch.from_numpy(d["semantic"].astype(np.int64, copy=False)),
            "instance": torch.from_numpy(d["instance"].astype(np.int64, copy=False)),
            "crowd": torch.from_numpy(d["crowd"]),
            "image_id": d["image_id"],
            "file_name": d["file_name"],
            "orig_size": (h, w),
        }
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


class CocoPanoptic(CocoPanopticDataset):
    """COCO panoptic in its released layout under ``root``: ``{split}2017/`` images,
    ``annotations/panoptic_{split}2017.json`` and ``annotations/panoptic_{split}2017/`` PNGs
    (133 categories, 80 things, mapped to contiguous ids 0..132 in category-id order)."""

    def __init__(self, root: str | os.PathLike, split: str = "val", transform=None, **kw):
        root = Path(root)
        super().__init__(
            root / f"{split}2017",
            root / "annotations" / f"panoptic_{split}2017.json",
            root / "annotations" / f"panoptic_{split}2017",
            name=kw.pop("name", "coco"),
            transform=transform,
            split=kw.pop("split", split),
            **kw,
        )
