"""Cityscapes panoptic, in the layout cityscapesscripts' ``csCreatePanopticImgs`` produces.

``root/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` images and, under ``root/gtFine/``, either
``cityscapes_panoptic_{split}_trainId.json`` + ``..._trainId/`` PNGs (``--use-train-id``: category
ids are the train ids 0..18) or ``cityscapes_panoptic_{split}.json`` + ``cityscapes_panoptic_{split}/``
PNGs (the default: the official label ids 7..33, which the benchmark server and
``evaluatePanoptic`` expect). The PNGs of both encode the same segments; only the category ids
differ. Either way: the 19 evaluated classes in train-id order, 8 things (person..bicycle),
label divisor 1000; the dataset's metadata carry the JSON's ids, so predictions written for it
(``evaluate --predictions``) use them too.
"""

from __future__ import annotations

import os
from pathlib import Path

from .coco import CocoPanopticDataset
from .meta import CITYSCAPES_IDS, cityscapes_metadata
from .panoptic_io import PanopticFormatError, read_panoptic_json

_IDS_OPTION = ("auto",) + CITYSCAPES_IDS
_CREATE = {"train": "csCreatePanopticImgs --use-train-id", "label": "csCreatePanopticImgs"}


def cityscapes_panoptic_paths(root: str | os.PathLike, split: str, ids: str) -> tuple[Path, Path]:
    """``(JSON, PNG folder)`` of ``split`` with ``ids`` ("train" or "label")."""
    base = Path(root) / "gtFine" / (f"cityscapes_panoptic_{split}" + ("_trainId" if ids == "train" else ""))
    return base.with_name(base.name + ".json"), base


class CityscapesPanoptic(CocoPanopticDataset):
    """Args:
    root: the Cityscapes folder (``leftImg8bit/``, ``gtFine/``).
    split: "train", "val" (or "test" where its panoptic JSON exists).
    ids: which ground truth to read: ``"train"`` (``..._trainId.json``), ``"label"`` (the official
        ``cityscapes_panoptic_{split}.json``) or ``"auto"``: the train-id one when present, else
        the label-id one.
    """

    def __init__(self, root: str | os.PathLike, split: str = "val", transform=None, ids: str = "auto"):
        root = Path(root)
        if ids not in _IDS_OPTION:
            raise ValueError(f"Cityscapes ids (data.options.ids): {ids!r} is not one of {', '.join(_IDS_OPTION)}")
        if ids == "auto":
            train_json, _ = cityscapes_panoptic_paths(root, split, "train")
            label_json, _ = cityscapes_panoptic_paths(root, split, "label")
            if not train_json.is_file() and not label_json.is_file():
                raise FileNotFoundError(
                    f"{train_json}: not found, nor {label_json.name} next to it; create the panoptic ground "
                    f"truth with `{_CREATE['label']}` (label ids) or `{_CREATE['train']}` (train ids)"
                )
            ids = "train" if train_json.is_file() else "label"
        json_path, png_dir = cityscapes_panoptic_paths(root, split, ids)
        if not json_path.is_file():
            raise FileNotFoundError(f"{json_path}: not found (data.options.ids={ids}); create it with `{_CREATE[ids]}`")
        metadata = cityscapes_metadata(ids)
        cats = read_panoptic_json(json_path)["categories"]
        got = sorted((int(c["id"]), int(c.get("isthing", 0))) for c in cats)
        want = [(metadata.category_id(c), int(metadata.is_thing(c))) for c in range(metadata.num_classes)]
        if got != want:
            first, things = want[0][0], [i for i, t in want if t]
            raise PanopticFormatError(
                f"{json_path}: categories are not the 19 Cityscapes {ids} ids {first}..{want[-1][0]} with things "
                f"{things[0]}..{things[-1]} (got ids {[g[0] for g in got][:25]}); was it made with `{_CREATE[ids]}`?"
            )
        self.ids = ids
        super().__init__(
            root / "leftImg8bit" / split,
            json_path,
            png_dir,
            metadata=metadata,
            transform=transform,
            split=split,
        )

    def image_path(self, ann, image_info):
        # image_id is "<city>_<seq>_<frame>"; images live in leftImg8bit/<split>/<city>/. (The JSON's
        # images[].file_name from cityscapesscripts reads "..._gtFine_leftImg8bit.png", not the real name.)
        image_id = str(ann["image_id"])
        return self.image_dir / image_id.split("_")[0] / f"{image_id}_leftImg8bit.png"
