"""Deployment: the banded (export) decomposition equals the reference; ONNX (run in onnxruntime),
ExportedProgram and TorchScript files of narrow Axial-ResNet / Axial-DeepLab models equal eager
at two sizes; a plain torch.jit.trace of the default model is right; ``axial-deeplab export``
writes a verified file from a checkpoint and answers bad input with one line."""

import copy
import os

import pytest
import torch
from engine_testing import save_untrained_checkpoint, tiny_run

from axial_deeplab.cli import main
from axial_deeplab.engine.export import export_model
from axial_deeplab.errors import UserError
from axial_deeplab.layers import PositionSensitiveAxialAttention
from axial_deeplab.models.registry import create_model

NARROW = {"width": 0.125, "layers": [1, 1, 1, 1]}
DEEPLAB_HEADS = {
    k: v for k, v in tiny_run()["model"]["kwargs"].items() if k.startswith(("aspp", "semantic", "instance"))
}
SIZES = [(64, 96), (96, 64)]


def rel_diff(got, want):
    return float((torch.as_tensor(got) - want).abs().max() / want.abs().max())


def _randomise_bn(model):
    """Non-trivial running statistics, so eval BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module", params=["axial_resnet_s", "axial_deeplab_s"])
def model(request):
    torch.manual_seed(0)
    if request.param == "axial_resnet_s":
        m = create_model("axial_resnet_s", num_classes=5, **NARROW)
    else:  # span 65: the banded decomposition
        m = create_model("axial_deeplab_s", num_classes=5, backbone_kwargs=NARROW, **DEEPLAB_HEADS)
    return _randomise_bn(m).eval()


def eager(model, x):
    with torch.no_grad():
        if hasattr(model, "predict_raw"):
            raw = model.predict_raw(x)
            return [raw["semantic_logits"], raw["center_heatmap"], raw["offset_map"]]
        return [model(x)]


@pytest.mark.parametrize(
    "span,length,axis,stride,mode,terms",
    [
        (5, 13, "height", 1, "subsample", (1, 1, 1, 1)),
        (5, 13, "width", 2, "avgpool", (1, 1, 1, 1)),
        (7, 3, "width", 1, "subsample", (1, 0, 1, 1)),  # axis shorter than the span
        (9, 30, "height", 2, "avgpool2d", (0, 1, 1, 0)),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_banded_equals_reference(span, length, axis, stride, mode, terms, training):
    torch.manual_seed(0)
    ref = PositionSensitiveAxialAttention(
        8,
        8,
        axis=axis,
        num_heads=2,
        span=span,
        stride=stride,
        stride_mode=mode,
        use_qk=bool(terms[0]),
        use_query_rpe=bool(terms[1]),
        use_key_rpe=bool(terms[2]),
        use_value_rpe=bool(terms[3]),
        impl="reference",
    )
    _randomise_bn(ref).train(training)
    banded = copy.deepcopy(ref)
    banded.impl = "banded"
    shape = (2, 8, length, 6) if axis == "height" else (2, 8, 6, length)
    x = torch.randn(shape, requires_grad=True)
    y_ref, y = ref(x), banded(x)
    g = torch.randn_like(y_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    (gx,) = torch.autograd.grad(y, x, g)
    assert rel_diff(y, y_ref) < 1e-5
    assert rel_diff(gx, gx_ref) < 1e-5
    torch.testing.assert_close(banded.bn_similarity.running_var, ref.bn_similarity.running_var)


def test_reference_has_no_value_dependent_branch():
    """The similarity-BN shortcut is decided from L and the span, so torch.export traces the
    reference with a symbolic axis length (it used to stop at bool(mask.all()))."""
    layer = PositionSensitiveAxialAttention(8, 8, axis="width", num_heads=2, span=5, impl="reference").eval()
    w = torch.export.Dim("w", min=2, max=64)
    program = torch.export.export(layer, (torch.randn(1, 8, 4, 16),), dynamic_shapes={"x": {3: w}})
    for width in (3, 16, 21):  # covered by the span, and not
        x = torch.randn(1, 8, 4, width)
        torch.testing.assert_close(program.module()(x), layer(x))


def test_onnx_equals_eager_at_two_sizes(model, tmp_path):
    import onnx
    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    report = export_model(model, "onnx", path, (3,) + SIZES[0])
    assert set(report.max_rel_diff) == set(SIZES) and max(report.max_rel_diff.values()) <= 1e-4
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    assert graph.opset_import[0].version >= 17
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # standard operators only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == report.output_names
    for h, w in SIZES:
        x = torch.rand(1, 3, h, w)
        for got, want in zip(session.run(None, {"image": x.numpy()}), eager(model, x)):
            assert rel_diff(got, want) < 1e-4


def test_exported_program_equals_eager_at_two_sizes(model, tmp_path):
    path = tmp_path / "m.pt2"
    export_model(model, "exported-program", path, (3,) + SIZES[0])
    program = torch.export.load(str(path))
    assert "axial_deeplab.attention_eval" in program.graph_module.code  # the fused kernel, not a decomposition
    loaded = program.module()
    for h, w in SIZES:
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            got = loaded(x)
        for g, want in zip(got, eager(model, x)):
            assert rel_diff(g, want) < 1e-4


def test_torchscript_export_and_plain_trace_equal_eager(model, tmp_path):
    x = torch.rand(1, 3, *SIZES[0])
    path = tmp_path / "m.pt"
    export_model(model, "torchscript", path, (3,) + SIZES[0])
    with torch.no_grad():
        got = torch.jit.load(str(path))(x)
    for g, want in zip(got, eager(model, x)):
        assert rel_diff(g, want) < 1e-4
    # a user's own trace of the default (fast) path: the kernels are bypassed while tracing
    assert all(m.impl == "auto" for m in model.modules() if isinstance(m, PositionSensitiveAxialAttention))
    target = _PredictRaw(model) if hasattr(model, "predict_raw") else model
    with torch.no_grad():
        traced = torch.jit.trace(target, (x,), check_trace=False, strict=False)
        got = traced(x)
    got = [got[k] for k in ("semantic_logits", "center_heatmap", "offset_map")] if isinstance(got, dict) else [got]
    for g, want in zip(got, eager(model, x)):
        assert rel_diff(g, want) < 1e-4


class _PredictRaw(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.predict_raw(x)


def test_mismatch_refuses_and_keeps_existing_file(model, tmp_path, monkeypatch):
    """A file that disagrees with eager is not written and the user's file is left alone."""
    import axial_deeplab.engine.export as ex

    path = tmp_path / "m.pt"
    path.write_bytes(b"mine")
    real = ex._export_torchscript

    def wrong(wrapper, example, tmp):
        run = real(wrapper, example, tmp)
        return lambda x: [o + 1.0 for o in run(x)]

    monkeypatch.setattr(ex, "_export_torchscript", wrong)
    with pytest.raises(UserError, match="differs from the eager model"):
        export_model(model, "torchscript", path, (3, 64, 64), overwrite=True)
    assert path.read_bytes() == b"mine"
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary left behind


TINY = tiny_run(data={"options": {"val": {"length": 2}}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "step-000000", TINY)


def test_cli_exports_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    argv = ["export", "--checkpoint", checkpoint, "--format", "torchscript", "--output", str(out), "--input", "3x64x64"]
    assert main(argv) == 0
    assert "verified against eager" in capsys.readouterr().out
    outputs = torch.jit.load(str(out))(torch.rand(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outputs[1:]] == [(1, 64, 64), (2, 64, 64)]
    assert tuple(outputs[0].shape[2:]) == (64, 64)
    # an existing file is refused unless --force
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "tflite"], "unknown --format 'tflite'"),
        (["--format", "onnx", "--input", "64x64"], "--input must look like 3x224x224"),
        (["--format", "onnx", "--input", "3x100x100"], "multiples of 32"),
        (["--format", "onnx", "--checkpoint", "/nonexistent/ckpt"], "checkpoint not found"),
        (["--format", "onnx", "--model", "no_such_model"], "unknown model"),
    ],
)
def test_cli_bad_input_is_one_line(args, message, tmp_path, capsys):
    if "--checkpoint" not in args and "--model" not in args:
        args = args + ["--model", "axial_resnet_s"]
    assert main(["export", "--output", str(tmp_path / "x.onnx")] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not os.listdir(tmp_path)


def _banded_and_reference(length, axis, terms, x_scale=1.0, **layer_kw):
    """``(banded, reference)`` outputs in eval of one layer (random BN statistics) on one input;
    ``terms`` switches q.k, q.r^q, k.r^k, r^v."""
    torch.manual_seed(0)
    ref = PositionSensitiveAxialAttention(
        8,
        8,
        axis=axis,
        num_heads=2,
        use_qk=bool(terms[0]),
        use_query_rpe=bool(terms[1]),
        use_key_rpe=bool(terms[2]),
        use_value_rpe=bool(terms[3]),
        impl="reference",
        **layer_kw,
    )
    _randomise_bn(ref).eval()
    banded = copy.deepcopy(ref)
    banded.impl = "banded"
    x = torch.randn((2, 8, length, 6) if axis == "height" else (2, 8, 6, length)) * x_scale
    with torch.no_grad():  # the inference form (export runs without gradients)
        return banded(x), ref(x)


@pytest.mark.parametrize(
    "distance,length,axis,stride,mode,terms",
    [
        (None, 13, "height", 1, "subsample", (1, 1, 1, 1)),
        (4, 13, "width", 2, "avgpool", (1, 1, 1, 1)),  # offsets beyond D clipped
        (3, 12, "height", 2, "avgpool2d", (0, 1, 1, 0)),
        (5, 7, "width", 1, "subsample", (1, 1, 0, 1)),
    ],
)
def test_banded_global_span_in_eval_equals_reference(distance, length, axis, stride, mode, terms):
    # global spans in eval take their own export-friendly form (BN folded, no concat/mask)
    y, y_ref = _banded_and_reference(
        length, axis, terms, span=None, max_relative_distance=distance, stride=stride, stride_mode=mode
    )
    assert rel_diff(y, y_ref) < 1e-5


def test_torch_jit_script_refuses_with_a_clear_error():
    """Scripting cannot compile the Python dispatch: a clear error naming what works, never a
    half-compiled model."""
    model = create_model("axial_resnet_s", num_classes=5, **NARROW).eval()
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script does not support .*torch\.jit\.trace"):
        torch.jit.script(model)


@pytest.mark.parametrize(
    "span,length,axis,stride,mode,terms",
    [
        (5, 13, "height", 1, "subsample", (1, 1, 1, 1)),
        (5, 13, "width", 2, "avgpool", (1, 1, 1, 1)),
        (7, 3, "width", 1, "subsample", (1, 0, 1, 1)),  # axis shorter than the span
        (3, 1, "height", 1, "subsample", (1, 1, 1, 1)),  # one position
        (9, 30, "height", 2, "avgpool2d", (0, 1, 1, 0)),  # no k . r^k: the additive mask
        (11, 17, "width", 1, "subsample", (0, 0, 1, 1)),  # k . r^k alone
        (13, 40, "height", 2, "subsample", (1, 1, 0, 1)),
        # a subsampling stride computes the kept queries only: k . r^k in the windows, or read
        # along the diagonals of the (j, key) product every s-th key
        (9, 30, "width", 2, "subsample", (1, 1, 1, 1)),
        (7, 25, "height", 3, "subsample", (0, 1, 1, 1)),
        (3, 11, "width", 3, "subsample", (1, 1, 1, 1)),
        (1, 9, "height", 2, "subsample", (0, 1, 1, 1)),
    ],
)
def test_banded_local_span_in_eval_equals_reference(span, length, axis, stride, mode, terms):
    # local spans in eval take their own export-friendly form (query-relative logits, BN folded)
    y, y_ref = _banded_and_reference(
        length,
        axis,
        terms,
        x_scale=3,
        span=span,
        stride=stride,
        stride_mode=mode,  # x3: peaked softmax rows
    )
    assert torch.isfinite(y).all()
    assert rel_diff(y, y_ref) < 1e-5


def _local_twins(span, axis="width", stride=1):
    """(reference, banded) copies of one local-span layer in eval, BN statistics not the identity."""
    torch.manual_seed(0)
    ref = _randomise_bn(
        PositionSensitiveAxialAttention(8, 8, axis=axis, num_heads=2, span=span, stride=stride, impl="reference")
    )
    banded = copy.deepcopy(ref).eval()
    banded.impl = "banded"
    return ref.eval(), banded


@pytest.mark.parametrize("example_width", [40, 16])  # 40: the query blocks (b = 5) filled exactly
def test_banded_dynamic_export_at_exact_block_multiples(example_width):
    """The query blocks' padding is empty where the axis is a multiple of the block (r + 1): the
    exported program must not be specialised to either case, at the example size or later."""
    ref, banded = _local_twins(span=9)
    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=128)
    with torch.no_grad():
        program = torch.export.export(
            banded, (torch.randn(1, 8, 6, example_width),), dynamic_shapes={"x": {2: h, 3: w}}
        ).module()
    for height, width in [(6, 40), (6, 16), (5, 45), (7, 13), (3, 10), (4, 5), (2, 3)]:
        x = torch.randn(1, 8, height, width) * 3
        with torch.no_grad():
            got, want = program(x), ref(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("stride", [1, 2])
def test_onnx_static_global_span_with_as_many_sequences_as_positions(tmp_path, stride):
    """A global-span layer exported at a fixed size where the sequences (batch x the other axis)
    are as many as the positions along the axis, as in a square image at batch 1: the exporter's
    graph optimisations must not mistake one dimension for the other."""
    import onnxruntime as ort

    ref, banded = _local_twins(span=None, axis="height", stride=stride)
    x = torch.randn(1, 8, 12, 12) * 3
    path = str(tmp_path / "layer.onnx")
    with torch.no_grad():
        torch.onnx.export(banded, (x,), dynamo=True, verbose=False).save(path)
        want = ref(x)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel_diff(got, want) < 1e-4


@pytest.mark.parametrize(
    "stride, sizes",
    [(1, [(6, 40), (5, 45), (7, 13), (3, 4)]), (2, [(6, 40), (5, 39), (7, 20), (3, 9), (4, 3), (2, 2)])],
    ids=["stride1", "stride2"],
)
def test_onnx_dynamic_local_span_equals_reference(tmp_path, stride, sizes):
    """A local-span layer through the ONNX exporter, exported with dynamic H and W at a width the
    blocks fill exactly: the file runs in onnxruntime at widths that fill them and that do not.
    With a subsampling stride 2 it computes only the queries it keeps, in blocks whose windows step
    2 keys per query (b = 5 here): right at widths even and odd, and shorter than one block."""
    import onnxruntime as ort

    ref, banded = _local_twins(span=9, stride=stride)
    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=128)
    path = str(tmp_path / "layer.onnx")
    with torch.no_grad():
        program = torch.onnx.export(
            banded, (torch.randn(1, 8, 6, 40),), dynamo=True, dynamic_shapes={"x": {2: h, 3: w}}, verbose=False
        )
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for height, width in sizes:
        x = torch.randn(1, 8, height, width) * 3
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = ref(x)
        assert got.shape == tuple(want.shape)
        assert rel_diff(got, want) < 1e-4
