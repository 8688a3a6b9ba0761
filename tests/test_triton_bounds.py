"""Every tile configuration the GPU autotuner may pick (:data:`triton_launch.CONFIGS`) keeps the
Triton kernels' loads and stores inside their buffers, forward and backward, at awkward shapes:
a length that is no multiple of any tile with tables clipped below it (L = 33, reach 20), a
local span that skips key blocks, a query step of 2 and a sequence shorter than one tile.

On a GPU a stray access is "illegal memory access" at best, a silent wrong value at worst; the
interpreter only reads the wrong memory. So every operand and result of a launch is placed in
the middle of a larger allocation whose margins hold a sentinel: a store or atomic add outside
the buffer changes a margin, and a load outside it that the kernel uses pulls the sentinel (a
value far from the data) into the results, which must still equal the PyTorch paths.

The kernels run through Triton's interpreter, switched on before triton is imported: the checks
run in one fresh subprocess and report per shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import attention_testing
import pytest
import torch

pytest.importorskip("triton", reason="the optional package triton is not installed (pip install triton)")

from test_triton_kernels import random_core_inputs  # noqa: E402

from axial_deeplab.layers import chunked as CH  # noqa: E402
from axial_deeplab.layers import recompute as RC  # noqa: E402
from axial_deeplab.layers import triton_launch as TK  # noqa: E402

SENTINEL = -7777.5  # finite, so an atomic add into a margin changes it; far from any data value
SHAPES = {
    # id: (layer kwargs, L, query step, dk, dv)
    "global-L33-reach20": (dict(max_relative_distance=20), 33, 1, 2, 3),
    "local-L40-span7": (dict(span=7), 40, 1, 2, 3),
    "local-L33-span9-step2": (dict(span=9), 33, 2, 3, 2),
    "global-L11-reach4": (dict(max_relative_distance=4), 11, 1, 2, 3),
}


def _guarded(launch, escapes):
    """``launch`` (:func:`triton_launch._launch`) with every tensor operand copied into the
    middle of a sentinel-filled allocation; after the run the results are copied back and each
    changed margin is recorded in ``escapes`` (argument position, elements changed)."""

    def run(backward, args, *rest):
        moved, copies = [], []
        for position, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                moved.append(a)
                continue
            assert a.is_contiguous(), f"operand {position} is not contiguous"
            n = a.numel()
            margin = max(4096, 2 * n)
            buf = torch.full((n + 2 * margin,), SENTINEL, dtype=a.dtype)
            inner = buf[margin : margin + n].view(a.shape)
            inner.copy_(a)
            moved.append(inner)
            copies.append((position, a, buf, margin, n))
        out = launch(backward, tuple(moved), *rest)
        for position, a, buf, margin, n in copies:
            changed = int((buf[:margin] != SENTINEL).sum() + (buf[margin + n :] != SENTINEL).sum())
            if changed:
                escapes.append(("backward" if backward else "forward", position, changed))
            a.copy_(buf[margin : margin + n].view(a.shape))
        return out

    return run


def _effective_configs(length, step):
    """The distinct tiles CONFIGS give at this length (the launch caps tiles at the sequence; the
    interpreter ignores warps and stages)."""
    seen = {}
    for config in TK.CONFIGS:
        seen.setdefault(TK.block_sizes(length, step, config[:2])[:2], config)
    return list(seen.values())


def _check_shape(kwargs, length, step, dk, dv):
    from attention_testing import close_scaled

    layer, qkv, scales, g_sv, g_sve = random_core_inputs(kwargs, length, step, dk, dv, heads=2, sequences=1)
    with torch.no_grad():
        want_fwd = CH.attend(layer, qkv, scales, step, return_lse=True)
        sv0, sve0, lse0 = want_fwd
        sve_saved = sve0 if sve0 is not None else sv0.new_zeros(0)
        want_bwd = RC.recompute_backward_torch(layer, step, qkv, scales, sv0, sve_saved, lse0, g_sv, g_sve)
    launch, escapes = TK._launch, []
    TK._launch = _guarded(launch, escapes)
    try:
        configs = _effective_configs(length, step)
        for config in configs:
            what = f"{kwargs} L={length} step={step} tiles {config}"
            with torch.no_grad():
                got_fwd = TK.attend_triton(layer, qkv, scales, step, return_lse=True, blocks=config)
                for name, a, b in zip(("sv", "sve", "lse"), got_fwd, want_fwd):
                    if b is not None:
                        close_scaled(a, b, 1e-5, f"{what}: forward {name}")
                sv, sve, lse = got_fwd
                sve = sve if sve is not None else sv.new_zeros(0)
                got_bwd = TK.attention_backward_triton(layer, step, qkv, scales, sv, sve, lse, g_sv, g_sve, config)
            assert not escapes, f"{what}: stores outside a buffer (kernel, operand position, elements): {escapes}"
            for name, a, b in zip(("qkv", "scales", "query_table", "key_table", "value_table"), got_bwd, want_bwd):
                if b is not None:
                    close_scaled(a, b, 1e-5, f"{what}: gradient of {name}")
    finally:
        TK._launch = launch
    return len(configs)


def _interpreter_main():
    import traceback

    results = {}
    for name, shape in SHAPES.items():
        try:
            results[name] = f"ok {_check_shape(*shape)}"
        except Exception:  # reported per shape by the parent
            results[name] = traceback.format_exc()[-3000:]
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    return attention_testing.interpreter_results("test_triton_bounds")


def test_every_tile_configuration_is_checked():
    """At L = 33 the configurations give six distinct tiles, up to 64 x 64 (more query rows than
    the sequence has): all of them run."""
    tiles = {TK.block_sizes(33, 1, c[:2])[:2] for c in _effective_configs(33, 1)}
    assert (64, 64) in tiles and (16, 16) in tiles and len(tiles) == len({tuple(c[:2]) for c in TK.CONFIGS})


@pytest.mark.parametrize("shape", list(SHAPES))
def test_triton_stays_inside_its_buffers(interpreter_results, shape):
    result = interpreter_results.get(shape, "check did not run")
    assert result.startswith("ok "), result
    assert int(result.split()[1]) >= 1


# --------------------------------------------------------------------------- GPU
_GPU_CONFIG_RUN = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
torch.backends.cudnn.allow_tf32 = {tf32!r}
torch.backends.cuda.matmul.allow_tf32 = False
from axial_deeplab.layers import triton_launch as TK
from test_triton_kernels import compare_backward
TK.BLOCK_SIZES = {config!r}
compare_backward(dict(max_relative_distance=20), 33, 1, 8, 8, tol={tol!r}, device="cuda", heads=4, sequences=17)
compare_backward(dict(max_relative_distance=40), 129, 1, 16, 32, tol={tol!r}, device="cuda", sequences=8)
compare_backward(dict(span=33), 65, 2, 16, 32, tol={tol!r}, device="cuda", sequences=8)
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter checks run on CPU)")
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "3xtf32"])
@pytest.mark.parametrize("config", TK.CONFIGS, ids=lambda c: "q{}-k{}-w{}-s{}".format(*c))
def test_every_tile_configuration_runs_on_gpu(config, tf32):
    """Each configuration the autotuner may time, forward and backward, at the shapes of the GPU
    comparisons, in a process of its own (an illegal memory access ends the CUDA context) with
    synchronous launches, so a failure names its configuration."""
    code = _GPU_CONFIG_RUN.format(
        tests=os.path.dirname(os.path.abspath(__file__)), tf32=tf32, config=tuple(config), tol=3e-2 if tf32 else 1e-4
    )
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
