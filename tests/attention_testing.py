"""Shared by the attention tests: BatchNorm state away from PyTorch's defaults (so a path
that ignored a running statistic or an affine parameter would show), one training step of
a layer copy, and a tolerance scaled to the size of the expected values."""

from __future__ import annotations

import copy

import torch


def randomize_batch_norms(layer) -> None:
    with torch.no_grad():
        for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)


def eval_layer(in_ch, out_ch, heads, key_ch=None, seed=0, reach=5, **kwargs):
    """A seeded eval-mode layer with BN state away from the defaults; global tables reach
    ``reach`` unless given."""
    from axial_deeplab.layers import PositionSensitiveAxialAttention

    torch.manual_seed(seed)
    if kwargs.get("span") is None:
        kwargs.setdefault("max_relative_distance", reach)
    layer = PositionSensitiveAxialAttention(in_ch, out_ch, num_heads=heads, key_channels=key_ch, **kwargs)
    randomize_batch_norms(layer)
    return layer.eval()


def forward_backward(layer, impl, x, mode="train", seed=5):
    """Forward + backward (of a fixed random projection of the output) of a copy of ``layer``
    with ``impl``: (output, {"input" and parameter name: gradient}, buffers, the copy). mode: "train",
    "eval", or "frozen-output-bn" (training with bn_output in eval: strided layers then compute
    only the subsampled query rows, with gradients)."""
    layer = copy.deepcopy(layer)
    layer.impl = impl
    layer.train(mode != "eval")
    if mode == "frozen-output-bn":
        layer.bn_output.eval()
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed)).to(y.device)
    (y * g).sum().backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return y.detach(), grads, {n: b.clone() for n, b in layer.named_buffers()}, layer


def assert_equal_runs(got, want, tol, what) -> None:
    """Two :func:`forward_backward` results agree: output, every gradient, every buffer."""
    y, grads, buffers = got
    y_ref, grads_ref, buffers_ref = want
    close_scaled(y, y_ref, tol, f"{what}: output")
    assert grads.keys() == grads_ref.keys()
    # the similarity BN's shift adds one constant to a row's logits, which the softmax cancels:
    # its gradient is 0 up to rounding, and the rounding scales with the layer's other gradients
    # (compared relative to themselves, ~1e-5 of noise fails on some CPUs' summation orders)
    scale = max(1.0, *(float(g.abs().max()) for g in grads_ref.values() if g is not None and g.numel()))
    for name in grads_ref:
        if name.endswith("bn_similarity.bias") and grads_ref[name] is not None:
            for side, g in (("got", grads[name]), ("reference", grads_ref[name])):
                assert float(g.abs().max()) <= 4 * tol * scale, f"{what}: grad {name} ({side}) is not ~0: {g}"
            continue
        close_scaled(grads[name], grads_ref[name], tol, f"{what}: grad {name}")
    for name in buffers_ref:
        close_scaled(buffers[name].double(), buffers_ref[name].double(), tol, f"{what}: buffer {name}")


def close_scaled(a, b, tol, what) -> None:
    """a == b up to ``tol`` relative, and ``tol`` times the largest |b| absolute."""
    assert a is not None and b is not None, f"{what} missing"
    torch.testing.assert_close(
        a.double(), b.double(), rtol=tol, atol=tol * max(1.0, float(b.abs().max())), msg=lambda m: f"{what}: {m}"
    )


def reference_eval(layer, x):
    """Inference output of a copy of ``layer`` with the plain equation (contiguous input)."""
    ref = copy.deepcopy(layer)
    ref.impl = "reference"
    with torch.no_grad():
        return ref(x.contiguous())


def kernel_eval(layer, x):
    """Inference output of the compiled CPU kernel, which must take this input."""
    from axial_deeplab.layers import cpu_kernel

    with torch.no_grad():
        y = cpu_kernel.forward_eval(layer, x)
    assert y is not None, "the compiled kernel did not take this input"
    return y


_INTERPRETER = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, {tests!r})
import {module}
{module}._interpreter_main()
"""


def interpreter_results(module: str) -> dict:
    """Run ``module._interpreter_main()`` (a test module beside this one) in a subprocess under
    Triton's CPU interpreter (it must be set before triton is imported) and return the dict it
    prints on its ``RESULTS`` line."""
    import json
    import os
    import subprocess
    import sys

    code = _INTERPRETER.format(tests=os.path.dirname(os.path.abspath(__file__)), module=module)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])
