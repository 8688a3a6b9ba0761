"""Registers, spills, shared memory and the key-block loop's machine instructions per
logit of the Triton kernels, compiled for a GPU architecture on any machine (no GPU needed:
Triton's bundled ptxas and cuobjdump), for every tile configuration the autotuner may pick.
Spilled registers and instructions issued per (query, key) pair are the hints available
without a GPU (an H100 issues about 30e12 lane-instructions a second, so a pair of layers at
8x256x65x129, about 1e8 logits, costs at least ~3.4 us per instruction per logit); times need
one::

    .venv/bin/python benchmarks/triton_compile_report.py --key-depth 16 --value-depth 32
"""
from __future__ import annotations

import argparse
import time

from axial_deeplab.layers import triton_kernels as TK


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key-depth", type=int, default=16, help="per-head query/key depth (16: 256-wide stage)")
    p.add_argument("--value-depth", type=int, default=32)
    p.add_argument("--query-step", type=int, default=1)
    p.add_argument("--precision", default="tf32", choices=["tf32", "tf32x3"],
                   help="tf32: the default (cuDNN TF32 on); tf32x3: with torch.backends.cudnn.allow_tf32 off")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--kernels", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    args = p.parse_args(argv)
    if not TK.triton_available():
        raise SystemExit("triton is not installed (pip install 'axial-deeplab[triton]')")
    print(f"sm_{args.arch}, dk={args.key_depth}, dv={args.value_depth}, step={args.query_step}, "
          f"dots {args.precision}")
    print("per logit (lane-instructions of the key-block loop): all, shared-memory, barriers, shuffles, "
          "tensor-core, spill loads/stores")
    print(f"{'kernel':9s} {'BLOCK_Q':>7s} {'BLOCK_K':>7s} {'warps':>5s} {'stages':>6s} {'registers':>9s} "
          f"{'spill B':>7s} {'shared KiB':>10s} {'all':>6s} {'smem':>5s} {'bar':>5s} {'shfl':>5s} {'mma':>5s} "
          f"{'local':>5s} {'compile s':>9s}")
    for kernel in args.kernels:
        for block_q, block_k, warps, stages in TK.CONFIGS:
            start = time.perf_counter()
            u = TK.compile_for_gpu(kernel, key_depth=args.key_depth, value_depth=args.value_depth,
                                   block_q=block_q, block_k=block_k, query_step=args.query_step,
                                   num_warps=warps, num_stages=stages, precision=args.precision,
                                   arch=args.arch)
            print(f"{kernel:9s} {block_q:7d} {block_k:7d} {warps:5d} {stages:6d} {u['registers']:9d} "
                  f"{u['spill_bytes']:7d} {u['shared_bytes'] / 1024:10.1f} {u['loop_per_logit']:6.1f} "
                  f"{u['shared_per_logit']:5.1f} {u['barriers_per_logit']:5.1f} {u['shuffles_per_logit']:5.1f} "
                  f"{u['tensor_per_logit']:5.1f} {u['local_per_logit']:5.1f} {time.perf_counter() - start:9.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
