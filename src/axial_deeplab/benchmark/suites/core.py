"""The attention core alone (qkv -> both retrievals; no projection, no BN), per axis, in
inference: how close each fast path comes to the device's memory bandwidth."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ..harness import Result, copy_bandwidth, measure
from ..report import progress
from .base import Settings, Suite
from .layers import LAYER_SHAPES, layer_shapes


def core_functions(device: torch.device) -> Dict[str, Callable]:
    """The attention core of each fast path: ``fn(layer, qkv, scales)``. On CPU "fast" is
    the compiled C kernel (PyTorch without a compiler); on CUDA "fast" is the chunked
    PyTorch path and "triton" the fused kernel."""
    from ...layers import chunked

    fns: Dict[str, Callable] = {"fast": lambda layer, qkv, scales: chunked.attend(layer, qkv, scales)}
    if device.type == "cuda":
        from ...layers.triton_launch import attend_triton, triton_available

        if triton_available():
            fns["triton"] = lambda layer, qkv, scales: attend_triton(layer, qkv, scales)
    return fns


def bench_core(
    device: torch.device, shapes=LAYER_SHAPES, repeats: int = 5, log=print, bandwidth: Optional[float] = None
) -> List[Result]:
    """Median time, the bytes the core must move (qkv in, the two retrievals out), their
    rate as a fraction of the copy bandwidth, and the multiply-add rate of the L x L work."""
    from ...layers import PositionSensitiveAxialAttention

    bandwidth = bandwidth or copy_bandwidth(device)
    rows: List[Result] = []
    for shape in shapes:
        b, c, h, w = shape
        for axis, length, other in (("height", h, w), ("width", w, h)):
            torch.manual_seed(0)
            layer = PositionSensitiveAxialAttention(c, c, axis=axis).to(device).eval()
            heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
            nh = b * other * heads
            gen = torch.Generator().manual_seed(0)
            qkv = torch.randn(nh, 2 * dk + dv, length, generator=gen).to(device)
            scales = torch.rand(3, heads, generator=gen).add_(0.5).to(device)
            moved = 4 * (qkv.numel() + 2 * nh * dv * length)
            macs = nh * length * length * (3 * dk + 2 * dv)
            case = f"{'x'.join(map(str, shape))} {axis}"
            for impl, fn in core_functions(device).items():

                def step(fn=fn):
                    with torch.no_grad():
                        return fn(layer, qkv, scales)

                r = measure("attention core", case, "eval", impl, step, repeats, device, with_memory=False)
                if r.median_ms:
                    seconds = r.median_ms / 1e3
                    r.gb_per_s = moved / seconds / 1e9
                    r.bandwidth_fraction = moved / seconds / bandwidth
                    r.gmac_per_s = macs / seconds / 1e9
                    r.note = (
                        f"{r.gb_per_s:.1f} GB/s = {100 * r.bandwidth_fraction:.0f}% of copy; {r.gmac_per_s:.1f} GMAC/s"
                    )
                rows.append(r)
                log(progress(rows[-1]) + "  " + r.note)
    return rows


def run(s: Settings) -> List[Result]:
    bandwidth = copy_bandwidth(s.device)
    s.log(f"copy bandwidth on {s.device}: {bandwidth / 1e9:.1f} GB/s")
    return bench_core(s.device, layer_shapes(s), repeats=s.repeats, log=s.log, bandwidth=bandwidth)


SUITE = Suite("core", run)
