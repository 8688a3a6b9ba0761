"""Dataset metadata shared by datasets, targets, models and evaluators.

One small dataclass says what the contiguous class ids mean (names, which are
things), how panoptic ids are packed (``class * label_divisor + instance``) and
how they map back to the dataset's own category ids, so every part of the
pipeline agrees without passing datasets around.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..errors import UserError


@dataclass
class PanopticMetadata:
    name: str
    class_names: list[str]
    thing_ids: list[int]
    label_divisor: int = 1000
    ignore_label: int = 255
    colors: list[tuple[int, int, int]] | None = None
    category_ids: list[int] | None = None
    # The dataset's own category dicts (id, name, isthing, color, supercategory, ...), as its JSON
    # lists them, so prediction files can carry them unchanged.
    categories: list[dict[str, Any]] | None = None

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
        if self.categories is not None:
            self.categories = [dict(cat) for cat in self.categories]
            got = sorted((int(cat["id"]), str(cat["name"]), int(cat.get("isthing", 0))) for cat in self.categories)
            want = sorted((self.category_id(k), self.class_names[k], int(self.is_thing(k))) for k in range(c))
            if got != want:
                raise ValueError(
                    f"metadata {self.name!r}: categories (id, name, isthing) {got[:5]} do not match the "
                    f"classes {want[:5]}"
                )

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
        """The ``categories`` list of a COCO-panoptic JSON: the dataset's own dicts unchanged
        (names, supercategory, isthing, color, any other field) where it has them, else built from
        the classes (``supercategory`` only where known, never invented)."""
        if self.categories is not None:
            return [copy.deepcopy(cat) for cat in self.categories]
        pal = self.palette()
        supers = _SUPERCATEGORIES.get(self.name, {})
        out = []
        for c in range(self.num_classes):
            cat = {
                "id": self.category_id(c),
                "name": self.class_names[c],
                "isthing": 1 if self.is_thing(c) else 0,
                "color": list(pal[c]),
            }
            if self.class_names[c] in supers:
                cat["supercategory"] = supers[self.class_names[c]]
            out.append(cat)
        return out

    # -- (de)serialisation, e.g. into checkpoints ----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["colors"] is not None:
            d["colors"] = [list(c) for c in d["colors"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PanopticMetadata":
        known = {
            "name",
            "class_names",
            "thing_ids",
            "label_divisor",
            "ignore_label",
            "colors",
            "category_ids",
            "categories",
        }
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
        """Contiguous ids follow the categories sorted by their dataset id. Every category must
        carry ``isthing`` (0 or 1): a missing one would silently make a thing class stuff."""
        from .panoptic_io import check_isthing

        cats = []
        for i, cat in enumerate(categories):
            for key in ("id", "name"):
                if key not in cat:
                    raise ValueError(f"{source}: category #{i} has no {key!r} field")
            cats.append(cat)
        check_isthing(cats, source)
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
            thing_ids=[i for i, c in enumerate(cats) if int(c["isthing"]) == 1],
            label_divisor=label_divisor,
            ignore_label=ignore_label,
            colors=colors,
            category_ids=[int(c["id"]) for c in cats],
            categories=list(categories),
        )


def _default_color(c: int) -> tuple[int, int, int]:
    # Golden-ratio hue walk: distinct, deterministic colours for any number of classes.
    import colorsys

    h = (c * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.65 + 0.35 * ((c // 7) % 2), 0.95 - 0.25 * ((c // 3) % 2))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


# Cityscapes train ids (19 evaluated classes; things are person..bicycle) and their official colours.
_CITYSCAPES = [
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
]


# Cityscapes' own category of each class (cityscapesscripts' labels.py), its panoptic supercategory.
_CITYSCAPES_SUPER = {
    "road": "flat",
    "sidewalk": "flat",
    "building": "construction",
    "wall": "construction",
    "fence": "construction",
    "pole": "object",
    "traffic light": "object",
    "traffic sign": "object",
    "vegetation": "nature",
    "terrain": "nature",
    "sky": "sky",
    "person": "human",
    "rider": "human",
    "car": "vehicle",
    "truck": "vehicle",
    "bus": "vehicle",
    "train": "vehicle",
    "motorcycle": "vehicle",
    "bicycle": "vehicle",
}
_SUPERCATEGORIES = {"cityscapes": _CITYSCAPES_SUPER}


# Cityscapes label ids (cityscapesscripts' labels.py ``id``) of the 19 evaluated classes, in train-id
# order: the category ids of ``csCreatePanopticImgs`` without --use-train-id and of the benchmark.
_CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
CITYSCAPES_IDS = ("train", "label")


def cityscapes_metadata(ids: str = "train") -> PanopticMetadata:
    """Cityscapes panoptic: 19 classes, 8 things (11..18), label divisor 1000. ``ids`` says which
    category ids the dataset's JSON uses: ``"train"`` (train ids 0..18, ``--use-train-id``) or
    ``"label"`` (the label ids 7..33 of the official ground truth); the classes are the same."""
    if ids not in CITYSCAPES_IDS:
        raise ValueError(f"cityscapes_metadata: ids must be one of {', '.join(CITYSCAPES_IDS)}, not {ids!r}")
    return PanopticMetadata(
        name="cityscapes",
        class_names=[n for n, _ in _CITYSCAPES],
        thing_ids=list(range(11, 19)),
        label_divisor=1000,
        ignore_label=255,
        colors=[c for _, c in _CITYSCAPES],
        category_ids=list(range(19)) if ids == "train" else list(_CITYSCAPES_LABEL_IDS),
    )


# A dataset's alternative category-id schemes for the same class list: Cityscapes' train ids and
# label ids name the same 19 classes, class by class.
_ID_SCHEMES = {"cityscapes": (tuple(range(19)), tuple(_CITYSCAPES_LABEL_IDS))}


def same_classes_other_ids(a: PanopticMetadata, b: PanopticMetadata) -> bool:
    """True when ``a`` and ``b`` are one dataset's classes under two of its id schemes (Cityscapes
    train ids and label ids): a model trained on one scores and writes predictions on the other."""
    schemes = _ID_SCHEMES.get(a.name)
    return (
        schemes is not None
        and a.name == b.name
        and a.category_ids is not None
        and b.category_ids is not None
        and tuple(a.category_ids) in schemes
        and tuple(b.category_ids) in schemes
        and a.class_names == b.class_names
        and a.thing_ids == b.thing_ids
    )


def with_category_ids_of(metadata: PanopticMetadata, categories) -> PanopticMetadata:
    """``metadata`` under the category ids of ``categories`` (a COCO-panoptic JSON's list, kept
    unchanged for writing) when they are its classes under another id scheme of the same dataset
    (Cityscapes label ids for a train-id model); else ``metadata`` itself."""
    try:
        other = PanopticMetadata.from_coco_categories(
            categories, name=metadata.name, label_divisor=metadata.label_divisor, ignore_label=metadata.ignore_label
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return metadata
    if not same_classes_other_ids(metadata, other) or other.category_ids == metadata.category_ids:
        return metadata
    return PanopticMetadata.from_dict(
        dict(metadata.to_dict(), category_ids=list(other.category_ids), categories=[dict(c) for c in categories])
    )


class MetadataMismatchError(UserError, ValueError):
    """A model's classes and a dataset's classes mean different things (names, order, things)."""


def _names_only_in(a: PanopticMetadata, b: PanopticMetadata) -> list[str]:
    return [n for n in a.class_names if n not in b.class_names]


def check_metadata_compatible(
    a: PanopticMetadata,
    b: PanopticMetadata,
    what: str = "metadata",
    *,
    names: tuple[str, str] = ("checkpoint", "dataset"),
    map_by_name: bool = False,
    hint: str = "",
) -> list[int] | None:
    """Refuse two metadata (``a`` a model's, ``b`` a dataset's) that give class ids other meanings.

    Compared: class names, things/stuff, dataset category ids (where both know them, and unless
    they are one dataset's two id schemes: Cityscapes train ids and label ids) and the label
    divisor, class by class; every difference is listed in one message. With
    ``map_by_name`` the classes may be listed in another order (and under other category ids):
    returns ``perm`` with ``perm[j]`` = the class of ``a`` named like class ``j`` of ``b``, so a
    model's per-class outputs reordered with it follow ``b``; a name present on one side only,
    or a class that is a thing on one side and stuff on the other, is still refused. Returns
    ``None`` when no reordering is needed. Raises :class:`MetadataMismatchError`.
    """
    na, nb = names
    diffs: list[str] = []

    def kind(md: PanopticMetadata, c: int) -> str:
        return "thing" if md.is_thing(c) else "stuff"

    def describe(md: PanopticMetadata, c: int, with_id: bool) -> str:
        ident = f", id {md.category_id(c)}" if with_id else ""
        return f"{md.class_names[c]!r} ({kind(md, c)}{ident})"

    if a.label_divisor != b.label_divisor:
        diffs.append(f"label divisor {a.label_divisor} vs {b.label_divisor} ({na} vs {nb})")
    perm: list[int] | None = None
    if map_by_name:
        for md, side in ((a, na), (b, nb)):
            dup = sorted({n for n in md.class_names if md.class_names.count(n) > 1})
            if dup:
                diffs.append(f"{side} lists class names more than once, so they cannot be matched by name: {dup}")
        only_a, only_b = _names_only_in(a, b), _names_only_in(b, a)
        if only_b:
            diffs.append(f"{nb} classes missing from the {na} (it cannot predict them): {only_b}")
        if only_a:
            diffs.append(f"{na} classes missing from the {nb}: {only_a}")
        index_a = {n: c for c, n in enumerate(a.class_names)}
        perm = []
        for j, name in enumerate(b.class_names):
            i = index_a.get(name)
            if i is None:
                continue
            if a.is_thing(i) != b.is_thing(j):
                diffs.append(f"class {name!r}: {kind(a, i)} in the {na}, {kind(b, j)} in the {nb}")
            perm.append(i)
        if not diffs and perm == list(range(a.num_classes)):
            perm = None
    else:
        if a.num_classes != b.num_classes:
            diffs.append(f"{nb} has {b.num_classes} classes, {na} {a.num_classes}")
            only_a, only_b = _names_only_in(a, b), _names_only_in(b, a)
            if only_b:
                diffs.append(f"only in the {nb}: {only_b}")
            if only_a:
                diffs.append(f"only in the {na}: {only_a}")
        # Where both know category ids they must agree, unless they are one dataset's two id schemes.
        with_id = a.category_ids is not None and b.category_ids is not None and not same_classes_other_ids(a, b)
        per_class = []
        for c in range(min(a.num_classes, b.num_classes)):
            same = (
                a.class_names[c] == b.class_names[c]
                and a.is_thing(c) == b.is_thing(c)
                and (not with_id or a.category_id(c) == b.category_id(c))
            )
            if not same:
                per_class.append(f"class {c}: {na} {describe(a, c, with_id)} vs {nb} {describe(b, c, with_id)}")
        if len(per_class) > 12:
            per_class = per_class[:12] + [f"... and {len(per_class) - 12} more classes differ"]
        diffs.extend(per_class)
    if diffs:
        msg = f"{what}: the classes do not agree: " + "; ".join(diffs) + "."
        raise MetadataMismatchError(msg + (f" {hint}" if hint else ""))
    return perm
