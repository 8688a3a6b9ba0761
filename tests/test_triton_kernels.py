"""The Triton kernels of ``impl="triton"`` (fused forward and fused backward) equal the
reference implementation: outputs, input gradient, every parameter gradient (the three
tables and the BN weights included) and the BN running statistics, in train and eval
mode, for global and local spans, a query stride, each term switched off, lengths that
are not powers of two, and several query blocks per sequence (the atomic k/v path).
The backward kernel is also held directly to the chunked PyTorch backward
(``recompute.recompute_backward_torch``) on random inputs.

Without a GPU the kernels run through Triton's interpreter, which must be switched on
before triton is imported: every interpreter check runs in one fresh subprocess (tiny
shapes) and reports per check. The CUDA test runs the same comparison on a GPU.
"""

from __future__ import annotations

import json

import attention_testing
import pytest
import torch

pytest.importorskip("triton", reason="the optional package triton is not installed (pip install triton)")

from attention_testing import assert_equal_runs, close_scaled, forward_backward, randomize_batch_norms

from axial_deeplab.layers import PositionSensitiveAxialAttention  # noqa: E402
from axial_deeplab.layers import memory_efficient as ME  # noqa: E402
from axial_deeplab.layers import recompute as RC  # noqa: E402
from axial_deeplab.layers import triton_launch as TK  # noqa: E402
from axial_deeplab.layers import triton_self_check as SC  # noqa: E402


# --------------------------------------------------------------------------- helpers
def make_layer(kwargs, channels=6, out_channels=8, heads=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    if kwargs.get("span") is None:
        kwargs.setdefault("max_relative_distance", 3)
    layer = PositionSensitiveAxialAttention(channels, out_channels, num_heads=heads, **kwargs).to(dtype)
    randomize_batch_norms(layer)
    return layer


def run_layer(layer, impl, x, mode="train"):
    """(output, gradients, buffers) of one forward + backward; mode "train", "eval" or "frozen-output-bn"."""
    return forward_backward(layer, impl, x, mode)[:3]


def compare_layer(kwargs, hw, modes, tol=1e-5, device="cpu", **layer_kw):
    layer = make_layer(kwargs, **layer_kw).to(device)
    x = torch.randn(2, layer.in_channels, *hw, generator=torch.Generator().manual_seed(1)).to(device)
    for mode in modes:
        assert_equal_runs(
            run_layer(layer, "triton", x, mode),
            run_layer(layer, "reference", x, mode),
            tol,
            f"triton {kwargs} {hw} {mode}",
        )


def random_core_inputs(kwargs, length, step, dk, dv, heads=2, sequences=2, device="cpu", seed=3):
    """A layer (for its tables and switches) and random qkv / scales / incoming gradients."""
    layer = make_layer(
        dict(kwargs, key_channels=heads * dk), channels=4, out_channels=heads * dv, heads=heads, seed=seed
    ).to(device)
    gen = torch.Generator().manual_seed(seed)
    nh = sequences * heads
    qkv = (0.7 * torch.randn(nh, 2 * dk + dv, length, generator=gen)).to(device)
    scales = torch.empty(3, heads).uniform_(0.3, 1.2, generator=gen).to(device)
    lq = len(range(0, length, step))
    g_sv = torch.randn(nh, dv, lq, generator=gen).to(device)
    g_sve = torch.randn(nh, dv, lq, generator=gen).to(device) if layer.use_value_rpe else None
    return layer, qkv, scales, g_sv, g_sve


def compare_backward(kwargs, length, step, dk, dv, tol=1e-5, device="cpu", **kw):
    """attention_backward_triton against the chunked PyTorch backward on the same forward."""
    layer, qkv, scales, g_sv, g_sve = random_core_inputs(kwargs, length, step, dk, dv, device=device, **kw)
    with torch.no_grad():
        sv, sve, lse = TK.attend_triton(layer, qkv, scales, step, return_lse=True)
        sve_saved = sve if sve is not None else sv.new_zeros(0)
        got = TK.attention_backward_triton(layer, step, qkv, scales, sv, sve_saved, lse, g_sv, g_sve)
        want = RC.recompute_backward_torch(layer, step, qkv, scales, sv, sve_saved, lse, g_sv, g_sve)
    names = ["qkv", "scales", "query_table", "key_table", "value_table"]
    assert sum(t is not None for t in got) == sum(t is not None for t in want)
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, f"{name}: gradient of a switched-off table"
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        close_scaled(a, b, tol, f"backward {kwargs} L={length} step={step}: {name}")
    # The backward must see real gradients (a nonzero table gradient, q, k and v).
    assert float(got[0].abs().max()) > 0


# --------------------------------------------------------------------------- interpreter checks
MODES = ("train", "eval")
LAYER_CHECKS = {
    # id: (layer kwargs, (H, W), modes, BLOCK_SIZES (query rows, keys) of a tile, None: the
    # default). Global tables reach D = 3 unless given.
    "global-L7-above-reach": (dict(axis="height"), (7, 2), MODES, None),
    "local-L9-above-span": (dict(axis="width", span=5), (2, 9), MODES, None),
    "global-L3-below-reach": (dict(axis="width"), (2, 3), MODES, None),
    "global-stride2-subsample": (dict(axis="height", stride=2), (7, 2), ("train",), None),
    "local-stride2-query-step": (dict(axis="width", span=5, stride=2), (2, 10), ("frozen-output-bn",), None),
    "global-stride2-query-step": (dict(axis="height", stride=2), (7, 1), ("frozen-output-bn",), None),
    "global-no-qk": (dict(axis="height", use_qk=False), (6, 2), MODES, None),
    "local-no-query_rpe": (dict(axis="width", span=3, use_query_rpe=False), (2, 7), MODES, None),
    "global-no-key_rpe": (dict(axis="width", use_key_rpe=False), (2, 6), MODES, None),
    "local-no-value_rpe": (dict(axis="height", span=3, use_value_rpe=False), (7, 2), MODES, None),
    # several query and key blocks (atomic k/v path); a local span skips key blocks
    "global-L20-blocks": (dict(axis="width", max_relative_distance=12), (2, 20), ("train",), (16, 16)),
    "local-L40-blocks": (dict(axis="width", span=5), (1, 40), ("train",), (16, 16)),
    "local-stride2-blocks": (dict(axis="width", span=5, stride=2), (1, 40), ("frozen-output-bn",), (16, 16)),
    "global-L40-default-blocks": (dict(axis="height", max_relative_distance=50), (40, 1), MODES, None),
}
BACKWARD_CHECKS = {
    # id: (kwargs, L, query step, dk, dv, BLOCK_SIZES)
    "backward-global-clipped": (dict(max_relative_distance=4), 11, 1, 3, 5, None),
    "backward-local": (dict(span=5), 11, 1, 3, 5, None),
    "backward-global-step2": (dict(max_relative_distance=4), 11, 2, 2, 3, None),
    "backward-local-step3-blocks": (dict(span=5), 50, 3, 2, 3, (16, 16)),
    "backward-global-blocks": (dict(max_relative_distance=20), 40, 1, 2, 2, (16, 16)),
    "backward-global-deep-blocks": (dict(max_relative_distance=9), 35, 1, 17, 20, (16, 32)),
    "backward-no-qk-no-rv": (dict(span=7, use_qk=False, use_value_rpe=False), 10, 1, 2, 3, None),
    "backward-only-qk-depth1": (dict(use_query_rpe=False, use_key_rpe=False, use_value_rpe=False), 9, 1, 1, 1, None),
}


def _interpreter_main():
    """Runs in the subprocess (TRITON_INTERPRET=1): every check, one JSON line of results.
    The PyTorch backward of the memory-efficient function is made to fail, so a layer check
    passes only if the Triton backward ran."""
    import traceback

    calls = {"n": 0}
    triton_backward = TK.attention_backward_triton

    def counting_backward(*args, **kwargs):
        calls["n"] += 1
        return triton_backward(*args, **kwargs)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the triton path fell back to the PyTorch backward")

    results = {}
    for name, (kwargs, hw, modes, block_q) in LAYER_CHECKS.items():
        TK.BLOCK_SIZES = block_q
        TK.attention_backward_triton, ME.recompute_backward = counting_backward, no_fallback
        calls["n"] = 0
        try:
            compare_layer(kwargs, hw, modes)
            assert calls["n"] == len(modes), f"triton backward ran {calls['n']} times for {len(modes)} backward passes"
            results[name] = "ok"
        except Exception:  # reported per check by the parent
            results[name] = traceback.format_exc()[-3000:]
        finally:
            TK.attention_backward_triton = triton_backward
    for name, (kwargs, length, step, dk, dv, block_q) in BACKWARD_CHECKS.items():
        TK.BLOCK_SIZES = block_q
        try:
            compare_backward(kwargs, length, step, dk, dv)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()[-3000:]
    results["autotuned-launch"] = _check_autotuned_launch(traceback)
    for name, check in SELF_CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()[-3000:]
    print("RESULTS " + json.dumps(results))


def _check_autotuned_launch(traceback):
    """The GPU's launch path (triton.autotune over CONFIGS, tiles from the chosen config,
    the pruning of tiles larger than the sequence) with one config left after pruning, so
    the interpreter needs no timing; the table of chosen configs records it."""
    saved = TK._autotuning, TK.CONFIGS, TK.BLOCK_SIZES
    TK._autotuning = lambda device: True
    TK.CONFIGS = [(16, 16, 4, 1), (64, 64, 8, 1), (32, 64, 4, 1)]  # L = 7 keeps the first only
    TK.BLOCK_SIZES = None
    TK.reset_autotuning()
    try:
        compare_layer(dict(axis="height"), (7, 2), MODES)
        chosen = TK.tuned_configs()
        assert set(chosen) == {"forward", "backward"}, chosen
        assert all("BLOCK_Q: 16, BLOCK_K: 16" in c for k in chosen.values() for c in k.values()), chosen
        return "ok"
    except Exception:
        return traceback.format_exc()[-3000:]
    finally:
        TK._autotuning, TK.CONFIGS, TK.BLOCK_SIZES = saved
        TK.reset_autotuning()


def _perturbed(fn, which):
    """``fn`` with one value of its result ``which`` (an index into the returned tuple) moved."""

    def wrong(*args, **kwargs):
        out = list(fn(*args, **kwargs))
        out[which] = out[which].clone()
        out[which].view(-1)[3] += 0.5
        return tuple(out)

    return wrong


def _check_self_check_passes():
    TK.BLOCK_SIZES = None
    assert SC.self_check(torch.device("cpu")) is None
    assert TK.BLOCK_SIZES is None, "the self-check passes its tiles, it does not set them"


def _check_self_check_catches(target, which, expect):
    """A planted error in the forward's output or the backward's gradients fails the check,
    and the reason names what differed."""
    saved = getattr(TK, target)
    setattr(TK, target, _perturbed(saved, which))
    try:
        reason = SC.self_check(torch.device("cpu"))
    finally:
        setattr(TK, target, saved)
    assert reason is not None and expect in reason, reason


def _check_untrusted_device_falls_back():
    """impl="triton" on a device whose self-check fails warns once and gives the reference's
    results (the PyTorch path ran); on a device that passes, the kernels run."""
    import warnings

    saved = SC.SELF_CHECK_DEVICE_TYPES, TK.attend_triton, dict(SC._TRUST), SC.self_check
    calls = {"n": 0}
    checks = []

    def failing_check(device):  # what self_check returns for a wrong kernel (tested above)
        checks.append(device)
        return "planted failure"

    def counting(*args, **kwargs):
        calls["n"] += 1
        return saved[1](*args, **kwargs)

    try:
        SC.SELF_CHECK_DEVICE_TYPES = ("cpu",)
        layer = make_layer(dict(axis="width", span=5))
        x = torch.randn(2, layer.in_channels, 2, 9, generator=torch.Generator().manual_seed(2))
        SC._TRUST.clear()
        TK.attend_triton, SC.self_check = _perturbed(counting, 0), failing_check
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = run_layer(layer, "triton", x, "train")
            run_layer(layer, "triton", x, "train")
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(checks) == 1, "the self-check must run once per device"
        assert len(messages) == 1 and "planted failure" in messages[0], messages
        assert calls["n"] == 0, "the untrusted kernels ran after the failed check"
        assert_equal_runs(got, run_layer(layer, "reference", x, "train"), 1e-5, "fallback")
        SC._TRUST.clear()
        TK.attend_triton, SC.self_check = counting, lambda device: None
        got = run_layer(layer, "triton", x, "train")
        assert calls["n"] > 0, "the kernels did not run on a device that passed"
        assert_equal_runs(got, run_layer(layer, "reference", x, "train"), 1e-5, "trusted")
    finally:
        SC.SELF_CHECK_DEVICE_TYPES, TK.attend_triton = saved[:2]
        SC.self_check = saved[3]
        SC._TRUST.clear()
        SC._TRUST.update(saved[2])


def _check_self_check_outside_compiled_graph():
    """torch.compile(fullgraph=True, dynamic=True) of code that asks whether the kernels are
    trusted: the check (which forks the RNG and runs its own autograd, nothing dynamo can trace)
    runs once, eagerly, outside the graph, and the graph is built for its verdict; a verdict
    already reached is used without checking again."""
    saved = SC.SELF_CHECK_DEVICE_TYPES, dict(SC._TRUST)
    key = ("cpu", TK.dot_precision())

    def branch(x):
        return x + 1 if SC.trusted(x.device) else x - 1

    try:
        SC.SELF_CHECK_DEVICE_TYPES = ("cpu",)
        SC._TRUST.clear()
        torch._dynamo.reset()
        compiled = torch.compile(branch, fullgraph=True, dynamic=True, backend="eager")
        assert compiled(torch.zeros(3)).tolist() == [1.0] * 3
        assert SC._TRUST == {key: True}, SC._TRUST
        SC._TRUST[key] = False  # a failed check (what trusted records for a wrong kernel)
        torch._dynamo.reset()
        assert (
            torch.compile(branch, fullgraph=True, dynamic=True, backend="eager")(torch.zeros(4)).tolist() == [-1.0] * 4
        )
        assert SC._TRUST == {key: False}, "the check ran again"
    finally:
        torch._dynamo.reset()
        SC.SELF_CHECK_DEVICE_TYPES = saved[0]
        SC._TRUST.clear()
        SC._TRUST.update(saved[1])


SELF_CHECKS = {
    "self-check-passes": _check_self_check_passes,
    "self-check-catches-forward-error": lambda: _check_self_check_catches("attend_triton", 0, "output"),
    "self-check-catches-backward-error": lambda: _check_self_check_catches(
        "attention_backward_triton", 2, "gradient of query_table"
    ),
    "untrusted-device-falls-back": _check_untrusted_device_falls_back,
    "self-check-outside-compiled-graph": _check_self_check_outside_compiled_graph,
}


@pytest.fixture(scope="module")
def interpreter_results():
    return attention_testing.interpreter_results("test_triton_kernels")


@pytest.mark.parametrize("check", list(LAYER_CHECKS) + list(BACKWARD_CHECKS) + ["autotuned-launch"] + list(SELF_CHECKS))
def test_triton_through_the_interpreter(interpreter_results, check):
    assert interpreter_results.get(check) == "ok", interpreter_results.get(check, "check did not run")


# --------------------------------------------------------------------------- GPU
@pytest.fixture(autouse=True)
def _no_fallback_on_gpu(monkeypatch):
    """The GPU comparisons must run the kernels: no self-check that could swap in the PyTorch
    path (and so pass by comparing the reference with itself)."""
    monkeypatch.setattr(SC, "SELF_CHECK_DEVICE_TYPES", ())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter checks run on CPU)")
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "3xtf32"])
def test_triton_self_check_passes_on_gpu(tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    assert SC.self_check(torch.device("cuda")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter checks run on CPU)")
@pytest.mark.parametrize(
    "kwargs",
    [dict(axis="height", max_relative_distance=20), dict(axis="width", span=7), dict(axis="height", span=9, stride=2)],
    ids=["global-height", "local-width", "local-stride2"],
)
def test_triton_equals_reference_on_gpu(kwargs, monkeypatch):
    # Full fp32 on both sides (cuDNN's TF32 convolutions would differ by ~1e-3); the kernels
    # then use 3xTF32 products.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    modes = ("train", "eval", "frozen-output-bn") if kwargs.get("stride", 1) > 1 else ("train", "eval")
    layer_kw = dict(channels=32, out_channels=32, heads=4)
    compare_layer(kwargs, (33, 17), modes, tol=1e-4, device="cuda", **layer_kw)
    monkeypatch.setattr(TK, "BLOCK_SIZES", (16, 16))  # several query blocks: atomic k/v path
    compare_layer(kwargs, (33, 17), ("train",), tol=1e-4, device="cuda", **layer_kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter checks run on CPU)")
def test_triton_with_tf32_products_on_gpu(monkeypatch):
    """PyTorch's default (cuDNN TF32 on): the kernels' products are TF32, the reference's
    matmuls float32; they agree to TF32's precision (a wrong term would be off by O(1))."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert TK.dot_precision() == "tf32"
    compare_layer(
        dict(axis="width", span=9),
        (17, 33),
        ("train", "eval"),
        tol=2e-2,
        device="cuda",
        channels=32,
        out_channels=32,
        heads=4,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter checks run on CPU)")
@pytest.mark.parametrize("block_q", [None, (16, 32)])
def test_triton_backward_equals_torch_backward_on_gpu(block_q, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # 3xTF32 products: float32 accuracy
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(TK, "BLOCK_SIZES", block_q)
    compare_backward(dict(max_relative_distance=40), 129, 1, 16, 32, tol=1e-4, device="cuda", sequences=8)
    compare_backward(dict(span=33), 65, 2, 16, 32, tol=1e-4, device="cuda", sequences=8)
