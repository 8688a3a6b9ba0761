"""Registers, spills, shared memory and the key-block loop's machine instructions per
logit of the Triton kernels, compiled for a GPU architecture on any machine (no GPU needed:
Triton's bundled ptxas and cuobjdump), for every tile configuration the autotuner may pick.
Spilled registers and instructions issued per (query, key) pair are the hints available
without a GPU (an H100 issues about 30e12 lane-instructions a second, so a pair of layers at
8x256x65x129, about 1e8 logits, costs at least ~3.4 us per instruction per logit); times need
one::

    .venv/bin/python benchmarks/triton_compile_report.py --key-depth 16 --value-depth 32

Offline tooling, kept out of the runtime package; ``tests/test_triton_compile.py`` runs
:func:`compile_for_gpu` too.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time

from axial_deeplab.layers import triton_kernels as TK
from axial_deeplab.layers.triton_launch import CONFIGS

_FORWARD_POINTERS = ("qkv", "rqe", "rke", "rve", "scale", "sv", "sve", "lse")
_BACKWARD_POINTERS = (
    "qkv",
    "rqe",
    "rke",
    "rve",
    "scale",
    "nscale",
    "lse",
    "delta",
    "gsv",
    "gsve",
    "gqkv",
    "grq_part",
    "grk_part",
    "grv_part",
    "gscale_part",
)


def compile_for_gpu(
    kernel: str,
    *,
    key_depth: int = 16,
    value_depth: int = 32,
    block_q: int = 32,
    block_k: int = 32,
    query_step: int = 1,
    num_warps: int = 4,
    num_stages: int = 1,
    precision: str = "tf32",
    terms=(True, True, True, True),
    arch: int = 90,
) -> dict:
    """Compile ``kernel`` ("forward" or "backward") for an NVIDIA GPU of compute capability
    ``arch`` (90: Hopper) on any machine, with Triton's bundled ptxas, and read the machine
    code's resource use: ``{"registers", "spill_bytes" (the stack frame), "shared_bytes"}``.
    Catches compile failures and register spills before the kernels run on a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton = TK.triton
    fn, pointers = (
        (TK.axial_forward_kernel, _FORWARD_POINTERS)
        if kernel == "forward"
        else (TK.axial_backward_kernel, _BACKWARD_POINTERS)
    )
    constexprs = {fn.arg_names[i] for i in fn.constexprs}
    ints = [n for n in fn.arg_names if n not in pointers and n not in constexprs]
    const = dict(
        TK.kernel_constants(key_depth, value_depth, terms, precision),
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        JB=TK.offset_window(block_q, block_k, query_step),
    )
    if kernel != "forward":
        const["ATOMIC_KV"] = True
    signature = {n: "*fp32" for n in pointers}
    signature.update({n: "i32" for n in ints})
    signature.update({n: "constexpr" for n in const})
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=const),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True),
    )
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(
        item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split() if ":" in item
    )
    result = {
        "registers": int(fields["REG"]),
        "spill_bytes": int(fields["STACK"]),
        "shared_bytes": int(compiled.metadata.shared),
    }
    result.update(_key_loop_counts(sass, num_warps * 32 / (block_q * block_k)))
    return result


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)[^;]*?(?:0x([0-9a-f]+))?\s*;")
_SASS_GROUPS = {
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "barriers": ("BAR",),
    "shuffles": ("SHFL",),
    "tensor": ("HMMA", "HGMMA"),
    "local": ("LDL", "STL"),
}


def _key_loop_counts(sass: str, lanes_per_logit: float) -> dict:
    """Machine instructions of the key-block loop (the longest backward branch of the SASS),
    per logit of a tile: all of them, and those touching shared memory, barriers, shuffles,
    tensor-core products and spilled registers. Counts lanes (a warp instruction is 32), the
    issue budget a GPU must spend on each of the L x L pairs."""
    body = []
    lines = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS_LINE.search, sass.splitlines()) if m]
    loops = [(int(target, 16), at) for at, op, target in lines if op == "BRA" and target and int(target, 16) < at]
    if loops:
        start, end = max(loops, key=lambda t: t[1] - t[0])
        body = [op for at, op, _ in lines if start <= at <= end]
    counts = {"loop_per_logit": len(body) * lanes_per_logit}
    for name, ops in _SASS_GROUPS.items():
        counts[f"{name}_per_logit"] = sum(op in ops for op in body) * lanes_per_logit
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key-depth", type=int, default=16, help="per-head query/key depth (16: 256-wide stage)")
    p.add_argument("--value-depth", type=int, default=32)
    p.add_argument("--query-step", type=int, default=1)
    p.add_argument(
        "--precision",
        default="tf32",
        choices=["tf32", "tf32x3"],
        help="tf32: the default (cuDNN TF32 on); tf32x3: with torch.backends.cudnn.allow_tf32 off",
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--kernels", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    args = p.parse_args(argv)
    if not TK.triton_available():
        raise SystemExit("triton is not installed (pip install 'axial-deeplab[triton]')")
    print(f"sm_{args.arch}, dk={args.key_depth}, dv={args.value_depth}, step={args.query_step}, dots {args.precision}")
    print(
        "per logit (lane-instructions of the key-block loop): all, shared-memory, barriers, shuffles, "
        "tensor-core, spill loads/stores"
    )
    print(
        f"{'kernel':9s} {'BLOCK_Q':>7s} {'BLOCK_K':>7s} {'warps':>5s} {'stages':>6s} {'registers':>9s} "
        f"{'spill B':>7s} {'shared KiB':>10s} {'all':>6s} {'smem':>5s} {'bar':>5s} {'shfl':>5s} {'mma':>5s} "
        f"{'local':>5s} {'compile s':>9s}"
    )
    for kernel in args.kernels:
        for block_q, block_k, warps, stages in CONFIGS:
            start = time.perf_counter()
            u = compile_for_gpu(
                kernel,
                key_depth=args.key_depth,
                value_depth=args.value_depth,
                block_q=block_q,
                block_k=block_k,
                query_step=args.query_step,
                num_warps=warps,
                num_stages=stages,
                precision=args.precision,
                arch=args.arch,
            )
            print(
                f"{kernel:9s} {block_q:7d} {block_k:7d} {warps:5d} {stages:6d} {u['registers']:9d} "
                f"{u['spill_bytes']:7d} {u['shared_bytes'] / 1024:10.1f} {u['loop_per_logit']:6.1f} "
                f"{u['shared_per_logit']:5.1f} {u['barriers_per_logit']:5.1f} {u['shuffles_per_logit']:5.1f} "
                f"{u['tensor_per_logit']:5.1f} {u['local_per_logit']:5.1f} {time.perf_counter() - start:9.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
