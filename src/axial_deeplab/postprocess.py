"""Panoptic-DeepLab post-processing: semantic + center heatmap + offsets -> panoptic map.

Steps (deeplab2's ``model/post_processor/panoptic_deeplab.py``): semantic argmax; centers = heatmap peaks above
``threshold`` that survive max-pool NMS, best ``top_k`` kept (exactly K, ties
broken by raster order through a stable sort); every thing pixel joins the
center nearest to its coordinate + predicted offset; every instance takes the
majority semantic class of its pixels and an id counted from 1 per class;
panoptic id = class * label_divisor + instance; stuff segments smaller than
``stuff_area`` become void. NaN / infinite inputs are scores of the lowest rank or void
pixels, with one warning per call (see :func:`panoptic_inference`).

Why it is fast and memory-bounded: everything is tensor code on the inputs'
device, batched where shapes allow. The nearest-center search never builds a
K x H x W tensor: centers are bucketed on a coarse grid over the pointed-to
positions, each cell keeps only the centers that can be nearest to some point
inside it (a center whose distance to the cell's box exceeds the smallest
farthest-corner distance cannot win), and pixels are processed in chunks of at
most ``max_elements`` (pixel, candidate) pairs. Majority votes, per-class ids
and scores are ``bincount``/``cumsum`` over (instance, class) pairs.

:func:`panoptic_inference_reference` is the plain per-center / per-instance
loop version of the same rules; tests compare the two and
``benchmarks/bench_postprocess.py`` times them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "PostprocessSettings",
    "merge_raw_outputs",
    "panoptic_inference",
    "panoptic_inference_reference",
    "find_instance_centers",
    "max_filter2d",
    "semantic_argmax",
    "nearest_center",
    "nearest_center_reference",
    "instance_masks",
    "DEFAULT_MAX_ELEMENTS",
    "NonFiniteWarning",
]


class NonFiniteWarning(RuntimeWarning):
    """Raised once per :func:`panoptic_inference` call whose inputs hold NaN or infinite values."""


# Largest number of (pixel, candidate center) pairs held at once (~4 MB per float32 tensor).
DEFAULT_MAX_ELEMENTS = 1 << 20
# Below this many centers, comparing against all of them beats building the grid.
_GRID_MIN_CENTERS = 16


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class PostprocessSettings:
    """How raw outputs become a panoptic map; the one definition of the defaults, which are
    Panoptic-DeepLab's Cityscapes settings as deeplab2's Cityscapes configs have them (centre
    threshold 0.1, NMS kernel 13, stuff area 2048), except that deeplab2 keeps 400 centres
    (its ``keep_k_centers``) where the default keeps 200.

    A panoptic model holds one (``model.postprocess_settings``); the engine sets it from the
    config's ``eval`` section (:meth:`from_config`) when it builds or loads a model, and
    evaluation, ``predict`` and the model's eval-mode forward all merge with it
    (:func:`merge_raw_outputs`). ``replace(**changes)`` gives a changed copy.

    Attributes:
        threshold: centre heatmap score a centre must exceed.
        nms_kernel: max-pool window of the centre NMS (positive, odd).
        top_k: most centres kept per image (``None``: all).
        stuff_area: stuff segments with fewer pixels become void.
    """

    threshold: float = 0.1
    nms_kernel: int = 13
    top_k: Optional[int] = 200
    stuff_area: int = 2048

    def __post_init__(self):
        _check_center_args(self.threshold, self.nms_kernel, self.top_k)
        if isinstance(self.stuff_area, bool) or not isinstance(self.stuff_area, int) or self.stuff_area < 0:
            raise ValueError(f"stuff_area must be a non-negative integer, got {self.stuff_area!r}")

    @classmethod
    def from_config(cls, cfg) -> "PostprocessSettings":
        """The settings of a :class:`~axial_deeplab.engine.config.Config`'s ``eval`` section
        (``eval.threshold``, ``eval.nms_kernel``, ``eval.top_k``, ``eval.stuff_area``); a bad
        value is refused with a ValueError naming its key (the engine's ConfigError is one)."""
        values = {f.name: getattr(cfg.eval, f.name) for f in dataclasses.fields(cls)}
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"eval.{e}") from None

    def replace(self, **changes) -> "PostprocessSettings":
        """A copy with ``changes``; an unknown name is refused, naming the known ones."""
        unknown = sorted(set(changes) - set(self.as_kwargs()))
        if unknown:
            raise TypeError(f"unknown post-processing settings {unknown}; known: {sorted(self.as_kwargs())}")
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> Dict[str, Any]:
        """The settings as :func:`panoptic_inference` keyword arguments."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- centers
def _check_center_args(threshold: float, nms_kernel: int, top_k: Optional[int]) -> None:
    if not isinstance(nms_kernel, int) or nms_kernel < 1 or nms_kernel % 2 == 0:
        raise ValueError(f"nms_kernel must be a positive odd integer, got {nms_kernel!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")


_DEFAULTS = PostprocessSettings()


def max_filter2d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over the ``kernel`` x ``kernel`` window centred on each pixel of ``x`` (..., H, W).

    Equals ``F.max_pool2d(x, kernel, stride=1, padding=kernel // 2)`` but is separable and
    builds each 1-D window by doubling (``ceil(log2 kernel)`` element-wise maxima per axis)
    instead of scanning ``kernel**2`` values per pixel.
    """
    if kernel == 1:
        return x
    radius = kernel // 2
    out = F.pad(x, (radius, radius), value=float("-inf"))
    out = _sliding_max(out, kernel, dim=-1)
    out = F.pad(out, (0, 0, radius, radius), value=float("-inf"))
    return _sliding_max(out, kernel, dim=-2)


def _sliding_max(x: torch.Tensor, window: int, dim: int) -> torch.Tensor:
    """``out[i] = max(x[i : i + window])`` along ``dim`` (output shorter by ``window - 1``)."""
    span = 1
    while span * 2 <= window:
        n = x.shape[dim] - span
        x = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, span, n))
        span *= 2
    if span < window:
        n = x.shape[dim] - (window - span)
        x = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, window - span, n))
    return x


def find_instance_centers(
    center_heatmap: torch.Tensor,
    threshold: float = _DEFAULTS.threshold,
    nms_kernel: int = _DEFAULTS.nms_kernel,
    top_k: Optional[int] = _DEFAULTS.top_k,
    max_filter=max_filter2d,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Heatmap peaks of a batch: ``center_heatmap`` (B, 1, H, W).

    Returns, per image, ``(centers, scores)``: ``centers`` (K, 2) int64 (y, x) and ``scores`` (K,),
    sorted by decreasing score (equal scores in raster order). A peak is a pixel above ``threshold``
    equal to the maximum of its ``nms_kernel`` x ``nms_kernel`` neighbourhood; at most ``top_k``
    (exactly ``top_k`` when more qualify) are kept. ``max_filter(x, kernel)`` computes the
    neighbourhood maxima (the reference passes plain ``max_pool2d``).
    """
    _check_center_args(threshold, nms_kernel, top_k)
    if center_heatmap.dim() != 4 or center_heatmap.shape[1] != 1:
        raise ValueError(f"center_heatmap must be (B, 1, H, W), got shape {tuple(center_heatmap.shape)}")
    heat = center_heatmap.detach()
    peaks = (heat > threshold) & (heat >= max_filter(heat, nms_kernel))  # >=: equal to the window max
    width = heat.shape[-1]
    results = []
    for b in range(heat.shape[0]):
        flat_heat = heat[b, 0].reshape(-1)
        index = torch.nonzero(peaks[b, 0].reshape(-1)).squeeze(1)  # raster order
        scores = flat_heat[index]
        order = torch.sort(scores, descending=True, stable=True).indices
        if top_k is not None:
            order = order[:top_k]
        index, scores = index[order], scores[order]
        centers = torch.stack([torch.div(index, width, rounding_mode="floor"), index % width], dim=1)
        results.append((centers, scores))
    return results


def _max_pool_filter(x: torch.Tensor, kernel: int) -> torch.Tensor:
    return F.max_pool2d(x, kernel, stride=1, padding=kernel // 2)


# --------------------------------------------------------------------------- grouping
def _squared_distance(py: torch.Tensor, px: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    # One formula shared by every path, so fast and reference paths produce identical values.
    dy = py - cy
    dx = px - cx
    dy.mul_(dy)
    dx.mul_(dx)
    return dy.add_(dx)


def nearest_center_reference(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest center for each point, one center at a time (lowest index wins ties)."""
    best = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    best_d = torch.full((points.shape[0],), float("inf"), dtype=points.dtype, device=points.device)
    for k in range(centers.shape[0]):
        d = _squared_distance(points[:, 0], points[:, 1], centers[k, 0], centers[k, 1])
        closer = d < best_d
        best[closer] = k
        best_d = torch.where(closer, d, best_d)
    return best


def nearest_center(
    points: torch.Tensor,
    centers: torch.Tensor,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    cell_size: Optional[float] = None,
) -> torch.Tensor:
    """Index of the nearest of ``centers`` (K, 2) for each of ``points`` (N, 2), both (y, x).

    Same result as :func:`nearest_center_reference` (lowest index wins exact ties), with at most
    ``max_elements`` (point, center) pairs alive at a time. ``cell_size`` (pixels) of the
    pruning grid defaults to a third of the mean center spacing.
    """
    if centers.shape[0] == 0:
        raise ValueError("nearest_center needs at least one center")
    points = points.to(torch.float32)
    centers = centers.to(device=points.device, dtype=torch.float32)
    return _nearest_center_yx(
        points[:, 0].contiguous(),
        points[:, 1].contiguous(),
        centers[:, 0].contiguous(),
        centers[:, 1].contiguous(),
        max_elements,
        cell_size,
    )


def _nearest_center_yx(py, px, cy, cx, max_elements=DEFAULT_MAX_ELEMENTS, cell_size=None):
    n, k = py.shape[0], cy.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=py.device)
    if k < _GRID_MIN_CENTERS:
        out = torch.empty(n, dtype=torch.long, device=py.device)
        chunk = max(1, max_elements // k)
        for s in range(0, n, chunk):
            d = _squared_distance(py[s : s + chunk, None], px[s : s + chunk, None], cy[None], cx[None])
            out[s : s + chunk] = d.argmin(dim=1)
        return out

    table, counts, cell_of_point = _candidate_table(py, px, cy, cx, max_elements, cell_size)
    # Points whose cell has a single candidate need no distance at all (-1 marks the others).
    out = torch.where(counts == 1, table[:, 0], -1).index_select(0, cell_of_point)
    undecided = torch.nonzero(out < 0).squeeze(1)
    m = table.shape[1]
    chunk = max(1, max_elements // m)
    for s in range(0, undecided.numel(), chunk):
        which = undecided[s : s + chunk]
        candidates = table.index_select(0, cell_of_point.index_select(0, which))  # (chunk, M), ascending
        flat = candidates.reshape(-1)
        d = _squared_distance(
            py.index_select(0, which)[:, None],
            px.index_select(0, which)[:, None],
            cy.index_select(0, flat).view_as(candidates),
            cx.index_select(0, flat).view_as(candidates),
        )
        out.index_copy_(0, which, candidates.gather(1, d.argmin(dim=1, keepdim=True)).squeeze(1))
    return out


def _candidate_table(py, px, cy, cx, max_elements, cell_size, max_cells=None):
    """Grid cells over the points' bounding box; per cell the (ascending) indices of the centers
    that can be nearest to a point of the cell, padded with the cell's first candidate.
    Returns (table (cells, M), candidates per cell (cells,), cell of each point (N,)).

    Building the table costs cells x K distance bounds, so with many centers the grid gets
    fewer, larger cells (at most ``max(4 sqrt(N), 2**26 / K)``): time grows like K sqrt(N)
    rather than K squared, and memory stays within ``max_elements`` pairs per block of cells."""
    k, n = cy.shape[0], py.shape[0]
    if max_cells is None:
        max_cells = int(min(1 << 16, max(4 * math.sqrt(n), (1 << 26) // k, 1)))
    lo_y, lo_x = math.floor(float(py.min())), math.floor(float(px.min()))
    ext_y, ext_x = max(float(py.max()) - lo_y, 1.0), max(float(px.max()) - lo_x, 1.0)
    if cell_size is None:  # a third of the mean spacing: most cells then see a single center
        cell_size = max(8.0, math.sqrt(ext_y * ext_x / k) / 3)
    size = max(float(cell_size), math.sqrt(ext_y * ext_x / max_cells))
    ny, nx = int(ext_y // size) + 1, int(ext_x // size) + 1
    while ny * nx > max_cells:
        size *= 1.25
        ny, nx = int(ext_y // size) + 1, int(ext_x // size) + 1

    def axis_bounds(low, c):
        low = low[:, None] - 0.5
        high = low + size + 1.0  # half a pixel of slack on both sides against rounding
        near = (low - c[None]).clamp_min_(0) + (c[None] - high).clamp_min_(0)
        far = torch.maximum((c[None] - low).abs_(), (c[None] - high).abs_())
        return near.square_(), far.square_()  # (cells, K)

    # A center can be nearest to some point of a cell only if its distance to the cell's box is at
    # most the smallest distance any center has to the box's farthest corner. Cells are processed
    # in blocks of at most max_elements (cell, center) pairs.
    cells = ny * nx
    rows_per_block = max_elements // (nx * k)
    if rows_per_block >= 1 and (ny + nx) * k <= 4 * max_elements:
        # Per-axis bounds once, whole rows of cells per block by broadcasting.
        row_low = lo_y + torch.arange(ny, device=cy.device, dtype=cy.dtype) * size
        near_y_all, far_y_all = axis_bounds(row_low, cy)
        near_x_all, far_x_all = axis_bounds(lo_x + torch.arange(nx, device=cx.device, dtype=cx.dtype) * size, cx)
        block = rows_per_block * nx
    else:
        near_y_all = None
        block = max(1, max_elements // k)
    cell_rows, cell_cols, counts = [], [], []
    for s in range(0, cells, block):
        if near_y_all is not None:
            r = slice(s // nx, s // nx + rows_per_block)
            near = (near_y_all[r, None, :] + near_x_all[None]).reshape(-1, k)
            far = (far_y_all[r, None, :] + far_x_all[None]).reshape(-1, k)
        else:
            cell = torch.arange(s, min(s + block, cells), device=cy.device)
            low_y = lo_y + torch.div(cell, nx, rounding_mode="floor").to(cy.dtype) * size
            low_x = lo_x + (cell % nx).to(cx.dtype) * size
            near_y, far_y = axis_bounds(low_y, cy)
            near_x, far_x = axis_bounds(low_x, cx)
            near = near_y.add_(near_x)
            far = far_y.add_(far_x)
            del near_x, far_x
        candidate = near <= far.min(dim=1, keepdim=True).values * (1 + 1e-5) + 1e-3
        del near, far
        counts.append(candidate.sum(dim=1))
        rows, cols = torch.nonzero(candidate, as_tuple=True)  # row-major: centers ascending per cell
        cell_rows.append(rows + s)
        cell_cols.append(cols)
    counts = torch.cat(counts)
    rows, cols = torch.cat(cell_rows), torch.cat(cell_cols)
    m = int(counts.max())
    start = torch.cumsum(counts, 0) - counts
    table = cols.index_select(0, start).view(cells, 1).repeat(1, m)  # padded with the first candidate
    table[rows, torch.arange(rows.numel(), device=rows.device) - start.index_select(0, rows)] = cols
    # Cell of each point, in float (exact: cell counts stay far below 2**24), one conversion.
    gy = ((py - lo_y) / size).floor_().clamp_(0, ny - 1)
    gx = ((px - lo_x) / size).floor_().clamp_(0, nx - 1)
    return table, counts, gy.mul_(nx).add_(gx).long()


# --------------------------------------------------------------------------- merge
def semantic_argmax(probs: torch.Tensor, chunk: int = 1 << 15) -> Tuple[torch.Tensor, torch.Tensor]:
    """``probs.max(dim=0)`` for (C, H, W): (max value, first class reaching it).

    On the CPU ``max(dim=0)`` with indices is several times slower than ``amax``; there the
    index is recovered from the maxima chunk by chunk: each class equal to the maximum writes a
    code ``C - c`` and the largest code marks the first such class.
    """
    num_classes = probs.shape[0]
    if probs.device.type != "cpu" or num_classes == 1 or num_classes > 255:
        return probs.max(dim=0)
    flat = probs.reshape(num_classes, -1)
    best = torch.empty(flat.shape[1], dtype=probs.dtype)
    code = torch.empty(flat.shape[1], dtype=torch.uint8)
    codes = torch.arange(num_classes, 0, -1, dtype=torch.uint8).view(num_classes, 1)
    for s in range(0, flat.shape[1], chunk):
        block = flat[:, s : s + chunk]
        block_best = torch.amax(block, dim=0, out=best[s : s + chunk])
        # block <= block_best everywhere, so >= marks the maxima (and runs faster than ==).
        torch.amax((block >= block_best) * codes, dim=0, out=code[s : s + chunk])
    index = num_classes - code.clamp_min_(1).long()  # code 0 only on NaN pixels: last class
    return best.reshape(probs.shape[1:]), index.reshape(probs.shape[1:])


def _thing_lookup(thing_ids: Iterable[int], num_classes: int, device) -> torch.Tensor:
    ids = sorted(set(int(t) for t in thing_ids))
    if ids and (ids[0] < 0 or ids[-1] >= num_classes):
        raise ValueError(f"thing_ids {ids} out of range for {num_classes} classes")
    lut = torch.zeros(num_classes, dtype=torch.bool, device=device)
    if ids:
        lut[torch.tensor(ids, device=device)] = True
    return lut


def _looks_like_probabilities(semantic: torch.Tensor) -> bool:
    """Whether (B, C, H, W) ``semantic`` holds probabilities, judged on its all-finite pixels
    (an infinite value marks logits)."""
    if semantic.numel() == 0:
        return True
    if not _all_finite(semantic):
        finite = torch.isfinite(semantic)
        if bool(torch.isinf(semantic).any()):
            return False
        semantic = semantic.movedim(-3, -1)[finite.all(dim=-3)].T  # (C, pixels with no NaN)
        if semantic.numel() == 0:
            return True
        return (
            float(semantic.min()) >= 0
            and float(semantic.max()) <= 1
            and bool(((semantic.sum(dim=0) - 1).abs() <= 1e-3).all())
        )
    if float(semantic.min()) < 0 or float(semantic.max()) > 1:
        return False
    return bool(((semantic.sum(dim=-3) - 1).abs() <= 1e-3).all())


def _segments_info(ids, classes, is_thing, scores, areas) -> List[Dict]:
    return [
        {"id": int(i), "category_id": int(c), "isthing": bool(t), "score": float(s), "area": int(a)}
        for i, c, t, s, a in zip(ids.tolist(), classes.tolist(), is_thing, scores.tolist(), areas.tolist())
    ]


def _merge_one(
    probs,
    offsets,
    centers,
    center_scores,
    thing_lut,
    label_divisor,
    stuff_area,
    void_label,
    max_elements,
    void_pixels=None,
    ungrouped=None,
) -> Dict:
    """Vectorised merge of one image: probs (C, H, W), offsets (2, H, W), centers (K, 2).

    ``void_pixels`` (H*W,) bool: pixels that join no segment (non-finite class scores);
    ``ungrouped`` (H*W,) bool: pixels that join no instance (non-finite offsets)."""
    num_classes, height, width = probs.shape
    device = probs.device
    sem_prob, semantic = semantic_argmax(probs)
    semantic_flat = semantic.reshape(-1)
    # Class of each pixel for the merge, with void pixels in an extra class ``num_classes``.
    merge_class = semantic_flat if void_pixels is None else semantic_flat.masked_fill(void_pixels, num_classes)
    thing = F.pad(thing_lut, (0, 1)).index_select(0, merge_class)
    if ungrouped is not None:
        thing &= ~ungrouped

    # Stuff: one segment per class (thing-ness is per class, so class areas are segment areas).
    class_area = torch.bincount(merge_class, minlength=num_classes + 1)[:num_classes]
    class_prob_sum = torch.bincount(merge_class, weights=sem_prob.reshape(-1), minlength=num_classes + 1)[:num_classes]
    kept_stuff = (class_area >= max(stuff_area, 1)) & ~thing_lut
    class_label = torch.where(
        kept_stuff, torch.arange(num_classes, device=device) * label_divisor, torch.full_like(class_area, void_label)
    )
    class_label = F.pad(class_label, (0, 1), value=void_label)
    panoptic = class_label.index_select(0, merge_class)  # stuff labels; thing and small-stuff pixels void for now
    stuff_classes = torch.nonzero(kept_stuff).squeeze(1)
    stuff_areas = class_area[stuff_classes]
    stuff_scores = (class_prob_sum[stuff_classes] / stuff_areas.clamp_min(1)).float()

    # Things: pixel -> nearest center of (coordinate + offset), then per-instance statistics.
    k = centers.shape[0]
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    instances = {
        "ids": empty_long,
        "classes": empty_long,
        "scores": torch.zeros(0, device=device),
        "areas": empty_long,
        "centers": empty_long.reshape(0, 2),
        "center_scores": torch.zeros(0, device=device),
    }
    thing_index = torch.nonzero(thing).squeeze(1) if k else empty_long
    if thing_index.numel():
        # Pointed-to positions (coordinate + offset); whole-map adds beat integer div/mod per pixel.
        offsets = offsets.float()
        rows = torch.arange(height, device=device, dtype=torch.float32).view(height, 1)
        cols = torch.arange(width, device=device, dtype=torch.float32).view(1, width)
        py = (offsets[0] + rows).reshape(-1).index_select(0, thing_index)
        px = (offsets[1] + cols).reshape(-1).index_select(0, thing_index)
        centers_f = centers.float()
        assign = _nearest_center_yx(py, px, centers_f[:, 0].contiguous(), centers_f[:, 1].contiguous(), max_elements)
        del py, px
        pixel_semantic = semantic_flat.index_select(0, thing_index)
        votes = torch.bincount(assign * num_classes + pixel_semantic, minlength=k * num_classes).reshape(k, num_classes)
        areas = votes.sum(dim=1)
        classes = votes.argmax(dim=1)  # majority class, lowest id on ties
        present = areas > 0
        per_class_rank = torch.cumsum(F.one_hot(classes, num_classes) * present[:, None], dim=0)
        instance_ids = per_class_rank.gather(1, classes[:, None]).squeeze(1)
        panoptic_ids = classes * label_divisor + instance_ids
        panoptic.index_copy_(0, thing_index, panoptic_ids.index_select(0, assign))
        # Probability of the instance's class: the pixel's max unless it was outvoted.
        class_prob = sem_prob.reshape(-1).index_select(0, thing_index)
        pixel_class = classes.index_select(0, assign)
        outvoted = torch.nonzero(pixel_class != pixel_semantic).squeeze(1)
        if outvoted.numel():
            where = pixel_class.index_select(0, outvoted) * (height * width) + thing_index.index_select(0, outvoted)
            class_prob.index_copy_(0, outvoted, probs.reshape(-1).index_select(0, where))
        mean_prob = torch.bincount(assign, weights=class_prob, minlength=k) / areas.clamp_min(1)
        scores = mean_prob.float() * center_scores.float()
        instances = {
            "ids": panoptic_ids[present],
            "classes": classes[present],
            "scores": scores[present],
            "areas": areas[present],
            "centers": centers[present],
            "center_scores": center_scores[present],
        }

    segments = _segments_info(
        instances["ids"], instances["classes"], [True] * len(instances["ids"]), instances["scores"], instances["areas"]
    )
    segments += _segments_info(
        stuff_classes * label_divisor, stuff_classes, [False] * len(stuff_classes), stuff_scores, stuff_areas
    )
    return {
        "panoptic": panoptic.reshape(height, width),
        "semantic": semantic,
        "segments_info": segments,
        "instances": instances,
        "centers": centers,
        "center_scores": center_scores,
    }


def _prepare(semantic, center_heatmap, offset_map, semantic_is_probs):
    batched = semantic.dim() == 4
    if not batched:
        semantic, center_heatmap, offset_map = semantic[None], center_heatmap[None], offset_map[None]
    if semantic.dim() != 4:
        raise ValueError(f"semantic must be (B, C, H, W) or (C, H, W), got shape {tuple(semantic.shape)}")
    b, _, h, w = semantic.shape
    if tuple(center_heatmap.shape) != (b, 1, h, w):
        raise ValueError(f"center_heatmap has shape {tuple(center_heatmap.shape)}, expected {(b, 1, h, w)}")
    if tuple(offset_map.shape) != (b, 2, h, w):
        raise ValueError(f"offset_map has shape {tuple(offset_map.shape)}, expected {(b, 2, h, w)}")
    semantic, heat = semantic.detach(), center_heatmap.detach()
    offsets = offset_map.detach().float()  # float32 first: a huge float64 offset becomes inf here
    found = [
        (name, _non_finite_counts(t))
        for name, t in (("semantic", semantic), ("center_heatmap", heat), ("offset_map", offsets))
    ]
    found = [(name, counts) for name, counts in found if counts is not None]
    if semantic_is_probs is None:
        semantic_is_probs = _looks_like_probabilities(semantic)
    probs = semantic if semantic_is_probs else semantic.float().softmax(dim=1)
    void_pixels = ungrouped = None
    if found:
        what = ", ".join(f"{name} ({nan} NaN, {inf} inf)" for name, (nan, inf) in found)
        warnings.warn(
            f"panoptic_inference: non-finite values in {what}; non-finite scores count as the lowest "
            f"(never a center or the winning class), pixels with non-finite class scores are void and "
            f"thing pixels with non-finite offsets join no instance (void)",
            NonFiniteWarning,
            stacklevel=3,
        )
        bad = ~torch.isfinite(probs)
        if bool(bad.any()):
            void_pixels = bad.any(dim=1).reshape(b, -1)
            probs = probs.masked_fill(bad, -1.0)  # below every probability: never the argmax
        bad = ~torch.isfinite(heat)
        if bool(bad.any()):
            heat = heat.masked_fill(bad, float("-inf"))  # never a peak, never suppresses one
        bad = ~torch.isfinite(offsets)
        if bool(bad.any()):
            ungrouped = bad.any(dim=1).reshape(b, -1)
            offsets = offsets.masked_fill(bad, 0.0)
    return batched, probs, heat, offsets, void_pixels, ungrouped


def _all_finite(x: torch.Tensor) -> bool:
    """Every value finite? A sum first (a NaN or inf anywhere makes it non-finite; a few times
    faster than a full ``isfinite`` mask), the exact test only when the sum overflows or is NaN."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(x).all())


def _non_finite_counts(x: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(NaN count, inf count)`` of ``x``, or None when every value is finite."""
    if not x.is_floating_point() or _all_finite(x):
        return None
    nan = int(torch.isnan(x).sum())
    return nan, int(x.numel() - nan - torch.isfinite(x).sum())


def panoptic_inference(
    semantic: torch.Tensor,
    center_heatmap: torch.Tensor,
    offset_map: torch.Tensor,
    thing_ids: Sequence[int],
    label_divisor: int = 1000,
    stuff_area: int = _DEFAULTS.stuff_area,
    threshold: float = _DEFAULTS.threshold,
    nms_kernel: int = _DEFAULTS.nms_kernel,
    top_k: Optional[int] = _DEFAULTS.top_k,
    void_label: int = -1,
    semantic_is_probs: Optional[bool] = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
):
    """Panoptic segmentation from Panoptic-DeepLab outputs, on the inputs' device.

    Args:
        semantic: (B, C, H, W) class probabilities or logits (or (C, H, W) for one image).
        center_heatmap: (B, 1, H, W). offset_map: (B, 2, H, W), (dy, dx) towards the center.
        thing_ids: contiguous ids of thing classes.
        label_divisor: panoptic id = class * label_divisor + instance (instance from 1 per class).
        stuff_area: stuff segments with fewer pixels become void.
        threshold, nms_kernel, top_k: center selection (see :func:`find_instance_centers`).
        void_label: panoptic value of void pixels.
        semantic_is_probs: ``True`` for probabilities, ``False`` for logits, ``None`` to detect.
        max_elements: bound on (pixel, center) pairs held at once while grouping.

    Non-finite inputs (a diverged model) give a well-defined result and one
    :class:`NonFiniteWarning` per call naming the inputs and counts: a NaN or infinite score is
    the lowest score (it never wins the argmax in ``semantic`` and is never a center); a pixel
    whose class probabilities are not all finite (after the softmax of logits) is void; a thing
    pixel whose offset is not finite joins no instance and is void.

    Returns:
        Per image (a list when batched, else one) a dict with ``panoptic`` (H, W) int64,
        ``semantic`` (H, W) int64 argmax, ``segments_info`` (list of {id, category_id, isthing,
        score, area}), ``instances`` (dict of ``ids``, ``classes``, ``scores`` = mean class
        probability over the mask x center score, ``areas``, ``centers``, ``center_scores``, one
        row per non-empty instance) and all selected ``centers`` / ``center_scores``.
    """
    if label_divisor < 1:
        raise ValueError(f"label_divisor must be positive, got {label_divisor}")
    batched, probs, heat, offsets, void_pixels, ungrouped = _prepare(
        semantic, center_heatmap, offset_map, semantic_is_probs
    )
    if top_k is not None and top_k >= label_divisor:
        raise ValueError(f"top_k={top_k} instances need label_divisor > top_k (got {label_divisor})")
    thing_lut = _thing_lookup(thing_ids, probs.shape[1], probs.device)
    found = find_instance_centers(heat, threshold=threshold, nms_kernel=nms_kernel, top_k=top_k)
    results = []
    for b, (centers, scores) in enumerate(found):
        if centers.shape[0] >= label_divisor:
            raise ValueError(
                f"{centers.shape[0]} centers need label_divisor > {centers.shape[0]} (got {label_divisor}); lower top_k"
            )
        results.append(
            _merge_one(
                probs[b],
                offsets[b],
                centers,
                scores,
                thing_lut,
                label_divisor,
                stuff_area,
                void_label,
                max_elements,
                None if void_pixels is None else void_pixels[b],
                None if ungrouped is None else ungrouped[b],
            )
        )
    return results if batched else results[0]


def merge_raw_outputs(
    raw: Mapping[str, torch.Tensor],
    thing_ids: Sequence[int],
    label_divisor: int,
    settings: Optional[PostprocessSettings] = None,
    **kwargs,
) -> List[Dict]:
    """The panoptic merge of a batch of raw outputs with ``settings``: the one call behind
    evaluation, ``predict`` and ``PanopticDeepLab.postprocess``.

    ``raw``: ``semantic_logits``, ``center_heatmap``, ``offset_map`` as ``predict_raw`` returns
    them; ``semantic_probs`` is merged instead of the logits' softmax when present (test-time
    augmentation averages probabilities). ``kwargs`` go to :func:`panoptic_inference`
    (e.g. ``max_elements``). Void pixels are -1. Returns :func:`panoptic_inference`'s dicts.
    """
    settings = _DEFAULTS if settings is None else settings
    probs = raw.get("semantic_probs")
    semantic = raw["semantic_logits"] if probs is None else probs
    return panoptic_inference(
        semantic,
        raw["center_heatmap"],
        raw["offset_map"],
        thing_ids,
        label_divisor=label_divisor,
        void_label=-1,
        semantic_is_probs=probs is not None,
        **settings.as_kwargs(),
        **kwargs,
    )


def panoptic_inference_reference(
    semantic_probs: torch.Tensor,
    center_heatmap: torch.Tensor,
    offset_map: torch.Tensor,
    thing_ids: Sequence[int],
    label_divisor: int = 1000,
    stuff_area: int = _DEFAULTS.stuff_area,
    threshold: float = _DEFAULTS.threshold,
    nms_kernel: int = _DEFAULTS.nms_kernel,
    top_k: Optional[int] = _DEFAULTS.top_k,
    void_label: int = -1,
) -> Dict:
    """Plain loop version of :func:`panoptic_inference` for one image (probabilities (C, H, W)).

    One pass over the pixels per center, one full-image mask per instance and per stuff class:
    the readable oracle for the tests and the comparison in ``benchmarks/bench_postprocess.py``.
    """
    num_classes, height, width = semantic_probs.shape
    ((centers, center_scores),) = find_instance_centers(
        center_heatmap[None], threshold, nms_kernel, top_k, max_filter=_max_pool_filter
    )
    sem_prob, semantic = semantic_probs.max(dim=0)
    thing_classes = sorted(set(int(t) for t in thing_ids))
    thing = torch.zeros_like(semantic, dtype=torch.bool)
    for c in thing_classes:
        thing |= semantic == c
    panoptic = torch.full((height, width), void_label, dtype=torch.long)
    segments, inst = [], {"ids": [], "classes": [], "scores": [], "areas": [], "centers": [], "center_scores": []}

    # Group: every thing pixel joins the nearest center of (coordinate + offset).
    assignment = torch.full((height, width), -1, dtype=torch.long)
    if centers.shape[0] and thing.any():
        ys, xs = torch.nonzero(thing, as_tuple=True)
        points = torch.stack([ys + offset_map[0][ys, xs], xs + offset_map[1][ys, xs]], dim=1).float()
        assignment[ys, xs] = nearest_center_reference(points, centers.float())

    next_id = {}
    for k in range(centers.shape[0]):
        mask = assignment == k
        area = int(mask.sum())
        if area == 0:
            continue
        counts = torch.bincount(semantic[mask], minlength=num_classes)
        cls = int(counts.argmax())
        next_id[cls] = next_id.get(cls, 0) + 1
        pid = cls * label_divisor + next_id[cls]
        panoptic[mask] = pid
        score = float(semantic_probs[cls][mask].double().mean()) * float(center_scores[k])
        for key, value in (
            ("ids", pid),
            ("classes", cls),
            ("scores", score),
            ("areas", area),
            ("centers", centers[k].tolist()),
            ("center_scores", float(center_scores[k])),
        ):
            inst[key].append(value)
        segments.append({"id": pid, "category_id": cls, "isthing": True, "score": score, "area": area})

    for c in range(num_classes):
        if c in thing_classes:
            continue
        mask = semantic == c
        area = int(mask.sum())
        if area == 0 or area < stuff_area:
            continue
        panoptic[mask] = c * label_divisor
        score = float(sem_prob[mask].double().mean())
        segments.append({"id": c * label_divisor, "category_id": c, "isthing": False, "score": score, "area": area})

    instances = {
        key: torch.tensor(value, dtype=torch.float32 if "score" in key else torch.long) for key, value in inst.items()
    }
    instances["centers"] = instances["centers"].reshape(-1, 2)
    return {
        "panoptic": panoptic,
        "semantic": semantic,
        "segments_info": segments,
        "instances": instances,
        "centers": centers,
        "center_scores": center_scores,
    }


def instance_masks(result: Dict) -> torch.Tensor:
    """Boolean masks (N, H, W) of the instances of one :func:`panoptic_inference` result.

    Materialises N x H x W booleans: meant for evaluation (e.g. mask AP), not for the merge.
    """
    ids = result["instances"]["ids"]
    return result["panoptic"][None] == ids.to(result["panoptic"].device)[:, None, None]
