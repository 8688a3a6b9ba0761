"""deeplab2 checkpoints into our models: the mappings against checkpoints deeplab2's own code wrote.

tests/fixtures/deeplab2/ holds small TF2 checkpoints of deeplab2's encoders and of a whole Cityscapes
Panoptic-DeepLab (shrunk widths; meta.json says how), with deeplab2's float32 outputs for input.npy.
tests/fixtures/deeplab2_float64/ holds deeplab2's outputs for the same checkpoints and inputs computed
in float64 (make_float64_outputs.py there). Converted, our models in float64 must reproduce those
within 1e-4, the encoders alone within 1e-8 (measured: 1e-10 and 7e-6). In float32 both deeplab2 and we round; these
shrunk random networks amplify rounding (deeplab2's own float32 outputs are up to 1.2e-2 off its
float64 ones), so the float32 check allows twice deeplab2's own float32 error on top of 1e-4.
No TensorFlow is needed.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from axial_deeplab.convert.core import ConversionError, convert_weights
from axial_deeplab.convert.deeplab2 import mapped_models, mapping_for
from axial_deeplab.convert.tf_checkpoint import read_tf_checkpoint
from axial_deeplab.models import create_model

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "fixtures", "deeplab2")
FLOAT64 = os.path.join(HERE, "fixtures", "deeplab2_float64")
PANOPTIC = "cityscapes_axial_swidernet_1_1_1_os16"
PANOPTIC_MODEL = "axial_deeplab_swidernet_1_1_1_cityscapes"
NOT_WEIGHTS = {"optimizer slot", "optimizer variable", "step counter", "object graph (checkpoint structure)"}

# fixture -> (deeplab2 instance it was made from, our model)
BACKBONES = {
    "axial_deeplab_s": ("axial_deeplab_s", "axial_resnet_s"),
    "axial_swidernet_1_1_1": ("axial_swidernet", "axial_swidernet_1_1_1"),
    "max_deeplab_s_backbone": ("max_deeplab_s_backbone", "max_deeplab_s_backbone"),
}
# deeplab2's numerics: Keras BN epsilon 1e-3 / momentum 0.99; its encoders default to output stride 16
DEEPLAB2_BACKBONE = dict(bn_eps=1e-3, bn_momentum=0.01, output_stride=16, features_only=True)


def meta(fixture):
    with open(os.path.join(FIXTURES, fixture, "meta.json")) as f:
        return json.load(f)


def backbone_kwargs(fixture):
    """Our constructor's arguments for deeplab2's shrinking overrides (``get_model(name, **overrides)``)."""
    instance, ours = BACKBONES[fixture]
    m = meta(fixture)
    assert m["deeplab2_instance"] == instance
    names = (
        {"width_multiplier": "width", "stem_width_multiplier": "stem_width"} if ours.startswith("axial_resnet") else {}
    )
    kw = {names.get(k, k): v for k, v in m["overrides"].items()}
    kw["layers"] = tuple(kw.pop("num_blocks"))
    return {**kw, **DEEPLAB2_BACKBONE}


def panoptic_kwargs():
    """Our Panoptic-DeepLab arguments for the config overrides deeplab2's model was shrunk with."""
    o = {
        k.replace("model_options.", ""): v
        for k, v in meta(PANOPTIC)["overrides"].items()
        if k.startswith("model_options.")
    }
    p = "panoptic_deeplab."
    assert o[p + "instance.center_head.head_channels"] == o[p + "instance.regression_head.head_channels"]
    return dict(
        backbone_kwargs=dict(
            stem_width_multiplier=o["backbone.stem_width_multiplier"],
            width_multiplier=o["backbone.backbone_width_multiplier"],
            backbone_layer_multiplier=o["backbone.backbone_layer_multiplier"],
        ),
        aspp_channels=o["decoder.aspp_channels"],
        semantic_decoder_channels=o["decoder.decoder_channels"],
        semantic_low_level_channels=(o[p + "low_level[0].channels_project"], o[p + "low_level[1].channels_project"]),
        semantic_head_channels=o[p + "semantic_head.head_channels"],
        instance_decoder_channels=o[p + "instance.instance_decoder_override.decoder_channels"],
        instance_aspp_channels=o[p + "instance.instance_decoder_override.aspp_channels"],
        instance_low_level_channels=(
            o[p + "instance.low_level_override[0].channels_project"],
            o[p + "instance.low_level_override[1].channels_project"],
        ),
        instance_head_channels=o[p + "instance.center_head.head_channels"],
    )


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def references(fixture):
    """(deeplab2's float32 outputs, its float64 outputs, the input NHWC)."""
    folder = os.path.join(FIXTURES, fixture)
    ref64 = np.load(os.path.join(FLOAT64, fixture + ".npz"))
    stale = str(ref64["checkpoint_sha256"]) != sha256(os.path.join(folder, "ckpt-1.data-00000-of-00001")) or str(
        ref64["input_sha256"]
    ) != sha256(os.path.join(folder, "input.npy"))
    assert not stale, f"{fixture} was regenerated: rerun tests/fixtures/deeplab2_float64/make_float64_outputs.py"
    return np.load(os.path.join(folder, "outputs.npz")), ref64, np.load(os.path.join(folder, "input.npy"))


def convert(fixture, name, **kwargs):
    tensors = read_tf_checkpoint(os.path.join(FIXTURES, fixture, "ckpt-1"))
    model = create_model(name, **kwargs).eval()
    state, report = convert_weights(tensors, model, mapping_for(name), source=fixture)
    model.load_state_dict(state, strict=True)
    return model, state, report, tensors


def check_report(report, tensors, model):
    """Every model key from the checkpoint (BN step counters aside), every checkpoint tensor used
    unless it is no model weight."""
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert sorted(k for _, k, _ in report.mapped) == sorted(keys)
    assert len(report.filled) == len(model.state_dict()) - len(keys)
    assert {why for _, why in report.left_out} <= NOT_WEIGHTS, report.left_out
    used = {n for names, _, _ in report.mapped for n in names}
    assert len(used) + len(report.left_out) == len(tensors)


def compare(ours, ref32, ref64, key, float64, atol=1e-4):
    """Max |ours - deeplab2| after the bound check (see the module docstring)."""
    if float64:
        diff = float(np.abs(ours - ref64[key]).max())
        assert diff < atol, f"{key}: {diff:.3g} from deeplab2's float64 outputs"
    else:
        own = float(np.abs(ref32[key] - ref64[key]).max())  # deeplab2's own float32 error
        diff = float(np.abs(ours - ref32[key]).max())
        assert diff <= 1e-4 + 2 * own, f"{key}: {diff:.3g} from deeplab2's float32 outputs (its own error {own:.3g})"
    return diff


@pytest.mark.parametrize("fixture", sorted(BACKBONES))
def test_backbone_checkpoint_converts_and_reproduces_deeplab2(fixture):
    ref32, ref64, x = references(fixture)
    model, _, report, tensors = convert(fixture, BACKBONES[fixture][1], **backbone_kwargs(fixture))
    check_report(report, tensors, model)
    assert {why for _, why in report.left_out} == {"step counter", "object graph (checkpoint structure)"}
    image = torch.from_numpy(x).permute(0, 3, 1, 2)
    for float64 in (True, False):
        net = model.double() if float64 else model.float()
        with torch.no_grad():
            features = net(image.double() if float64 else image)
        assert len(features) == 4
        for i, f in enumerate(features):
            # encoders alone: the same function up to float64 rounding (measured <= 1e-10)
            compare(f.permute(0, 2, 3, 1).numpy(), ref32, ref64, f"res{i + 2}", float64, atol=1e-8)


def test_panoptic_checkpoint_converts_and_reproduces_deeplab2():
    ref32, ref64, x = references(PANOPTIC)
    model, _, report, tensors = convert(PANOPTIC, PANOPTIC_MODEL, **panoptic_kwargs())
    check_report(report, tensors, model)
    reasons = [why for _, why in report.left_out]
    assert reasons.count("optimizer slot") == 2 * len([1 for p in model.parameters()])  # Adam's m and v
    image = torch.from_numpy(x).permute(0, 3, 1, 2)
    for float64 in (True, False):
        net = model.double() if float64 else model.float()
        # deeplab2 takes 0..255, we take [0, 1]; scaled in the compared precision (these networks turn
        # float32's rounding of x / 255 alone into 4e-4 on the offsets)
        inp = (image.double() if float64 else image) / 255.0
        with torch.no_grad():
            raw = net.predict_raw(inp)
            features = net.backbone((inp - net.pixel_mean) / net.pixel_std)
        compare(raw["semantic_logits"].permute(0, 2, 3, 1).numpy(), ref32, ref64, "semantic_logits", float64)
        compare(raw["center_heatmap"][:, 0].numpy(), ref32, ref64, "center_heatmap", float64)
        compare(raw["offset_map"].permute(0, 2, 3, 1).numpy(), ref32, ref64, "offset_map", float64)
        for i in (0, 1, 3):
            compare(features[i].permute(0, 2, 3, 1).numpy(), ref32, ref64, f"encoder_res{i + 2}", float64)


def _cli_sets():
    return [f"model.kwargs.{k}={json.dumps(v)}" for k, v in panoptic_kwargs().items()]


def test_convert_command_end_to_end_then_load_model_and_predict(tmp_path, capsys):
    from PIL import Image

    import axial_deeplab
    from axial_deeplab.cli import main

    out = tmp_path / "from_deeplab2"
    args = [
        "convert",
        "--from",
        "deeplab2",
        os.path.join(FIXTURES, PANOPTIC, "ckpt-1"),
        "--model",
        PANOPTIC_MODEL,
        "--output",
        str(out),
        "-q",
    ]
    for s in _cli_sets():
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    _, state, report, _ = convert(PANOPTIC, PANOPTIC_MODEL, **panoptic_kwargs())
    assert f"mapped {len(report.mapped)} tensors:" in printed
    assert f"left out {len(report.left_out)} checkpoint tensors:" in printed

    model = axial_deeplab.load_model(out)  # rebuilt from the saved config
    assert model.metadata.num_classes == 19 and model.num_classes == 19
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    ref32, ref64, x = references(PANOPTIC)
    with torch.no_grad():
        raw = model.predict_raw(torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0)
    compare(raw["semantic_logits"].permute(0, 2, 3, 1).numpy(), ref32, ref64, "semantic_logits", False)

    picture = tmp_path / "street.png"
    Image.fromarray(x[0].round().clip(0, 255).astype(np.uint8)).save(picture)
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(out), "--no-progress", str(picture), "--output", str(pred)]) == 0
    assert (pred / "panoptic" / "street.png").is_file()


def test_wrong_model_or_settings_fail_clearly(tmp_path, capsys):
    from axial_deeplab.cli import main

    ckpt = os.path.join(FIXTURES, PANOPTIC, "ckpt-1")
    out = tmp_path / "out"

    def convert_cli(model, *sets):
        args = ["convert", "--from", "deeplab2", ckpt, "--model", model, "--output", str(out)]
        for s in sets:
            args += ["--set", s]
        rc = main(args)
        return rc, capsys.readouterr().err

    # another backbone than the checkpoint's: the missing deeplab2 variable is named
    rc, err = convert_cli("axial_deeplab_max_s_backbone_cityscapes")
    assert rc == 2 and "no variable 'encoder/_stem/_conv1_bn_act/_conv/kernel'" in err
    # the right model at the full size: the first block the shrunk checkpoint lacks is named
    rc, err = convert_cli(PANOPTIC_MODEL)
    assert rc == 2 and "no variable 'encoder/_stage2/_block1/_shortcut/_conv/kernel'" in err
    # one width wrong: the keys, the checkpoint's tensors and both shapes are named
    sets = [s for s in _cli_sets() if "semantic_head_channels" not in s] + ["model.kwargs.semantic_head_channels=32"]
    rc, err = convert_cli(PANOPTIC_MODEL, *sets)
    assert rc == 2 and "does not map onto PanopticDeepLab" in err
    assert (
        "semantic_head.1.weight: checkpoint semantic_last_layer/kernel gives [19, 16, 1, 1], model [19, 32, 1, 1]"
    ) in err
    # a model without a deeplab2 mapping, and an unknown one
    rc, err = convert_cli("axial26s")
    assert rc == 2 and "no deeplab2 mapping for model 'axial26s'" in err and PANOPTIC_MODEL in err
    rc, err = convert_cli("no_such_model")
    assert rc == 2 and "unknown model 'no_such_model'" in err
    # Axial-DeepLab-S as registered (span 65, PyTorch's BN epsilon): both differences and their fixes named
    rc, err = convert_cli("axial_deeplab_s")
    assert rc == 2 and "would compute other outputs than deeplab2's" in err
    assert "local span 65" in err and "span=null" in err and "epsilon 1e-05" in err and "bn_eps=0.001" in err
    assert not out.exists()


def test_arrangement_span_and_classifier_are_refused():
    kw = backbone_kwargs("axial_deeplab_s")
    with pytest.raises(ConversionError, match="arrangement 'maxpool'"):
        convert("axial_deeplab_s", "axial_resnet_s", **{**kw, "arrangement": "maxpool"})
    with pytest.raises(ConversionError, match="local span 9"):
        convert("axial_deeplab_s", "axial_resnet_s", **{**kw, "span": 9})
    others = meta(PANOPTIC)["batch_norm_layers"] - 1  # deeplab2's count: every BN of the model
    with pytest.raises(
        ConversionError, match=rf"backbone\.stem\.1 \(and {others} more BatchNorm layers\): epsilon 1e-05"
    ):
        convert(PANOPTIC, PANOPTIC_MODEL, **{**panoptic_kwargs(), "bn_eps": 1e-5})
    with pytest.raises(ConversionError, match="no ImageNet classifier"):
        convert("axial_deeplab_s", "axial_resnet_s", **{**kw, "features_only": False})
    # a backbone checkpoint into a panoptic model: no decoders
    with pytest.raises(ConversionError, match="no semantic_decoder/ variables"):
        convert("axial_swidernet_1_1_1", PANOPTIC_MODEL, **panoptic_kwargs())


def test_every_deeplab2_family_has_a_mapping():
    have = set(mapped_models())
    for name in (
        "axial_resnet_s",
        "axial_resnet_l",
        "axial_resnet_m",
        "axial_resnet_xl",
        "axial_swidernet_1_1_1",
        "axial_swidernet_1_1_3",
        "axial_swidernet_1_1_4_5",
        "max_deeplab_s_backbone",
        "axial_resnet50",
        "axial_deeplab_s",
        PANOPTIC_MODEL,
        "axial_deeplab_max_s_backbone_cityscapes",
        "axial_deeplab_swidernet_1_1_4_5_cityscapes",
    ):
        assert name in have
    from axial_deeplab.models import list_models

    assert have <= set(list_models())


def test_converted_backbone_initialises_a_panoptic_model(tmp_path, capsys):
    """An ImageNet-style deeplab2 encoder checkpoint -> a features_only backbone folder ->
    ``pretrained_backbone`` of the panoptic model, weights unchanged."""
    from axial_deeplab.cli import main

    fixture = "axial_swidernet_1_1_1"
    kw = {k: v for k, v in backbone_kwargs(fixture).items() if k != "output_stride"}  # stride: no weights
    out = tmp_path / "backbone"
    args = [
        "convert",
        "--from",
        "deeplab2",
        os.path.join(FIXTURES, fixture, "ckpt-1"),
        "--model",
        BACKBONES[fixture][1],
        "--output",
        str(out),
        "-q",
    ]
    for k, v in kw.items():
        args += ["--set", f"model.kwargs.{k}={json.dumps(v)}"]
    assert main(args) == 0, capsys.readouterr().err
    _, state, _, _ = convert(fixture, BACKBONES[fixture][1], **kw)
    panoptic = create_model(
        PANOPTIC_MODEL,
        pretrained_backbone=str(out),
        backbone_kwargs={k: v for k, v in kw.items() if k != "features_only"},
    )
    loaded = panoptic.backbone.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
