"""``axial-deeplab predict`` and its output folder: earlier predictions are only added to or
replaced when asked, a second run into the same folder stops at once, the output folder is never
read as input, a bad ``--output`` and a failed write end in one line naming the path (exit 2)
with nothing half-written left behind. A tiny randomly initialised checkpoint keeps it fast.
"""

import errno
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from engine_testing import save_untrained_checkpoint, tiny_run

from axial_deeplab.cli import main
from axial_deeplab.errors import output_error

TINY = tiny_run(data={"options": {"val": {"length": 2}}}, eval={"batch_size": 1})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny Axial-DeepLab saved as a checkpoint folder with its classes."""
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "step-000000", TINY)


@pytest.fixture(scope="module")
def pictures():
    """Three small synthetic RGB images as PNG bytes."""
    import io

    from PIL import Image

    from axial_deeplab.data.synthetic import SyntheticPanoptic
    from axial_deeplab.engine.visualize import to_uint8_image

    ds = SyntheticPanoptic("val", length=3, image_size=(64, 64))
    out = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(to_uint8_image(ds[i]["image"])).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _images(folder, pictures, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / f"{name}.png").write_bytes(pictures[i % len(pictures)])
    return folder


def _predict(checkpoint, *args):
    return main(["predict", "--checkpoint", checkpoint, "--no-progress", *map(str, args)])


def _snapshot(folder):
    """Every file below ``folder`` (relative path -> bytes)."""
    return {
        os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(folder)
        for n in names
    }


def _ids(out):
    """The names of the predicted images (their PNGs' names: the image ids are integers)."""
    return [a["file_name"].rsplit(".", 1)[0] for a in json.loads((out / "predictions.json").read_text())["annotations"]]


def _error_line(err, *parts):
    """The single error line of the command; each of ``parts`` appears in it."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("axial-deeplab predict: error:"), err
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Earlier predictions: refused, added to (--add) or replaced (--replace)
# ---------------------------------------------------------------------------------------------
def test_folder_with_predictions_is_refused_and_left_as_it_was(checkpoint, pictures, tmp_path, capsys):
    src = _images(tmp_path / "in", pictures, "a", "b")
    out = tmp_path / "out"
    assert _predict(checkpoint, src, "--output", out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    other = _images(tmp_path / "in2", pictures, "a")
    assert _predict(checkpoint, other, "--output", out) == 2
    _error_line(capsys.readouterr().err, out, "already holds predictions", "--add", "--replace")
    assert _snapshot(out) == before


def test_new_empty_or_unrelated_folder_is_accepted(checkpoint, pictures, tmp_path, capsys):
    src = _images(tmp_path / "in", pictures, "a")
    (tmp_path / "empty").mkdir()
    assert _predict(checkpoint, src, "--output", tmp_path / "empty") == 0
    assert _predict(checkpoint, src, "--output", tmp_path / "new" / "deeper") == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "panoptic").mkdir()
    (mine / "panoptic" / "README").write_text("mine too")
    assert _predict(checkpoint, src, "--output", mine) == 0
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (mine / "panoptic" / "README").read_text() == "mine too"
    assert _ids(mine) == ["a"]


def test_add_merges_new_images_and_refuses_taken_names(checkpoint, pictures, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(checkpoint, _images(tmp_path / "one", pictures, "a", "b"), "--output", out) == 0
    first = _snapshot(out)
    assert _predict(checkpoint, _images(tmp_path / "two", pictures, "c"), "--output", out, "--add") == 0
    assert "added to the 2 earlier ones" in capsys.readouterr().out
    pred = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in pred["annotations"]] == [1, 2, 3]  # the added images continue the ids
    assert [(i["id"], i["file_name"]) for i in pred["images"]] == [(1, "a.png"), (2, "b.png"), (3, "c.png")]
    assert sorted(os.listdir(out / "panoptic")) == ["a.png", "b.png", "c.png"]
    assert sorted(os.listdir(out / "overlay")) == ["a.png", "b.png", "c.png"]
    after = _snapshot(out)
    assert all(after[k] == v for k, v in first.items() if k != "predictions.json")  # earlier PNGs untouched
    # a name already there is refused, before anything is written
    assert _predict(checkpoint, _images(tmp_path / "three", pictures, "b", "d"), "--output", out, "--add") == 2
    _error_line(capsys.readouterr().err, out, "named b", "--replace")
    assert _snapshot(out) == after


def test_add_refuses_predictions_of_other_categories(checkpoint, pictures, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(checkpoint, _images(tmp_path / "one", pictures, "a"), "--output", out) == 0
    pred = json.loads((out / "predictions.json").read_text())
    pred["categories"][0]["name"] = "something else"
    (out / "predictions.json").write_text(json.dumps(pred))
    before = _snapshot(out)
    capsys.readouterr()
    assert _predict(checkpoint, _images(tmp_path / "two", pictures, "c"), "--output", out, "--add") == 2
    _error_line(capsys.readouterr().err, out / "predictions.json", "categories")
    assert _snapshot(out) == before


def test_replace_removes_only_our_earlier_predictions(checkpoint, pictures, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(checkpoint, _images(tmp_path / "one", pictures, "a", "b"), "--output", out) == 0
    (out / "notes.txt").write_text("keep me")
    (out / "panoptic" / "README").write_text("mine too")
    (out / "panoptic" / "stale.png.x1y2.tmp").write_bytes(b"half")  # a write killed midway
    assert _predict(checkpoint, _images(tmp_path / "two", pictures, "c"), "--output", out, "--replace") == 0
    assert _ids(out) == ["c"]
    assert sorted(os.listdir(out / "panoptic")) == ["README", "c.png"]
    assert sorted(os.listdir(out / "overlay")) == ["c.png"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "panoptic" / "README").read_text() == "mine too"


def test_add_and_replace_exclude_each_other(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _predict(checkpoint, tmp_path, "--output", tmp_path / "o", "--add", "--replace")
    assert e.value.code == 2
    assert "--replace" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# One run at a time per output folder
# ---------------------------------------------------------------------------------------------
def test_second_run_into_a_locked_folder_fails_at_once(checkpoint, pictures, tmp_path, capsys):
    src = _images(tmp_path / "in", pictures, "a")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".predict.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
        assert _predict(checkpoint, src, "--output", out) == 2
        _error_line(capsys.readouterr().err, out, "another predict run")
        assert sorted(os.listdir(out)) == [".predict.lock"]
    finally:
        os.close(fd)
    assert _predict(checkpoint, src, "--output", out) == 0  # free again


def test_lock_is_held_for_the_whole_run(checkpoint, pictures, tmp_path, monkeypatch):
    """While images are read and written another opener of the lock file is turned away, and
    the lock is free once the run is over."""
    from axial_deeplab.data import panoptic_io

    src = _images(tmp_path / "in", pictures, "a", "b")
    out = tmp_path / "out"
    real_read, seen = panoptic_io.read_image, []

    def read_image(path):
        fd = os.open(out / ".predict.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("free")
        except BlockingIOError:
            seen.append("held")
        finally:
            os.close(fd)
        return real_read(path)

    monkeypatch.setattr(panoptic_io, "read_image", read_image)
    assert _predict(checkpoint, src, "--output", out) == 0
    assert seen == ["held", "held"]
    fd = os.open(out / ".predict.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The output folder is never read as input
# ---------------------------------------------------------------------------------------------
def test_output_inside_the_input_folder_is_not_read(checkpoint, pictures, tmp_path, capsys):
    src = _images(tmp_path / "in", pictures, "a", "b")
    out = src / "out"
    for extra in ([], ["--replace"]):
        assert _predict(checkpoint, src, "--output", out, *extra) == 0
        captured = capsys.readouterr()
        assert "2 of 2 images processed" in captured.out
        assert _ids(out) == ["a", "b"]
    assert "4 file(s) under the output folder" in captured.err  # 2 panoptic + 2 overlay PNGs
    assert _predict(checkpoint, src, "--output", out) == 2  # the refusal stays one line
    _error_line(capsys.readouterr().err, out, "already holds predictions")


def test_output_equal_to_the_input_folder_skips_only_our_outputs(checkpoint, pictures, tmp_path, capsys):
    src = _images(tmp_path / "in", pictures, "a", "b")
    for extra in ([], ["--replace"]):
        assert _predict(checkpoint, src, "--output", src, *extra) == 0
        assert "2 of 2 images processed" in capsys.readouterr().out
        assert _ids(src) == ["a", "b"]
    assert (src / "a.png").read_bytes() == pictures[0]


def test_collect_images_api_reports_what_it_skipped(pictures, tmp_path):
    from axial_deeplab.engine.predict import collect_images

    src = _images(tmp_path / "in", pictures, "a")
    _images(src / "out" / "panoptic", pictures, "a")
    skipped = []
    assert collect_images([str(src)], output_dir=str(src / "out"), skipped=skipped) == [src / "a.png"]
    assert skipped == [src / "out" / "panoptic" / "a.png"]
    assert len(collect_images([str(src)])) == 2  # without output_dir: as before


# ---------------------------------------------------------------------------------------------
# A bad --output: one line naming the path
# ---------------------------------------------------------------------------------------------
def test_output_that_is_a_file(checkpoint, pictures, tmp_path, capsys):
    src = _images(tmp_path / "in", pictures, "a")
    f = tmp_path / "results.txt"
    f.write_text("my results")
    assert _predict(checkpoint, src, "--output", f) == 2
    _error_line(capsys.readouterr().err, f, "is a file")
    assert _predict(checkpoint, src, "--output", f / "sub" / "dir") == 2
    _error_line(capsys.readouterr().err, f / "sub" / "dir", f"{f} is a file")
    assert f.read_text() == "my results"


# ---------------------------------------------------------------------------------------------
# Write failures abort the run; read failures stay per image
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raised", ["OSError", "OutputError"])
def test_disk_full_on_a_png_aborts_and_removes_the_runs_files(
    checkpoint, pictures, tmp_path, capsys, monkeypatch, raised
):
    """The second panoptic PNG meets a full disk (as a raw ``OSError`` or as the
    ``OutputError`` of the atomic writers): exit 2 naming it, no predictions.json, no PNG
    of this run left, and the earlier predictions.json (``--add``) as it was."""
    from axial_deeplab.data import panoptic_io

    out = tmp_path / "out"
    assert _predict(checkpoint, _images(tmp_path / "one", pictures, "a"), "--output", out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    real, calls = panoptic_io.atomic_write_bytes, []

    def full_disk(path, data, fsync=True):
        calls.append(path)
        if len(calls) == 2:
            err = OSError(errno.ENOSPC, "No space left on device")
            raise err if raised == "OSError" else output_error(path, err)
        return real(path, data, fsync=fsync)

    monkeypatch.setattr(panoptic_io, "atomic_write_bytes", full_disk)
    src = _images(tmp_path / "two", pictures, "b", "c", "d")
    assert _predict(checkpoint, src, "--output", out, "--add") == 2
    _error_line(capsys.readouterr().err, out / "panoptic" / "c.png", "disk is full")
    assert _snapshot(out) == before

    fresh = tmp_path / "fresh"
    calls.clear()
    assert _predict(checkpoint, src, "--output", fresh) == 2
    _error_line(capsys.readouterr().err, fresh / "panoptic" / "c.png", "disk is full")
    assert not (fresh / "predictions.json").exists()
    assert [p for p in _snapshot(fresh) if p != ".predict.lock"] == []


def test_failed_predictions_json_keeps_the_earlier_one(checkpoint, pictures, tmp_path, capsys, monkeypatch):
    from axial_deeplab.data import panoptic_io

    out = tmp_path / "out"
    assert _predict(checkpoint, _images(tmp_path / "one", pictures, "a"), "--output", out) == 0
    before = _snapshot(out)
    capsys.readouterr()

    def read_only(path, obj, indent=None):
        raise output_error(path, OSError(errno.EROFS, "Read-only file system"))

    monkeypatch.setattr(panoptic_io, "write_json", read_only)
    assert _predict(checkpoint, _images(tmp_path / "two", pictures, "b"), "--output", out, "--add") == 2
    _error_line(capsys.readouterr().err, out / "predictions.json", "read-only")
    assert _snapshot(out) == before


def test_real_write_limit_in_a_subprocess(checkpoint, pictures, tmp_path):
    """A real failing write (RLIMIT_FSIZE: every file is limited to 300 bytes, smaller than the
    PNGs): one line naming the PNG, exit 2, no predictions.json, no temporary files."""
    src = _images(tmp_path / "in", pictures, "a")
    out = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "axial_deeplab.cli",
            "predict",
            "--checkpoint",
            checkpoint,
            str(src),
            "--output",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=limit,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc.stderr, "cannot write", out)
    assert line.split(": ")[-2].endswith("a.png"), line
    assert [p for p in _snapshot(out) if p != ".predict.lock"] == []


def test_unreadable_image_stays_a_per_image_failure(checkpoint, pictures, tmp_path, capsys):
    src = _images(tmp_path / "in", pictures, "a")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    assert _predict(checkpoint, src, "--output", out) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "1 of 2 images processed" in captured.out
    assert _ids(out) == ["a"]


def test_python_api_refuses_earlier_predictions_by_default(checkpoint, pictures, tmp_path):
    from axial_deeplab.engine.predict import collect_images, load_checkpoint_model, predict_images
    from axial_deeplab.errors import UserError

    model, cfg, metadata = load_checkpoint_model(checkpoint, torch.device("cpu"))
    src = _images(tmp_path / "in", pictures, "a")
    out = str(tmp_path / "out")
    files = collect_images([str(src)], output_dir=out)
    report = predict_images(model, cfg, metadata, files, out, torch.device("cpu"), progress=False, inputs=[str(src)])
    assert report.processed == [str(src / "a.png")]
    with pytest.raises(UserError, match="already holds predictions"):
        predict_images(model, cfg, metadata, files, out, torch.device("cpu"), progress=False, inputs=[str(src)])
    report = predict_images(
        model, cfg, metadata, files, out, torch.device("cpu"), progress=False, inputs=[str(src)], existing="replace"
    )
    assert report.processed == [str(src / "a.png")]
