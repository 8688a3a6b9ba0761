"""Threads of the C kernel: built with OpenMP and linked against the runtime torch has loaded, its
shares run on torch's own OpenMP threads (one pool, not a second one fighting torch's spinning
workers for the cores); without OpenMP they run on a Python thread pool. Both give the same
outputs and gradients, and a failed OpenMP build warns and falls back to the pool."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from attention_testing import assert_equal_runs, eval_layer, forward_backward, randomize_batch_norms, reference_eval

from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the C kernel is not built")

OPENMP_RUNTIME = re.compile(r"lib(gomp|omp|iomp5)([-.].*)?\.so(\..*)?$")


def _loaded_openmp_runtimes() -> set:
    with open("/proc/self/maps") as f:
        paths = {line.split(None, 5)[-1].strip() for line in f if line.count(" ") >= 5}
    return {os.path.realpath(p) for p in paths if OPENMP_RUNTIME.match(os.path.basename(p))}


_RUNTIMES_AFTER_LOADING = """
import json, os, re, torch
from axial_deeplab.layers import cpu_kernel
assert cpu_kernel.available() and cpu_kernel._state["openmp"]
with open("/proc/self/maps") as f:
    paths = {line.split(None, 5)[-1].strip() for line in f if line.count(" ") >= 5}
pattern = re.compile(%r)
print(json.dumps(sorted({os.path.realpath(p) for p in paths if pattern.match(os.path.basename(p))})))
"""


@pytest.fixture
def three_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(
    not (os.path.exists("/proc/self/maps") and torch.backends.openmp.is_available()),
    reason="the OpenMP build is tried where torch uses OpenMP and /proc lists the loaded libraries",
)
def test_the_kernel_uses_torchs_openmp_runtime_and_no_second_one():
    assert cpu_kernel._state["openmp"], "the kernel was built without OpenMP (a warning said why)"
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    runtime, _ = cpu_kernel._openmp_runtime()
    if any(os.path.dirname(p) == torch_lib for p in _loaded_openmp_runtimes()):
        assert os.path.dirname(os.path.realpath(runtime)) == torch_lib, runtime
    # in a process with torch and the kernel only (this one may hold other packages' copies)
    code = _RUNTIMES_AFTER_LOADING % OPENMP_RUNTIME.pattern
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(loaded) == 1, loaded


def _layer(axis, seed):
    torch.manual_seed(seed)
    # dk = 6, dv = 8 over 2 heads; a global span, so the similarity-BN moments run in C as well
    layer = PositionSensitiveAxialAttention(6, 16, num_heads=2, key_channels=24, axis=axis)
    randomize_batch_norms(layer)
    return layer


def _train_and_eval(x):
    """A memory-efficient training step (forward, backward) of a height and a width layer, and
    the eval forward of the width layer: outputs and gradients."""
    runs = [
        forward_backward(_layer(axis, seed), "memory_efficient", x)[:3] for seed, axis in enumerate(("height", "width"))
    ]
    layer = eval_layer(6, 16, 2, key_ch=24, axis="width", impl="fast")
    with torch.no_grad():
        runs.append(cpu_kernel.forward_eval(layer, x))
    return runs, reference_eval(layer, x)


def test_openmp_and_python_pool_shares_agree(three_threads, monkeypatch):
    # 2 x 13 sequences of 11 (and 2 x 11 of 13) over three threads: the shares meet inside
    # sequences; both paths split the same way, so they agree to the last bit
    x = torch.randn(2, 6, 11, 13, generator=torch.Generator().manual_seed(1))
    monkeypatch.setitem(cpu_kernel._state, "pools", {})
    first, ref = _train_and_eval(x)
    used_pool = bool(cpu_kernel._state["pools"])
    assert used_pool != cpu_kernel._state["openmp"]  # the OpenMP build starts no Python threads
    monkeypatch.setitem(cpu_kernel._state, "openmp", not cpu_kernel._state["openmp"])
    second, _ = _train_and_eval(x)
    if not used_pool:
        assert cpu_kernel._state["pools"]  # and now the Python pool ran the shares
    for got, want in zip(first[:2], second[:2], strict=True):
        assert_equal_runs(got, want, 0.0, "OpenMP vs Python-pool shares")
    assert torch.equal(first[2], second[2])
    torch.testing.assert_close(first[2], ref, rtol=1e-5, atol=1e-5)


def test_one_thread_and_three_agree(three_threads):
    x = torch.randn(1, 6, 9, 14, generator=torch.Generator().manual_seed(2))
    three, _ = _train_and_eval(x)
    torch.set_num_threads(1)
    one, _ = _train_and_eval(x)
    for got, want in zip(three[:2], one[:2], strict=True):
        assert_equal_runs(got, want, 1e-5, "three threads vs one")
    torch.testing.assert_close(three[2], one[2], rtol=1e-6, atol=1e-6)


# A "compiler" that refuses -fopenmp and passes everything else to the real one.
NO_OPENMP_COMPILER = r"""
import os, sys
if "-fopenmp" in sys.argv:
    sys.stderr.write("cc: error: unsupported option '-fopenmp' (forced for the test)\n")
    sys.exit(1)
os.execv(REAL, [REAL] + sys.argv[1:])
"""


@pytest.mark.skipif(
    not (os.path.exists("/proc/self/maps") and torch.backends.openmp.is_available()),
    reason="the OpenMP build is tried where torch uses OpenMP and /proc lists the loaded libraries",
)
def test_a_failed_openmp_build_warns_once_and_the_shares_run_on_python_threads(monkeypatch, tmp_path, three_threads):
    real = cpu_kernel._compiler()
    if real is None or len(real) != 1 or shutil.which(real[0]) is None:
        pytest.skip("needs a plain compiler command to wrap")
    script = tmp_path / "no_openmp_cc.py"
    script.write_text(f"REAL = {shutil.which(real[0])!r}\n" + NO_OPENMP_COMPILER)
    monkeypatch.setenv("CC", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}")
    monkeypatch.setenv("AXIAL_DEEPLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernel, "ENABLED", True)
    monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "tried": False, "pools": {}, "openmp": False})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cpu_kernel.available()
        assert cpu_kernel.available()
    messages = [str(w.message) for w in record if "C kernel" in str(w.message)]
    assert len(messages) == 1, messages
    assert "built without OpenMP" in messages[0] and "unsupported option '-fopenmp'" in messages[0]
    assert not cpu_kernel._state["openmp"]
    layer = eval_layer(6, 16, 2, key_ch=24, axis="height", impl="fast")
    x = torch.randn(2, 6, 12, 11, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = cpu_kernel.forward_eval(layer, x)
    assert y is not None and cpu_kernel._state["pools"]  # it ran, on the Python pool
    torch.testing.assert_close(y, reference_eval(layer, x), rtol=1e-5, atol=1e-5)


def test_shares_write_no_common_pair_of_cache_lines(three_threads, monkeypatch):
    # Two cores writing one 64-byte line, or the two lines of an aligned 128-byte pair (a core's
    # adjacent-line prefetcher fetches both), pass it between their caches on every write: the
    # backward's per-share table gradients laid end to end cost it a third of its time on two
    # threads. Every share's scratch and accumulator block starts a whole pair after the previous
    # one's end.
    for floats in (1, 31, 32, 33, 1000, 4097):
        stride = cpu_kernel._scratch_stride(floats)
        assert stride % 32 == 0 and stride >= floats + 32
    lib = cpu_kernel._library()
    calls = []

    class Recording:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            if name != "axial_attention_backward_shares":
                return fn

            def recorded(args, total, workers, scratch, scratch_stride, grads, grads_stride):
                calls.append((workers, scratch, scratch_stride, grads, grads_stride, args._obj))
                return fn(args, total, workers, scratch, scratch_stride, grads, grads_stride)

            return recorded

    if not cpu_kernel._state["openmp"]:
        pytest.skip("the shares' blocks are laid out by the OpenMP entry point")
    monkeypatch.setattr(cpu_kernel, "_library", lambda: Recording())
    x = torch.randn(2, 6, 11, 13, generator=torch.Generator().manual_seed(3))
    forward_backward(_layer("width", 0), "memory_efficient", x)
    assert calls
    for workers, scratch, scratch_stride, grads, grads_stride, args in calls:
        assert workers == 3
        used = lib.axial_attention_backward_scratch_floats(cpu_kernel.ctypes.byref(args))
        for base, stride, size in (
            (scratch, scratch_stride, used),
            (grads, grads_stride, (2 * args.dk + args.dv) * args.Jp + 3 * args.heads),
        ):
            assert base % 64 == 0 and (stride * 4) % 128 == 0 and stride * 4 >= size * 4 + 128


def test_deep_heads_moments_split_into_shares_that_agree_with_one(three_threads, monkeypatch):
    # dk 16 (Axial-ResNet's third stage): rows of 2 dk^2 products each, so a few sequences already
    # make a share; every Gram block and gradient row is one share's alone, so the results agree
    # to the last bit with one share
    nseq, length, heads, dk, dv = 56, 14, 8, 16, 32
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(nseq * length, heads * (2 * dk + dv), generator=gen)
    ws = torch.randn(nseq, heads, 2, dk, dk, generator=gen)
    cs = torch.randn(nseq, heads, 2 * dk, generator=gen)
    tp = torch.randn(length, 2, dk, dk, generator=gen)
    bp = torch.randn(heads, 2 * dk, generator=gen)
    cp = torch.randn(heads, length, 2 * dk, generator=gen)
    workers = []
    workers_of = cpu_kernel._workers
    monkeypatch.setattr(
        cpu_kernel, "_workers", lambda total, least: workers.append(workers_of(total, least)) or workers[-1]
    )

    def run():
        grams = cpu_kernel.row_moments(y, nseq, length, heads, dk, True, True)
        return [t for pair in grams for t in pair] + [
            cpu_kernel.row_moments_backward(y, nseq, length, heads, dk, ws, cs, tp, bp, cp)
        ]

    three = run()
    assert workers == [3, 3, 3]  # by sequence, by position, the backward
    torch.set_num_threads(1)
    one = run()
    for a, b in zip(three, one, strict=True):
        assert torch.equal(a, b)
