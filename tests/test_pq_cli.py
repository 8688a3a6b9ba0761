"""The ``axial-deeplab pq`` command on files in COCO-panoptic format."""

import contextlib
import io
import json

import numpy as np
import pytest

from axial_deeplab.cli import main
from axial_deeplab.data import PanopticWriter, SyntheticPanoptic


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory):
    """Synthetic val ground truth on disk, a perfect prediction and a degraded one."""
    root = tmp_path_factory.mktemp("pq_cli")
    ds = SyntheticPanoptic("val", length=6, crowd_probability=0.5)
    paths = ds.write_coco_panoptic(root / "gt")
    md = ds.metadata
    rng = np.random.default_rng(0)
    with (
        PanopticWriter(root / "perfect.json", root / "perfect", md) as perfect,
        PanopticWriter(root / "degraded.json", root / "degraded", md) as degraded,
    ):
        for i in range(len(ds)):
            sc = ds.generate(i)
            sem = sc.semantic.astype(np.int64)
            pan = np.where(sem == 255, -1, sem * md.label_divisor + sc.instance)
            perfect.add_prediction(ds.image_id(i), pan)
            bad = pan.copy()
            bad[:, : int(rng.integers(10, 40))] = 0  # a wrong "sky" band over the left part
            degraded.add_prediction(ds.image_id(i), bad)
    return root, paths


def test_perfect_prediction_scores_one(synthetic_files):
    root, paths = synthetic_files
    out_json = root / "perfect_result.json"
    code, out, _ = _run(
        [
            "pq",
            "--gt-json",
            str(paths["json"]),
            "--gt-folder",
            str(paths["png_dir"]),
            "--pred-json",
            str(root / "perfect.json"),
            "--pred-folder",
            str(root / "perfect"),
            "--json",
            str(out_json),
        ]
    )
    assert code == 0
    lines = {line.split("|")[0].strip(): line.split("|")[1].split() for line in out.splitlines() if "|" in line}
    assert lines["All"] == ["100.0", "100.0", "100.0", "5"]
    assert lines["Things"][-1] == "3" and lines["Stuff"][-1] == "2"
    res = json.loads(out_json.read_text())
    assert set(res) == {"All", "Things", "Stuff", "per_class"}
    assert res["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 5}


def test_degraded_prediction_matches_cityscapesscripts(synthetic_files, tmp_path):
    from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic

    root, paths = synthetic_files
    args = [str(paths["json"]), str(paths["png_dir"]), str(root / "degraded.json"), str(root / "degraded")]
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = evaluatePanoptic(*args, str(tmp_path / "cs.json"))
    code, out, _ = _run(
        [
            "pq",
            "--gt-json",
            args[0],
            "--gt-folder",
            args[1],
            "--pred-json",
            args[2],
            "--pred-folder",
            args[3],
            "--json",
            str(tmp_path / "ours.json"),
            "--workers",
            "2",
            "--per-class",
        ]
    )
    assert code == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert 0 < ours["All"]["pq"] < 1
    for group in ("All", "Things", "Stuff"):
        for k in ("pq", "sq", "rq"):
            assert ours[group][k] == pytest.approx(theirs[group][k], abs=1e-9)
        assert ours[group]["n"] == theirs[group]["n"]
    for cat, r in theirs["per_class"].items():
        assert ours["per_class"][str(cat)]["pq"] == pytest.approx(r["pq"], abs=1e-9)
    assert "sky" in out and "rectangle" in out  # --per-class prints category names
    row = next(line for line in out.splitlines() if line.startswith("All"))
    assert row.split("|")[1].split()[0] == f"{100 * theirs['All']['pq']:.1f}"


def test_errors_exit_2_and_name_the_file(synthetic_files, tmp_path):
    root, paths = synthetic_files
    pred = json.loads((root / "perfect.json").read_text())
    pred["annotations"][1]["segments_info"][0]["category_id"] = 77
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(pred))
    code, _, err = _run(
        [
            "pq",
            "--gt-json",
            str(paths["json"]),
            "--gt-folder",
            str(paths["png_dir"]),
            "--pred-json",
            str(bad),
            "--pred-folder",
            str(root / "perfect"),
            "--workers",
            "1",
        ]
    )
    assert code == 2
    assert "bad.json" in err and "unknown category_id 77" in err
    code, _, err = _run(
        [
            "pq",
            "--gt-json",
            str(tmp_path / "missing.json"),
            "--gt-folder",
            str(paths["png_dir"]),
            "--pred-json",
            str(bad),
            "--pred-folder",
            str(root / "perfect"),
        ]
    )
    assert code == 2 and "missing.json" in err
