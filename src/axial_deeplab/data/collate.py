"""Batching of sample dicts: tensors of one shape are stacked, everything else stays a list."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def collate_panoptic(samples: Sequence[dict]) -> dict[str, Any]:
    """``[{key: value}]`` -> ``{key: stacked tensor or list}``.

    Tensors are stacked when all samples have the same shape for that key; strings, sizes and
    tensors of differing shapes (e.g. full-resolution evaluation images) become lists. Samples
    must share their keys.
    """
    if not samples:
        raise ValueError("collate_panoptic: empty batch")
    keys = list(samples[0].keys())
    for i, s in enumerate(samples[1:], 1):
        if set(s.keys()) != set(keys):
            raise ValueError(f"collate_panoptic: sample {i} has keys {sorted(s.keys())}, sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
