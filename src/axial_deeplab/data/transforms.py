"""Augmentations on sample dicts, applied identically to the image and the label maps.

Images are resized bilinearly and padded with a constant: the pixel the model's input
normalisation maps to 0 (:func:`model_pad_value`; the ImageNet mean by default);
``semantic`` / ``instance`` / ``crowd`` use nearest neighbour with half-pixel centres and are
padded with ``ignore_label`` / 0 / False. Pure torch, no torchvision. Randomness comes from
torch's generator (seeded per DataLoader worker), or from the ``generator`` given to a transform.

Padding transforms record ``valid_size`` (the content size before padding) so predictions can
be cropped back before scoring.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
LABEL_KEYS = ("semantic", "instance", "crowd")


def model_pad_value(model=None) -> tuple:
    """The [0, 1] RGB value to pad ``model``'s inputs with: its ``pad_value`` (the pixel its input
    normalisation maps to 0, e.g. 0.5 for deeplab2's x / 127.5 - 1), the ImageNet mean for a model
    without one or no model. The one place the evaluation, prediction and training pipelines
    take their padding from."""
    while model is not None and not hasattr(model, "pad_value"):  # DDP / torch.compile wrappers
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            break
        model = inner
    value = getattr(model, "pad_value", None) if model is not None else None
    return tuple(float(v) for v in value) if value is not None else IMAGENET_MEAN


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(n: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, n]."""
    return int(torch.randint(0, n + 1, (), generator=generator)) if n > 0 else 0


def _nearest_index(n_out: int, n_in: int) -> torch.Tensor:
    # half-pixel centres ("nearest-exact"): the source pixel whose centre is nearest
    idx = torch.floor((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out)).long()
    return idx.clamp_(0, n_in - 1)


def resize_sample(sample: dict, size: tuple[int, int], resize_labels: bool = True) -> dict:
    """Resize the image (bilinear) and, if asked, the label maps (nearest) to ``size`` = (H, W)."""
    h, w = size
    out = dict(sample)
    img = sample["image"]
    if tuple(img.shape[-2:]) != (h, w):
        out["image"] = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    if resize_labels:
        for key in LABEL_KEYS:
            if key in sample and tuple(sample[key].shape[-2:]) != (h, w):
                lab = sample[key]
                iy = _nearest_index(h, lab.shape[-2])
                ix = _nearest_index(w, lab.shape[-1])
                out[key] = lab[..., iy, :][..., :, ix]
    return out


def pad_sample(
    sample: dict, top: int, bottom: int, left: int, right: int, pad_value=IMAGENET_MEAN, ignore_label: int = 255
) -> dict:
    if top == bottom == left == right == 0:
        return dict(sample)
    out = dict(sample)
    img = sample["image"]
    c, h, w = img.shape
    canvas = torch.empty((c, h + top + bottom, w + left + right), dtype=img.dtype)
    canvas[:] = torch.as_tensor(pad_value, dtype=img.dtype).reshape(-1, 1, 1)
    canvas[:, top : top + h, left : left + w] = img
    out["image"] = canvas
    fills = {"semantic": ignore_label, "instance": 0, "crowd": False}
    for key in LABEL_KEYS:
        if key in sample:
            lab = sample[key]
            new = torch.full((h + top + bottom, w + left + right), fills[key], dtype=lab.dtype)
            new[top : top + h, left : left + w] = lab
            out[key] = new
    return out


def crop_sample(sample: dict, y: int, x: int, h: int, w: int) -> dict:
    out = dict(sample)
    out["image"] = sample["image"][:, y : y + h, x : x + w]
    for key in LABEL_KEYS:
        if key in sample:
            out[key] = sample[key][y : y + h, x : x + w]
    return out


class Compose:
    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomScale:
    """Rescale by a factor drawn uniformly from [min_scale, max_scale] (on a grid of ``step`` if > 0)."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0, step: float = 0.0, generator=None):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"RandomScale: need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale, self.step = float(min_scale), float(max_scale), float(step)
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        if self.step > 0:
            n = int(math.floor((self.max_scale - self.min_scale) / self.step + 1e-9))
            s = self.min_scale + self.step * _randint(n, self.generator)
        else:
            s = _uniform(self.min_scale, self.max_scale, self.generator)
        h, w = sample["image"].shape[-2:]
        return resize_sample(sample, (max(1, int(round(h * s))), max(1, int(round(w * s)))))

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale}, step={self.step})"


class Resize:
    """Resize to a fixed (H, W), or (``long_side``) so the longer side has that length."""

    def __init__(
        self, size: int | Sequence[int] | None = None, long_side: int | None = None, resize_labels: bool = True
    ):
        if (size is None) == (long_side is None):
            raise ValueError("Resize: give exactly one of size and long_side")
        self.size = None if size is None else _pair(size)
        self.long_side = long_side
        self.resize_labels = resize_labels

    def __call__(self, sample: dict) -> dict:
        if self.size is not None:
            size = self.size
        else:
            h, w = sample["image"].shape[-2:]
            s = self.long_side / max(h, w)
            size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        return resize_sample(sample, size, self.resize_labels)


class RandomCrop:
    """Crop ``size`` = (H, W) at a random place; smaller samples are first padded (placed at a
    random offset) with ``pad_value`` for the image and ignore / 0 / False for the labels.

    ``photometric`` (e.g. :class:`ColorJitter`) runs on the image pixels the crop keeps before
    the padding is added, so the padding keeps ``pad_value`` and takes no part in the jitter's
    statistics (jittering after the crop would change the padded pixels too).
    """

    def __init__(self, size, pad_value=IMAGENET_MEAN, ignore_label: int = 255, generator=None, photometric=None):
        self.size = _pair(size)
        self.pad_value = pad_value
        self.ignore_label = ignore_label
        self.generator = generator
        self.photometric = photometric

    def __call__(self, sample: dict) -> dict:
        ch, cw = self.size
        h, w = sample["image"].shape[-2:]
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        top = _randint(ph, self.generator) if ph or pw else 0
        left = _randint(pw, self.generator) if ph or pw else 0
        y, x = _randint(h + ph - ch, self.generator), _randint(w + pw - cw, self.generator)
        # the window [y, y + ch) x [x, x + cw) of the padded sample, in the unpadded one
        y0, x0 = max(y - top, 0), max(x - left, 0)
        y1, x1 = min(y + ch - top, h), min(x + cw - left, w)
        out = crop_sample(sample, y0, x0, y1 - y0, x1 - x0)
        if self.photometric is not None:
            out = self.photometric(out)
        return pad_sample(
            out, y0 + top - y, y + ch - top - y1, x0 + left - x, x + cw - left - x1, self.pad_value, self.ignore_label
        )

    def __repr__(self) -> str:
        jitter = type(self.photometric).__name__ if self.photometric is not None else None
        return f"RandomCrop(size={self.size}, photometric={jitter})"


class PadTo:
    """Pad bottom/right to ``size`` = (H, W) and/or to a multiple of ``divisor``; records
    ``valid_size``. Larger samples raise (crop or resize first)."""

    def __init__(self, size=None, divisor: int | None = None, pad_value=IMAGENET_MEAN, ignore_label: int = 255):
        if size is None and not divisor:
            raise ValueError("PadTo: give size and/or divisor")
        self.size = None if size is None else _pair(size)
        self.divisor = divisor
        self.pad_value = pad_value
        self.ignore_label = ignore_label

    def __call__(self, sample: dict) -> dict:
        h, w = sample["image"].shape[-2:]
        th, tw = (h, w) if self.size is None else self.size
        if h > th or w > tw:
            raise ValueError(f"PadTo: sample {sample.get('file_name', '')} of size {h}x{w} is larger than {th}x{tw}")
        if self.divisor:
            d = self.divisor
            th, tw = -(-th // d) * d, -(-tw // d) * d
        out = pad_sample(sample, 0, th - h, 0, tw - w, self.pad_value, self.ignore_label)
        out["valid_size"] = (h, w)
        return out


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, generator=None):
        self.p = p
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        if float(torch.rand((), generator=self.generator)) >= self.p:
            return sample
        out = dict(sample)
        out["image"] = sample["image"].flip(-1)
        for key in LABEL_KEYS:
            if key in sample:
                out[key] = sample[key].flip(-1)
        return out


class ColorJitter:
    """Photometric jitter of brightness, contrast and saturation by factors in [1 - x, 1 + x],
    plus optional Gaussian pixel noise; labels untouched; the result stays in [0, 1]."""

    def __init__(self, brightness=0.2, contrast=0.2, saturation=0.2, noise_std=0.0, generator=None):
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.noise_std = noise_std
        self.generator = generator

    def __call__(self, sample: dict) -> dict:
        g = self.generator
        img = sample["image"]
        gray_w = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype).reshape(3, 1, 1)
        if self.brightness:
            img = img * _uniform(1 - self.brightness, 1 + self.brightness, g)
        if self.contrast:
            mean = (img * gray_w).sum(0).mean()
            img = (img - mean) * _uniform(1 - self.contrast, 1 + self.contrast, g) + mean
        if self.saturation:
            gray = (img * gray_w).sum(0, keepdim=True)
            img = (img - gray) * _uniform(1 - self.saturation, 1 + self.saturation, g) + gray
        if self.noise_std:
            img = img + self.noise_std * torch.randn(img.shape, generator=g, dtype=img.dtype)
        out = dict(sample)
        out["image"] = img.clamp(0, 1)
        return out


def build_train_transforms(
    crop_size,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    scale_step: float = 0.0,
    flip: bool = True,
    jitter: bool = True,
    ignore_label: int = 255,
    pad_value=IMAGENET_MEAN,
    extra: Sequence[Callable[[dict], dict]] = (),
    generator: torch.Generator | None = None,
) -> Compose:
    """Random scale -> random crop (photometric jitter on the cropped image pixels, then padding)
    -> flip -> ``extra`` (e.g. the panoptic target generator, which must follow the geometric
    transforms)."""
    ts: list = []
    if (min_scale, max_scale) != (1.0, 1.0):
        ts.append(RandomScale(min_scale, max_scale, scale_step, generator=generator))
    photometric = ColorJitter(generator=generator) if jitter else None
    ts.append(RandomCrop(crop_size, pad_value, ignore_label, generator=generator, photometric=photometric))
    if flip:
        ts.append(RandomHorizontalFlip(0.5, generator=generator))
    ts.extend(extra)
    return Compose(ts)


def build_eval_transforms(
    size=None,
    long_side: int | None = None,
    pad_to=None,
    divisor: int | None = None,
    ignore_label: int = 255,
    pad_value=IMAGENET_MEAN,
    resize_labels: bool = True,
    extra: Sequence[Callable[[dict], dict]] = (),
) -> Compose:
    """Optional resize (fixed ``size`` or ``long_side``), then optional bottom/right padding to
    ``pad_to`` and/or a multiple of ``divisor`` (recording ``valid_size``)."""
    ts: list = []
    if size is not None or long_side is not None:
        ts.append(Resize(size=size, long_side=long_side, resize_labels=resize_labels))
    if pad_to is not None or divisor:
        ts.append(PadTo(pad_to, divisor, pad_value, ignore_label))
    ts.extend(extra)
    return Compose(ts)


# -------------------------------------------------------------------------------------------
# Classification (image tensors, not sample dicts)
# -------------------------------------------------------------------------------------------
class RandomResizedCrop:
    """Inception-style crop of a random area fraction and aspect, resized to ``size``."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
        self.size = _pair(size)
        self.scale, self.ratio = scale, ratio
        self.generator = generator

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        g = self.generator
        _, h, w = img.shape
        for _ in range(10):
            area = h * w * _uniform(*self.scale, g)
            ar = math.exp(_uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), g))
            cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                y, x = _randint(h - ch, g), _randint(w - cw, g)
                break
        else:
            ch, cw = min(h, w), min(h, w)
            y, x = (h - ch) // 2, (w - cw) // 2
        crop = img[:, y : y + ch, x : x + cw]
        return F.interpolate(crop[None], size=self.size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)


def build_classification_transforms(size: int = 224, train: bool = True, crop_fraction: float = 0.875, generator=None):
    """Train: random-resized crop + flip. Eval: resize the shorter side to size / crop_fraction,
    then centre-crop ``size``. Both take and return (3, H, W) float tensors."""
    if train:
        rrc = RandomResizedCrop(size, generator=generator)

        def train_tf(img):
            img = rrc(img)
            return img.flip(-1) if float(torch.rand((), generator=generator)) < 0.5 else img

        return train_tf

    def eval_tf(img):
        _, h, w = img.shape
        short = int(round(size / crop_fraction))
        s = short / min(h, w)
        nh, nw = max(size, int(round(h * s))), max(size, int(round(w * s)))
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
        y, x = (nh - size) // 2, (nw - size) // 2
        return img[:, y : y + size, x : x + size]

    return eval_tf
