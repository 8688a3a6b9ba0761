"""The Triton kernels compile for a Hopper GPU (sm_90) on this GPU-less machine, with
Triton's bundled ptxas: every tile configuration the autotuner may pick, the depths of
the model's stages, a query step, terms switched off and both dot precisions. A kernel
that does not compile, or that needs more registers or shared memory than an SM has,
would otherwise first fail in a GPU session. (Speed needs the GPU; the registers and
spills printed by benchmarks/triton_compile_report.py are the hint available here.)"""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the optional package triton is not installed (pip install triton)")

from axial_deeplab.layers import triton_kernels as TK  # noqa: E402

HOPPER_MAX_SHARED = 227 * 1024  # dynamic shared memory one block may use on sm_90
MAX_REGISTERS = 255


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "triton-cache"))


def check_usage(usage, what):
    assert 0 < usage["registers"] <= MAX_REGISTERS, (what, usage)
    assert usage["shared_bytes"] <= HOPPER_MAX_SHARED, (what, usage)


@pytest.mark.parametrize("config", TK.CONFIGS, ids=lambda c: "q{}-k{}-w{}-s{}".format(*c))
def test_forward_compiles_for_hopper_in_every_tuned_config(config):
    block_q, block_k, warps, stages = config
    usage = TK.compile_for_gpu("forward", block_q=block_q, block_k=block_k, num_warps=warps,
                               num_stages=stages, precision="tf32")
    check_usage(usage, config)


@pytest.mark.parametrize("config", [TK.CONFIGS[0], TK.CONFIGS[5], TK.CONFIGS[-1]],
                         ids=lambda c: "q{}-k{}-w{}-s{}".format(*c))
def test_backward_compiles_for_hopper(config):
    block_q, block_k, warps, stages = config
    usage = TK.compile_for_gpu("backward", block_q=block_q, block_k=block_k, num_warps=warps,
                               num_stages=stages, precision="tf32")
    check_usage(usage, config)


@pytest.mark.parametrize("kernel", ["forward", "backward"])
@pytest.mark.parametrize("variant", [
    dict(key_depth=4, value_depth=8, query_step=2, precision="tf32x3"),  # first stage of -S, stride 2
    dict(key_depth=3, value_depth=5, terms=(False, True, False, True)),  # odd depths, terms off
    dict(key_depth=16, value_depth=32, terms=(True, False, False, False)),  # plain attention
], ids=["stage1-step2-tf32x3", "odd-depths-terms-off", "qk-only"])
def test_kernel_variants_compile_for_hopper(kernel, variant):
    check_usage(TK.compile_for_gpu(kernel, **variant), variant)


def test_compile_report_reads_the_machine_code():
    """More query rows per tile need more registers or shared memory: the report reads the
    compiled code, not a constant."""
    small = TK.compile_for_gpu("forward", block_q=16, block_k=16, num_warps=4)
    large = TK.compile_for_gpu("forward", block_q=64, block_k=64, num_warps=4)
    assert (large["shared_bytes"], large["registers"] + large["spill_bytes"]) != \
        (small["shared_bytes"], small["registers"] + small["spill_bytes"])
    assert large["shared_bytes"] > small["shared_bytes"]
    # the key-block loop was found, with its tensor-core products and the gathers' shared-memory traffic
    for usage in (small, large):
        assert usage["loop_per_logit"] > usage["tensor_per_logit"] > 0, usage
        assert usage["shared_per_logit"] > 0, usage
    qk_only = TK.compile_for_gpu("forward", block_q=16, block_k=16, num_warps=4, terms=(True, False, False, False))
    assert qk_only["loop_per_logit"] < small["loop_per_logit"], (qk_only, small)  # no relative terms: less work
