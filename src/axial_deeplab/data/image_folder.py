"""ImageNet-layout classification data: ``root/<class name>/<image>``, classes sorted by name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from .panoptic_io import image_to_tensor, read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class ImageFolderDataset(Dataset):
    """Items are ``(image (3, H, W) float32 in [0, 1], label int)``; ``transform`` (if any) is
    applied to the image tensor. ``classes`` lists the class folder names (label = index)."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"{self.root}: no class folders (expected root/<class>/<image>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = sorted(p for p in (self.root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            self.samples.extend((p, self.class_to_idx[c]) for p in files)
        if not self.samples:
            raise FileNotFoundError(f"{self.root}: no images with suffix {IMAGE_SUFFIXES} in the class folders")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = image_to_tensor(read_image(path))
        if self.transform is not None:
            image = self.transform(image)
        return image, label
