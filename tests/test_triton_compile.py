"""The Triton kernels compile for a Hopper GPU (sm_90) on this GPU-less machine, with
Triton's bundled ptxas: every tile configuration the autotuner may pick, the depths of
the model's stages, a query step, terms switched off and both dot precisions. A kernel
that does not compile, or that needs more registers or shared memory than an SM has,
would otherwise first fail on a GPU. (Speed needs the GPU; the registers and
spills printed by benchmarks/triton_compile_report.py are the hint available here.)"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("triton", reason="the optional package triton is not installed (pip install triton)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from triton_compile_report import compile_for_gpu  # noqa: E402  (offline tooling, not in the package)

from axial_deeplab.layers.triton_launch import CONFIGS  # noqa: E402

HOPPER_MAX_SHARED = 227 * 1024  # dynamic shared memory one block may use on sm_90
MAX_REGISTERS = 255


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "triton-cache"))


def check_usage(usage, what):
    assert 0 < usage["registers"] <= MAX_REGISTERS, (what, usage)
    assert usage["shared_bytes"] <= HOPPER_MAX_SHARED, (what, usage)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "q{}-k{}-w{}-s{}".format(*c))
def test_forward_compiles_for_hopper_in_every_tuned_config(config):
    block_q, block_k, warps, stages = config
    usage = compile_for_gpu(
        "forward", block_q=block_q, block_k=block_k, num_warps=warps, num_stages=stages, precision="tf32"
    )
    check_usage(usage, config)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[5], CONFIGS[-1]], ids=lambda c: "q{}-k{}-w{}-s{}".format(*c))
def test_backward_compiles_for_hopper(config):
    block_q, block_k, warps, stages = config
    usage = compile_for_gpu(
        "backward", block_q=block_q, block_k=block_k, num_warps=warps, num_stages=stages, precision="tf32"
    )
    check_usage(usage, config)


@pytest.mark.parametrize("kernel", ["forward", "backward"])
@pytest.mark.parametrize(
    "variant",
    [
        dict(key_depth=4, value_depth=8, query_step=2, precision="tf32x3"),  # first stage of -S, stride 2
        dict(key_depth=3, value_depth=5, terms=(False, True, False, True)),  # odd depths, terms off
        dict(key_depth=16, value_depth=32, terms=(True, False, False, False)),  # plain attention
    ],
    ids=["stage1-step2-tf32x3", "odd-depths-terms-off", "qk-only"],
)
def test_kernel_variants_compile_for_hopper(kernel, variant):
    check_usage(compile_for_gpu(kernel, **variant), variant)


def test_compile_report_reads_the_machine_code():
    """More query rows per tile need more registers or shared memory: the report reads the
    compiled code, not a constant."""
    small = compile_for_gpu("forward", block_q=16, block_k=16, num_warps=4)
    large = compile_for_gpu("forward", block_q=64, block_k=64, num_warps=4)
    assert (large["shared_bytes"], large["registers"] + large["spill_bytes"]) != (
        small["shared_bytes"],
        small["registers"] + small["spill_bytes"],
    )
    assert large["shared_bytes"] > small["shared_bytes"]
    # the key-block loop was found, with its tensor-core products and the gathers' shared-memory traffic
    for usage in (small, large):
        assert usage["loop_per_logit"] > usage["tensor_per_logit"] > 0, usage
        assert usage["shared_per_logit"] > 0, usage
    qk_only = compile_for_gpu("forward", block_q=16, block_k=16, num_warps=4, terms=(True, False, False, False))
    assert qk_only["loop_per_logit"] < small["loop_per_logit"], (qk_only, small)  # no relative terms: less work
