"""Experiment configuration: nested dataclasses with documented defaults, read from YAML
and patched with dotted ``key=value`` overrides from the command line.

Why dataclasses: every key has one documented default here, unknown keys are errors that
name the file and the key (a typo must not silently train the wrong recipe), and the
resolved config is written next to each checkpoint so evaluation and prediction rebuild
exactly the trained model.

A YAML file may start with ``base: other.yaml`` (path relative to the file); the base is
loaded first and the file's keys are merged over it, recursively for mappings.

The shipped recipes are package data (``axial_deeplab/configs/*.yaml``), so they exist in a
wheel as in a checkout. ``load_config`` takes a path or a recipe's name (``synthetic``,
``coco_axial_deeplab_s``); a missing ``configs/NAME.yaml`` (the path the docs used before the
recipes moved into the package) falls back to the shipped recipe of that name.

Why not OmegaConf: its structured configs would cover only the typed coercion, the unknown-key
errors and the dotted overrides (``_coerce``, ``_build``, ``apply_overrides``, about 130 lines).
The rest stays ours either way: ``base:`` file inheritance, the cross-field checks of
``validate_config``, recipe names and the per-key help text of ``describe_config``. OmegaConf is
not installed in any of our environments, and every command (``train`` included) reads a config,
so it would become a core dependency for those 130 lines.

Enum-like keys are ``Literal`` annotations (``ScheduleKind``, ``OptimizerName`` ...): the annotation
is the one list of allowed values, read with ``typing.get_args`` by the loader, by
``validate_config`` and by the modules that act on the value, so a misspelt value is one error
naming the key, the value and the allowed ones.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml

__all__ = [
    "Config",
    "ExperimentConfig",
    "ModelConfig",
    "DataConfig",
    "TargetConfig",
    "LossConfig",
    "SolverConfig",
    "TrainLoopConfig",
    "EvalConfig",
    "ConfigError",
    "TaskName",
    "DeviceKind",
    "DatasetName",
    "OptimizerName",
    "ScheduleKind",
    "AmpMode",
    "literal_fields",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "parse_override",
    "dump_config",
    "describe_config",
    "resolve_config_path",
    "shipped_configs",
    "config_description",
    "read_config_data",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key at fault."""


# The allowed values of the enum-like keys; ``typing.get_args(X)`` is the tuple of them.
TaskName = Literal["panoptic", "classification"]
# experiment.device also takes "cuda:N" (any GPU number), so it stays ``str`` checked against these and that pattern.
DeviceKind = Literal["auto", "cpu", "cuda", "mps"]
DatasetName = Literal["synthetic", "cityscapes", "coco", "mapillary", "coco_panoptic", "imagenet"]
OptimizerName = Literal["adam", "adamw", "radam_lookahead", "sgd"]
ScheduleKind = Literal["poly", "cosine", "constant"]
AmpMode = Literal["auto", "bf16", "fp16", "none"]


def _not_one_of(where: str, value, allowed: Sequence) -> ConfigError:
    return ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")


def _doc(text: str, default=dataclasses.MISSING, default_factory=dataclasses.MISSING):
    kw = {"metadata": {"doc": text}}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, **kw)
    return field(default=default, **kw)


@dataclass
class ExperimentConfig:
    name: str = _doc("Run name; the default output folder is runs/<name>.", "experiment")
    output_dir: Optional[str] = _doc("Folder for checkpoints, logs and pictures (default runs/<name>).", None)
    task: TaskName = _doc("'panoptic' (Axial-DeepLab) or 'classification' (Axial-ResNet on ImageNet).", "panoptic")
    seed: int = _doc("Seed for weights, data order and augmentation (same seed -> same run).", 0)
    deterministic: bool = _doc("Ask PyTorch for deterministic kernels (slower on GPU).", False)
    device: str = _doc("'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.", "auto")
    threads: Optional[int] = _doc("CPU threads per process (torch.set_num_threads); null keeps PyTorch's choice.", None)
    compile: bool = _doc(
        "Run the model through torch.compile in train (static shapes) and evaluate (dynamic "
        "shapes); the first steps then include the compile time.",
        False,
    )


@dataclass
class ModelConfig:
    name: str = _doc(
        "Registry name, e.g. axial_deeplab_s / _m / _l / _xl, panoptic_deeplab_r50, axial_resnet_s.", "axial_deeplab_s"
    )
    kwargs: Dict[str, Any] = _doc(
        "Extra keyword arguments for create_model (span, drop_path_rate, width ...).", default_factory=dict
    )
    pretrained: Optional[str] = _doc("Local checkpoint to initialise from (never downloaded).", None)
    sync_bn: bool = _doc("Use synchronised BatchNorm across processes when distributed.", True)


@dataclass
class DataConfig:
    dataset: DatasetName = _doc(
        "'synthetic', 'cityscapes', 'coco', 'mapillary', 'coco_panoptic' (custom data in "
        "COCO-panoptic format) or 'imagenet' (image folders).",
        "synthetic",
    )
    root: Optional[str] = _doc("Dataset root folder in its official layout (not used by 'synthetic').", None)
    train_split: str = _doc("Split used for training.", "train")
    eval_split: str = _doc("Split used for evaluation.", "val")
    options: Dict[str, Any] = _doc("Extra keyword arguments for the dataset class.", default_factory=dict)
    resize_long_side: Optional[int] = _doc(
        "Resize every image so its longer side has this length before "
        "augmentation and evaluation (COCO 641); null keeps the size.",
        None,
    )
    crop_size: List[int] = _doc(
        "Training crop [height, width] (classification: the square crop side).", default_factory=lambda: [1025, 2049]
    )
    min_scale: float = _doc("Smallest random rescale factor during training.", 0.5)
    max_scale: float = _doc("Largest random rescale factor during training.", 2.0)
    scale_step: float = _doc("Step between random scale factors (0 = continuous).", 0.1)
    flip: bool = _doc("Random horizontal flips during training.", True)
    photometric: bool = _doc("Random brightness/contrast/saturation jitter during training.", False)
    eval_size: Optional[List[int]] = _doc(
        "Pad evaluation images (bottom/right) to [H, W]; null pads to a multiple of 32.", None
    )
    num_workers: int = _doc("DataLoader worker processes per training process.", 4)
    eval_num_workers: Optional[int] = _doc("Workers for evaluation loaders (default: num_workers).", None)


@dataclass
class TargetConfig:
    sigma: float = _doc("Gaussian sigma of the center heatmap, in pixels.", 8.0)
    small_instance_area: int = _doc("Instances smaller than this (pixels) get small_instance_weight.", 4096)
    small_instance_weight: float = _doc("Semantic loss weight of small-instance pixels.", 3.0)
    ignore_crowd_in_semantic: bool = _doc("Exclude crowd pixels from the semantic loss.", False)


@dataclass
class LossConfig:
    semantic_top_k: float = _doc(
        "Fraction of hardest pixels kept by the bootstrapped cross-entropy (0.2 Cityscapes, 1.0 COCO).", 0.2
    )
    semantic_weight: float = _doc("Weight of the semantic loss.", 1.0)
    center_weight: float = _doc("Weight of the center-heatmap MSE.", 200.0)
    offset_weight: float = _doc("Weight of the offset L1.", 0.01)
    label_smoothing: float = _doc("Label smoothing of the classification cross-entropy.", 0.0)


@dataclass
class SolverConfig:
    optimizer: OptimizerName = _doc("'adam', 'adamw', 'radam_lookahead' (the paper's) or 'sgd' (Nesterov).", "adam")
    lr: float = _doc("Base learning rate.", 1e-4)
    weight_decay: float = _doc(
        "Weight decay; never applied to norms or biases, nor to relative tables unless decay_relative_tables.", 0.0
    )
    decay_relative_tables: bool = _doc(
        "Also decay the relative-position *_table parameters (deeplab2 and timm decay them; off keeps the "
        "groups of runs made before this key).",
        False,
    )
    betas: List[float] = _doc("Adam/RAdam betas.", default_factory=lambda: [0.9, 0.999])
    eps: float = _doc("Adam/RAdam epsilon.", 1e-8)
    momentum: float = _doc("SGD momentum.", 0.9)
    nesterov: bool = _doc("SGD Nesterov momentum.", True)
    lookahead_steps: int = _doc("Lookahead: fast steps between slow-weight syncs (k).", 6)
    lookahead_alpha: float = _doc("Lookahead: slow-weight step size (alpha).", 0.5)
    schedule: ScheduleKind = _doc(
        "After the linear warm-up: 'poly' (power poly_power, to end_lr), 'cosine' (half cosine to end_lr) "
        "or 'constant' (the base LR; end_lr and poly_power unused).",
        "poly",
    )
    poly_power: float = _doc("Power of the poly schedule.", 0.9)
    end_lr: float = _doc("Learning rate reached at the last step.", 0.0)
    warmup_steps: int = _doc("Linear warm-up steps.", 0)
    warmup_start_factor: float = _doc("LR factor at step 0 of the warm-up.", 0.001)
    max_steps: int = _doc("Training iterations (optimizer steps).", 60000)
    max_epochs: Optional[float] = _doc("If set, max_steps = ceil(max_epochs * len(train set) / batch_size).", None)
    warmup_epochs: Optional[float] = _doc("If set, warmup_steps in epochs (like max_epochs).", None)
    batch_size: int = _doc("GLOBAL batch size; split evenly over the distributed processes.", 32)
    grad_accum_steps: int = _doc(
        "Run each process's share of the batch as this many micro-batches (forward + "
        "backward each), one optimizer step per global batch: the recipe of batch_size "
        "in the memory of a micro-batch; BatchNorm normalises each micro-batch alone.",
        1,
    )
    ema_decay: Optional[float] = _doc(
        "Keep an exponential moving average of the weights with this decay (e.g. "
        "0.9998; null = none): evaluated beside the model, kept as best when it "
        "scores higher, saved as ema.safetensors in checkpoints.",
        None,
    )
    grad_clip_norm: Optional[float] = _doc("Clip the global gradient norm to this value (null = off).", None)
    amp: AmpMode = _doc(
        "Mixed precision: 'auto' (bf16 on capable GPUs, else fp16 on GPU, off on CPU), "
        "'bf16' (GPU, or CPU autocast), 'fp16' (GPU only) or 'none'.",
        "auto",
    )


@dataclass
class TrainLoopConfig:
    log_every: int = _doc("Write losses/LR to the metrics log every N steps.", 20)
    checkpoint_every: int = _doc("Write a checkpoint every N steps (and always at the end).", 1000)
    keep_checkpoints: int = _doc("How many periodic checkpoints to keep (the best is kept apart).", 2)
    eval_every: int = _doc("Evaluate every N steps (0 = never during training; see eval_at_end).", 5000)
    eval_at_end: bool = _doc("Evaluate after the last step.", True)
    image_every: int = _doc("Log input/prediction/ground-truth panels to TensorBoard every N steps (0 = off).", 1000)
    tensorboard: bool = _doc("Write TensorBoard scalars and images (if tensorboard is installed).", True)
    plot_curves: bool = _doc("Draw training_curves.png (matplotlib) in the run folder at the end.", True)
    progress: bool = _doc("Show tqdm progress bars (rank 0 only).", True)


@dataclass
class EvalConfig:
    batch_size: int = _doc("Evaluation batch size per process.", 1)
    threshold: float = _doc("Center heatmap threshold.", 0.1)
    nms_kernel: int = _doc("Center max-pool NMS kernel.", 13)
    top_k: int = _doc("Keep at most this many centers per image.", 200)
    stuff_area: int = _doc("Stuff segments smaller than this become void.", 2048)
    scales: List[float] = _doc("Test-time scales (TTA when more than [1.0]).", default_factory=lambda: [1.0])
    flip: bool = _doc("Test-time horizontal flip.", False)
    compute_ap: bool = _doc("Also compute COCO mask AP (pycocotools).", False)
    per_class: bool = _doc("Print per-class PQ and IoU in evaluation summaries.", False)
    max_images: Optional[int] = _doc("Evaluate at most this many images (null = all).", None)


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def output_dir(self) -> str:
        return self.experiment.output_dir or os.path.join("runs", self.experiment.name)


# ----------------------------------------------------------------------------- conversion


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, where: str):
    """Check/convert a YAML value against a field annotation; error names ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        last = None
        for a in non_none:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: invalid value {value!r}")
    if value is None:
        raise ConfigError(f"{where}: must not be null")
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _not_one_of(where, value, args)
    if origin in (list, List, Sequence):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = args or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls, data: Dict[str, Any], where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys under {where or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = types[name]
        key = f"{where}.{name}" if where else name
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def config_from_dict(data: Dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested mapping (missing keys take defaults)."""
    cfg = _build(Config, copy.deepcopy(data or {}), "")
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def literal_fields() -> Dict[str, tuple]:
    """``{"solver.schedule": ("poly", "cosine", "constant"), ...}``: every enum-like key and its
    allowed values, read from the ``Literal`` annotations."""
    out = {}
    for sec in dataclasses.fields(Config):
        cls = _field_types(Config)[sec.name]
        for name, tp in _field_types(cls).items():
            if typing.get_origin(tp) is Literal:
                out[f"{sec.name}.{name}"] = typing.get_args(tp)
    return out


def validate_config(cfg: Config) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    # again here for a Config built or changed in code, which never passed through _coerce
    for key, allowed in literal_fields().items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in allowed:
            raise _not_one_of(key, value, allowed)
    device = cfg.experiment.device
    if not (device in typing.get_args(DeviceKind) or re.fullmatch(r"cuda:\d+", str(device))):
        raise _not_one_of("experiment.device", device, typing.get_args(DeviceKind) + ("cuda:N",))
    need(
        len(cfg.data.crop_size) == 2 and all(v > 0 for v in cfg.data.crop_size),
        f"data.crop_size must be [height, width] with positive values, got {cfg.data.crop_size}",
    )
    need(
        cfg.data.eval_size is None or (len(cfg.data.eval_size) == 2 and all(v > 0 for v in cfg.data.eval_size)),
        f"data.eval_size must be null or [height, width], got {cfg.data.eval_size}",
    )
    need(
        0 < cfg.data.min_scale <= cfg.data.max_scale,
        f"data.min_scale/max_scale must satisfy 0 < min <= max, got {cfg.data.min_scale}, {cfg.data.max_scale}",
    )
    need(cfg.solver.lr > 0, f"solver.lr must be positive, got {cfg.solver.lr}")
    need(cfg.solver.max_steps > 0, f"solver.max_steps must be positive, got {cfg.solver.max_steps}")
    need(cfg.solver.batch_size > 0, f"solver.batch_size must be positive, got {cfg.solver.batch_size}")
    need(cfg.solver.grad_accum_steps >= 1, f"solver.grad_accum_steps must be >= 1, got {cfg.solver.grad_accum_steps}")
    need(
        cfg.solver.batch_size % cfg.solver.grad_accum_steps == 0,
        f"solver.grad_accum_steps={cfg.solver.grad_accum_steps} must divide solver.batch_size="
        f"{cfg.solver.batch_size} (the global batch is cut into equal micro-batches)",
    )
    need(
        cfg.solver.ema_decay is None or 0 < cfg.solver.ema_decay < 1,
        f"solver.ema_decay must be null or in (0, 1), got {cfg.solver.ema_decay}",
    )
    need(cfg.solver.warmup_steps >= 0, f"solver.warmup_steps must be >= 0, got {cfg.solver.warmup_steps}")
    need(len(cfg.solver.betas) == 2, f"solver.betas must have two values, got {cfg.solver.betas}")
    need(0 < cfg.loss.semantic_top_k <= 1, f"loss.semantic_top_k must be in (0, 1], got {cfg.loss.semantic_top_k}")
    need(cfg.train.checkpoint_every > 0, f"train.checkpoint_every must be positive, got {cfg.train.checkpoint_every}")
    need(cfg.train.log_every > 0, f"train.log_every must be positive, got {cfg.train.log_every}")
    need(cfg.train.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {cfg.train.keep_checkpoints}")
    need(
        len(cfg.eval.scales) >= 1 and all(s > 0 for s in cfg.eval.scales),
        f"eval.scales must be a non-empty list of positive factors, got {cfg.eval.scales}",
    )
    need(cfg.eval.batch_size > 0, f"eval.batch_size must be positive, got {cfg.eval.batch_size}")


# ----------------------------------------------------------------------------- YAML + overrides


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("kwargs", "options"):
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _read_yaml(path: str, _seen=()) -> Dict[str, Any]:
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        data = _deep_merge(_read_yaml(base_path, _seen + (path,)), data)
    return data


def _shipped_dir() -> str:
    # a plain folder: the package is installed unzipped (its C kernel is compiled next to it)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_configs() -> Dict[str, str]:
    """``{name: path}`` of the recipes shipped in the package, sorted by name."""
    folder = _shipped_dir()
    if not os.path.isdir(folder):
        return {}
    return {f[:-5]: os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".yaml")}


def _available() -> str:
    names = list(shipped_configs())
    return f"shipped configs: {', '.join(names)} (axial-deeplab config list)" if names else "no shipped configs found"


def resolve_config_path(spec: str) -> str:
    """The file that ``--config spec`` means: an existing file as given; otherwise a shipped
    recipe named ``spec`` (``synthetic``, ``synthetic.yaml``), or ``configs/NAME.yaml`` when
    that path does not exist. An unknown name is a ConfigError listing the shipped ones."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    shipped = shipped_configs()
    head, tail = os.path.split(os.path.normpath(spec))
    name = tail[:-5] if tail.endswith(".yaml") else tail
    # a bare name, or a path into a "configs" folder that is not here (e.g. outside the checkout)
    if (not head or os.path.basename(head) == "configs") and name in shipped:
        return shipped[name]
    what = "config file not found" if (head or tail.endswith((".yaml", ".yml"))) else "unknown config name"
    raise ConfigError(f"{what}: {spec}; {_available()}")


def config_description(path: str) -> str:
    """One line about a config file: the first line of its leading comment (a trailing colon or
    period dropped; a line that runs on keeps the part before its first ': ' or '; ')."""
    with open(path, "r", encoding="utf-8") as f:
        first = f.readline().strip()
    if not first.startswith("#"):
        return ""
    line = first.lstrip("#").strip()
    if line.endswith((".", ":")):
        return line[:-1]
    depth = 0
    for i, ch in enumerate(line):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and line[i : i + 2] in (": ", "; "):
            return line[:i]
    return line


def read_config_data(spec: str) -> Dict[str, Any]:
    """The mapping a config file sets after its ``base`` chain is merged (no defaults added)."""
    return _read_yaml(resolve_config_path(spec))


def parse_override(text: str):
    """``'solver.lr=1e-3'`` -> ``(['solver', 'lr'], 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply dotted overrides to a nested mapping (validation happens in config_from_dict)."""
    data = copy.deepcopy(data)
    for text in overrides or ():
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or only defaults when ``path`` is None) and apply overrides.
    ``path`` may name a shipped recipe (see :func:`resolve_config_path`)."""
    if path:
        path = resolve_config_path(path)
    data = _read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_config(cfg: Config, path: Optional[str] = None) -> str:
    """YAML text of the resolved config; written atomically when ``path`` is given."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path:
        from ..fileio import atomic_write_text

        atomic_write_text(path, text)
    return text


def describe_config() -> str:
    """Every key with its default and its documentation, for ``train --print-defaults``."""
    lines = []
    for sec in dataclasses.fields(Config):
        cls = _field_types(Config)[sec.name]
        lines.append(f"{sec.name}:")
        inst = cls()
        for f in dataclasses.fields(cls):
            default = getattr(inst, f.name)
            lines.append(
                f"  {f.name}: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}"
                f"    # {f.metadata.get('doc', '')}"
            )
    return "\n".join(lines) + "\n"
