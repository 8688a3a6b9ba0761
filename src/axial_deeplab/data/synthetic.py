"""A built-in synthetic panoptic dataset: the default data of the demo and of the tests.

Each scene has two stuff regions ("sky" above a wavy horizon, "ground" below), textured with
smooth noise, and 3-7 things of three classes: real handwritten digits (scikit-learn's
``load_digits``, shipped in the package: :mod:`axial_deeplab.data.digits`; upscaled), shaded
discs and striped rotated rectangles. Things touch and occlude each other (an occluded thing
keeps at least ``min_visible_fraction`` of its area), their sizes span a 4x range, and with
``crowd_probability`` a cluster of small discs is labelled as one crowd segment. Things left
smaller than ``min_instance_area`` pixels become void.

Scenes are a pure function of (seed, split, index): every item draws from its own
``numpy.random.Generator`` seeded with ``[seed, split, index]``, so items are byte-identical
across runs and processes, need no cache, and the "train" and "val" splits never share a stream.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .meta import PanopticMetadata
from .panoptic_io import PanopticWriter, image_to_tensor, write_image

CLASS_NAMES = ["sky", "ground", "digit", "disc", "rectangle"]
SKY, GROUND, DIGIT, DISC, RECTANGLE = range(5)
THING_IDS = [DIGIT, DISC, RECTANGLE]
SPLITS = {"train": 0, "val": 1}

# Mean colours (RGB in [0, 1]); each instance jitters its colour and every pixel gets noise.
_BASE_COLOR = {
    SKY: (0.55, 0.74, 0.94),
    GROUND: (0.45, 0.37, 0.22),
    DIGIT: (0.96, 0.84, 0.16),
    DISC: (0.86, 0.16, 0.14),
    RECTANGLE: (0.50, 0.26, 0.80),
}


def synthetic_metadata() -> PanopticMetadata:
    """5 classes: sky, ground (stuff) and digit, disc, rectangle (things); COCO ids 1..5."""
    return PanopticMetadata(
        name="synthetic",
        class_names=list(CLASS_NAMES),
        thing_ids=list(THING_IDS),
        label_divisor=1000,
        ignore_label=255,
        colors=[tuple(int(round(255 * v)) for v in _BASE_COLOR[c]) for c in range(len(CLASS_NAMES))],
        category_ids=[c + 1 for c in range(len(CLASS_NAMES))],
    )


@functools.lru_cache(maxsize=1)
def _digits() -> np.ndarray:
    """The 1797 8x8 handwritten digits (scikit-learn's, shipped in the package), scaled to [0, 1]
    (float32)."""
    from .digits import load_digits

    return (load_digits()[0] / 16.0).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights (n_out, n_in) with half-pixel centres and clamped borders."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def _resize2d(a: np.ndarray, h: int, w: int) -> np.ndarray:
    return _interp_matrix(h, a.shape[0]) @ a @ _interp_matrix(w, a.shape[1]).T


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-ish, spatially smooth noise with features about ``cell`` pixels wide."""
    g = rng.standard_normal((max(2, h // cell + 1), max(2, w // cell + 1)), dtype=np.float32)
    return _resize2d(g, h, w)


@dataclass
class SyntheticObject:
    """What was drawn: the label maps say what is visible, this says what was intended."""

    class_id: int
    instance_id: int  # id in the final instance map (0 if the object ended up void)
    size: int  # side of the square box the shape was drawn in, pixels
    center: tuple[int, int]  # (y, x) of the box centre
    full_area: int  # in-image pixels of the whole shape when it was placed
    visible_area: int  # pixels still visible in the final image
    crowd: bool = False
    digit_index: int = -1  # row of load_digits() for digits
    void: bool = False  # too small after occlusion/clipping: labelled ignore


@dataclass
class SyntheticScene:
    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8, 255 = void
    instance: np.ndarray  # (H, W) int32, 0 on stuff / void
    crowd: np.ndarray  # (H, W) bool
    objects: list[SyntheticObject] = field(default_factory=list)


# -------------------------------------------------------------------------------------------
# Shapes: each returns (mask (s, s) bool, colour (s, s, 3) float32) for a box of side s.
# -------------------------------------------------------------------------------------------
def _jitter(rng: np.random.Generator, cls: int, amount: float = 0.07) -> np.ndarray:
    return np.clip(np.asarray(_BASE_COLOR[cls], np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


def _digit_shape(rng: np.random.Generator, s: int):
    digits = _digits()
    index = int(rng.integers(len(digits)))
    up = _resize2d(digits[index], s, s)
    mask = up > 0.35
    color = _jitter(rng, DIGIT)
    tex = color[None, None, :] * (0.7 + 0.3 * np.clip(up, 0, 1))[..., None]
    return mask, tex, index


def _disc_shape(rng: np.random.Generator, s: int):
    r = (np.arange(s, dtype=np.float32) + 0.5 - s / 2) / (s / 2)
    ratio = float(rng.uniform(0.7, 1.0))
    ry, rx = (ratio, 1.0) if rng.random() < 0.5 else (1.0, ratio)
    d2 = (r[:, None] / ry) ** 2 + (r[None, :] / rx) ** 2
    mask = d2 <= 1.0
    # Shading: a highlight off-centre, darker rim.
    hy, hx = rng.uniform(-0.4, 0.0, 2)
    shade = 1.15 - 0.45 * np.clip((r[:, None] - hy) ** 2 + (r[None, :] - hx) ** 2, 0, 1.5) / 1.5
    tex = _jitter(rng, DISC)[None, None, :] * shade[..., None]
    return mask, tex


def _rectangle_shape(rng: np.random.Generator, s: int):
    aspect = float(rng.uniform(0.45, 1.0))
    theta = float(rng.uniform(-math.pi / 6, math.pi / 6))
    c, si = abs(math.cos(theta)), abs(math.sin(theta))
    w = s / max(c + aspect * si, si + aspect * c)  # the rotated rectangle fits the box
    h = aspect * w
    p = np.arange(s, dtype=np.float32) + 0.5 - s / 2
    y, x = p[:, None], p[None, :]
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    mask = (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)
    period = float(rng.uniform(5.0, 9.0))
    stripes = 0.85 + 0.15 * np.sin(2 * math.pi * u / period)
    tex = _jitter(rng, RECTANGLE)[None, None, :] * stripes[..., None]
    return mask, tex


def _crowd_shape(rng: np.random.Generator, s: int):
    """A cluster of 5-8 small discs, drawn as one crowd segment of class disc."""
    p = np.arange(s, dtype=np.float32) + 0.5
    mask = np.zeros((s, s), bool)
    for _ in range(int(rng.integers(5, 9))):
        r = float(rng.uniform(3.0, 5.5))
        cy, cx = rng.uniform(r, s - r, 2)
        mask |= (p[:, None] - cy) ** 2 + (p[None, :] - cx) ** 2 <= r * r
    tex = _jitter(rng, DISC)[None, None, :] * np.ones((s, s, 1), np.float32)
    return mask, tex


# -------------------------------------------------------------------------------------------
# Dataset
# -------------------------------------------------------------------------------------------
class SyntheticPanoptic(Dataset):
    """Deterministic synthetic panoptic scenes (see the module docstring).

    Args:
        split: "train" or "val" (disjoint random streams).
        length: number of items (default 2000 for train, 200 for val).
        image_size: int or (H, W), at least 64; 128 by default.
        seed: base seed; items depend only on (seed, split, index).
        num_objects: inclusive range of things attempted per image.
        object_size: inclusive range of object box sides in pixels (default: 1/8 to 1/2 of the
            shorter image side, i.e. 16-64 px at 128x128).
        touch_probability: chance that a thing is placed against an earlier one.
        crowd_probability: chance that an image contains a crowd cluster.
        min_visible_fraction: occlusion never hides more than this fraction of a thing.
        min_instance_area: things with fewer visible pixels become void.
        transform: callable applied to the sample dict.
    """

    def __init__(
        self,
        split: str = "train",
        length: int | None = None,
        image_size: int | Sequence[int] = 128,
        seed: int = 0,
        num_objects: tuple[int, int] = (3, 7),
        object_size: tuple[int, int] | None = None,
        touch_probability: float = 0.6,
        crowd_probability: float = 0.1,
        min_visible_fraction: float = 0.4,
        min_instance_area: int = 20,
        transform: Callable[[dict], dict] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"SyntheticPanoptic: split must be one of {sorted(SPLITS)}, got {split!r}")
        if isinstance(image_size, numbers.Integral):
            h, w = int(image_size), int(image_size)
        else:
            h, w = (int(v) for v in image_size)
        if min(h, w) < 64:
            raise ValueError(f"SyntheticPanoptic: image_size must be at least 64, got {(h, w)}")
        if object_size is None:
            object_size = (min(h, w) // 8, min(h, w) // 2)
        lo, hi = int(object_size[0]), int(object_size[1])
        if not 8 <= lo <= hi <= min(h, w):
            raise ValueError(
                f"SyntheticPanoptic: object_size must satisfy 8 <= min <= max <= image side, got {object_size}"
            )
        if not 0 <= num_objects[0] <= num_objects[1]:
            raise ValueError(f"SyntheticPanoptic: bad num_objects {num_objects}")
        self.split = split
        self.length = int(length if length is not None else (2000 if split == "train" else 200))
        if self.length < 0:
            raise ValueError(f"SyntheticPanoptic: length must be >= 0, got {length}")
        self.image_size = (h, w)
        self.seed = int(seed)
        self.num_objects = (int(num_objects[0]), int(num_objects[1]))
        self.object_size = (lo, hi)
        self.touch_probability = float(touch_probability)
        self.crowd_probability = float(crowd_probability)
        self.min_visible_fraction = float(min_visible_fraction)
        self.min_instance_area = int(min_instance_area)
        self.transform = transform
        self.metadata = synthetic_metadata()
        _digits()  # load once here, before any DataLoader worker forks

    def __len__(self) -> int:
        return self.length

    def image_id(self, index: int) -> str:
        return f"synthetic_{self.split}_{self.seed}_{index:06d}"

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], int(index)])

    # -- scene generation ----------------------------------------------------------------------
    def generate(self, index: int) -> SyntheticScene:
        if not 0 <= index < self.length:
            raise IndexError(f"SyntheticPanoptic: index {index} out of range 0..{self.length - 1}")
        rng = self.rng(index)
        H, W = self.image_size
        img, semantic = self._background(rng, H, W)
        instance = np.zeros((H, W), np.int32)
        crowd = np.zeros((H, W), bool)
        objects: list[SyntheticObject] = []
        visible: list[int] = [0]  # visible pixels per provisional id (index = id)
        full: list[int] = [0]

        def place(mask, tex, cls, size, is_crowd, digit_index, tries=8):
            for _ in range(tries):
                if objects and rng.random() < self.touch_probability:
                    other = objects[int(rng.integers(len(objects)))]
                    angle = rng.uniform(0, 2 * math.pi)
                    dist = (other.size + size) / 2 * rng.uniform(0.5, 0.9)
                    cy = int(round(other.center[0] + dist * math.sin(angle)))
                    cx = int(round(other.center[1] + dist * math.cos(angle)))
                else:
                    cy, cx = int(rng.integers(H)), int(rng.integers(W))
                y0, x0 = cy - size // 2, cx - size // 2
                ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y0 + size, H), min(x0 + size, W)
                if ya >= yb or xa >= xb:
                    continue
                m = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
                area = int(m.sum())
                if area < 0.6 * mask.sum():
                    continue  # mostly outside the image
                under = np.bincount(instance[ya:yb, xa:xb][m], minlength=len(visible))
                ok = all(
                    visible[i] - under[i] >= self.min_visible_fraction * full[i] for i in np.flatnonzero(under[1:]) + 1
                )
                if not ok:
                    continue
                for i in np.flatnonzero(under[1:]) + 1:
                    visible[i] -= int(under[i])
                new_id = len(visible)
                visible.append(area)
                full.append(area)
                img[ya:yb, xa:xb][m] = tex[ya - y0 : yb - y0, xa - x0 : xb - x0][m]
                semantic[ya:yb, xa:xb][m] = cls
                instance[ya:yb, xa:xb][m] = new_id
                crowd[ya:yb, xa:xb][m] = is_crowd
                objects.append(SyntheticObject(cls, new_id, size, (cy, cx), area, area, is_crowd, digit_index))
                return

        smin, smax = self.object_size
        if rng.random() < self.crowd_probability:
            s = int(round(min(smax, 2 * smin + 8)))
            mask, tex = _crowd_shape(rng, s)
            place(mask, tex, DISC, s, True, -1)
        for _ in range(int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))):
            cls = THING_IDS[int(rng.integers(len(THING_IDS)))]
            size = int(round(math.exp(rng.uniform(math.log(smin), math.log(smax)))))
            digit_index = -1
            if cls == DIGIT:
                mask, tex, digit_index = _digit_shape(rng, size)
            elif cls == DISC:
                mask, tex = _disc_shape(rng, size)
            else:
                mask, tex = _rectangle_shape(rng, size)
            place(mask, tex, cls, size, False, digit_index)

        # Final bookkeeping: exact visible areas, void for tiny things, ids renumbered 1..K.
        counts = np.bincount(instance.ravel(), minlength=len(visible))
        remap = np.zeros(len(visible), np.int32)
        next_id = 1
        for obj in objects:
            obj.visible_area = int(counts[obj.instance_id])
            if obj.visible_area < self.min_instance_area:
                obj.void = True
                remap[obj.instance_id] = 0
                semantic[instance == obj.instance_id] = self.metadata.ignore_label
                obj.instance_id = 0
            else:
                remap[obj.instance_id] = next_id
                obj.instance_id = next_id
                next_id += 1
        instance = remap[instance]
        crowd &= instance > 0

        img += 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
        image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return SyntheticScene(image, semantic, instance, crowd, objects)

    def _background(self, rng: np.random.Generator, H: int, W: int):
        yy = np.arange(H, dtype=np.float32)[:, None]
        xx = np.arange(W, dtype=np.float32)[None, :]
        amp = rng.uniform(2.0, 0.06 * H)
        period = rng.uniform(0.5, 1.5) * W
        horizon = H * rng.uniform(0.3, 0.6) + amp * np.sin(2 * math.pi * xx / period + rng.uniform(0, 2 * math.pi))
        sky = yy < horizon  # (H, W)
        t = yy / H
        sky_col = _jitter(rng, SKY, 0.05)
        clouds = np.clip(_smooth_noise(rng, H, W, 24), 0, None)[..., None] * 0.22
        sky_img = sky_col * (0.85 + 0.3 * t)[..., None] + clouds
        ground_col = _jitter(rng, GROUND, 0.05)
        stripes = 0.06 * np.sin(2 * math.pi * yy / rng.uniform(6, 12) + rng.uniform(0, 6.3))
        ground_img = ground_col * (0.9 + 0.1 * _smooth_noise(rng, H, W, 8) + stripes)[..., None]
        img = np.where(sky[..., None], sky_img, ground_img).astype(np.float32)
        semantic = np.where(sky, SKY, GROUND).astype(np.uint8)
        return img, semantic

    # -- torch Dataset -------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.length
        scene = self.generate(index)
        H, W = self.image_size
        sample = {
            "image": image_to_tensor(scene.image),
            "semantic": torch.from_numpy(scene.semantic.astype(np.int64)),
            "instance": torch.from_numpy(scene.instance.astype(np.int64)),
            "crowd": torch.from_numpy(scene.crowd),
            "image_id": self.image_id(index),
            "file_name": self.image_id(index) + ".png",
            "orig_size": (H, W),
        }
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    # -- export --------------------------------------------------------------------------------
    def write_coco_panoptic(self, root: str | os.PathLike, indices: Sequence[int] | None = None) -> dict[str, Path]:
        """Write the split in COCO-panoptic layout under ``root``:
        ``{split}/<image_id>.png`` (lossless images), ``annotations/panoptic_{split}.json`` and
        ``annotations/panoptic_{split}/<image_id>.png``. Returns those three paths; read them
        back with ``CocoPanopticDataset(image_dir, json_path, png_dir)``."""
        root = Path(root)
        image_dir = root / self.split
        json_path = root / "annotations" / f"panoptic_{self.split}.json"
        png_dir = root / "annotations" / f"panoptic_{self.split}"
        image_dir.mkdir(parents=True, exist_ok=True)
        info = {"info": {"description": f"axial-deeplab synthetic panoptic, split {self.split}, seed {self.seed}"}}
        with PanopticWriter(json_path, png_dir, self.metadata, extra=info) as writer:
            for i in range(self.length) if indices is None else indices:
                scene = self.generate(int(i))
                image_id = self.image_id(int(i))
                write_image(image_dir / f"{image_id}.png", scene.image)
                writer.add_ground_truth(
                    image_id, scene.semantic, scene.instance, scene.crowd, image_file_name=f"{image_id}.png"
                )
        return {"image_dir": image_dir, "json": json_path, "png_dir": png_dir}
