"""Pictures a person can check: colour overlays of panoptic predictions with instance
outlines, side-by-side input / prediction / ground-truth panels, and the training curves.

Stuff takes its class colour; each thing instance takes its class colour shifted by a
deterministic per-instance amount, so touching instances of one class stay apart, and
every segment border is outlined. Matplotlib is used only for the curve plot, with the
Agg backend (no display needed).
"""

from __future__ import annotations

import io
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "to_uint8_image",
    "colorize_panoptic",
    "segment_boundaries",
    "overlay_panoptic",
    "make_panel",
    "save_png",
    "panoptic_from_labels",
    "plot_training_curves",
]


def to_uint8_image(image) -> np.ndarray:
    """(3, H, W) float in [0, 1] tensor/array, or (H, W, 3) uint8 -> (H, W, 3) uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    image = np.asarray(image)
    # float images follow the sample contract (3, H, W); uint8 pictures are (H, W, 3)
    if image.ndim == 3 and image.shape[0] in (1, 3) and (image.dtype != np.uint8 or image.shape[-1] not in (1, 3)):
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def _np_map(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64)


def _instance_shift(instance: np.ndarray) -> np.ndarray:
    # Deterministic pseudo-random colour shift per instance id, in [-60, 60] per channel.
    h = (instance * 2654435761) & 0xFFFFFFFF
    shifts = np.stack([(h >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(np.int64)
    return (shifts * 120) // 255 - 60


def colorize_panoptic(
    panoptic, palette: Sequence[Sequence[int]], label_divisor: int, thing_ids: Sequence[int] = (), void_color=(0, 0, 0)
) -> np.ndarray:
    """(H, W) panoptic ids (class * label_divisor + instance, void < 0) -> (H, W, 3) uint8."""
    pan = _np_map(panoptic)
    pal = np.asarray(list(palette) + [void_color], dtype=np.int64)
    void = pan < 0
    cls = np.where(void, len(pal) - 1, pan // label_divisor)
    cls = np.clip(cls, 0, len(pal) - 1)
    inst = np.where(void, 0, pan % label_divisor)
    rgb = pal[cls]
    thing = (~void) & (inst > 0) & np.isin(cls, np.asarray(list(thing_ids), dtype=np.int64))
    if thing.any():
        rgb[thing] = rgb[thing] + _instance_shift(inst[thing] * 7919 + cls[thing])
    return np.clip(rgb, 0, 255).astype(np.uint8)


def segment_boundaries(panoptic, thickness: int = 1) -> np.ndarray:
    """Boolean (H, W): pixels whose right or lower neighbour has another segment id."""
    pan = _np_map(panoptic)
    edge = np.zeros(pan.shape, dtype=bool)
    dy = pan[1:, :] != pan[:-1, :]
    dx = pan[:, 1:] != pan[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    if thickness > 1:
        t = torch.from_numpy(edge[None, None].astype(np.float32))
        k = 2 * (thickness // 2) + 1
        edge = torch.nn.functional.max_pool2d(t, k, stride=1, padding=k // 2)[0, 0].numpy() > 0
    return edge


def overlay_panoptic(
    image,
    panoptic,
    palette,
    label_divisor: int,
    thing_ids: Sequence[int] = (),
    alpha: float = 0.55,
    outline_color=(255, 255, 255),
) -> np.ndarray:
    """Blend the coloured panoptic map over the image and draw every segment outline."""
    img = to_uint8_image(image).astype(np.float32)
    color = colorize_panoptic(panoptic, palette, label_divisor, thing_ids).astype(np.float32)
    pan = _np_map(panoptic)
    out = img * (1 - alpha) + color * alpha
    void = pan < 0
    out[void] = img[void] * 0.6  # void: darkened image, no colour
    out[segment_boundaries(pan)] = np.asarray(outline_color, dtype=np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def panoptic_from_labels(semantic, instance, label_divisor: int, ignore_label: int = 255) -> np.ndarray:
    """Ground-truth class/instance maps -> panoptic ids with void = -1 (for drawing)."""
    sem = _np_map(semantic)
    ins = _np_map(instance)
    pan = sem * label_divisor + np.where(ins > 0, ins, 0)
    pan[sem == ignore_label] = -1
    return pan


def make_panel(images: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None, gap: int = 4) -> np.ndarray:
    """Side-by-side (H, W, 3) uint8 pictures with a white gap; titles drawn if Pillow can."""
    ims = [to_uint8_image(i) for i in images]
    h = max(i.shape[0] for i in ims)
    title_h = 14 if titles else 0
    w = sum(i.shape[1] for i in ims) + gap * (len(ims) - 1)
    canvas = np.full((h + title_h, w, 3), 255, dtype=np.uint8)
    x = 0
    for im in ims:
        canvas[title_h : title_h + im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    if titles:
        from PIL import Image, ImageDraw

        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        x = 0
        for im, t in zip(ims, titles):
            draw.text((x + 2, 1), str(t), fill=(0, 0, 0))
            x += im.shape[1] + gap
        canvas = np.asarray(pil)
    return canvas


def save_png(path: str, array: np.ndarray) -> str:
    """Write an (H, W, 3) uint8 or (H, W) array as PNG, atomically."""
    from PIL import Image

    from ..fileio import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_training_curves(records: List[Dict], path: str, title: str = "training") -> Optional[str]:
    """Loss components and learning rate against step, with evaluation PQ/mIoU if logged.

    ``records`` are the rows of the metrics log (dicts with 'step' and 'kind' = 'train'
    or 'eval'). Returns the path, or None when there is nothing to draw.
    """
    from ..errors import require_extra

    matplotlib = require_extra("matplotlib", "drawing the training curves", "demo")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write_bytes

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    loss_keys = [k for k in ("loss", "semantic", "center", "offset") if any(k in r for r in train)]
    has_eval = any(("PQ" in r or "top1" in r) for r in evals)
    ncols = 2 + int(has_eval)
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.8), dpi=100)
    ax = axes[0]
    for k in loss_keys:
        pts = [(r["step"], r[k]) for r in train if k in r and r[k] is not None and math.isfinite(r[k])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=k, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if any(r.get(k, 0) > 0 for r in train for k in loss_keys if isinstance(r.get(k), (int, float))):
        ax.set_yscale("log")
    ax.set_title("training losses")
    ax.grid(alpha=0.3)
    if loss_keys:
        ax.legend(fontsize=8)
    ax = axes[1]
    pts = [(r["step"], r["lr"]) for r in train if "lr" in r]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color="tab:purple")
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    ax.grid(alpha=0.3)
    last_step = max([r["step"] for r in records] + [1])
    if has_eval:
        ax = axes[2]
        for k, color in (
            ("PQ", "tab:blue"),
            ("SQ", "tab:green"),
            ("RQ", "tab:orange"),
            ("mIoU", "tab:red"),
            ("top1", "tab:blue"),
            ("top5", "tab:green"),
        ):
            pts = [(r["step"], r[k]) for r in evals if k in r and r[k] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=f"{k} {ys[-1]:.1f}", color=color)
        ax.set_xlabel("step")
        ax.set_xlim(0, last_step * 1.05)
        ax.set_ylim(0, 100)
        ax.set_title("held-out metrics (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
