"""Inference on image files: a trained checkpoint (its config.yaml and metadata travel
with it) turns images or folders of images into COCO-panoptic PNGs + JSON and colour
overlays. An unreadable image is reported by name and skipped; the others are processed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from . import checkpoint as ckpt
from .builders import build_eval_transform, build_model
from .config import Config, ConfigError, load_config

__all__ = ["IMAGE_SUFFIXES", "collect_images", "load_checkpoint_model", "predict_images", "PredictReport"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class PredictReport:
    output_dir: str
    processed: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    json_path: Optional[str] = None


def collect_images(inputs: Sequence[str]) -> List[Path]:
    """Files given directly, plus every image file below the given folders (sorted)."""
    files: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def load_checkpoint_model(checkpoint: str, device: torch.device, config_path: Optional[str] = None,
                          overrides: Sequence[str] = ()):
    """``(model in eval mode, config, metadata)`` from a checkpoint folder (or a weights file
    with ``config_path``). The dataset is only opened when the checkpoint lacks metadata."""
    path = ckpt.resolve_checkpoint(checkpoint)
    cfg_path = config_path or ckpt.checkpoint_config_path(path)
    if not cfg_path:
        raise ConfigError(f"{path}: no config.yaml next to the weights; pass --config with the training config")
    cfg = load_config(cfg_path, overrides)
    cfg.model.pretrained = None  # the checkpoint holds all weights
    info = ckpt.read_checkpoint_info(path)
    metadata = None
    if cfg.experiment.task == "panoptic":
        if "metadata" in info:
            from ..data.meta import PanopticMetadata

            metadata = PanopticMetadata.from_dict(info["metadata"])
        else:
            from .builders import build_dataset, dataset_metadata

            metadata = dataset_metadata(build_dataset(cfg, cfg.data.eval_split))
        model = build_model(cfg, metadata)
    else:
        classes = info.get("classes")
        if not classes:
            raise ConfigError(f"{path}: classification checkpoint without its class list (info.json 'classes')")
        metadata = list(classes)
        model = build_model(cfg, None, num_classes=len(classes))
    ckpt.load_model_weights(model, path)
    model.to(device).eval()
    return model, cfg, metadata


def _output_name(f: Path, roots: Iterable[Path], taken: set) -> str:
    name = f.stem
    for r in roots:
        try:
            rel = f.resolve().relative_to(r.resolve())
            name = str(rel.with_suffix("")).replace(os.sep, "__")
            break
        except ValueError:
            continue
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


@torch.no_grad()
def predict_images(model, cfg: Config, metadata, files: Sequence[Path], output_dir: str, device: torch.device,
                   progress: bool = True, inputs: Sequence[str] = (), overlays: bool = True) -> PredictReport:
    """Write ``panoptic/<name>.png`` + ``predictions.json`` (COCO panoptic) and
    ``overlay/<name>.png`` for each readable image; collect the failures."""
    from tqdm.auto import tqdm

    from ..data.panoptic_io import PanopticWriter, image_to_tensor, read_image
    from ..data.transforms import resize_sample
    from .evaluate import postprocess_outputs, raw_outputs
    from .visualize import make_panel, overlay_panoptic, save_png

    os.makedirs(output_dir, exist_ok=True)
    report = PredictReport(output_dir=output_dir)
    transform = build_eval_transform(cfg, metadata)
    roots = [Path(i) for i in inputs if Path(i).is_dir()]
    taken: set = set()
    json_path = os.path.join(output_dir, "predictions.json")
    writer = PanopticWriter(json_path, os.path.join(output_dir, "panoptic"), metadata)
    pal, div, things = metadata.palette(), metadata.label_divisor, metadata.thing_ids
    for f in tqdm(files, desc="predict", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            rgb = read_image(f)
        except Exception as e:  # unreadable / corrupt file: name it and go on
            report.failed.append((str(f), str(e)))
            continue
        try:
            image = image_to_tensor(rgb)
            h0, w0 = image.shape[-2:]
            sample = transform({"image": image, "file_name": str(f)})
            x = sample["image"]
            vh, vw = sample.get("valid_size", tuple(x.shape[-2:]))
            raw = raw_outputs(model, x[None].to(device), cfg)
            result = postprocess_outputs(raw, metadata, cfg, full=True)[0]
            pan = result["panoptic"][:vh, :vw].cpu()
            if (vh, vw) != (h0, w0):  # resized for the network: back to the file's size
                pan = resize_sample({"image": x[:, :vh, :vw], "semantic": pan}, (h0, w0))["semantic"]
            seg_scores = {}
            for s in result.get("segments_info", []):
                if "score" in s:
                    seg_scores[int(s["id"])] = float(s["score"])
            name = _output_name(f, roots, taken)
            writer.add_prediction(name, pan.numpy(), scores=seg_scores, image_file_name=str(f),
                                  png_name=f"{name}.png")
            if overlays:
                save_png(os.path.join(output_dir, "overlay", f"{name}.png"),
                         make_panel([image, overlay_panoptic(image, pan, pal, div, things)]))
            report.processed.append(str(f))
        except Exception as e:
            report.failed.append((str(f), f"{type(e).__name__}: {e}"))
    writer.close()
    report.json_path = json_path
    return report
