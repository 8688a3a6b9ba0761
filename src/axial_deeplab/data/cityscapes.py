"""Cityscapes panoptic with train ids, in the layout cityscapesscripts produces.

``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` images, and
``root/gtFine/cityscapes_panoptic_{split}_trainId.json`` + ``..._trainId/`` PNGs made by
``csCreatePanopticImgs --use-train-id``: 19 classes (category ids are train ids 0..18),
8 things (person..bicycle), label divisor 1000.
"""

from __future__ import annotations

import os
from pathlib import Path

from .coco import CocoPanopticDataset
from .meta import cityscapes_metadata
from .panoptic_io import PanopticFormatError, read_panoptic_json


class CityscapesPanoptic(CocoPanopticDataset):
    def __init__(self, root: str | os.PathLike, split: str = "val", transform=None):
        root = Path(root)
        json_path = root / "gtFine" / f"cityscapes_panoptic_{split}_trainId.json"
        if not json_path.is_file() and (root / "gtFine" / f"cityscapes_panoptic_{split}.json").is_file():
            raise FileNotFoundError(
                f"{json_path}: not found; the JSON next to it uses label ids. Create the train-id version with "
                f"`csCreatePanopticImgs --use-train-id`"
            )
        metadata = cityscapes_metadata()
        cats = read_panoptic_json(json_path)["categories"]
        got = sorted((int(c["id"]), int(c.get("isthing", 0))) for c in cats)
        want = [(c, int(metadata.is_thing(c))) for c in range(metadata.num_classes)]
        if got != want:
            raise PanopticFormatError(
                f"{json_path}: categories are not the 19 Cityscapes train ids 0..18 with things 11..18 "
                f"(got ids {[g[0] for g in got][:25]}); was it made with --use-train-id?"
            )
        super().__init__(
            root / "leftImg8bit" / split,
            json_path,
            root / "gtFine" / f"cityscapes_panoptic_{split}_trainId",
            metadata=metadata,
            transform=transform,
            split=split,
        )

    def image_path(self, ann, image_info):
        # image_id is "<city>_<seq>_<frame>"; images live in leftImg8bit/<split>/<city>/. (The JSON's
        # images[].file_name from cityscapesscripts reads "..._gtFine_leftImg8bit.png", not the real name.)
        image_id = str(ann["image_id"])
        return self.image_dir / image_id.split("_")[0] / f"{image_id}_leftImg8bit.png"
