"""The attention dispatcher: which path runs, why the faster ones were refused, and the public
ways to force one (layer impl, ``attention_impl``, ``AXIAL_DEEPLAB_ATTENTION_IMPL``)."""

from __future__ import annotations

import ast
import copy
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from attention_testing import randomize_batch_norms

from axial_deeplab.layers import (
    PositionSensitiveAxialAttention,
    attention_impl,
    available_attention_impls,
    cpu_kernel,
    dispatch,
    explain,
    register_attention_impl,
    select_backend,
)

LAYERS_DIR = Path(__file__).resolve().parents[1] / "src" / "axial_deeplab" / "layers"


def make_layer(in_ch=8, span=3, axis="width", **kw):
    torch.manual_seed(0)
    layer = PositionSensitiveAxialAttention(in_ch, 8, axis=axis, num_heads=2, span=span, **kw)
    randomize_batch_norms(layer)
    return layer.eval()


def make_input(in_ch=8, seed=1):
    return torch.randn(2, in_ch, 3, 7, generator=torch.Generator().manual_seed(seed))


def reference_output(layer, x):
    ref = copy.deepcopy(layer)
    ref.impl = "reference"
    with torch.no_grad():
        return ref(x)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full_env.pop(dispatch.ENV_IMPL, None)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=full_env,
        cwd=str(Path(__file__).resolve().parent),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# --------------------------------------------------------------------------- explain on CPU
@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the kernel-off case is tested below")
def test_explain_names_the_default_cpu_routes_with_the_c_kernel():
    layer, x = make_layer(), make_input()
    with torch.no_grad():
        text = explain(layer, x)
        assert select_backend(layer, x) == "memory_efficient"
    assert "selected: memory_efficient (route eval_op:" in text
    assert "C kernel: loaded" in text
    layer.train()
    text = explain(layer, x)
    assert "selected: memory_efficient (route rows_op:" in text
    assert "route eval_op   refused: gradients are enabled" in text


def test_explain_without_the_c_kernel_says_so_and_output_is_right():
    code = (
        "import torch\n"
        "from test_attention_dispatch import make_layer, make_input, reference_output\n"
        "from axial_deeplab.layers import explain, cpu_kernel\n"
        "assert not cpu_kernel.available()\n"
        "layer, x = make_layer(), make_input()\n"
        "with torch.no_grad():\n"
        "    print(explain(layer, x))\n"
        "    y = layer(x)\n"
        "    layer(x)\n"  # logged once only
        "torch.testing.assert_close(y, reference_output(layer, x), rtol=1e-5, atol=1e-5)\n"
    )
    proc = _run_python(code, AXIAL_DEEPLAB_NO_C_KERNEL="1", AXIAL_DEEPLAB_ATTENTION_DEBUG="1")
    assert "selected: memory_efficient (route eval_op:" in proc.stdout
    assert "C kernel: switched off (AXIAL_DEEPLAB_NO_C_KERNEL)" in proc.stdout
    # the debug switch by environment: one line naming the path and route
    logged = [
        ln for ln in proc.stderr.splitlines() if ln.startswith("axial_deeplab.attention") and "impl=auto" in ln
    ]  # not the reference copy
    assert len(logged) == 1 and "memory_efficient (route eval_op)" in logged[0], proc.stderr


def test_explain_gives_the_reasons_for_refused_faster_routes():
    layer, x = make_layer(), make_input()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        text = explain(layer, x)
        assert select_backend(layer, x) == "memory_efficient"
    assert "route eval_op   refused: CPU autocast is on" in text
    assert "route rows_op   refused: CPU autocast is on" in text
    assert "selected: memory_efficient (route chunked:" in text
    text = explain(layer, x.double())  # float32 parameters, float64 input
    assert "parameters (torch.float32) and input (torch.float64) differ in dtype" in text


def test_other_devices_run_the_reference_where_nothing_faster_can():
    layer = make_layer().to("meta")
    x = torch.empty(2, 8, 3, 7, device="meta")
    assert select_backend(layer, x) == "reference"
    text = explain(layer, x)
    assert "memory_efficient  refused:" in text and "meta tensors hold no values" in text


# --------------------------------------------------------------------------- CUDA priority without a GPU
def test_cuda_priority_takes_memory_efficient_without_triton():
    assert dispatch.priority("cuda", "eval", include_unavailable=True) == ["triton", "memory_efficient", "reference"]
    assert dispatch.priority("cuda", "train", include_unavailable=True)[0] == "triton"
    assert dispatch.priority("cpu", "eval") == ["memory_efficient", "fast", "reference"]
    assert dispatch.priority("mps", "train") == ["memory_efficient", "reference"]
    if "triton" in available_attention_impls():
        pytest.skip("Triton is installed: the CUDA default is the Triton path here")
    layer = make_layer()
    fake_cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, shape=(2, 8, 3, 7))
    for training in (False, True):
        layer.train(training)
        assert select_backend(layer, fake_cuda) == "memory_efficient"
        text = explain(layer, fake_cuda)
        assert "triton            refused: Triton is not installed" in text
        assert "selected: memory_efficient (route chunked:" in text
        assert "route eval_op   refused: the operators have CPU implementations only (input on cuda)" in text
    layer.impl = "triton"
    with pytest.raises(ValueError, match="'triton' is not available: Triton is not installed"):
        select_backend(layer, fake_cuda)


# --------------------------------------------------------------------------- forcing a path
def test_context_manager_forces_the_path_nests_and_restores():
    layer, x = make_layer(), make_input()
    want = reference_output(layer, x)
    with torch.no_grad():
        with attention_impl("fast"):
            assert select_backend(layer, x) == "fast"
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
            with attention_impl("banded"):
                assert select_backend(layer, x) == "banded"
                torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
                with attention_impl("auto"):
                    assert select_backend(layer, x) == "memory_efficient"
            assert select_backend(layer, x) == "fast"
            pinned = copy.deepcopy(layer)
            pinned.impl = "reference"  # a layer's own impl is more specific than the context
            assert select_backend(pinned, x) == "reference"
        assert select_backend(layer, x) == "memory_efficient"
    with pytest.raises(ValueError, match=r"unknown attention impl 'nope'; available: \['auto', 'banded'"):
        with attention_impl("nope"):
            pass


def test_environment_variable_forces_the_path(monkeypatch):
    layer, x = make_layer(), make_input()
    want = reference_output(layer, x)
    monkeypatch.setenv(dispatch.ENV_IMPL, "banded")
    with torch.no_grad():
        assert select_backend(layer, x) == "banded"
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        assert "path forced to 'banded' by AXIAL_DEEPLAB_ATTENTION_IMPL" in explain(layer, x)
        with attention_impl("reference"):  # the context manager is more specific
            assert select_backend(layer, x) == "reference"
    monkeypatch.setenv(dispatch.ENV_IMPL, "fastest")
    with pytest.raises(ValueError, match="unknown attention impl 'fastest'; available:"):
        layer(x)


def test_a_forced_path_that_cannot_run_raises_with_the_reason():
    layer = make_layer().to("meta")
    x = torch.empty(2, 8, 3, 7, device="meta")
    with attention_impl("memory_efficient"):
        with pytest.raises(
            ValueError,
            match=r"'memory_efficient' \(set by attention_impl\(\)\) cannot run here: "
            r"eval_op: the operators have CPU implementations only",
        ):
            layer(x)
    layer.impl = "fast"
    with pytest.raises(ValueError, match="'fast' .*meta tensors hold no values"):
        layer(x)
    assert "cannot run: meta tensors hold no values" in explain(layer, x)


# --------------------------------------------------------------------------- tracing
class _Explained(torch.nn.Module):
    """A layer pair that records what explain says while it is traced."""

    def __init__(self, pair):
        super().__init__()
        self.pair = pair
        self.texts = []

    def forward(self, x):
        self.texts.append(explain(self.pair[0], x))
        return self.pair(x)


def test_jit_trace_refuses_the_ctypes_paths_and_equals_eager():
    pair = torch.nn.Sequential(
        make_layer(axis="height", span=None, max_relative_distance=3), make_layer(axis="width", span=3)
    )
    x = make_input()
    model = _Explained(pair)
    with torch.no_grad():
        want = pair(x)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        got = traced(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    text = model.texts[-1]
    assert "selected: reference" in text
    assert (
        "route chunked   refused: torch.jit.trace is running and this route calls the C kernel through ctypes"
    ) in text
    assert "fast              refused: torch.jit.trace is running and this path calls the C kernel" in text
    pair[0].impl = "fast"  # by name: refused, not silently wrong
    with torch.no_grad(), pytest.raises(ValueError, match="'fast' .*torch.jit.trace is running"):
        torch.jit.trace(pair, (x,), check_trace=False)


# --------------------------------------------------------------------------- debug log
def test_debug_log_names_the_path_once_per_configuration(caplog):
    layer, x = make_layer(in_ch=6, span=5), make_input(in_ch=6)  # a configuration no other test logs
    with caplog.at_level(logging.DEBUG, logger="axial_deeplab.attention"), torch.no_grad():
        for _ in range(3):
            layer(x)
        layer(x.double().float())  # same device, dtype, mode: no new line
    records = [r.getMessage() for r in caplog.records if r.name == "axial_deeplab.attention"]
    assert len(records) == 1, records
    assert "memory_efficient (route eval_op)" in records[0] and "span=5" in records[0] and "eval" in records[0]


# --------------------------------------------------------------------------- registration (compatible API)
def test_register_attention_impl_adds_a_path_and_auto_devices_put_it_first():
    calls = []

    def doubled(layer, x):
        """A test path."""
        calls.append(1)
        return dispatch.get_backend("reference").run(layer, x)

    try:
        register_attention_impl("test_path", doubled, auto_devices=("fakedev",))
        assert "test_path" in available_attention_impls()
        assert dispatch.priority("fakedev", "eval")[0] == "test_path"
        layer, x = make_layer(impl="test_path"), make_input()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_output(layer, x))
        assert calls == [1]
    finally:
        dispatch.unregister_backend("test_path")
    assert "test_path" not in available_attention_impls()
    assert "test_path" not in dispatch.priority("fakedev", "eval")


# --------------------------------------------------------------------------- no import circles
def _top_level_imports(path: Path):
    """Sibling modules of layers/ imported when ``path`` is imported (function bodies and
    ``if TYPE_CHECKING:`` blocks, which never run, excluded)."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                if child.module:
                    found.add(child.module.split(".")[0])
                else:
                    found.update(a.name for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_layers_modules_import_without_circles():
    modules = {p.stem: p for p in LAYERS_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {m: _top_level_imports(p) & set(modules) for m, p in modules.items()}
    assert "axial_attention" not in graph["reference"]
    assert graph["dispatch"] == set(), "dispatch must stay a leaf"
    state = {}

    def acyclic(m, stack):
        if state.get(m) == "done":
            return
        assert state.get(m) != "active", f"import circle: {' -> '.join(stack + [m])}"
        state[m] = "active"
        for dep in sorted(graph[m]):
            acyclic(dep, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        acyclic(m, [])
    for module in ("axial_deeplab.layers.reference", "axial_deeplab.layers.axial_attention"):
        _run_python(
            f"import {module}\n"
            "import torch\n"
            "from axial_deeplab.layers import PositionSensitiveAxialAttention as P\n"
            "assert P(4, 4, num_heads=1)(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)\n"
        )


# --------------------------------------------------------------------------- axial-deeplab info --attention
def test_info_attention_names_the_path_of_each_layer_configuration(capsys):
    from axial_deeplab.cli import main as cli_main

    assert cli_main(["info", "--attention", "axial_resnet_s", "--input", "3x64x64", "--train"]) == 0
    out = capsys.readouterr().out
    assert "training step on cpu:" in out and "distinct attention layer configuration(s), 32 layers" in out
    # deeplab2's arrangement strides the first block of every stage, so layer1.0 stands alone
    assert "[1] layer1.0.attn_h\n" in out and "[3] layer1.1.attn_h and 1 more like it" in out
    assert out.count("selected: memory_efficient (route rows_op") == out.count("\n[")
    assert "route eval_op   refused: gradients are enabled" in out
