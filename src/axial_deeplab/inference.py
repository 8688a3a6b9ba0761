"""Using a trained model from Python: :func:`load_model` and :class:`Predictor`.

::

    model = axial_deeplab.load_model("runs/coco_s")              # run folder: its best/, else newest
    result = axial_deeplab.Predictor(model)("street.jpg")        # path, PIL image or HxWx3 uint8 array
    result.panoptic, result.segments, result.overlay()

A checkpoint folder is self-describing: ``model.safetensors`` (the weights), ``config.yaml``
(the training config, which builds the model) and ``info.json`` (its ``metadata``: class names,
thing ids, label divisor, colours). The predictor runs the same steps as ``axial-deeplab
predict`` (:func:`axial_deeplab.engine.predict.predict_panoptic`), so both give the same map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["load_model", "Predictor", "PanopticResult"]


def load_model(path, device="cpu", config: Optional[str] = None, overrides: Sequence[str] = ()):
    """The model of a checkpoint, in eval mode on ``device``.

    ``path``: a checkpoint folder, a run folder (its ``best/`` checkpoint, else the newest
    ``step-*/``), or a weights file (``model.safetensors``) whose folder holds no
    ``config.yaml``, with ``config`` the training config. ``overrides``: dotted config
    overrides (``"eval.top_k=50"``). The model carries its config and classes as
    ``model.config`` and ``model.metadata`` (a ``PanopticMetadata``, or the class-name list of
    a classifier), which :class:`Predictor` uses. A missing path or a folder without a
    checkpoint raises ``FileNotFoundError`` naming it.
    """
    from .engine.predict import load_checkpoint_model

    model, cfg, metadata = load_checkpoint_model(os.fspath(path), torch.device(device), config, overrides)
    model.config, model.metadata = cfg, metadata
    return model


@dataclass
class PanopticResult:
    """The prediction for one image.

    ``panoptic``: (H, W) int64 at the input's size, ``class * label_divisor + instance``, -1 for
    void. ``segments``: one dict per segment with ``id`` (its value in ``panoptic``),
    ``class_id`` (contiguous class index), ``category_id`` (the dataset's id), ``class_name``,
    ``isthing``, ``area`` (pixels) and ``score`` where the post-processing gives one (things).
    """

    panoptic: np.ndarray
    segments: List[Dict[str, Any]]
    image: np.ndarray = field(repr=False)
    metadata: Any = field(repr=False)

    def overlay(self, alpha: float = 0.55) -> np.ndarray:
        """The segments' colours blended over the image, outlines drawn: (H, W, 3) uint8 RGB."""
        from .engine.visualize import overlay_panoptic

        md = self.metadata
        return overlay_panoptic(self.image, self.panoptic, md.palette(), md.label_divisor, md.thing_ids, alpha=alpha)


def _as_rgb(image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a path, a PIL image or an array; errors say what was given."""
    from .data.panoptic_io import image_to_rgb8, read_image

    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if hasattr(image, "mode") and hasattr(image, "getbands"):  # a PIL image
        image.load()
        return image_to_rgb8(image, "PIL image")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        return np.ascontiguousarray(image)
    raise TypeError(f"image must be a file path, a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")


class Predictor:
    """Panoptic prediction on single images with a trained model.

    ``path_or_model``: anything :func:`load_model` takes, or a model it returned (a model
    built otherwise needs ``config`` (a ``Config``) and ``metadata`` (a ``PanopticMetadata``)).
    ``device`` defaults to CPU for a path and to the model's own device for a model.
    """

    def __init__(self, path_or_model, device=None, config=None, metadata=None, overrides: Sequence[str] = ()):
        if isinstance(path_or_model, torch.nn.Module):
            model = path_or_model
            cfg = config if config is not None else getattr(model, "config", None)
            metadata = metadata if metadata is not None else getattr(model, "metadata", None)
            if cfg is None or metadata is None:
                raise ValueError(
                    "Predictor: this model carries no config and classes; load it with "
                    "axial_deeplab.load_model, or pass config= and metadata="
                )
            if device is None:
                device = next(model.parameters()).device
            model.to(device).eval()
        else:
            model = load_model(path_or_model, device or "cpu", config, overrides)
            cfg, metadata = model.config, model.metadata
        if cfg.experiment.task != "panoptic":
            raise ValueError(
                f"Predictor: the model is a {cfg.experiment.task} model; Predictor makes panoptic predictions"
            )
        from .engine.builders import build_eval_transform

        self.model, self.config, self.metadata = model, cfg, metadata
        self.device = torch.device(device or "cpu")
        self._transform = build_eval_transform(cfg, metadata, model=model)

    def __call__(self, image) -> PanopticResult:
        """Predict one image: a file path, a PIL image or an (H, W, 3) uint8 RGB array."""
        from .engine.predict import predict_panoptic

        rgb = _as_rgb(image)
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else ""
        _, pan, scores = predict_panoptic(
            self.model, self.config, self.metadata, rgb, self.device, self._transform, name
        )
        pan = pan.numpy().astype(np.int64)
        pan[pan < 0] = -1
        md = self.metadata
        values, areas = np.unique(pan[pan >= 0], return_counts=True)
        segments = []
        for v, a in zip(values.tolist(), areas.tolist()):
            c = v // md.label_divisor
            seg = {
                "id": v,
                "class_id": c,
                "category_id": md.category_id(c),
                "class_name": md.class_names[c],
                "isthing": md.is_thing(c),
                "area": a,
            }
            if v in scores:
                seg["score"] = scores[v]
            segments.append(seg)
        return PanopticResult(panoptic=pan, segments=segments, image=rgb, metadata=md)

    predict = __call__
