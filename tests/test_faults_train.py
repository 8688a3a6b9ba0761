"""Faults around ``train``: what ``--overwrite`` may delete, how ``--resume`` / ``--resume-from``
are spelt and which changed settings a resume accepts, Ctrl-C, a diverging loss, and a corrupt
image met by a DataLoader worker. Each test asserts the message names the culprit and that
what the user had (files, runs, checkpoints) is still there."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from engine_testing import SUBPROCESS_ENV, run_torchrun
from PIL import Image
from test_engine_train import STEPS, _check_checkpoints, _config, _losses, _write_config

from axial_deeplab.cli import build_parser, main
from axial_deeplab.engine import checkpoint as ck
from axial_deeplab.engine.train import RUN_MARKER, train


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6): the oracle, and a run folder to copy."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(_config(run_dir))
    return {
        "run_dir": run_dir,
        "losses": _losses(run_dir),
        "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
    }


def _copy_run(reference, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(reference["run_dir"], dst)
    return dst


def _cfg_file(tmp_path, run_dir, **sections):
    return _write_config(_config(run_dir, **sections), tmp_path / "cfg.yaml")


def _snapshot(folder):
    """Every file below ``folder`` with its bytes' size and mtime (to show nothing was touched)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def _assert_same_weights(model_state, reference):
    for k, v in model_state.items():
        assert torch.allclose(v.float(), reference["state"][k].float(), rtol=1e-6, atol=1e-7), k


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("axial-deeplab train")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------
# --overwrite deletes only a run of ours, and only once every check has passed
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_run", [False, True], ids=["plain-folder", "run-folder-with-a-user-file"])
def test_overwrite_refuses_a_folder_holding_files_it_did_not_write(reference, tmp_path, capsys, with_run):
    folder = _copy_run(reference, tmp_path) if with_run else tmp_path / "x"
    folder.mkdir(exist_ok=True)
    (folder / "thesis.txt").write_text("four years of work")
    before = _snapshot(folder)
    rc = main(["train", "--config", _cfg_file(tmp_path, folder, solver={"max_steps": 2}), "--overwrite"])
    assert rc == 2
    line = _error_line(capsys)
    assert str(folder) in line and "thesis.txt" in line and "refusing to delete" in line
    assert _snapshot(folder) == before


@pytest.mark.parametrize("bad", ["data.root=/nonexistent", "model.name=no_such_model"])
def test_overwrite_with_a_bad_setting_leaves_the_run_intact(reference, tmp_path, capsys, bad):
    run_dir = _copy_run(reference, tmp_path)
    before = _snapshot(run_dir)
    coco = {"data": {"dataset": "coco", "options": {}}} if bad.startswith("data.root") else {}
    rc = main(["train", "--config", _cfg_file(tmp_path, run_dir, **coco), "--overwrite", bad])
    assert rc == 2
    assert bad.split("=")[1] in _error_line(capsys)
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("marker", [True, False], ids=["marked-run", "run-from-before-the-marker"])
def test_overwrite_replaces_a_run_folder(reference, tmp_path, marker):
    run_dir = _copy_run(reference, tmp_path)
    assert (run_dir / RUN_MARKER).is_file()
    if not marker:
        (run_dir / RUN_MARKER).unlink()
    rc = main(
        [
            "train",
            "--config",
            _cfg_file(tmp_path, run_dir),
            "--overwrite",
            "solver.max_steps=2",
            "train.eval_at_end=false",
        ]
    )
    assert rc == 0
    names = [os.path.basename(p) for p in ck.list_checkpoints(str(run_dir / "checkpoints"))]
    assert names == ["step-000002"]
    assert not (run_dir / "checkpoints" / "best").exists()
    assert sorted(_losses(run_dir)) == [1, 2]
    assert (run_dir / RUN_MARKER).is_file()


def test_a_new_run_does_not_replace_a_users_files(tmp_path, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine: true\n")
    rc = main(["train", "--config", _cfg_file(tmp_path, folder)])
    assert rc == 2
    assert str(folder / "config.yaml") in _error_line(capsys)
    assert (folder / "config.yaml").read_text() == "mine: true\n"


# ------------------------------------------------------------------------------------------
# --resume is a flag, --resume-from PATH names a checkpoint
# ------------------------------------------------------------------------------------------
def test_resume_flag_does_not_swallow_an_override():
    args = build_parser().parse_args(["train", "--config", "f.yaml", "--resume", "solver.max_steps=6"])
    assert args.resume is True and args.resume_from is None
    assert args.overrides == ["solver.max_steps=6"]


def test_old_resume_spelling_is_refused_with_a_hint(reference, tmp_path, capsys):
    run_dir = _copy_run(reference, tmp_path)
    ckpt = str(run_dir / "checkpoints" / "step-000004")
    before = _snapshot(run_dir)
    rc = main(["train", "--config", _cfg_file(tmp_path, run_dir), "--resume", ckpt])
    assert rc == 2
    line = _error_line(capsys)
    assert f"--resume-from {ckpt}" in line
    assert _snapshot(run_dir) == before


def test_resume_from_a_checkpoint_continues_exactly(reference, tmp_path):
    run_dir = _copy_run(reference, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")
    ckpt = str(run_dir / "checkpoints" / "step-000004")
    result = train(_config(run_dir), resume=ckpt)  # the Python API takes a path too
    assert result.step == STEPS
    _assert_same_weights(result.model.state_dict(), reference)


# ------------------------------------------------------------------------------------------
# A resume refuses changed settings it cannot honour, honours and records the others
# ------------------------------------------------------------------------------------------
def test_resume_refuses_changed_training_settings(reference, tmp_path, capsys):
    run_dir = _copy_run(reference, tmp_path)
    ckpt = str(run_dir / "checkpoints" / "step-000004")
    before = _snapshot(run_dir)
    rc = main(
        [
            "train",
            "--config",
            _cfg_file(tmp_path, run_dir),
            "--resume-from",
            ckpt,
            "solver.lr=0.05",
            "model.kwargs.width=0.25",
            "train.log_every=2",
        ]
    )
    assert rc == 2
    line = _error_line(capsys)
    assert ckpt in line
    assert "solver.lr: 0.002 -> 0.05" in line and "model.kwargs.width: 0.125 -> 0.25" in line
    assert "train.log_every" not in line.split("Settings that may change")[0]  # allowed: not listed as refused
    assert "--overwrite" in line
    assert _snapshot(run_dir) == before


def test_resume_honours_and_records_allowed_changes(reference, tmp_path, capsys):
    run_dir = _copy_run(reference, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")
    cfg = _config(
        run_dir,
        train={
            "log_every": 2,
            "checkpoint_every": 2,
            "keep_checkpoints": 5,
            "eval_every": 0,
            "eval_at_end": False,
            "tensorboard": False,
            "progress": False,
            "plot_curves": False,
        },
    )
    result = train(cfg, resume=True)
    out = capsys.readouterr().out
    assert "resuming with changed settings" in out
    assert "train.log_every: 1 -> 2" in out and "train.eval_at_end: True -> False" in out
    assert result.step == STEPS
    _assert_same_weights(result.model.state_dict(), reference)  # still an exact resume
    info = ck.read_checkpoint_info(str(run_dir / "checkpoints" / "step-000006"))
    (entry,) = info["resumed_with_changes"]
    assert entry["step"] == 4 and entry["changes"]["train.log_every"] == [1, 2]
    assert "log_every: 2" in (run_dir / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------
# Ctrl-C saves the last completed step; --resume continues exactly
# ------------------------------------------------------------------------------------------
SIGINT_DRIVER = textwrap.dedent("""
    import os, signal, sys
    from axial_deeplab.engine import metrics_log
    from axial_deeplab.cli import main
    real_log = metrics_log.MetricsLogger.log
    def log(self, kind, step, values):
        real_log(self, kind, step, values)
        if kind == "train" and step == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, in the middle of step bookkeeping
    metrics_log.MetricsLogger.log = log
    sys.exit(main(sys.argv[2:]))
""")


def test_sigint_saves_a_checkpoint_and_resume_matches_uninterrupted(reference, tmp_path):
    run_dir = tmp_path / "run"
    cfg_path = _cfg_file(tmp_path, run_dir)
    driver = tmp_path / "driver.py"
    driver.write_text(SIGINT_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), "3", "train", "--config", cfg_path],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.startswith("axial-deeplab train")]
    assert len(last) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    saved = str(run_dir / "checkpoints" / "step-000003")
    assert saved in last[0] and "--resume" in last[0]
    ckpts = _check_checkpoints(str(run_dir))  # complete and readable
    assert [os.path.basename(p) for p in ckpts] == ["step-000002", "step-000003"]
    assert ck.load_training_state(saved)["step"] == 3
    assert sorted(_losses(run_dir)) == [1, 2, 3]
    result = train(_config(run_dir), resume=True)
    assert result.step == STEPS
    resumed = _losses(run_dir)
    for step, loss in reference["losses"].items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), f"step {step}"
    _assert_same_weights(result.model.state_dict(), reference)


def test_ctrl_c_at_a_terminal_with_data_workers(tmp_path):
    """SIGINT to the whole process group (main process and its DataLoader worker), as a terminal's
    Ctrl-C sends it, at a moment the test does not choose."""
    run_dir = tmp_path / "run"
    cfg_path = _cfg_file(
        tmp_path,
        run_dir,
        solver={"max_steps": 500},
        train={"checkpoint_every": 1000, "eval_at_end": False},
        data={"num_workers": 1},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "axial_deeplab.cli", "train", "--config", cfg_path],
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() or len(_losses(run_dir)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (ckpt,) = _check_checkpoints(str(run_dir))
    step = ck.load_training_state(ckpt)["step"]
    assert 2 <= step < 500 and os.path.basename(ckpt) == f"step-{step:06d}"
    assert ckpt in err and max(_losses(run_dir)) == step


DDP_SIGINT_WORKER = textwrap.dedent("""
    import os, signal, sys
    from axial_deeplab.engine.config import load_config
    from axial_deeplab.engine.train import TrainingInterrupted, train
    def on_log(step, values):
        if step == 3 and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGINT)  # one process only: the others must stop with it
    try:
        train(load_config(sys.argv[1]), on_log=on_log)
    except TrainingInterrupted as e:
        print(f"rank {os.environ['RANK']} stopped after step {e.step}", flush=True)
        sys.exit(130)
""")


@pytest.mark.slow
def test_sigint_under_torchrun_stops_every_process_at_one_step(tmp_path):
    run_dir = tmp_path / "run"
    cfg_path = _cfg_file(tmp_path, run_dir, train={"eval_at_end": False})
    proc = run_torchrun(tmp_path, DDP_SIGINT_WORKER, cfg_path)
    assert "rank 0 stopped after step 3" in proc.stdout and "rank 1 stopped after step 3" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-3000:]
    )
    ckpts = _check_checkpoints(str(run_dir))
    assert [os.path.basename(p) for p in ckpts] == ["step-000002", "step-000003"]
    assert ck.load_training_state(ckpts[-1])["step"] == 3


# ------------------------------------------------------------------------------------------
# A diverging loss: one line, exit 2, earlier checkpoints intact
# ------------------------------------------------------------------------------------------
def test_nan_loss_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from axial_deeplab.engine import train as engine_train

    real = engine_train._compute_losses
    calls = []

    def diverging(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(engine_train, "_compute_losses", diverging)
    run_dir = tmp_path / "run"
    rc = main(["train", "--config", _cfg_file(tmp_path, run_dir)])
    assert rc == 2
    line = _error_line(capsys)
    kept = str(run_dir / "checkpoints" / "step-000002")
    assert "diverged" in line and "nan" in line and "step 4" in line and kept in line
    ckpts = _check_checkpoints(str(run_dir))
    assert [os.path.basename(p) for p in ckpts] == ["step-000002"]
    assert ck.load_training_state(kept)["step"] == 2


# ------------------------------------------------------------------------------------------
# A corrupt image met by a DataLoader worker: the same clean error as in the main process
# ------------------------------------------------------------------------------------------
CATS = [
    {"id": 1, "name": "thing", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "ground", "isthing": 0, "color": [70, 130, 180]},
]


def _coco_with_a_truncated_image(root, n=4, size=32):
    img_dir = root / "train2017"
    png_dir = root / "annotations" / "panoptic_train2017"
    img_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for k in range(n):
        ids = np.full((size, size), 2, np.int64)
        ids[4:14, 6:16] = 5
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        name = f"{k:012d}"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(img_dir / f"{name}.jpg")
        Image.fromarray(rgb).save(png_dir / f"{name}.png")
        segs = [
            {"id": 2, "category_id": 2, "iscrowd": 0, "area": int((ids == 2).sum()), "bbox": [0, 0, size, size]},
            {"id": 5, "category_id": 1, "iscrowd": 0, "area": 100, "bbox": [6, 4, 10, 10]},
        ]
        images.append({"id": k + 1, "file_name": f"{name}.jpg", "height": size, "width": size})
        anns.append({"image_id": k + 1, "file_name": f"{name}.png", "segments_info": segs})
    (root / "annotations" / "panoptic_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS})
    )
    bad = img_dir / f"{1:012d}.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated mid-stream
    return bad


def test_corrupt_image_in_a_worker_gives_the_main_process_error(tmp_path, capsys):
    root = tmp_path / "coco"
    bad = _coco_with_a_truncated_image(root)
    lines = {}
    for workers in (0, 1):
        run_dir = tmp_path / f"run{workers}"
        cfg = _cfg_file(
            tmp_path,
            run_dir,
            data={"dataset": "coco", "root": str(root), "options": {}, "num_workers": workers, "crop_size": [32, 32]},
            solver={"max_steps": 2},
            train={"eval_at_end": False},
        )
        rc = main(["train", "--config", cfg])
        assert rc == 2
        lines[workers] = _error_line(capsys)
    assert str(bad) in lines[0] and "DataLoader worker" not in lines[1]
    assert lines[1] == lines[0]


def test_worker_error_keeps_its_type():
    """The error a worker carries is rebuilt with its own type and message."""
    from axial_deeplab.data import PanopticFormatError
    from axial_deeplab.engine.sampling import CarriedError, CarryingCollate, reraise_carried

    carried = CarryingCollate(lambda samples: samples)([{"a": 1}, CarriedError(PanopticFormatError("x.jpg: bad"))])
    with pytest.raises(PanopticFormatError, match=r"^x\.jpg: bad$"):
        reraise_carried(carried)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        reraise_carried(CarriedError(FileNotFoundError(2, "No such file", "nope.png")))


def test_corrupt_image_in_an_evaluation_worker_gives_the_main_process_error(tmp_path):
    """Evaluation's loader carries a worker's input error the same way as training's."""
    from axial_deeplab.engine.builders import build_dataset, build_model, dataset_metadata
    from axial_deeplab.engine.evaluate import evaluate_model

    root = tmp_path / "coco"
    bad = _coco_with_a_truncated_image(root)
    errors = {}
    for workers in (0, 1):
        cfg = _config(
            tmp_path / "run",
            data={
                "dataset": "coco",
                "root": str(root),
                "options": {},
                "eval_num_workers": workers,
                "crop_size": [32, 32],
            },
        )
        dataset = build_dataset(cfg, "train")
        metadata = dataset_metadata(dataset)
        model = build_model(cfg, metadata)
        with pytest.raises(ValueError) as info:
            evaluate_model(model, dataset, cfg, torch.device("cpu"), metadata=metadata, progress=False)
        errors[workers] = (type(info.value), str(info.value))
    assert str(bad) in errors[0][1] and "DataLoader worker" not in errors[1][1]
    assert errors[1] == errors[0]


class _Evil:
    """Unpickling this runs os.mkdir: the marker folder appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickles_are_refused_without_running(reference, tmp_path, capsys):
    """A pickle that runs code, as a run's training state (``--resume``), as ``--checkpoint``
    weights (``evaluate``) and as ``model.pretrained``: each refused by name, nothing ran."""
    marker = tmp_path / "code-ran"
    run_dir = _copy_run(reference, tmp_path)
    newest = ck.latest_checkpoint(str(run_dir / "checkpoints"))
    evil_state = os.path.join(newest, ck.STATE_FILE)
    torch.save({"step": 6, "rng": _Evil(marker)}, evil_state)
    cfg = _cfg_file(tmp_path, run_dir)
    assert main(["train", "--config", cfg, "--resume"]) == 2
    assert evil_state in capsys.readouterr().err

    evil_weights = tmp_path / "weights.pt"
    torch.save({"model": _Evil(marker)}, evil_weights)
    assert main(["evaluate", "--checkpoint", str(evil_weights), "--config", cfg, "--no-progress"]) == 2
    assert str(evil_weights) in capsys.readouterr().err

    assert main(["train", "--config", _cfg_file(tmp_path, tmp_path / "fresh"), f"model.pretrained={evil_weights}"]) == 2
    assert str(evil_weights) in capsys.readouterr().err
    assert not marker.exists()
