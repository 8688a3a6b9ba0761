"""Dataset metadata shared by datasets, targets, models and evaluators.

One small dataclass says what the contiguous class ids mean (names, which are
things), how panoptic ids are packed (``class * label_divisor + instance``) and
how they map back to the dataset's own category ids, so every part of the
pipeline agrees without passing datasets around.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence


@dataclass
class PanopticMetadata:
    name: str
    class_names: list[str]
    thing_ids: list[int]
    label_divisor: int = 1000
    ignore_label: int = 255
    colors: list[tuple[int, int, int]] | None = None
    category_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.class_names = [str(n) for n in self.class_names]
        self.thing_ids = sorted(int(t) for t in self.thing_ids)
        c = len(self.class_names)
        if c == 0:
            raise ValueError(f"metadata {self.name!r}: class_names is empty")
        bad = [t for t in self.thing_ids if not 0 <= t < c]
        if bad:
            raise ValueError(f"metadata {self.name!r}: thing_ids {bad} outside 0..{c - 1}")
        if len(set(self.thing_ids)) != len(self.thing_ids):
            raise ValueError(f"metadata {self.name!r}: thing_ids has duplicates")
        if self.label_divisor <= 0:
            raise ValueError(f"metadata {self.name!r}: label_divisor must be positive")
        if 0 <= self.ignore_label < c:
            raise ValueError(
                f"metadata {self.name!r}: ignore_label {self.ignore_label} collides with a class id (0..{c - 1})"
            )
        if self.colors is not None:
            if len(self.colors) != c:
                raise ValueError(f"metadata {self.name!r}: {len(self.colors)} colors for {c} classes")
            self.colors = [tuple(int(v) for v in col) for col in self.colors]
        if self.category_ids is not None:
            if len(self.category_ids) != c:
                raise ValueError(f"metadata {self.name!r}: {len(self.category_ids)} category_ids for {c} classes")
            self.category_ids = [int(v) for v in self.category_ids]
            if len(set(self.category_ids)) != c:
                raise ValueError(f"metadata {self.name!r}: category_ids has duplicates")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def stuff_ids(self) -> list[int]:
        return [c for c in range(self.num_classes) if c not in set(self.thing_ids)]

    def is_thing(self, c: int) -> bool:
        return int(c) in self.thing_ids

    # -- dataset category ids <-> contiguous ids ---------------------------------------------
    def category_id(self, c: int) -> int:
        """Dataset category id (COCO json id) of contiguous class ``c``."""
        return int(self.category_ids[c]) if self.category_ids is not None else int(c)

    def contiguous_id_map(self) -> dict[int, int]:
        """``{dataset category id: contiguous id}``."""
        return {self.category_id(c): c for c in range(self.num_classes)}

    def palette(self) -> list[tuple[int, int, int]]:
        """A colour per class: the dataset's own, or a fixed distinct palette."""
        if self.colors is not None:
            return list(self.colors)
        return [_default_color(c) for c in range(self.num_classes)]

    def coco_categories(self) -> list[dict[str, Any]]:
        """The ``categories`` list of a COCO-panoptic JSON."""
        pal = self.palette()
        return [
            {
                "id": self.category_id(c),
                "name": self.class_names[c],
                "isthing": 1 if self.is_thing(c) else 0,
                "color": list(pal[c]),
                "supercategory": "thing" if self.is_thing(c) else "stuff",
            }
            for c in range(self.num_classes)
        ]

    # -- (de)serialisation, e.g. into checkpoints ----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["colors"] is not None:
            d["colors"] = [list(c) for c in d["colors"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PanopticMetadata":
        known = {"name", "class_names", "thing_ids", "label_divisor", "ignore_label", "colors", "category_ids"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"metadata: unknown fields {sorted(unknown)}")
        missing = {"name", "class_names", "thing_ids"} - set(d)
        if missing:
            raise ValueError(f"metadata: missing fields {sorted(missing)}")
        return cls(**d)

    @classmethod
    def from_coco_categories(
        cls,
        categories: Sequence[dict[str, Any]],
        name: str,
        label_divisor: int = 1000,
        ignore_label: int = 255,
        source: str = "categories",
    ) -> "PanopticMetadata":
        """Contiguous ids follow the categories sorted by their dataset id."""
        cats = []
        for i, cat in enumerate(categories):
            for key in ("id", "name"):
                if key not in cat:
                    raise ValueError(f"{source}: category #{i} has no {key!r} field")
            cats.append(cat)
        ids = [int(c["id"]) for c in cats]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"{source}: duplicate category ids {dup}")
        cats = sorted(cats, key=lambda c: int(c["id"]))
        colors = None
        if all("color" in c and len(c["color"]) == 3 for c in cats):
            colors = [tuple(int(v) for v in c["color"]) for c in cats]
        return cls(
            name=name,
            class_names=[str(c["name"]) for c in cats],
            thing_ids=[i for i, c in enumerate(cats) if int(c.get("isthing", 0)) == 1],
            label_divisor=label_divisor,
            ignore_label=ignore_label,
            colors=colors,
            category_ids=[int(c["id"]) for c in cats],
        )


def _default_color(c: int) -> tuple[int, int, int]:
    # Golden-ratio hue walk: distinct, deterministic colours for any number of classes.
    import colorsys

    h = (c * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.65 + 0.35 * ((c // 7) % 2), 0.95 - 0.25 * ((c // 3) % 2))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


# Cityscapes train ids (19 evaluated classes; things are person..bicycle) and their official colours.
_CITYSCAPES = [
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)), ("fence", (190, 153, 153)), ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)), ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)), ("sky", (70, 130, 180)), ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)), ("car", (0, 0, 142)), ("truck", (0, 0, 70)), ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)), ("motorcycle", (0, 0, 230)), ("bicycle", (119, 11, 32)),
]


def cityscapes_metadata() -> PanopticMetadata:
    """Cityscapes panoptic with train ids: 19 classes, 8 things (11..18), label divisor 1000."""
    return PanopticMetadata(
        name="cityscapes",
        class_names=[n for n, _ in _CITYSCAPES],
        thing_ids=list(range(11, 19)),
        label_divisor=1000,
        ignore_label=255,
        colors=[c for _, c in _CITYSCAPES],
        category_ids=list(range(19)),
    )


def check_metadata_compatible(a: PanopticMetadata, b: PanopticMetadata, what: str = "metadata") -> None:
    """Raise if two metadata disagree on the things that change label meaning."""
    for attr in ("class_names", "thing_ids", "label_divisor", "ignore_label"):
        if getattr(a, attr) != getattr(b, attr):
            raise ValueError(f"{what}: {attr} differs ({getattr(a, attr)!r} vs {getattr(b, attr)!r})")

