"""Launching the Triton kernels of :mod:`.triton_kernels`: tiles, operands, grids, reductions.

Why apart from the kernels: the ``@triton.jit`` code is compiled per tile size, and which tile
runs is a decision of the launch. Every launch passes ``BLOCK_Q``, ``BLOCK_K`` and ``JB`` to the
kernel explicitly, chosen in this order:

* ``blocks`` given to :func:`attend_triton` / :func:`attention_backward_triton` /
  :func:`triton_layer` ((query rows, keys), optionally with (num_warps, num_stages)): the
  self-check, the tile sweep;
* else :data:`BLOCK_SIZES`, the process default (None unless tests or benchmarks set it);
* else on a GPU ``triton.autotune`` over :data:`CONFIGS` at the first call of each shape, and
  elsewhere (Triton's interpreter), or while traced (``torch.compile``, the fake runs of the
  operators of :mod:`.triton_ops`, where a launch is a ``wrap_triton`` graph node), :func:`block_sizes`.

The layer stands in for a convolution, so its products follow PyTorch's switch for
convolutions, ``torch.backends.cudnn.allow_tf32`` (on by default): TF32 tensor-core
products like cuDNN's, or with it off "tf32x3" (three TF32 products: float32 accuracy,
still on tensor cores; Triton's exact "ieee" dot fails to compile with these gathers in
Triton 3.9, and would run on the CUDA cores) (:func:`dot_precision`).

On a CPU the kernels run only through Triton's interpreter (``TRITON_INTERPRET=1``, tests on
tiny shapes); speed figures need a GPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from .chunked import run_layer
from .geometry import LOG2E, attention_radius, num_queries, offset_table_rows, offset_tables
from .memory_efficient import memory_efficient_core
from .triton_kernels import (
    axial_backward_kernel,
    axial_forward_kernel,
    kernel_constants,
    next_pow2,
    offset_window,
    triton,
    triton_available,
)

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "triton_available",
    "attend_triton",
    "attention_backward_triton",
    "triton_layer",
    "block_sizes",
    "dot_precision",
    "tuned_configs",
    "reset_autotuning",
    "BLOCK_SIZES",
    "CONFIGS",
    "TABLE_GRAD_SLOTS",
]

# Process default of the tiles, (query rows, keys) optionally with (num_warps, num_stages); None:
# the autotuner picks on a GPU, :func:`block_sizes` elsewhere. Tests set small values to run
# several blocks.
BLOCK_SIZES: Optional[Tuple[int, ...]] = None
# (BLOCK_Q, BLOCK_K, num_warps, num_stages) the autotuner times on a GPU.
CONFIGS = [
    (16, 16, 2, 1),
    (16, 16, 4, 1),
    (16, 16, 4, 2),
    (16, 32, 4, 1),
    (32, 16, 4, 1),
    (32, 32, 2, 1),
    (32, 32, 4, 1),
    (32, 32, 8, 1),
    (32, 32, 4, 2),
    (64, 32, 8, 1),
    (64, 64, 8, 1),
]
# Partial buffers of the table gradients: programs add into slot (program id mod this).
TABLE_GRAD_SLOTS = 32
_TUNE_KEY = ["L", "LQ", "QSTEP", "RADIUS", "DK", "DV", "DOT", "USE_QK", "USE_QR", "USE_KR", "USE_RV"]
_tuned = {"forward": None, "backward": None}  # built on first use on a GPU (:func:`_tuned_kernels`)


def dot_precision() -> str:
    """``tl.dot`` input precision: "tf32" where PyTorch lets cuDNN's float32 convolutions use
    TF32 (its default), else "tf32x3" (float32 accuracy)."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"


def block_sizes(length: int, query_step: int = 1, blocks: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_K, JB): query rows and keys of a tile (at least 16 each, as ``tl.dot``
    needs, and no larger than the sequence needs) and the width of its offset window. ``blocks``:
    the (query rows, keys) asked for, else a default for the length."""
    if blocks is not None:
        block_q, block_k = (next_pow2(b) for b in blocks[:2])
    else:
        block_k = 16 if length <= 16 else 32
        block_q = max(16, block_k // max(1, query_step))
    lq = num_queries(length, query_step)
    block_q = max(16, min(block_q, next_pow2(lq)))
    block_k = max(16, min(block_k, next_pow2(length)))
    return block_q, block_k, offset_window(block_q, block_k, query_step)


def _atomic_kv(lq: int, block_q: int) -> bool:
    """k / v gradients need atomics when several query blocks add into the same key block."""
    return -(-lq // block_q) > 1


# --------------------------------------------------------------------------- autotuning (GPU)
def _tile_rows(args) -> int:
    return offset_window(args["BLOCK_Q"], args["BLOCK_K"], args["QSTEP"])


def _prune(configs, named_args, **kwargs):
    """Drop tiles larger than the sequence needs (keep the smallest when all are)."""
    length, lq = named_args["L"], named_args["LQ"]
    fit = [
        c
        for c in configs
        if c.kwargs["BLOCK_K"] <= max(16, next_pow2(length)) and c.kwargs["BLOCK_Q"] <= max(16, next_pow2(lq))
    ]
    return fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_Q"] * c.kwargs["BLOCK_K"], c.num_warps))]


def _tuned_kernels():
    """The autotuned kernels (built once, from :data:`CONFIGS`); the autotuner passes the
    tiles of the config it runs, and the heuristics JB and ATOMIC_KV derived from them."""
    if _tuned["forward"] is None:
        configs = [triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bq, bk, w, s in CONFIGS]
        prune = {"early_config_prune": _prune}
        _tuned["forward"] = triton.autotune(configs, key=_TUNE_KEY, prune_configs_by=prune)(
            triton.heuristics({"JB": _tile_rows})(axial_forward_kernel)
        )
        _tuned["backward"] = triton.autotune(
            configs, key=_TUNE_KEY, prune_configs_by=prune, reset_to_zero=["gqkv", "grq_part", "grk_part", "grv_part"]
        )(
            triton.heuristics({"JB": _tile_rows, "ATOMIC_KV": lambda a: _atomic_kv(a["LQ"], a["BLOCK_Q"])})(
                axial_backward_kernel
            )
        )
    return _tuned["forward"], _tuned["backward"]


def reset_autotuning() -> None:
    """Forget the autotuned kernels (and their choices); the next GPU launch rebuilds them from
    :data:`CONFIGS`."""
    _tuned["forward"] = _tuned["backward"] = None


def tuned_configs() -> dict:
    """What the autotuner chose so far: {kernel: {tuning key: config}} (for the benchmark)."""
    chosen = {}
    for name, tuned in _tuned.items():
        if tuned is not None and tuned.cache:
            chosen[name] = {str(key): str(config) for key, config in tuned.cache.items()}
    return chosen


def _autotuning(device: torch.device) -> bool:
    """Whether a launch without explicit tiles autotunes (a real GPU, not the interpreter)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


# --------------------------------------------------------------------------- launch
def _launch(
    backward: bool, args: tuple, layer, length: int, lq: int, query_step: int, blocks: Optional[Sequence[int]]
) -> int:
    """One program per (sequence-head, query block), tiles passed explicitly (see the module
    docstring for their choice). Returns the BLOCK_Q that ran (the backward's partial sums need it)."""
    nh, device = args[0].shape[0], args[0].device
    terms = (layer.use_qk, layer.use_query_rpe, layer.use_key_rpe, layer.use_value_rpe)
    # fused multiply-adds on (Triton 3.9 warns that its default will turn them off)
    options = {**kernel_constants(layer.key_depth, layer.value_depth, terms, dot_precision()), "enable_fp_fusion": True}
    blocks = BLOCK_SIZES if blocks is None else blocks
    traced = _traced(args[0])
    if blocks is None and _autotuning(device) and not traced:
        tuned = _tuned_kernels()[int(backward)]
        tuned[lambda meta: (nh, triton.cdiv(lq, meta["BLOCK_Q"]))](*args, **options)
        return tuned.best_config.kwargs["BLOCK_Q"]
    if blocks is not None and len(blocks) == 4:
        options.update(num_warps=int(blocks[2]), num_stages=int(blocks[3]))
    block_q, block_k, jb = block_sizes(length, query_step, blocks)
    kernel = axial_backward_kernel if backward else axial_forward_kernel
    if backward:
        options["ATOMIC_KV"] = _atomic_kv(lq, block_q)
    if traced:  # a node of the graph (torch.compile / the operator's fake run), not a launch
        kernel = wrap_triton(kernel)
    kernel[(nh, triton.cdiv(lq, block_q))](*args, BLOCK_Q=block_q, BLOCK_K=block_k, JB=jb, **options)
    return block_q


def _traced(t: torch.Tensor) -> bool:
    """Whether this launch is being traced (fake tensors, torch.compile) rather than run."""
    return torch.compiler.is_compiling() or is_fake(t)


def _require_triton():
    if not triton_available():
        raise RuntimeError("impl='triton' needs the optional package triton (pip install triton)")


def _placeholder(t: Optional[torch.Tensor], device) -> torch.Tensor:
    """A switched-off operand: a one-element tensor of its own (never read or written)."""
    return torch.zeros(1, device=device) if t is None else t


def attend_triton(
    layer,
    qkv: torch.Tensor,
    scales: torch.Tensor,
    query_step: int = 1,
    return_lse: bool = False,
    blocks: Optional[Sequence[int]] = None,
):
    """Same contract as :func:`.chunked.attend`, computed by the Triton kernel (no autograd;
    :class:`.memory_efficient.AxialAttentionFunction` provides the backward)."""
    _require_triton()
    nh, c2h, length = qkv.shape
    dv, device = layer.value_depth, qkv.device
    qkv = qkv.detach().float().contiguous()
    lq = num_queries(length, query_step)
    rqe, rke, rve = offset_tables(layer, length, torch.float32, device)
    scale = (scales.detach().float() * LOG2E).contiguous()
    sv = torch.empty(nh, dv, lq, device=device)
    sve = torch.empty(nh, dv, lq, device=device) if layer.use_value_rpe else None
    lse = torch.empty(nh, lq, device=device)
    args = (
        qkv,
        _placeholder(rqe, device),
        _placeholder(rke, device),
        _placeholder(rve, device),
        scale,
        sv,
        _placeholder(sve, device),
        lse,
        length,
        lq,
        query_step,
        attention_radius(layer),
        layer.num_heads,
        c2h,
    )
    _launch(False, args, layer, length, lq, query_step, blocks)
    if return_lse:
        return sv, sve, lse
    return sv, sve


def attention_backward_triton(
    layer,
    query_step: int,
    qkv: torch.Tensor,
    scales: torch.Tensor,
    sv: torch.Tensor,
    sve: torch.Tensor,
    lse: torch.Tensor,
    g_sv: Optional[torch.Tensor],
    g_sve: Optional[torch.Tensor],
    blocks: Optional[Sequence[int]] = None,
):
    """Backward of :func:`attend_triton` by recomputation in one Triton kernel; the
    ``backward_fn`` of :class:`.memory_efficient.AxialAttentionFunction` (same contract
    as :func:`.recompute.recompute_backward`). Returns ``(g_qkv, g_scales (3, heads),
    g_query_table, g_key_table, g_value_table)`` (a switched-off table's gradient is None)."""
    _require_triton()
    nh, c2h, length = qkv.shape
    dk, dv, heads = layer.key_depth, layer.value_depth, layer.num_heads
    use_rv = layer.use_value_rpe
    device = qkv.device
    lq = num_queries(length, query_step)
    f32 = torch.float32
    sv = sv.detach().to(f32)
    g_sv = torch.zeros_like(sv) if g_sv is None else g_sv.detach().to(f32).contiguous()
    delta = (g_sv * sv).sum(1)  # (nh, Lq): sum_p P dP
    if use_rv:
        g_sve = torch.zeros_like(sv) if g_sve is None or g_sve.numel() == 0 else g_sve.detach().to(f32).contiguous()
        delta = delta + (g_sve * sve.detach().to(f32)).sum(1)
    else:
        g_sve = None
    delta = delta.contiguous()

    x = qkv.detach().to(f32).contiguous()
    rqe, rke, rve = offset_tables(layer, length, f32, device)
    nscale = scales.detach().to(f32).contiguous()
    scale = (scales.detach().float() * LOG2E).contiguous()  # as attend_triton computes it
    slots = max(1, min(TABLE_GRAD_SLOTS, nh))
    span = 2 * length - 1
    most_programs = nh * triton.cdiv(lq, 16)  # tiles have at least 16 query rows

    g_qkv = torch.zeros(nh, c2h, length, dtype=f32, device=device)
    g_scale_part = torch.zeros(most_programs, 3, dtype=f32, device=device)
    g_rq_part = torch.zeros(slots, dk, span, dtype=f32, device=device) if layer.use_query_rpe else None
    g_rk_part = torch.zeros(slots, dk, span, dtype=f32, device=device) if layer.use_key_rpe else None
    g_rv_part = torch.zeros(slots, dv, span, dtype=f32, device=device) if use_rv else None

    def ptr(t):
        return _placeholder(t, device)

    args = (
        x,
        ptr(rqe),
        ptr(rke),
        ptr(rve),
        scale,
        nscale,
        lse.detach().to(f32).contiguous(),
        delta,
        g_sv,
        ptr(g_sve),
        g_qkv,
        ptr(g_rq_part),
        ptr(g_rk_part),
        ptr(g_rv_part),
        g_scale_part,
        length,
        lq,
        query_step,
        attention_radius(layer),
        heads,
        c2h,
        slots,
    )
    num_qb = triton.cdiv(lq, _launch(True, args, layer, length, lq, query_step, blocks))

    # Deterministic reductions of the partial sums, back to the parameters' rows.
    g_scales = g_scale_part[: nh * num_qb].view(nh // heads, heads, num_qb, 3).sum((0, 2)).t()
    offsets = offset_table_rows(layer, length, device)

    def to_rows(part, table):
        if part is None:
            return None
        flat = part.sum(0)
        rows = torch.zeros(flat.shape[0], layer.table_rows, dtype=f32, device=device)
        return rows.index_add_(1, offsets, flat).to(table.dtype)

    g_rq = to_rows(g_rq_part, layer.query_table)
    g_rk = to_rows(g_rk_part, layer.key_table)
    g_rv = to_rows(g_rv_part, layer.value_table)
    return g_qkv.to(qkv.dtype), g_scales.to(scales.dtype), g_rq, g_rk, g_rv


def triton_layer(
    layer: PositionSensitiveAxialAttention, x: torch.Tensor, blocks: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """The layer with the Triton forward; in training, the memory-efficient autograd function
    with the Triton backward (both kernels fused, nothing kept but the inputs, the small
    outputs and one log-sum-exp per row). No self-check: see :mod:`.triton_self_check`."""

    def attend_fn(layer_, qkv, scales, step, return_lse=False):
        return attend_triton(layer_, qkv, scales, step, return_lse=return_lse, blocks=blocks)

    def backward_fn(*args):
        return attention_backward_triton(*args, blocks=blocks)

    def core(layer_, qkv, scales, step):
        return memory_efficient_core(layer_, qkv, scales, step, attend_fn=attend_fn, backward_fn=backward_fn)

    return run_layer(layer, x, core)
