"""Our parameter and multiply-add counts against the paper's tables (meta-device builds, no memory).

The paper's figures are typed in from its Tables 1, 6 and 7 here, independently of the copy in
``models.complexity``; the tolerances are the closest each row gets (README, "Models")."""

import re

import pytest

from axial_deeplab.cli import main
from axial_deeplab.models.complexity import (
    PAPER_FIGURES,
    PAPER_SPAN_FIGURES,
    build_on_meta,
    count_complexity,
    paper_figure,
)

WIDTH = {"s": 0.5, "m": 0.75, "l": 1.0, "xl": 2.0}
CITYSCAPES = (1, 3, 1025, 2049)


def _count(name, shape, **kwargs):
    total = count_complexity(build_on_meta(name, **kwargs), shape)["total"]
    return total["params"] / 1e6, total["madds"] / 1e9


def _off(ours, paper):
    return abs(ours / paper - 1.0)


def test_figures_are_the_papers():
    assert {k: (v.params_m, v.madds_b) for k, v in PAPER_FIGURES.items() if k.startswith("axial_deeplab")} == {
        "axial_deeplab_s": (12.1, 220.8),
        "axial_deeplab_m": (25.9, 419.6),
        "axial_deeplab_l": (44.9, 687.4),
        "axial_deeplab_xl": (173.0, 2446.8),
    }
    assert [PAPER_SPAN_FIGURES[m].madds_b for m in (5, 9, 17, 33, 65)] == [617.4, 622.1, 631.5, 650.2, 687.4]
    assert paper_figure("axial_deeplab_l", {"span": 9}).madds_b == 622.1
    assert paper_figure("axial_deeplab_s", {"span": 9}) is None  # Table 7 is L only
    assert paper_figure("axial_deeplab_s", {"output_stride": 32}) is None
    assert paper_figure("axial_deeplab_s", {"stem_width": 0.5, "arrangement": "maxpool"}).madds_b == 220.8
    assert paper_figure("axial_resnet_s_conv", {"num_classes": 10}) is None


# (size, paper params M, paper M-Adds B, params tolerance, M-Adds tolerance) with the stem at the
# model's width; XL's M-Adds and S's parameters are the rows that stay off (README).
@pytest.mark.parametrize(
    "size,params,madds,tol_p,tol_m",
    [
        ("s", 12.1, 220.8, 0.025, 0.02),
        ("m", 25.9, 419.6, 0.02, 0.02),
        ("l", 44.9, 687.4, 0.02, 0.02),
        ("xl", 173.0, 2446.8, 0.02, 0.035),
    ],
)
def test_cityscapes_table6_with_the_stem_at_model_width(size, params, madds, tol_p, tol_m):
    p, m = _count(f"axial_deeplab_{size}", CITYSCAPES, num_classes=19, stem_width=WIDTH[size], arrangement="deeplab2")
    assert _off(p, params) < tol_p, (p, params)
    assert _off(m, madds) < tol_m, (m, madds)


def test_stem_width_is_what_brings_s_to_the_paper():
    """deeplab2's full-width stem puts S far above the paper; the multiplied stem does not."""
    _, full = _count("axial_deeplab_s", CITYSCAPES, arrangement="deeplab2")
    _, scaled = _count("axial_deeplab_s", CITYSCAPES, arrangement="deeplab2", stem_width=0.5)
    assert full / 220.8 - 1 > 0.15 and _off(scaled, 220.8) < 0.02


def test_table7_spans_keep_parameters_and_follow_the_madds():
    counts = {m: _count("axial_deeplab_l", CITYSCAPES, span=m, arrangement="deeplab2") for m in (5, 17, 65)}
    assert len({p for p, _ in counts.values()}) == 1  # the tables do not depend on the span
    assert _off(counts[5][0], 44.9) < 0.01
    for m, paper in ((5, 617.4), (17, 631.5), (65, 687.4)):
        assert _off(counts[m][1], paper) < 0.025, (m, counts[m][1], paper)
    assert counts[5][1] < counts[17][1] < counts[65][1]


def test_imagenet_table1():
    assert _off(_count("resnet50", (1, 3, 224, 224))[1], 4.1) < 0.01
    p, m = _count("axial_resnet_s_conv", (1, 3, 224, 224), stem_width=0.5, arrangement="deeplab2")
    assert _off(p, 12.4) < 0.01 and _off(m, 2.8) < 0.02


def test_info_prints_ours_beside_the_papers(capsys):
    assert main(["info", "axial_deeplab_s", "--input", "3x1025x2049", "--set", "stem_width=0.5"]) == 0
    out = capsys.readouterr().out
    assert "Table 6" in out
    ours = re.search(r"^ours\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    paper = re.search(r"^paper\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    diff = re.search(r"^difference\s+([+-][\d.]+)%\s+([+-][\d.]+)%$", out, re.M)
    assert ours and paper and diff, out
    assert (float(paper.group(1)), float(paper.group(2))) == (12.1, 220.8)
    assert float(diff.group(2)) == pytest.approx(100 * (float(ours.group(2)) / 220.8 - 1), abs=0.06)


def test_info_points_to_the_papers_input_size(capsys):
    assert main(["info", "axial_deeplab_l", "--set", "span=33"]) == 0
    out = capsys.readouterr().out
    assert "650.2B" in out and "--input 3x1025x2049" in out
    assert main(["info", "axial_resnet_s", "--num-classes", "10"]) == 0
    assert "paper" not in capsys.readouterr().out


def test_closest_fit_reproduces_every_madds_row():
    """Setting F of the README: stem x width, max-pool layout, a 256-channel instance decoder,
    strided attention counted as computed. Every M-Adds row of Tables 6 and 7 within 1.5%."""
    rows = [(f"axial_deeplab_{s}", 65, m) for s, m in (("s", 220.8), ("m", 419.6), ("l", 687.4), ("xl", 2446.8))]
    rows += [("axial_deeplab_l", span, m) for span, m in ((5, 617.4), (9, 622.1), (17, 631.5), (33, 650.2))]
    for name, span, paper in rows:
        model = build_on_meta(
            name,
            span=span,
            stem_width=WIDTH[name.rsplit("_", 1)[1]],
            arrangement="maxpool",
            instance_decoder_channels=256,
        )
        madds = count_complexity(model, CITYSCAPES, strided_attention="computed")["total"]["madds"] / 1e9
        assert _off(madds, paper) < 0.015, (name, span, madds, paper)


def test_strided_attention_counts():
    layer_free = build_on_meta("resnet50")  # no attention: both conventions agree
    kept = count_complexity(layer_free, (1, 3, 224, 224))["total"]["madds"]
    assert count_complexity(layer_free, (1, 3, 224, 224), strided_attention="computed")["total"]["madds"] == kept
    axial = build_on_meta("axial_resnet_s_conv", arrangement="deeplab2")
    kept = count_complexity(axial, (1, 3, 224, 224))["total"]["madds"]
    computed = count_complexity(axial, (1, 3, 224, 224), strided_attention="computed")["total"]["madds"]
    assert computed > kept
    with pytest.raises(ValueError, match="strided_attention"):
        count_complexity(axial, (1, 3, 224, 224), strided_attention="all")
