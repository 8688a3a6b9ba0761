"""From a :class:`~axial_deeplab.engine.config.Config` to the objects a run needs: datasets
in their official layouts, transform pipelines, the model, and the loss. The only place
where config keys meet the data and model packages, so the loops stay generic.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, get_args

from .config import Config, ConfigError, DatasetName

__all__ = [
    "DATASETS",
    "build_dataset",
    "dataset_metadata",
    "build_train_transform",
    "build_eval_transform",
    "build_model",
    "build_loss",
    "model_kwargs_for",
    "INPUT_DIVISOR",
    "compile_model",
    "INFERENCE_COMPILE_OPTIONS",
]

DATASETS = get_args(DatasetName)  # the names data.dataset takes; build_dataset has a branch for each

# Evaluation inputs are padded to a multiple of this (the backbone's largest stride).
INPUT_DIVISOR = 32


def _need_root(cfg: Config) -> str:
    root = cfg.data.root
    if not root:
        raise ConfigError(f"data.root: the {cfg.data.dataset!r} dataset needs its root folder (data.root=PATH)")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root: folder not found: {root}")
    return root


def _accepted_options(cls, fixed=("self", "root", "split", "transform", "image_dir", "json_path", "png_dir")):
    """The keyword options ``cls`` takes (following ``**kw`` into the COCO-panoptic reader the
    folder layouts wrap), or None when it takes anything."""
    import inspect

    params = inspect.signature(cls).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        from ..data.coco import CocoPanopticDataset

        if cls is CocoPanopticDataset or not issubclass(cls, CocoPanopticDataset):
            return None
        names |= _accepted_options(CocoPanopticDataset) or set()
    return names - set(fixed)


def _check_options(cls, dataset: str, options: Dict[str, Any], where: str = "data.options", also=()) -> None:
    """Refuse an option the dataset does not take (a misspelt key), naming it and the valid ones."""
    valid = _accepted_options(cls)
    if valid is None:
        return
    valid = (valid - {"metadata"}) | set(also)  # metadata is an object, not a config value
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ConfigError(
            f"{', '.join(f'{where}.{k}' for k in unknown)}: unknown option for the {dataset!r} dataset; "
            f"valid options: {', '.join(sorted(valid)) or 'none'}"
        )


def build_dataset(cfg: Config, split: str, transform: Optional[Callable] = None):
    """The raw dataset of ``split`` (transforms are applied by the engine's wrapper unless
    ``transform`` is given here)."""
    name = cfg.data.dataset
    opts: Dict[str, Any] = dict(cfg.data.options)
    if name == "synthetic":
        from ..data.synthetic import SyntheticPanoptic

        split_opts = opts.pop(split, {}) if isinstance(opts.get(split), dict) else {}
        for other in ("train", "val"):
            if isinstance(opts.get(other), dict):
                opts.pop(other)
        _check_options(SyntheticPanoptic, name, opts)
        _check_options(SyntheticPanoptic, name, split_opts, f"data.options.{split}")
        opts.update(split_opts)
        return SyntheticPanoptic(split=split, transform=transform, **opts)
    if name == "cityscapes":
        from ..data.cityscapes import CityscapesPanoptic

        _check_options(CityscapesPanoptic, name, opts)
        return CityscapesPanoptic(_need_root(cfg), split=split, transform=transform, **opts)
    if name == "coco":
        from ..data.coco import CocoPanoptic

        _check_options(CocoPanoptic, name, opts)
        return CocoPanoptic(_need_root(cfg), split=split, transform=transform, **opts)
    if name == "mapillary":
        from ..data.mapillary import MapillaryVistasPanoptic

        _check_options(MapillaryVistasPanoptic, name, opts)
        return MapillaryVistasPanoptic(_need_root(cfg), split=split, transform=transform, **opts)
    if name == "coco_panoptic":
        from ..data.coco import CocoPanopticDataset

        spec = opts.get(split)
        if isinstance(spec, dict):
            _check_options(
                CocoPanopticDataset, name, spec, f"data.options.{split}", also=("image_dir", "json_path", "png_dir")
            )
        if not isinstance(spec, dict) or not {"image_dir", "json_path", "png_dir"} <= set(spec):
            raise ConfigError(
                f"data.options.{split}: a custom COCO-panoptic dataset needs image_dir, json_path and png_dir "
                f"for split {split!r} (paths relative to data.root if set)"
            )
        root = cfg.data.root or ""
        kw = {k: v for k, v in spec.items() if k not in ("image_dir", "json_path", "png_dir")}
        shared = ("label_divisor", "ignore_label", "name")
        stray = sorted(k for k, v in opts.items() if k not in shared and not isinstance(v, dict))
        if stray:
            raise ConfigError(
                f"{', '.join(f'data.options.{k}' for k in stray)}: unknown option for the {name!r} "
                f"dataset; valid: {', '.join(shared)}, or a split name holding image_dir, json_path, "
                f"png_dir"
            )
        for k in ("label_divisor", "ignore_label", "name"):
            if k in opts and k not in kw:
                kw[k] = opts[k]
        return CocoPanopticDataset(
            os.path.join(root, spec["image_dir"]),
            os.path.join(root, spec["json_path"]),
            os.path.join(root, spec["png_dir"]),
            transform=transform,
            **kw,
        )
    if name == "imagenet":
        from ..data.image_folder import ImageFolderDataset

        _check_options(ImageFolderDataset, name, opts)
        folder = os.path.join(_need_root(cfg), split)
        return ImageFolderDataset(folder, transform=transform, **opts)
    raise ConfigError(f"data.dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def dataset_metadata(dataset):
    md = getattr(dataset, "metadata", None)
    if md is None:
        raise ValueError(f"{type(dataset).__name__} has no .metadata")
    return md


def _target_generator(cfg: Config, metadata):
    from ..data.targets import PanopticTargetGenerator

    t = cfg.targets
    return PanopticTargetGenerator(
        metadata.thing_ids,
        ignore_label=metadata.ignore_label,
        sigma=t.sigma,
        small_instance_area=t.small_instance_area,
        small_instance_weight=t.small_instance_weight,
        ignore_crowd_in_semantic=t.ignore_crowd_in_semantic,
    )


def build_train_transform(cfg: Config, metadata=None, model=None) -> Callable:
    """``model``: the network the samples are for; crops pad with its ``pad_value``."""
    d = cfg.data
    if cfg.experiment.task == "classification":
        from ..data.transforms import build_classification_transforms

        return build_classification_transforms(d.crop_size[0], train=True)
    from ..data.transforms import Compose, Resize, build_train_transforms, model_pad_value

    pipeline = build_train_transforms(
        d.crop_size,
        min_scale=d.min_scale,
        max_scale=d.max_scale,
        scale_step=d.scale_step,
        flip=d.flip,
        jitter=d.photometric,
        ignore_label=metadata.ignore_label,
        pad_value=model_pad_value(model),
        extra=[_target_generator(cfg, metadata)],
    )
    if d.resize_long_side:
        pipeline = Compose([Resize(long_side=d.resize_long_side)] + list(pipeline.transforms))
    return pipeline


def build_eval_transform(cfg: Config, metadata=None, with_targets: bool = False, model=None) -> Callable:
    """``model``: the network the images are for; padding uses its ``pad_value``."""
    d = cfg.data
    if cfg.experiment.task == "classification":
        from ..data.transforms import build_classification_transforms

        return build_classification_transforms(d.crop_size[0], train=False)
    from ..data.transforms import build_eval_transforms, model_pad_value

    extra = [_target_generator(cfg, metadata)] if with_targets else []
    # A fixed evaluation size (e.g. Cityscapes 1025x2049) is used as is; otherwise pad to the stride.
    divisor = None if d.eval_size else INPUT_DIVISOR
    return build_eval_transforms(
        long_side=d.resize_long_side,
        pad_to=d.eval_size,
        divisor=divisor,
        ignore_label=metadata.ignore_label,
        pad_value=model_pad_value(model),
        extra=extra,
    )


def model_kwargs_for(cfg: Config, metadata=None, num_classes: Optional[int] = None) -> Dict[str, Any]:
    kw = dict(cfg.model.kwargs)
    if cfg.experiment.task == "panoptic":
        kw.setdefault("metadata", metadata)
    elif num_classes is not None:
        kw.setdefault("num_classes", num_classes)
    return kw


def build_model(cfg: Config, metadata=None, num_classes: Optional[int] = None):
    from ..models import create_model

    kwargs = model_kwargs_for(cfg, metadata, num_classes)
    try:
        model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs: {cfg.model.name} does not accept these arguments ({e})") from None
    if hasattr(model, "postprocess_settings"):  # a panoptic model merges with the config's eval settings
        from ..postprocess import PostprocessSettings

        model.postprocess_settings = PostprocessSettings.from_config(cfg)
        _warn_replaced_postprocess_kwargs(cfg)
    return model


def _warn_replaced_postprocess_kwargs(cfg: Config) -> None:
    """model.kwargs may name the model's post-processing arguments, but the eval section decides."""
    import warnings

    names = {"center_threshold": "threshold", "nms_kernel": "nms_kernel", "top_k": "top_k", "stuff_area": "stuff_area"}
    for arg, key in names.items():
        if arg in cfg.model.kwargs and cfg.model.kwargs[arg] != getattr(cfg.eval, key):
            warnings.warn(
                f"model.kwargs.{arg}={cfg.model.kwargs[arg]!r} is replaced by eval.{key}="
                f"{getattr(cfg.eval, key)!r}: the eval section sets a built model's post-processing",
                UserWarning,
                stacklevel=3,
            )


def build_loss(cfg: Config, metadata=None):
    if cfg.experiment.task == "classification":
        import torch

        return torch.nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)
    from ..losses import PanopticDeepLabLoss

    loss_cfg = cfg.loss
    return PanopticDeepLabLoss(
        ignore_label=metadata.ignore_label,
        top_k_fraction=loss_cfg.semantic_top_k,
        semantic_weight=loss_cfg.semantic_weight,
        center_weight=loss_cfg.center_weight,
        offset_weight=loss_cfg.offset_weight,
    )


# Inductor options for a model whose weights no longer change: freezing treats them as constants,
# so each BatchNorm folds into its convolution and the attention's folded projection is computed
# once instead of in every call (applies to calls under torch.no_grad / inference_mode).
INFERENCE_COMPILE_OPTIONS = {"freezing": True}

# Inductor options for a training step on CPU. Inductor decides the convolutions' layout per graph
# and counts only forward convolutions, so a backward graph keeps NCHW: its convolution
# backwards then guard on the symbolic strides (a dynamic-shape step recompiles at every new
# size) and oneDNN runs them slower (the 5x5 depthwise backward at half speed). Forcing the
# layout optimisation gives the backward graph the forward's channels_last: no recompiles, and a
# compiled Axial-DeepLab-S step's convolution backwards 356 -> 265 ms (eager: 260).
TRAINING_COMPILE_OPTIONS = {"force_layout_optimization": True}


def training_compile_options(model) -> dict:
    """:data:`TRAINING_COMPILE_OPTIONS` for a model on CPU, else none (Inductor's own layout
    choice stands on GPUs)."""
    param = next(iter(model.parameters()), None)
    return dict(TRAINING_COMPILE_OPTIONS) if param is None or param.device.type == "cpu" else {}


def compile_model(model, cfg: Config, dynamic: bool = True, inference: bool = False):
    """``torch.compile(model, dynamic=dynamic)`` when ``experiment.compile`` asks for it, else the
    model itself; training on CPU with :data:`TRAINING_COMPILE_OPTIONS`. Evaluation images come in
    many sizes (dynamic); training crops have one size (static: a training step with symbolic
    sizes compiles, but its compile takes far longer).

    ``inference``: the weights no longer change (``evaluate``): compiled with
    :data:`INFERENCE_COMPILE_OPTIONS` (Inductor's freezing). A panoptic model is evaluated through
    ``predict_raw``, which ``torch.compile(model)`` (it compiles ``forward``) would leave eager:
    that method is compiled too."""
    if not cfg.experiment.compile:
        return model
    import torch

    if not inference:
        options = training_compile_options(model)
        return (
            torch.compile(model, dynamic=dynamic, options=options) if options else torch.compile(model, dynamic=dynamic)
        )
    options = dict(INFERENCE_COMPILE_OPTIONS)
    compiled = torch.compile(model, dynamic=dynamic, options=options)
    if callable(getattr(model, "predict_raw", None)):
        compiled.predict_raw = torch.compile(model.predict_raw, dynamic=dynamic, options=options)
    return compiled
