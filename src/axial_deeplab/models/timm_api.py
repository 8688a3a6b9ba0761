"""The timm model API of our classification backbones, without depending on timm.

:class:`TimmModelMixin` gives :class:`.axial_resnet.AxialResNet` and
:class:`.axial_swidernet.HybridAxialResNet` the methods timm's models have, with timm's meaning:
``forward_features`` (the last, unpooled feature map), ``forward_head(x, pre_logits=False)``,
``get_classifier`` / ``reset_classifier(num_classes, global_pool=None)``,
``set_grad_checkpointing`` (each block's activations recomputed in backward), ``group_matcher``
(layer-wise learning-rate decay), ``forward_intermediates`` and ``prune_intermediate_layers``
(what ``timm.create_model(..., features_only=True)`` wraps). Feature index ``i`` is ``res{i+2}``:
0 .. 3 are the outputs at strides 4, 8, 16, 32 (16 at output stride 16); the stem is not one.

:data:`PRETRAINED_CFGS` / :func:`pretrained_cfg_for` describe each backbone's input the way timm's
``pretrained_cfg`` does (``timm.data.resolve_data_config`` reads it), with the preprocessing our
weights actually expect; see :func:`pretrained_cfg_for`.
"""

from __future__ import annotations

import fnmatch
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.activation_recompute import run_recomputed

__all__ = [
    "FeatureInfo",
    "GlobalPool",
    "TimmModelMixin",
    "take_indices",
    "pretrained_cfg_for",
    "PRETRAINED_CFGS",
    "RAW_RGB",
    "IMAGENET_NORM",
    "DEEPLAB2_NORM",
]

IndicesT = Union[int, Sequence[int], None]


class FeatureInfo(list):
    """timm-like feature info: one dict (``num_chs``, ``reduction``, ``module``) per feature level,
    all levels as list items; ``channels()`` / ``reduction()`` / ``module_name()`` give those of
    ``out_indices`` (every level unless set), or of level ``idx`` when given, as timm's does."""

    out_indices: Optional[Tuple[int, ...]] = None

    def _get(self, key: str, idx=None):
        if idx is not None:
            return [self[i][key] for i in idx] if isinstance(idx, (list, tuple)) else self[idx][key]
        indices = range(len(self)) if self.out_indices is None else self.out_indices
        return [self[i][key] for i in indices]

    def channels(self, idx=None):
        return self._get("num_chs", idx)

    def reduction(self, idx=None):
        return self._get("reduction", idx)

    def module_name(self, idx=None):
        return self._get("module", idx)

    def get_dicts(self, keys=None, idx=None) -> List[dict]:
        indices = range(len(self)) if self.out_indices is None else self.out_indices
        indices = indices if idx is None else ([idx] if isinstance(idx, int) else idx)
        return [dict(self[i]) if keys is None else {k: self[i][k] for k in keys} for i in indices]


def take_indices(num_features: int, indices: IndicesT = None) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices``: ``None`` all levels, an int the last n, a sequence those
    levels (negative from the end). Returns (absolute indices, largest index)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(
                    f"feature index {i} is out of range (0 to {num_features - 1}): the features "
                    f"are res2 .. res5, indices 0 .. {num_features - 1}"
                )
            take.append(idx)
        if not take:
            raise ValueError("out_indices / indices is empty")
    return take, max(take)


class GlobalPool(nn.Module):
    """timm's global pooling choices that keep the channel count: ``"avg"``, ``"max"``,
    ``"avgmax"`` (their mean) to (B, C), or ``""`` (no pooling: the map passes through)."""

    POOL_TYPES = ("avg", "max", "avgmax", "")

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        if pool_type not in self.POOL_TYPES:
            raise ValueError(
                f"global_pool {pool_type!r} is not supported; choose one of "
                f"{', '.join(repr(p) for p in self.POOL_TYPES)}"
            )
        self.pool_type = pool_type

    def is_identity(self) -> bool:
        return not self.pool_type

    def forward(self, x):
        if self.pool_type == "avg":
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.pool_type == "max":
            return F.adaptive_max_pool2d(x, 1).flatten(1)
        if self.pool_type == "avgmax":
            return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)).flatten(1)
        return x

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


class TimmModelMixin:
    """timm's model API over ``self.stem`` and the stages named in ``self._stage_names``.

    A subclass sets ``stem``, ``_stage_names`` (every stage in run order), ``_feature_stages``
    (those whose outputs are res2 .. res5), ``num_features`` and ``feature_info``, then calls
    :meth:`_init_head`. ``_group_prefix`` names the stages for :meth:`group_matcher`.
    """

    _group_prefix = "layer"
    grad_checkpointing = False

    def _init_head(
        self,
        num_classes: int,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        features_only: bool = False,
        out_indices: IndicesT = None,
    ) -> None:
        self.num_classes = num_classes
        self.drop_rate = float(drop_rate)
        self.head_hidden_size = self.num_features
        self.features_only = features_only
        if features_only:
            take, _ = take_indices(len(self.feature_info), out_indices)
            self.out_indices = tuple(take)
            self.feature_info.out_indices = self.out_indices
        else:
            if out_indices is not None:
                raise ValueError("out_indices selects the features of a features_only=True model")
            self.out_indices = None  # all, should features_only be switched on later
            self.global_pool = GlobalPool(global_pool)
            self.fc = self._make_fc(num_classes)

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes > 0 and self.global_pool.is_identity():
            raise ValueError(
                "global_pool='' (no pooling) needs num_classes=0: the linear classifier takes pooled (B, C) features"
            )
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- running the network --------------------------------------------------------------------

    def _run_stage(self, name: str, x):
        stage = getattr(self, name)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in stage:  # each block's activations recomputed in backward
                x = run_recomputed(block, block, x)
            return x
        return stage(x)

    def forward_features(self, x) -> torch.Tensor:
        """The last feature map, unpooled (B, num_features, H / 32, W / 32 at output stride 32)."""
        x = self.stem(x)
        for name in self._stage_names:
            x = self._run_stage(name, x)
        return x

    def forward_head(self, x, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, dropout (``drop_rate``, training only) and the classifier on
        ``forward_features``' output; ``pre_logits=True`` stops before the classifier."""
        self._need_head("forward_head")
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        if self.features_only:
            return self.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x,
        indices: IndicesT = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's: the res2 .. res5 features picked by ``indices`` (None: all, int: the last n,
        sequence: those), and unless ``intermediates_only`` the final features first, as
        ``(final, [features])``. ``stop_early`` stops after the last feature asked for (the
        'final' is then that stage's output). ``norm`` has nothing to apply: there is no final
        norm layer. Only ``output_fmt="NCHW"``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; only 'NCHW'")
        take, max_index = take_indices(len(self.feature_info), indices)
        intermediates = []
        feat_idx = -1
        x = self.stem(x)
        for name in self._stage_names:
            x = self._run_stage(name, x)
            if name in self._feature_stages:
                feat_idx += 1
                if feat_idx in take:
                    intermediates.append(x)
                if feat_idx == max_index and (stop_early or intermediates_only):
                    break
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: IndicesT = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last feature in ``indices`` (emptied, so the state dict of
        what is kept is unchanged) and, with ``prune_head`` or when the end is cut, the head
        (``reset_classifier(0, '')``). Returns the absolute indices kept, as timm's."""
        take, max_index = take_indices(len(self.feature_info), indices)
        last_needed = self._feature_stages[max_index]
        for name in self._stage_names[self._stage_names.index(last_needed) + 1 :]:
            setattr(self, name, nn.Sequential())
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if (prune_head or prune_end) and not self.features_only:
            self.reset_classifier(0, "")
        return take

    # -- head -----------------------------------------------------------------------------------

    def _need_head(self, what: str) -> None:
        if self.features_only:
            raise RuntimeError(
                f"{what}: a features_only=True model has no classification head; build it without features_only"
            )

    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The classifier module (``fc``), or its name."""
        self._need_head("get_classifier")
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none, ``forward`` returns pooled features);
        ``global_pool`` None keeps the pooling, ``""`` removes it (with ``num_classes=0``)."""
        self._need_head("reset_classifier")
        ref = next(self.parameters(), None)
        if global_pool is not None:
            self.global_pool = GlobalPool(global_pool)
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes)
        if ref is not None:
            self.fc.to(device=ref.device, dtype=ref.dtype)
        self.fc.train(self.training)
        self.global_pool.train(self.training)

    # -- training helpers -----------------------------------------------------------------------

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Run every block through ``layers.activation_recompute`` while gradients are on: only
        each block's input is kept and its activations are recomputed in backward. Unlike timm's,
        BatchNorm's running statistics see each training batch once (restored after the replay),
        so a step equals one without checkpointing (see ``layers.activation_recompute``)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups for timm's layer-wise LR decay: ``stem``, then ``blocks`` one per stage
        (``coarse``) or per block; the classifier falls in the last group."""
        p = self._group_prefix
        blocks = [(rf"^{p}(\d+)\." if coarse else rf"^{p}(\d+)\.(\d+)", None)]
        blocks += self._extra_block_groups()
        return dict(stem=r"^stem\.", blocks=blocks)

    def _extra_block_groups(self) -> list:
        return []


# -- pretrained_cfg ------------------------------------------------------------------------------

# Our ImageNet recipe (configs/imagenet_*.yaml, data/transforms.build_classification_transforms)
# feeds [0, 1] RGB straight in: no mean/std normalisation.
RAW_RGB = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
# The PyTorch ImageNet port (csrhddlam/axial-deeplab) trained with torchvision's normalisation.
IMAGENET_NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# deeplab2's x / 127.5 - 1 on 0..255, i.e. (x - 0.5) / 0.5 on [0, 1]: its converted checkpoints.
DEEPLAB2_NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# (pattern, normalisation, why) -- first match wins
_NORMS = (
    ("axial26s", IMAGENET_NORM, "the PyTorch port's weights"),
    ("axial50?", IMAGENET_NORM, "the PyTorch port's weights"),
    ("axial_swidernet_*", DEEPLAB2_NORM, "deeplab2's converted weights"),
    ("max_deeplab_*_backbone", DEEPLAB2_NORM, "deeplab2's converted weights"),
    ("axial_resnet50", DEEPLAB2_NORM, "deeplab2's converted weights"),
    ("resnet50_beta", DEEPLAB2_NORM, "deeplab2's converted weights"),
    ("axial_resnet_*", RAW_RGB, "our ImageNet recipe"),
    ("resnet50", RAW_RGB, "our ImageNet recipe"),
)

#: The classification backbones that have a pretrained_cfg (and a timm registration).
TIMM_MODELS = tuple(
    [f"axial_resnet_{s}{k}" for s in ("s", "m", "l", "xl") for k in ("", "_conv", "_full")]
    + [
        "axial_resnet_tiny",
        "resnet50",
        "axial26s",
        "axial50s",
        "axial50m",
        "axial50l",
        "axial_swidernet_1_1_1",
        "axial_swidernet_1_1_3",
        "axial_swidernet_1_1_4_5",
        "max_deeplab_s_backbone",
        "max_deeplab_l_backbone",
        "axial_resnet50",
        "resnet50_beta",
    ]
)


def pretrained_cfg_for(name: str) -> Optional[dict]:
    """timm-style ``pretrained_cfg`` of a registered classification backbone (None for others):
    224x224 centre crops of a 256 resize (crop_pct 0.875), bilinear, as our evaluation transform;
    ``mean`` / ``std`` those the weights were trained with: none (0 / 1) for our ImageNet recipe,
    ImageNet's for the PyTorch port's models, 0.5 / 0.5 for deeplab2's. No ``url``: we publish no
    weights (load local ones with ``pretrained_cfg_overlay=dict(file=...)`` or ``checkpoint_path``)."""
    if name not in TIMM_MODELS:
        return None
    norm = next(n for pattern, n, _ in _NORMS if fnmatch.fnmatch(name, pattern))
    return dict(
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        crop_mode="center",
        interpolation="bilinear",
        fixed_input_size=False,
        first_conv="stem.0",
        classifier="fc",
        license="apache-2.0",
        **norm,
    )


PRETRAINED_CFGS: Dict[str, dict] = {name: pretrained_cfg_for(name) for name in TIMM_MODELS}
