"""The training engine end to end on a tiny Axial-DeepLab and 64x64 synthetic scenes:

* two processes under torchrun (gloo) end with identical weights, equal (float tolerance)
  to one process training on the same global batch;
* a run killed with SIGKILL (between checkpoints, and in the middle of writing one) leaves
  only complete checkpoints, and the resumed run's losses equal an uninterrupted run's;
* train / evaluate / predict smoke runs through the CLI, including a corrupt input image.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from engine_testing import SUBPROCESS_ENV, run_torchrun, tiny_run

from axial_deeplab.cli import main
from axial_deeplab.engine import checkpoint as ck
from axial_deeplab.engine.config import config_from_dict, dump_config
from axial_deeplab.engine.metrics_log import read_metrics
from axial_deeplab.engine.train import train

STEPS = 6

TINY = tiny_run(
    # The reference attention normalises its similarity terms through its BatchNorm module,
    # which the engine synchronises across processes; the fast paths compute those moments
    # themselves (per process), so the cross-process equality below is checked on the reference.
    model={"kwargs": {"attention_kw": {"impl": "reference"}}},
    data={"options": {"train": {"length": 16}, "val": {"length": 4}}, "min_scale": 0.75, "max_scale": 1.25},
    solver={
        "optimizer": "sgd",
        "lr": 0.002,
        "momentum": 0.9,
        "grad_clip_norm": 5.0,
        "max_steps": STEPS,
        "batch_size": 4,
        "warmup_steps": 2,
    },
    train={"log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5, "eval_at_end": True},
    eval={"batch_size": 2},
)


def _config(run_dir, **sections):
    data = json.loads(json.dumps(TINY))
    data["experiment"]["output_dir"] = str(run_dir)
    for sec, values in sections.items():
        data[sec].update(values)
    return config_from_dict(data)


def _write_config(cfg, path):
    path.write_text(dump_config(cfg))
    return str(path)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run (the oracle of the other tests)."""
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = _config(run_dir)
    result = train(cfg)
    return {
        "cfg": cfg,
        "run_dir": run_dir,
        "result": result,
        "losses": _losses(run_dir),
        "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
    }


DDP_WORKER = textwrap.dedent("""
    import os, sys
    from safetensors.torch import save_file
    from axial_deeplab.engine.config import load_config
    from axial_deeplab.engine.train import train
    cfg = load_config(sys.argv[1])
    result = train(cfg)
    rank = int(os.environ["RANK"])
    save_file({k: v.detach().contiguous() for k, v in result.model.state_dict().items()},
              os.path.join(sys.argv[2], f"rank{rank}.safetensors"))
""")


FAST_LOCAL = {"span": 5, "attention_kw": {"impl": "auto"}}  # the default CPU fast path, local span


@pytest.mark.parametrize("variant", ["reference-global", "fast-local"])
def test_two_processes_match_one_process(reference, tmp_path, variant):
    """DDP over 2 processes equals one process on the global batch. The ``fast-local`` variant
    checks the similarity-BN statistics the attention math forms itself (in closed form, over
    in-span pairs) are summed over processes too."""
    from safetensors.torch import load_file

    model_kwargs = dict(TINY["model"]["kwargs"], **(FAST_LOCAL if variant == "fast-local" else {}))
    if variant == "fast-local":
        run_dir = tmp_path / "single"
        single_cfg = _config(run_dir, model={"name": TINY["model"]["name"], "kwargs": model_kwargs})
        result = train(single_cfg)
        reference = {
            "cfg": single_cfg,
            "run_dir": run_dir,
            "losses": _losses(run_dir),
            "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        }
    cfg = _config(tmp_path / "ddp", model={"name": TINY["model"]["name"], "kwargs": model_kwargs})
    proc = run_torchrun(tmp_path, DDP_WORKER, _write_config(cfg, tmp_path / "ddp.yaml"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert r0.keys() == r1.keys() == reference["state"].keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    moved = 0
    for k, single in reference["state"].items():
        if single.dtype.is_floating_point:
            torch.testing.assert_close(r0[k], single, rtol=1e-4, atol=1e-5, msg=f"DDP != single process: {k}")
            moved += 1
        else:
            assert torch.equal(r0[k], single), k  # num_batches_tracked
    assert moved > 50
    # the logged (rank-averaged) losses equal the single process's losses on the global batch
    ddp_losses = _losses(tmp_path / "ddp")
    assert sorted(ddp_losses) == list(range(1, STEPS + 1))
    for step, loss in reference["losses"].items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-4)
    # evaluation shards the held-out images over the processes and sums their statistics
    (ddp_eval,) = [r for r in read_metrics(str(tmp_path / "ddp")) if r["kind"] == "eval"]
    (ref_eval,) = [r for r in read_metrics(str(reference["run_dir"])) if r["kind"] == "eval"]
    assert ddp_eval["num_images"] == ref_eval["num_images"] == 4
    for k in ("PQ", "SQ", "RQ", "mIoU", "pixel_accuracy"):
        assert ddp_eval[k] == pytest.approx(ref_eval[k], abs=1e-3), k
    # and the weights really trained: they differ from the initialisation
    from axial_deeplab.data.synthetic import synthetic_metadata
    from axial_deeplab.engine.builders import build_model

    torch.manual_seed(TINY["experiment"]["seed"])
    init = build_model(reference["cfg"], synthetic_metadata()).state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in r0 if r0[k].dtype.is_floating_point)


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from axial_deeplab.engine.config import load_config
    from axial_deeplab.engine.train import train
    mode, kill_step = sys.argv[2], int(sys.argv[3])
    if mode == "during_checkpoint":
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            if isinstance(obj, dict) and obj.get("step") == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)  # files written, folder not yet renamed into place
        torch.save = dying_save
        on_log = None
    else:
        def on_log(step, values):
            if step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
    train(load_config(sys.argv[1]), resume=len(sys.argv) > 4, on_log=on_log)
""")


def _check_checkpoints(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    ckpts = ck.list_checkpoints(root)
    for path in ckpts:
        ck.load_training_state(path)  # readable with weights_only=True
        from safetensors.torch import load_file

        load_file(os.path.join(path, ck.MODEL_FILE))
    return ckpts


@pytest.mark.parametrize("mode, kill_step, expect_last", [("between_checkpoints", 3, 2), ("during_checkpoint", 4, 2)])
def test_sigkill_then_resume_matches_uninterrupted(reference, tmp_path, mode, kill_step, expect_last):
    run_dir = tmp_path / "run"
    cfg = _config(run_dir)
    cfg_path = _write_config(cfg, tmp_path / "cfg.yaml")
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), cfg_path, mode, str(kill_step)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = _check_checkpoints(str(run_dir))
    assert [os.path.basename(p) for p in ckpts][-1] == f"step-{expect_last:06d}"
    if mode == "during_checkpoint":
        leftovers = [n for n in os.listdir(run_dir / "checkpoints") if ".tmp-" in n]
        assert leftovers, "the kill should have left a half-written checkpoint folder"
    # resume in this process and compare every logged loss with the uninterrupted run
    result = train(cfg, resume=True)
    assert result.step == STEPS
    assert not [n for n in os.listdir(run_dir / "checkpoints") if ".tmp-" in n]
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in reference["losses"].items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"step {step}"
    for k, v in result.model.state_dict().items():
        assert torch.allclose(v.float(), reference["state"][k].float(), rtol=1e-6, atol=1e-7), k
    _check_checkpoints(str(run_dir))


def test_train_refuses_to_clobber_a_run(reference):
    from axial_deeplab.engine.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        train(reference["cfg"])


def test_evaluate_command(reference, tmp_path, capsys):
    out_json = tmp_path / "metrics.json"
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(reference["run_dir"]),
            "--no-progress",
            "--per-class",
            "--json",
            str(out_json),
            "--overlays",
            str(tmp_path / "pics"),
            "--num-overlays",
            "2",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "All" in text and "Things" in text and "Stuff" in text and "mIoU" in text
    metrics = json.loads(out_json.read_text())
    assert metrics["num_images"] == 4
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU"):
        assert 0.0 <= metrics[k] <= 100.0
    assert len(os.listdir(tmp_path / "pics")) == 2
    # a model fed resized images (COCO recipe: longer side 641) is scored at the labels' own size
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(reference["run_dir"]),
            "--no-progress",
            "--json",
            str(out_json),
            "--overlays",
            str(tmp_path / "pics48"),
            "--num-overlays",
            "1",
            "data.resize_long_side=48",
        ]
    )
    assert rc == 0
    assert json.loads(out_json.read_text())["num_images"] == 4
    from PIL import Image

    (pic,) = os.listdir(tmp_path / "pics48")
    assert Image.open(tmp_path / "pics48" / pic).size[1] == 64 + 14  # full-size panels under a title row


def test_predict_folder_with_a_corrupt_image(reference, tmp_path, capsys):
    from axial_deeplab.data.synthetic import SyntheticPanoptic
    from axial_deeplab.engine.visualize import save_png, to_uint8_image

    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    ds = SyntheticPanoptic("val", length=2, image_size=(64, 80))
    save_png(str(folder / "a.png"), to_uint8_image(ds[0]["image"]))
    save_png(str(folder / "more" / "b.png"), to_uint8_image(ds[1]["image"]))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    out = tmp_path / "out"
    rc = main(
        ["predict", "--checkpoint", str(reference["run_dir"]), str(folder), "--output", str(out), "--no-progress"]
    )
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.jpg" in captured.err and "a.png" not in captured.err
    assert "2 of 3 images processed" in captured.out
    assert sorted(os.listdir(out / "panoptic")) == ["a.png", "more__b.png"]
    assert sorted(os.listdir(out / "overlay")) == ["a.png", "more__b.png"]
    pred = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in pred["annotations"]] == [1, 2]  # 1..N over the images predicted
    assert [(i["id"], i["file_name"]) for i in pred["images"]] == [(1, "a.png"), (2, "more/b.png")]
    assert [a["file_name"] for a in pred["annotations"]] == ["a.png", "more__b.png"]
    from axial_deeplab.data.panoptic_io import read_panoptic_png

    ids = read_panoptic_png(str(out / "panoptic" / "a.png"))
    assert ids.shape == (64, 80)
    seg_ids = {s["id"] for s in pred["annotations"][0]["segments_info"]}
    assert set(int(v) for v in set(ids.ravel().tolist()) - {0}) == seg_ids


def test_predict_on_missing_input_is_a_user_error(reference, tmp_path, capsys):
    rc = main(
        [
            "predict",
            "--checkpoint",
            str(reference["run_dir"]),
            str(tmp_path / "nope.png"),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    assert "nope.png" in capsys.readouterr().err


def test_demo_command_smoke(tmp_path, capsys):
    """The demo's wiring (train -> evaluate -> table, overlays, curves) on a 2-step budget."""
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--output",
            str(out),
            "--no-progress",
            "--num-overlays",
            "2",
            "--threads",
            "1",
            "solver.max_steps=2",
            "solver.warmup_steps=0",
            "solver.batch_size=2",
            "data.num_workers=0",
            "data.options.val.length=2",
            "train.tensorboard=false",
            "train.checkpoint_every=2",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "PQ" in text and "Things" in text and "mIoU" in text
    assert str(out / "overlays") in text and str(out / "training_curves.png") in text
    assert len(os.listdir(out / "overlays")) == 2
    assert (out / "training_curves.png").stat().st_size > 1000
    evals = [r for r in read_metrics(str(out)) if r["kind"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["PQ"] <= 100.0


def test_experiment_compile_runs_the_model_through_torch_compile(tmp_path, monkeypatch):
    """``experiment.compile: true`` hands the training model to torch.compile (static shapes: one
    crop size); off by default. (Compiled numerics are tested on the attention operator itself.)"""
    calls = []

    def spy(model, **kw):
        calls.append(kw)
        return model

    monkeypatch.setattr(torch, "compile", spy)
    train(_config(tmp_path / "off", solver={"max_steps": 1}, train={"eval_at_end": False}))
    assert calls == []
    train(_config(tmp_path / "on", experiment={"compile": True}, solver={"max_steps": 1}, train={"eval_at_end": False}))
    assert calls == [{"dynamic": False, "options": {"force_layout_optimization": True}}]  # on CPU
