"""Mapillary Vistas panoptic in its released layout; classes come from its panoptic JSON.

Looks under ``root/{training|validation}/`` for ``images/*.jpg`` and, in this order,
``panoptic/panoptic_2018.json`` (v1.x), ``v1.2/panoptic/panoptic_2018.json`` or
``v2.0/panoptic/panoptic_2020.json``, the PNGs sitting next to the JSON.
"""

from __future__ import annotations

import os
from pathlib import Path

from .coco import CocoPanopticDataset

_SPLIT_DIRS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
_VERSIONS = {
    "v1.1": ("panoptic", "panoptic_2018.json"),
    "v1.2": ("v1.2/panoptic", "panoptic_2018.json"),
    "v2.0": ("v2.0/panoptic", "panoptic_2020.json"),
}


class MapillaryVistasPanoptic(CocoPanopticDataset):
    """``split``: "train"/"val" (or "training"/"validation"); ``version``: "v1.1" (files in
    ``{split}/panoptic/``), "v1.2", "v2.0", or None to take the first layout present."""

    def __init__(self, root: str | os.PathLike, split: str = "val", version: str | None = None, transform=None, **kw):
        root = Path(root)
        if split not in _SPLIT_DIRS:
            raise ValueError(f"MapillaryVistasPanoptic: split must be one of {sorted(_SPLIT_DIRS)}, got {split!r}")
        base = root / _SPLIT_DIRS[split]
        if version is not None and version not in _VERSIONS:
            raise ValueError(f"MapillaryVistasPanoptic: version must be one of {sorted(_VERSIONS)}, got {version!r}")
        candidates = [_VERSIONS[version]] if version else list(_VERSIONS.values())
        tried = [base / d / f for d, f in candidates]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"{tried[0]}: Mapillary Vistas panoptic JSON not found (looked for {', '.join(map(str, tried))})"
            )
        super().__init__(
            base / "images",
            found,
            found.parent,
            name=kw.pop("name", "mapillary_vistas"),
            transform=transform,
            split=kw.pop("split", split),
            **kw,
        )
