"""COCO-panoptic files: PNG id maps (id = R + 256 G + 256^2 B, 0 = void) plus a JSON of segments.

This is the exchange format of the official tools (panopticapi, cityscapesscripts), so our
datasets read it, our predictions are written in it, and the ``pq`` command scores it. Every
failure names the file and what is wrong with it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_json
from .meta import PanopticMetadata

VOID_ID = 0
MAX_SEGMENT_ID = 256**3 - 1


class PanopticFormatError(ValueError):
    """A COCO-panoptic file (JSON, PNG or image) is malformed; the message names it."""


# -------------------------------------------------------------------------------------------
# Encoding of ids in RGB
# -------------------------------------------------------------------------------------------
def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 ids."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb_to_id: expected an (H, W, 3) array, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.int64)
        return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    # little-endian view of (R, G, B, 0) bytes as one uint32: R + 256 G + 256^2 B
    rgba = np.zeros(rgb.shape[:2] + (4,), np.uint8)
    rgba[..., :3] = rgb
    return rgba.view("<u4")[..., 0].astype(np.int64)


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer ids in [0, 2^24) -> (H, W, 3) uint8."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"id_to_rgb: ids must lie in [0, {MAX_SEGMENT_ID}], got [{ids.min()}, {ids.max()}]")
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


# -------------------------------------------------------------------------------------------
# Files
# -------------------------------------------------------------------------------------------
# Modes whose channels are 8 bits: Pillow converts them to RGB exactly (alpha is dropped).
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_SIXTEEN_BIT_GRAY = {"I;16", "I;16L", "I;16B", "I;16N"}
_MODE_NAMES = {"I": "32-bit signed integer", "F": "32-bit float"}


def _tile_rawmode(im) -> str:
    """The raw pixel layout of a not yet loaded image ("RGB;16B" for a 16-bit RGB PNG), or ""."""
    try:
        args = im.tile[0].args if hasattr(im.tile[0], "args") else im.tile[0][3]
    except (IndexError, AttributeError, TypeError):
        return ""
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else ""


def image_to_rgb8(im, source: str = "image", sixteen_bit: bool | None = None) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a loaded PIL image of any mode Pillow opens.

    8-bit modes (1, L, P, CMYK, YCbCr, ...) are converted by Pillow; an alpha channel (LA, PA,
    RGBA, a palette's transparency) is dropped, keeping the colour under it. 16-bit grayscale
    (I;16, I;16B, I;16L, and mode I read from a 16-bit PNG/PGM) is scaled to 8 bits by ``>> 8``,
    as Pillow itself does for 16-bit RGB files, instead of saturating to white. Modes whose value
    range cannot be known (32-bit integer I from other files, float F) are refused by name:
    guessing a range would silently change the picture. ``sixteen_bit``: whether a mode-I image
    came from a 16-bit file (see :func:`_read_rgb`).
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in _SIXTEEN_BIT_GRAY or (mode == "I" and sixteen_bit):
        gray = np.asarray(im).astype(np.int64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise PanopticFormatError(
                f"{source}: 16-bit grayscale values outside 0..65535 ([{gray.min()}, {gray.max()}]); "
                f"save it as 8-bit or 16-bit unsigned"
            )
        return np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if mode in _EIGHT_BIT_MODES:
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # Pillow's own path for palettes with transparency
        try:
            return np.asarray(im.convert("RGB"))
        except ValueError as e:
            raise PanopticFormatError(f"{source}: cannot convert image mode {mode} to RGB ({e})") from e
    desc = _MODE_NAMES.get(mode, "an unsupported pixel format")
    raise PanopticFormatError(
        f"{source}: image mode {mode} ({desc}) has no known value range to map to 8-bit RGB; "
        f"save it as 8-bit or 16-bit RGB or grayscale"
    )


def _read_rgb(path: str | os.PathLike, what: str, modes=None) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an image file; errors name the file and say what it was
    meant to be (``what``); ``modes``: the PIL modes accepted (then also only 8 bits per channel,
    as a panoptic PNG's ids need)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with Image.open(path) as im:
            rawmode = _tile_rawmode(im)
            if modes is not None and (im.mode not in modes or ";16" in rawmode):
                got = f"mode {im.mode}" + (f", 16 bits per channel ({rawmode})" if ";16" in rawmode else "")
                raise PanopticFormatError(f"{path}: {what} must be 8-bit RGB (id = R + 256*G + 256^2*B), got {got}")
            sixteen_bit = rawmode.startswith("I;16") or im.format in ("PNG", "PPM")
            im.load()
            return image_to_rgb8(im, f"{path}: {what}", sixteen_bit=sixteen_bit)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise PanopticFormatError(f"{path}: cannot read {what} ({e})") from e


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, whatever its mode (see :func:`image_to_rgb8`); errors
    name the file."""
    return _read_rgb(path, "image file")


def read_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """A COCO-panoptic PNG (8-bit RGB or RGBA) as (H, W) int64 segment ids."""
    return rgb_to_id(_read_rgb(path, "panoptic PNG", modes=("RGB", "RGBA")))


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image atomically; the format follows the suffix (PNG is lossless)."""
    from PIL import Image

    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported image suffix (use .png or .jpg)")
    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    atomic_write_bytes(path, buf.getvalue(), fsync=False)


def write_panoptic_png(path: str | os.PathLike, ids: np.ndarray) -> None:
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"{path}: a panoptic id map must be written as .png")
    write_image(path, id_to_rgb(ids))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    atomic_write_json(path, obj, indent=indent, fsync=False)


def load_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PanopticFormatError(f"{path}: not valid JSON ({e})") from e


def read_panoptic_json(path: str | os.PathLike, require_categories: bool = True) -> dict:
    """Load and check the structure of a COCO-panoptic JSON (annotations, segments, categories)."""
    path = Path(path)
    d = load_json(path, "panoptic JSON")
    if not isinstance(d, dict):
        raise PanopticFormatError(f"{path}: top level must be an object")
    if "annotations" not in d or not isinstance(d["annotations"], list):
        raise PanopticFormatError(f"{path}: missing 'annotations' list")
    if require_categories and not isinstance(d.get("categories"), list):
        raise PanopticFormatError(f"{path}: missing 'categories' list")
    for i, cat in enumerate(d.get("categories") or []):
        for key in ("id", "name"):
            if key not in cat:
                raise PanopticFormatError(f"{path}: categories[{i}] has no {key!r}")
    if require_categories:
        check_isthing(d["categories"], str(path))
    for i, ann in enumerate(d["annotations"]):
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise PanopticFormatError(f"{path}: annotations[{i}] has no {key!r}")
        seen = set()
        for j, seg in enumerate(ann["segments_info"]):
            for key in ("id", "category_id"):
                if key not in seg:
                    raise PanopticFormatError(
                        f"{path}: annotations[{i}] (image_id {ann['image_id']!r}) segments_info[{j}] has no {key!r}"
                    )
            sid = int(seg["id"])
            if not 0 < sid <= MAX_SEGMENT_ID:
                raise PanopticFormatError(
                    f"{path}: image_id {ann['image_id']!r}: segment id {sid} outside 1..{MAX_SEGMENT_ID}"
                )
            if sid in seen:
                raise PanopticFormatError(f"{path}: image_id {ann['image_id']!r}: duplicate segment id {sid}")
            seen.add(sid)
    return d


def check_isthing(categories: Sequence[Mapping[str, Any]], source: str) -> None:
    """Every category must say whether it is a thing: without ``isthing`` it would silently count
    as stuff (no instances, wrong PQ Things/Stuff). panopticapi requires the field too."""

    def named(c):
        return f"id {c.get('id')} {c.get('name', '')!r}"

    lacking = [named(c) for c in categories if "isthing" not in c]
    if lacking:
        raise PanopticFormatError(
            f"{source}: {len(lacking)} categories have no 'isthing' (1 = thing, 0 = stuff): "
            f"{', '.join(lacking[:10])}{' ...' if len(lacking) > 10 else ''}"
        )
    bad = [f"{named(c)} ({c['isthing']!r})" for c in categories if c["isthing"] not in (0, 1)]
    if bad:
        raise PanopticFormatError(f"{source}: 'isthing' must be 0 or 1, got {', '.join(bad[:10])}")


def _listing(values: Sequence, limit: int = 10) -> str:
    values = list(values)
    more = f" ... ({len(values)} in all)" if len(values) > limit else ""
    return f"{values[:limit]}{more}"


def check_panoptic_json(
    data: Mapping[str, Any],
    path: str | os.PathLike,
    category_ids,
    *,
    what: str = "panoptic JSON",
    split: str | None = None,
    folders: Sequence[str | os.PathLike] = (),
    allow_empty: bool = False,
) -> None:
    """The checks of a COCO-panoptic JSON made once when it is opened, shared by the datasets
    (training and evaluation) and ``pq`` (ground truth and predictions): no image id twice in
    ``annotations`` or ``images`` (it would be scored twice), every segment's category among
    ``category_ids``, and at least one annotation unless ``allow_empty`` (an empty split would
    score an all-zero table). Errors name the file and the ids; ``split`` and ``folders`` are
    named in the error for an empty split. ``data`` has passed :func:`read_panoptic_json`."""
    path = str(path)
    anns = data["annotations"]
    if not anns and not allow_empty:
        of_split = f" of split {split!r}" if split else ""
        extra = f" (with {', '.join(map(str, folders))})" if folders else ""
        raise PanopticFormatError(
            f"{path}: {what}{of_split} has no annotations, so no images to use{extra}; check the split and the files"
        )
    for key, items, field in (("annotations", anns, "image_id"), ("images", data.get("images") or [], "id")):
        counts: dict = {}
        for item in items:
            if isinstance(item, Mapping) and field in item:
                counts[str(item[field])] = counts.get(str(item[field]), 0) + 1
        dup = [k for k, n in counts.items() if n > 1]
        if dup:
            raise PanopticFormatError(
                f"{path}: {key} lists {field}s more than once: {_listing(dup)}; each image must appear once"
            )
    known = {int(c) for c in category_ids}
    unknown = [
        (ann["image_id"], seg["id"], seg["category_id"])
        for ann in anns
        for seg in ann["segments_info"]
        if int(seg["category_id"]) not in known
    ]
    if unknown:
        image_id, seg_id, cat = unknown[0]
        cats = sorted({int(u[2]) for u in unknown})
        raise PanopticFormatError(
            f"{path}: image_id {image_id!r} segment {seg_id} has unknown category_id {cat}"
            + (f" ({len(unknown)} segments in all, category_ids {_listing(cats)})" if len(unknown) > 1 else "")
            + f"; known: {_listing(sorted(known))}"
        )


def check_segment_ids(present, listed, source: str) -> None:
    """The segment ids found in a PNG (non-void) and those its JSON entry lists must be the same
    set, both ways; the error names ``source`` (the PNG, its JSON and image id) and the ids."""
    present = np.unique(np.asarray(present, np.int64))
    present = present[present != VOID_ID]
    listed = np.unique(np.asarray(listed, np.int64))
    extra = np.setdiff1d(present, listed)
    if extra.size:
        raise PanopticFormatError(
            f"{source}: segment ids {_listing(extra.tolist(), 5)} in the PNG are absent from the JSON "
            f"(no segments_info entry for segment id {extra[0]})"
        )
    missing = np.setdiff1d(listed, present)
    if missing.size:
        raise PanopticFormatError(
            f"{source}: the JSON lists segment ids {_listing(missing.tolist(), 5)} that are absent from the PNG "
            f"(no pixel has segment id {missing[0]})"
        )


# -------------------------------------------------------------------------------------------
# Label maps <-> id maps + segments_info
# -------------------------------------------------------------------------------------------
def compact_ids(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map integer keys (>= 0; negative = void) to 0 (void) and 1..S in key order.

    Returns (compact ids of keys' shape, the S distinct keys). Small key ranges use a lookup
    table (linear time), others a sort.
    """
    top = int(keys.max()) if keys.size else -1
    if top < 0:
        return np.zeros(keys.shape, np.int64), np.zeros(0, np.int64)
    if top < 4 * keys.size + 4096:
        shifted = np.maximum(keys, -1) + 1  # void -> 0
        present = np.bincount(shifted.ravel(), minlength=top + 2) > 0
        present[0] = False
        lut = np.cumsum(present) * present
        return lut[shifted], np.flatnonzero(present[1:])
    valid = keys >= 0
    uniq, inverse = np.unique(keys[valid], return_inverse=True)
    out = np.zeros(keys.shape, np.int64)
    out[valid] = inverse.reshape(-1) + 1
    return out, uniq


def _boxes(ids: np.ndarray, n: int) -> np.ndarray:
    """COCO boxes [x, y, w, h] of segments 1..n of a compact id map, as an (n, 4) array."""
    h, w = ids.shape
    rows = np.bincount((np.arange(h)[:, None] * (n + 1) + ids).ravel(), minlength=h * (n + 1)).reshape(h, n + 1)
    cols = np.bincount((np.arange(w)[None, :] * (n + 1) + ids).ravel(), minlength=w * (n + 1)).reshape(w, n + 1)
    out = np.zeros((n, 4), np.int64)
    for axis_counts, lo, size in ((cols, 0, 2), (rows, 1, 3)):
        present = axis_counts[:, 1:] > 0  # (length, n)
        first = present.argmax(0)
        last = present.shape[0] - 1 - present[::-1].argmax(0)
        out[:, lo] = first
        out[:, size] = last - first + 1
    return out


def _segments_from_keys(keys: np.ndarray, describe, metadata: PanopticMetadata, crowd: np.ndarray | None = None):
    """Number the distinct non-negative keys 1..S and describe them as COCO segments;
    ``describe(key)`` gives the segment's class and extra fields."""
    ids, uniq = compact_ids(keys)
    n = uniq.size
    if n > MAX_SEGMENT_ID:
        raise ValueError(f"too many segments ({n}) for a panoptic PNG")
    areas = np.bincount(ids.ravel(), minlength=n + 1)
    crowd_px = np.bincount(ids.ravel(), weights=crowd.ravel(), minlength=n + 1) if crowd is not None else None
    boxes = _boxes(ids, n) if n else np.zeros((0, 4), np.int64)
    segments = []
    for k, key in enumerate(uniq.tolist()):
        info = describe(key)
        seg = {
            "id": k + 1,
            "category_id": metadata.category_id(info["class"]),
            "iscrowd": int(crowd_px is not None and crowd_px[k + 1] > 0),
            "area": int(areas[k + 1]),
            "bbox": [int(v) for v in boxes[k]],
        }
        for extra in ("score", "isthing"):
            if extra in info:
                seg[extra] = info[extra]
        segments.append(seg)
    return ids, segments


def encode_panoptic(
    semantic: np.ndarray, instance: np.ndarray, crowd: np.ndarray | None, metadata: PanopticMetadata
) -> tuple[np.ndarray, list[dict]]:
    """Ground-truth label maps -> (id map, segments_info). Void (ignore_label) becomes id 0.

    Stuff classes form one segment per class; each (thing class, instance id) pair is a segment;
    a segment with any crowd pixel is written with ``iscrowd`` 1.
    """
    semantic = to_numpy(semantic).astype(np.int64)
    instance = to_numpy(instance).astype(np.int64)
    crowd = np.zeros(semantic.shape, bool) if crowd is None else to_numpy(crowd).astype(bool)
    if semantic.shape != instance.shape or semantic.shape != crowd.shape:
        raise ValueError(f"encode_panoptic: shapes differ {semantic.shape} {instance.shape} {crowd.shape}")
    void = semantic == metadata.ignore_label
    bad = ~void & ((semantic < 0) | (semantic >= metadata.num_classes))
    if bad.any():
        raise ValueError(f"encode_panoptic: semantic values {np.unique(semantic[bad])[:5].tolist()} are not classes")
    is_thing = np.zeros(metadata.num_classes, bool)
    is_thing[metadata.thing_ids] = True
    inst = np.where(is_thing[np.where(void, 0, semantic)], instance, 0)
    span = int(inst.max()) + 1 if inst.size else 1
    keys = np.where(void, -1, semantic * span + inst)
    return _segments_from_keys(keys, lambda key: {"class": key // span}, metadata, crowd)


def encode_prediction(
    panoptic: np.ndarray, metadata: PanopticMetadata, scores: Mapping[int, float] | None = None
) -> tuple[np.ndarray, list[dict]]:
    """A predicted panoptic map (class * label_divisor + instance, negative = void) -> (id map,
    segments_info). ``scores`` optionally maps a panoptic value to its segment score."""
    pan = to_numpy(panoptic).astype(np.int64)
    valid = pan >= 0
    if pan.size and pan.max() // metadata.label_divisor >= metadata.num_classes:
        classes = np.unique(pan[valid] // metadata.label_divisor)
        bad = classes[classes >= metadata.num_classes]
        raise ValueError(
            f"encode_prediction: panoptic values decode to classes {bad[:5].tolist()} "
            f"outside 0..{metadata.num_classes - 1}"
        )

    def describe(key):
        c = key // metadata.label_divisor
        info = {"class": c, "isthing": int(metadata.is_thing(c))}
        if scores is not None and key in scores:
            info["score"] = float(scores[key])
        return info

    return _segments_from_keys(np.where(valid, pan, -1), describe, metadata)


def decode_panoptic(
    ids: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    metadata: PanopticMetadata,
    source: str = "panoptic PNG",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(id map, segments_info) -> (semantic int64, instance int64, crowd bool).

    Thing segments get instance ids 1..K in ``segments_info`` order (crowd ones too); stuff and
    void get 0; void pixels get ``metadata.ignore_label``. Ids in the PNG that ``segments_info``
    does not list, listed ids absent from the PNG (:func:`check_segment_ids`), or unknown
    categories raise :class:`PanopticFormatError` naming ``source``.
    """
    cat_to_class = metadata.contiguous_id_map()
    n = len(segments_info)
    seg_ids = np.empty(n, np.int64)
    seg_class = np.empty(n, np.int64)
    seg_inst = np.zeros(n, np.int64)
    seg_crowd = np.zeros(n, bool)
    next_inst = 1
    for k, seg in enumerate(segments_info):
        cat = int(seg["category_id"])
        if cat not in cat_to_class:
            raise PanopticFormatError(
                f"{source}: segment {seg['id']} has unknown category_id {cat} "
                f"(known: {sorted(cat_to_class)[:10]}{'...' if len(cat_to_class) > 10 else ''})"
            )
        c = cat_to_class[cat]
        seg_ids[k] = int(seg["id"])
        seg_class[k] = c
        seg_crowd[k] = bool(seg.get("iscrowd", 0))
        if metadata.is_thing(c):
            seg_inst[k] = next_inst
            next_inst += 1
    order = np.argsort(seg_ids, kind="stable")
    seg_ids, seg_class, seg_inst, seg_crowd = seg_ids[order], seg_class[order], seg_inst[order], seg_crowd[order]
    if n > 1 and np.any(seg_ids[1:] == seg_ids[:-1]):
        raise PanopticFormatError(f"{source}: duplicate segment ids in segments_info")

    ids = to_numpy(ids).astype(np.int64, copy=False)
    labelled = ids != VOID_ID
    if n == 0:
        check_segment_ids(np.unique(ids[labelled]), seg_ids, source)
        shape = ids.shape
        return (
            np.full(shape, metadata.ignore_label, np.int64),
            np.zeros(shape, np.int64),
            np.zeros(shape, bool),
        )
    idx = np.clip(np.searchsorted(seg_ids, ids), 0, n - 1)
    known = seg_ids[idx] == ids
    unknown = labelled & ~known
    found = np.zeros(n, bool)
    found[idx[labelled & known]] = True
    if unknown.any() or not found.all():  # linear-time test; the shared check words the error
        check_segment_ids(np.concatenate([seg_ids[found], np.unique(ids[unknown])]), seg_ids, source)
    semantic = np.where(labelled, seg_class[idx], metadata.ignore_label)
    instance = np.where(labelled, seg_inst[idx], 0)
    crowd = labelled & seg_crowd[idx]
    return semantic, instance, crowd


# -------------------------------------------------------------------------------------------
# Writer
# -------------------------------------------------------------------------------------------
class PanopticWriter:
    """Collects PNGs and segments_info, then writes the COCO-panoptic JSON atomically.

    >>> with PanopticWriter("pred.json", "pred/", metadata) as w:
    ...     w.add_prediction("img1", panoptic_map)
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        png_dir: str | os.PathLike,
        metadata: PanopticMetadata,
        extra: Mapping[str, Any] | None = None,
        categories: Sequence[Mapping[str, Any]] | None = None,
    ):
        """``categories``: the JSON's category list (default ``metadata.coco_categories()``, the
        dataset's own dicts where the metadata keep them). Image ids are written as given (an
        int stays an int, as official ground truth has them), so files pair up with it."""
        self.json_path = Path(json_path)
        self.png_dir = Path(png_dir)
        self.metadata = metadata
        self.extra = dict(extra or {})
        self.categories = [dict(c) for c in categories] if categories is not None else None
        self.annotations: list[dict] = []
        self.images: list[dict] = []
        self._ids: set = set()
        self._pngs: set = set()
        self.png_dir.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        image_id: str | int,
        ids: np.ndarray,
        segments_info: list[dict],
        image_file_name: str | None = None,
        png_name: str | None = None,
    ) -> None:
        if image_id in self._ids:
            raise ValueError(f"PanopticWriter: image_id {image_id!r} added twice")
        png_name = png_name or f"{image_id}.png"
        if png_name in self._pngs:
            raise ValueError(f"PanopticWriter: PNG name {png_name!r} (image_id {image_id!r}) used twice")
        self._ids.add(image_id)
        self._pngs.add(png_name)
        write_panoptic_png(self.png_dir / png_name, ids)
        self.annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segments_info})
        h, w = np.asarray(ids).shape[:2]
        self.images.append(
            {"id": image_id, "file_name": image_file_name or f"{image_id}.png", "height": int(h), "width": int(w)}
        )

    def add_ground_truth(self, image_id, semantic, instance, crowd=None, **kw) -> None:
        ids, segs = encode_panoptic(semantic, instance, crowd, self.metadata)
        self.add(image_id, ids, segs, **kw)

    def add_prediction(self, image_id, panoptic, scores: Mapping[int, float] | None = None, **kw) -> None:
        ids, segs = encode_prediction(panoptic, self.metadata, scores)
        self.add(image_id, ids, segs, **kw)

    def close(self) -> None:
        obj = dict(self.extra)
        obj.update(
            {
                "images": self.images,
                "annotations": self.annotations,
                "categories": self.categories if self.categories is not None else self.metadata.coco_categories(),
            }
        )
        write_json(self.json_path, obj)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        return False


def image_to_tensor(rgb: np.ndarray):
    """(H, W, 3) uint8 -> torch.float32 (3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0))


def to_numpy(x) -> np.ndarray:
    """A tensor or array-like as a numpy array (no copy for numpy input)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
