"""Panoptic-DeepLab training targets from a panoptic label (as deeplab2's ``data/sample_generator.py``).

Runs inside DataLoader workers after the geometric transforms, so it is plain
NumPy on the CPU and touches every pixel only a few times: per-instance
statistics come from ``np.bincount`` and each Gaussian is pasted into a local
window instead of being evaluated over the whole image.

Targets added to the sample:

* ``semantic`` (int64 HxW): the class map, unchanged.
* ``semantic_weights`` (float32 HxW): ``small_instance_weight`` on pixels of
  non-crowd thing instances smaller than ``small_instance_area`` pixels, 1
  elsewhere, 0 on ``ignore_label`` (and on crowd pixels if
  ``ignore_crowd_in_semantic``).
* ``center`` (float32 1xHxW): Gaussians (peak 1, ``sigma``) at the rounded mean
  pixel coordinate of each non-crowd thing instance, combined with max.
* ``center_weights`` (float32 HxW): 1 on labelled, non-crowd pixels.
* ``offset`` (float32 2xHxW): ``(dy, dx) = center - pixel`` on non-crowd
  thing pixels, 0 elsewhere.
* ``offset_weights`` (float32 HxW): 1 on non-crowd thing pixels.
"""

from __future__ import annotations

from typing import Dict, Iterable

import numpy as np
import torch

__all__ = ["PanopticTargetGenerator", "gaussian_kernel"]


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Square Gaussian with peak 1 on a ``(6*sigma+3)`` window (radius ``round(3*sigma)+1``)."""
    radius = int(round(3 * sigma)) + 1
    r = np.arange(-radius, radius + 1, dtype=np.float64)
    g1 = np.exp(-(r**2) / (2.0 * sigma**2))
    return np.outer(g1, g1).astype(np.float32)


def _as_numpy(value, key: str, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(f"sample[{key!r}] must be a 2-D (H, W) map, got shape {tuple(array.shape)}")
    return array.astype(dtype, copy=False)


class PanopticTargetGenerator:
    """Callable transform that adds the Panoptic-DeepLab targets to a sample dict.

    Args:
        thing_ids: contiguous class ids of thing classes.
        ignore_label: semantic value of void pixels.
        sigma: standard deviation of the center Gaussians, in pixels.
        small_instance_area: instances with fewer pixels get ``small_instance_weight``.
        small_instance_weight: semantic-loss weight of small-instance pixels.
        ignore_crowd_in_semantic: give crowd pixels semantic weight 0.
    """

    def __init__(
        self,
        thing_ids: Iterable[int],
        ignore_label: int = 255,
        sigma: float = 8.0,
        small_instance_area: int = 4096,
        small_instance_weight: float = 3.0,
        ignore_crowd_in_semantic: bool = False,
    ):
        self.thing_ids = sorted(int(t) for t in thing_ids)
        if any(t < 0 for t in self.thing_ids):
            raise ValueError(f"thing_ids must be non-negative class ids, got {self.thing_ids}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.ignore_label = int(ignore_label)
        self.sigma = float(sigma)
        self.small_instance_area = int(small_instance_area)
        self.small_instance_weight = float(small_instance_weight)
        self.ignore_crowd_in_semantic = bool(ignore_crowd_in_semantic)
        self._kernel = gaussian_kernel(self.sigma)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(thing_ids={self.thing_ids}, ignore_label={self.ignore_label}, "
            f"sigma={self.sigma}, small_instance_area={self.small_instance_area}, "
            f"small_instance_weight={self.small_instance_weight}, "
            f"ignore_crowd_in_semantic={self.ignore_crowd_in_semantic})"
        )

    def __call__(self, sample: Dict) -> Dict:
        for key in ("semantic", "instance"):
            if key not in sample:
                raise KeyError(f"panoptic targets need sample[{key!r}]; got keys {sorted(sample)}")
        out = dict(sample)
        out.update(self.generate(sample["semantic"], sample["instance"], sample.get("crowd")))
        return out

    def generate(self, semantic, instance, crowd=None) -> Dict[str, torch.Tensor]:
        """Targets for one label: ``semantic``/``instance`` (H, W) ints, ``crowd`` (H, W) bool or None."""
        sem = _as_numpy(semantic, "semantic", np.int64)
        inst = _as_numpy(instance, "instance", np.int64)
        if inst.shape != sem.shape:
            raise ValueError(f"sample['instance'] has shape {inst.shape}, sample['semantic'] {sem.shape}")
        if crowd is None:
            crowd_map = np.zeros(sem.shape, dtype=bool)
        else:
            crowd_map = _as_numpy(crowd, "crowd", bool)
            if crowd_map.shape != sem.shape:
                raise ValueError(f"sample['crowd'] has shape {crowd_map.shape}, sample['semantic'] {sem.shape}")
        height, width = sem.shape
        if sem.size and sem.min() < 0:
            raise ValueError(f"sample['semantic'] has negative class ids (min {sem.min()})")

        valid = sem != self.ignore_label
        lut_size = max(int(sem.max()) + 1 if sem.size else 1, (self.thing_ids[-1] + 1) if self.thing_ids else 1)
        is_thing = np.zeros(lut_size, dtype=bool)
        is_thing[self.thing_ids] = True
        if 0 <= self.ignore_label < lut_size:
            is_thing[self.ignore_label] = False
        thing_pixels = (inst > 0) & is_thing[sem]
        objects = thing_pixels & ~crowd_map  # pixels of non-crowd thing instances

        semantic_weights = valid.astype(np.float32)
        if self.ignore_crowd_in_semantic:
            semantic_weights[crowd_map] = 0.0
        center_weights = (valid & ~crowd_map).astype(np.float32)
        offset_weights = objects.astype(np.float32)
        center = np.zeros((height, width), dtype=np.float32)
        offset = np.zeros((2, height, width), dtype=np.float32)

        flat = np.flatnonzero(objects)
        if flat.size:
            ids = inst.reshape(-1)[flat]
            ids = self._compact_ids(ids)  # 0..N-1
            ys, xs = np.divmod(flat, width)
            area = np.bincount(ids)
            center_y = np.round(np.bincount(ids, weights=ys) / area).astype(np.int64)
            center_x = np.round(np.bincount(ids, weights=xs) / area).astype(np.int64)
            offset[0].reshape(-1)[flat] = center_y[ids] - ys
            offset[1].reshape(-1)[flat] = center_x[ids] - xs
            small = area[ids] < self.small_instance_area
            semantic_weights.reshape(-1)[flat[small]] = self.small_instance_weight
            for cy, cx in zip(center_y.tolist(), center_x.tolist()):
                self._paste_gaussian(center, cy, cx)

        return {
            "semantic": torch.from_numpy(np.ascontiguousarray(sem)),
            "semantic_weights": torch.from_numpy(semantic_weights),
            "center": torch.from_numpy(center)[None],
            "center_weights": torch.from_numpy(center_weights),
            "offset": torch.from_numpy(offset),
            "offset_weights": torch.from_numpy(offset_weights),
        }

    @staticmethod
    def _compact_ids(ids: np.ndarray) -> np.ndarray:
        """Map arbitrary positive instance ids to 0..N-1 (bincount when ids are small, else unique)."""
        top = int(ids.max())
        if top <= 4 * ids.size + 65536:
            present = np.bincount(ids, minlength=top + 1) > 0
            remap = np.cumsum(present) - 1
            return remap[ids]
        return np.unique(ids, return_inverse=True)[1].reshape(-1)

    def _paste_gaussian(self, heatmap: np.ndarray, cy: int, cx: int) -> None:
        kernel = self._kernel
        radius = kernel.shape[0] // 2
        height, width = heatmap.shape
        y0, y1 = max(cy - radius, 0), min(cy + radius + 1, height)
        x0, x1 = max(cx - radius, 0), min(cx + radius + 1, width)
        window = kernel[y0 - (cy - radius) : y1 - (cy - radius), x0 - (cx - radius) : x1 - (cx - radius)]
        np.maximum(heatmap[y0:y1, x0:x1], window, out=heatmap[y0:y1, x0:x1])
