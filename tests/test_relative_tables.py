"""Relative tables of 2D+1 rows whatever the span: checkpoints of any table length load into
models of any span, exactly where the model can hold what the checkpoint computed.

The central check is the paper's fine-tuning protocol: ImageNet weights (global span) as the
backbone of a span-65 Axial-DeepLab, whose features then equal the classifier's wherever span 65
covers the whole axis."""

import warnings

import pytest
import torch
from attention_testing import randomize_batch_norms
from safetensors.torch import save_file
from test_port_compat import make_port_state_dict

from axial_deeplab.engine.checkpoint import save_checkpoint
from axial_deeplab.layers import PositionSensitiveAxialAttention, attention_impl
from axial_deeplab.models import create_model
from axial_deeplab.models.weights import fit_relative_tables

TABLES = ("query_table", "key_table", "value_table")


def layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    m = PositionSensitiveAxialAttention(6, 8, num_heads=2, axis="width", **kwargs).double()
    randomize_batch_norms(m)
    return m.eval()


def x_of(width, seed=1):
    return torch.randn(2, 6, 3, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def eval_features(model, x):
    with torch.no_grad(), attention_impl("reference"):
        return model(x)


def stored_rows(model):
    return {p.shape[1] for n, p in model.named_parameters() if n.endswith("_table")}


# --------------------------------------------------------------------------- the layer
def test_stored_tables_do_not_depend_on_the_span_and_the_math_sees_the_centre():
    for span in (None, 5, 65):
        m = PositionSensitiveAxialAttention(8, 8, num_heads=2, span=span)
        assert {p.shape for n, p in m.named_parameters() if n.endswith("_table")} == {(2, 509), (4, 509)}
        rows = 509 if span is None else span
        assert m.table_rows == rows and m.query_table.shape == (2, rows) and m.value_table.shape == (4, rows)
        centre = slice(254 - (rows - 1) // 2, 254 + (rows - 1) // 2 + 1)
        assert torch.equal(m.key_table, m._parameters["key_table"][:, centre])
    with pytest.raises(ValueError, match="span 9"):
        PositionSensitiveAxialAttention(8, 8, num_heads=2, span=9, max_relative_distance=3)
    assert PositionSensitiveAxialAttention(8, 8, num_heads=2, span=9, max_relative_distance=4).table_rows == 9


def test_a_local_layer_trains_only_its_centre_rows():
    m = layer(span=5).train()
    (m(x_of(7)) ** 2).sum().backward()
    for name in TABLES:
        g = m._parameters[name].grad
        assert g[:, 252:257].abs().sum() > 0 and g[:, :252].abs().sum() == 0 and g[:, 257:].abs().sum() == 0


def test_local_layer_outputs_do_not_depend_on_the_stored_reach():
    small = layer(span=5, max_relative_distance=2)  # 5 stored rows: the former layout
    big = layer(span=5, max_relative_distance=20)
    big.load_state_dict(small.state_dict())  # 5 rows -> 41, by edge copies
    assert big._parameters["query_table"].shape == (2, 41)
    x = x_of(9)
    with torch.no_grad():
        assert torch.equal(big(x), small(x))
        back = layer(span=5, max_relative_distance=2)
        back.load_state_dict(big.state_dict())  # 41 -> 5: centre crop, exact for a local span
        assert torch.equal(back(x), small(x))


def test_a_shorter_global_table_extends_exactly_as_clipping():
    short = layer(max_relative_distance=2)
    long = layer(max_relative_distance=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # extending is exact: no warning
        long.load_state_dict(short.state_dict())
    table = short._parameters["value_table"]
    assert torch.equal(long._parameters["value_table"][:, :5], table[:, :1].expand(-1, 5))  # edge copies
    with torch.no_grad():
        for width in (3, 11):  # offsets up to 10: the short layer clips them at 2
            torch.testing.assert_close(long(x_of(width)), short(x_of(width)), rtol=1e-12, atol=1e-12)


def test_a_longer_global_table_is_cropped_with_a_warning_naming_the_layer():
    long = layer(max_relative_distance=6)
    model = torch.nn.Sequential(layer(max_relative_distance=2))
    with pytest.warns(UserWarning, match=r"^0: .*reaches offset 6.*axes longer than 3"):
        model.load_state_dict({f"0.{k}": v for k, v in long.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(model(x_of(3)), long(x_of(3)), rtol=1e-12, atol=1e-12)  # within the reach
        assert not torch.allclose(model(x_of(8)), long(x_of(8)), atol=1e-6)  # beyond: clipped at 2
    # the project's loaders fit the tables first and say it once for the whole model
    with pytest.warns(UserWarning, match=r"ckpt: .*1 global-span layer.*0: its"):
        fitted = fit_relative_tables(model, {f"0.{k}": v for k, v in long.state_dict().items()}, "ckpt")
    assert fitted["0.key_table"].shape == (2, 5)


# --------------------------------------------------------------------------- whole models
def _randomized(model):
    """BN state away from the defaults, and no zero-init residual gamma (it would hide the
    attention blocks from the comparison)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return model.eval()


def test_old_span_sized_checkpoint_loads_into_the_new_model_exactly(tmp_path, quick_init):
    torch.manual_seed(0)
    old = _randomized(create_model("axial_resnet_tiny", num_classes=5, span=9, max_relative_distance=4))
    assert stored_rows(old) == {9}  # the former layout: span-sized tables
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(path))
    new = create_model("axial_resnet_tiny", num_classes=5, span=9, pretrained=str(path)).eval()
    assert stored_rows(new) == {509}
    x = torch.randn(1, 3, 40, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(new(x), old(x))


def _features_equal(panoptic, classifier, x):
    got = eval_features(panoptic.backbone, x)
    want = eval_features(classifier, x)  # AxialResNet.forward_features through forward(features_only)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g.shape == w.shape and max(g.shape[-2:]) <= 33
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_imagenet_checkpoint_loads_into_span_65_axial_deeplab_s(tmp_path, quick_init):
    torch.manual_seed(0)
    classifier = _randomized(create_model("axial_resnet_s", num_classes=10)).double()
    assert {m.span for m in classifier.modules() if isinstance(m, PositionSensitiveAxialAttention)} == {None}
    path = save_checkpoint(str(tmp_path / "step-1"), classifier, step=1)  # a folder, as training writes it
    panoptic = (
        create_model("axial_deeplab_s", num_classes=4, thing_ids=[2, 3], output_stride=32, pretrained_backbone=path)
        .double()
        .eval()
    )
    spans = {m.span for m in panoptic.backbone.modules() if isinstance(m, PositionSensitiveAxialAttention)}
    assert spans == {65}
    classifier.features_only = True
    x = torch.randn(1, 3, 64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _features_equal(panoptic, classifier, x)


def test_port_state_dict_loads_into_a_span_65_panoptic_model(tmp_path, quick_init):
    # tables sized for 32x32 (the port's 2K-1 rows), run at 64x64: every stage clips offsets
    layers, image_size = (1, 2, 4, 1), 32
    sd = make_port_state_dict(layers, 0.5, image_size, num_classes=10)
    path = tmp_path / "port.pth"
    torch.save(sd, path)
    classifier = create_model("axial26s", num_classes=10, image_size=image_size, pretrained=str(path))
    assert stored_rows(classifier) == {15, 7, 3}
    panoptic = create_model(
        "axial_deeplab_s",
        backbone="axial26s",
        span=65,
        num_classes=4,
        thing_ids=[2, 3],
        output_stride=32,
        pretrained_backbone=str(path),
    )
    assert stored_rows(panoptic.backbone) == {509}
    classifier.double().eval().features_only = True
    panoptic.double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _features_equal(panoptic, classifier, x)
    # the edge rows are what makes it exact: zero rows beyond each checkpoint table's reach differ
    with torch.no_grad():
        for name, m in panoptic.backbone.named_modules():
            if isinstance(m, PositionSensitiveAxialAttention):
                reach = classifier.get_submodule(name).table_reach
                for t in m.relative_table_parameters():
                    t[:, : 254 - reach] = 0
                    t[:, 254 + reach + 1 :] = 0
    got, want = eval_features(panoptic.backbone, x), eval_features(classifier, x)
    assert not torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
