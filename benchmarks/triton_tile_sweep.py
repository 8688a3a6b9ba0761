"""Time the Triton kernels in every tile configuration the autotuner may pick (GPU only).

For the attention core of a layer (qkv -> both retrievals, and its backward) on each axis,
at Axial-DeepLab's local span 33 and at a global span: median times per (BLOCK_Q, BLOCK_K,
warps, stages) from triton.testing.do_bench, so one run on a GPU shows how the tiles trade
off (the autotuner keeps only the best). The default input, 8x256x65x129, is the size the
kernels are tuned for: a batch of 8 Cityscapes crops at output stride 16, 256 channels::

    python3 benchmarks/triton_tile_sweep.py --json sweep.json
"""

from __future__ import annotations

import argparse
import json

import torch

from axial_deeplab.layers import PositionSensitiveAxialAttention
from axial_deeplab.layers import triton_launch as TK


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8x256x65x129", help="BxCxHxW of the layer's input")
    p.add_argument("--spans", nargs="+", default=["33", "global"], help="local span sizes and/or 'global'")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not TK.triton_available():
        raise SystemExit("needs a CUDA GPU and triton")
    import triton.testing

    b, c, h, w = (int(v) for v in args.shape.split("x"))
    rows = []
    print(f"{'axis':6s} {'span':6s} {'tile':16s} {'forward ms':>10s} {'backward ms':>11s}")
    for span in args.spans:
        for axis, length, other in (("height", h, w), ("width", w, h)):
            kw = {} if span == "global" else {"span": int(span)}
            torch.manual_seed(0)
            layer = PositionSensitiveAxialAttention(c, c, axis=axis, **kw).cuda()
            nh = b * other * layer.num_heads
            gen = torch.Generator(device="cuda").manual_seed(0)
            qkv = torch.randn(nh, 2 * layer.key_depth + layer.value_depth, length, device="cuda", generator=gen)
            scales = torch.rand(3, layer.num_heads, device="cuda", generator=gen) + 0.5
            g = torch.randn(nh, layer.value_depth, length, device="cuda", generator=gen)
            for config in TK.CONFIGS:
                try:
                    sv, sve, lse = TK.attend_triton(layer, qkv, scales, return_lse=True, blocks=config)
                    fwd = triton.testing.do_bench(lambda: TK.attend_triton(layer, qkv, scales, blocks=config))
                    bwd = triton.testing.do_bench(
                        lambda: TK.attention_backward_triton(layer, 1, qkv, scales, sv, sve, lse, g, g, blocks=config)
                    )
                    note = ""
                except Exception as e:  # a config that does not fit this GPU: report, go on
                    fwd = bwd = None
                    note = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
                tile = "q{}k{} w{} s{}".format(*config)
                print(
                    f"{axis:6s} {span:6s} {tile:16s} {fwd if fwd is None else f'{fwd:10.3f}':>10} "
                    f"{bwd if bwd is None else f'{bwd:11.3f}':>11} {note}",
                    flush=True,
                )
                rows.append(dict(axis=axis, span=span, config=list(config), forward_ms=fwd, backward_ms=bwd, note=note))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
