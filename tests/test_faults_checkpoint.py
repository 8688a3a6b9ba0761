"""Faults around checkpoints and outputs: full, read-only and vanished folders, a kill in the
middle of replacing ``best/``, unusable devices, misspelt dataset options, corrupt or
mismatched checkpoints. Each must end in one clear line naming the culprit, with every
earlier checkpoint and file left as it was."""

import contextlib
import errno
import hashlib
import io
import json
import os

import pytest
import torch
from engine_testing import tiny_run
from torch import nn

from axial_deeplab.cli import main
from axial_deeplab.engine import checkpoint as ck
from axial_deeplab.engine.builders import build_dataset, build_model, dataset_metadata
from axial_deeplab.engine.config import ConfigError, config_from_dict, dump_config
from axial_deeplab.errors import OutputError, UserError
from axial_deeplab.fileio import atomic_write_bytes

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

TINY = tiny_run(
    data={"options": {"train": {"length": 8}, "val": {"length": 2}}},
    solver={"optimizer": "sgd", "lr": 0.002, "max_steps": 2, "batch_size": 2, "warmup_steps": 0},
    train={"log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 5, "eval_at_end": False},
    eval={"batch_size": 2},
)


def _cfg_dict(run_dir=None, **sections):
    data = json.loads(json.dumps(TINY))
    if run_dir is not None:
        data["experiment"]["output_dir"] = str(run_dir)
    for sec, values in sections.items():
        data[sec].update(values)
    return data


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _one_line_error(err, *names):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def _digest(folder):
    """Every file under ``folder`` with its hash (to prove a checkpoint was left untouched)."""
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(base, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _temps(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n]


def _small_model(seed=0, width=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 2, 1))


class _FailingFile:
    """A file object that takes ``limit`` bytes, then fails like a full disk."""

    def __init__(self, real, limit, exc):
        self.real, self.left, self.exc = real, limit, exc

    def write(self, data):
        n = min(len(data), self.left)
        self.real.write(data[:n])
        self.left -= n
        if n < len(data):
            raise self.exc
        return n

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def _enospc():
    return OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------- atomic file writes


def test_atomic_write_disk_full_midway_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "predictions.json"
    atomic_write_bytes(target, b"old contents")
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FailingFile(real_fdopen(fd, *a, **k), 5, _enospc()))
    with pytest.raises(OutputError) as info:
        atomic_write_bytes(target, b"new contents that do not fit")
    assert str(target) in str(info.value) and "disk is full" in str(info.value)
    assert isinstance(info.value, UserError) and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old contents"
    assert os.listdir(target.parent) == ["predictions.json"]  # no temporary file left


def test_atomic_write_into_read_only_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "keep.png").write_bytes(b"png")
    if IS_ROOT:  # root writes through mode bits: fail where the system would
        import tempfile

        def refuse(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(OutputError) as info:
            atomic_write_bytes(folder / "keep.png", b"new")
    finally:
        folder.chmod(0o755)
    msg = str(info.value)
    assert str(folder / "keep.png") in msg and ("read-only" in msg or "permission" in msg)
    assert (folder / "keep.png").read_bytes() == b"png" and os.listdir(folder) == ["keep.png"]


def test_atomic_write_folder_vanishes(tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "gone"
    real_fdopen = os.fdopen

    class Vanishing(_FailingFile):
        def write(self, data):
            shutil.rmtree(folder)  # deleted by someone else while we write
            return self.real.write(data)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Vanishing(real_fdopen(fd, *a, **k), 0, None))
    with pytest.raises(OutputError) as info:
        atomic_write_bytes(folder / "a.png", b"data")
    assert str(folder / "a.png") in str(info.value) and "vanished" in str(info.value)
    assert not folder.exists()


# ----------------------------------------------------------------------------- checkpoint writes


def _failing_torch_save(limit, real=torch.save):

    def save(obj, f, *a, **k):
        real(obj, f, *a, **k)  # the real bytes, then cut short as a full disk leaves them
        with open(f, "r+b") as fh:
            fh.truncate(limit)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    return save


def _failing_save_file(limit):
    import safetensors.torch as st

    real = st.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(limit)
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_file


@pytest.mark.parametrize("where", ["torch.save", "safetensors", "makedirs", "mkdtemp", "info.json"])
def test_checkpoint_write_failure_is_one_clear_error(tmp_path, monkeypatch, where):
    import builtins
    import tempfile

    import safetensors.torch as st

    root = tmp_path / "checkpoints"
    m = _small_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    first = ck.save_checkpoint(str(root / "step-000001"), m, opt, step=1, config_text="a: 1\n")
    best = ck.save_checkpoint(str(root / "best"), m, step=1, info={"metrics": {"PQ": 1.0}})
    before = {p: _digest(p) for p in (first, best)}
    target = root / ("best" if where == "info.json" else "step-000002")
    if where == "torch.save":
        monkeypatch.setattr(torch, "save", _failing_torch_save(100))
    elif where == "safetensors":
        monkeypatch.setattr(st, "save_file", _failing_save_file(64))
    elif where == "makedirs":
        target = tmp_path / "sub" / "checkpoints" / "step-000002"

        def makedirs(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(os, "makedirs", makedirs)
    elif where == "mkdtemp":

        def mkdtemp(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    else:  # replacing best/: the last file of the new copy does not fit
        real_open = builtins.open

        def open_(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            return _FailingFile(f, 10, _enospc()) if str(file).endswith(ck.INFO_FILE) and "w" in mode else f

        monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(OutputError) as info:
        if where == "info.json":
            ck.save_checkpoint(str(target), _small_model(1), step=2, info={"metrics": {"PQ": 2.0}})
        else:
            ck.save_checkpoint(str(target), m, opt, step=2)
    monkeypatch.undo()
    msg = str(info.value)
    assert str(target) in msg and "\n" not in msg
    assert not os.path.exists(target) or where == "info.json"
    assert {p: _digest(p) for p in (first, best)} == before  # earlier checkpoints byte-identical
    assert _temps(root) == []  # no temporary folder left behind
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(root))] == ["step-000001"]


def test_train_disk_full_at_checkpoint_via_cli(tmp_path, monkeypatch):
    """``train`` meets a full disk at its second checkpoint: one line naming it, exit 2, the
    first checkpoint untouched."""
    run_dir = tmp_path / "run"
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(config_from_dict(_cfg_dict(run_dir))))
    real_save = torch.save
    calls = {"n": 0}
    snapshot = {}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(obj, f, *a, **k)
        snapshot.update(_digest(str(run_dir / "checkpoints" / "step-000001")))
        return _failing_torch_save(50, real_save)(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = _run(["train", "--config", str(cfg_path)])
    assert code == 2
    _one_line_error(err, run_dir / "checkpoints" / "step-000002", "disk is full")
    monkeypatch.undo()
    assert _digest(str(run_dir / "checkpoints" / "step-000001")) == snapshot
    assert _temps(run_dir / "checkpoints") == []


# ----------------------------------------------------------------------------- replacing best/


def _save_best(root, seed, metric):
    return ck.save_checkpoint(str(root / "best"), _small_model(seed), step=seed, info={"metrics": {"PQ": metric}})


def _assert_complete_best(root, allowed):
    best = root / "best"
    assert best.is_dir(), os.listdir(root)
    pq = ck.read_checkpoint_info(str(best))["metrics"]["PQ"]
    assert pq in allowed
    m = _small_model(99)
    ck.load_model_weights(m, str(best))  # complete and readable
    want = _small_model({1.0: 1, 2.0: 2}[pq])
    for (k, a), (_, b) in zip(m.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k
    assert _temps(root) == []


def _stop_at_rename(n, stop, exchange, set_attr):
    """Make the ``n``-th rename of a replacement (os.replace or the atomic exchange) take
    effect and then call ``stop`` (raise, or end the process); ``set_attr`` installs the wrappers."""
    calls = {"n": 0}
    real_replace, real_exchange = os.replace, getattr(ck, "_exchange", None)

    def after(fn):
        def wrapped(*a, **k):
            result = fn(*a, **k)
            calls["n"] += 1
            if calls["n"] == n:
                stop()
            return result

        return wrapped

    set_attr(os, "replace", after(real_replace))
    set_attr(ck, "_exchange", after(real_exchange) if exchange else (lambda a, b: False))


def _interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("exchange,kill_at", [(True, 1), (True, 2), (False, 1), (False, 2), (False, 3)])
def test_interrupted_best_replacement_keeps_a_complete_best(tmp_path, monkeypatch, exchange, kill_at):
    root = tmp_path / "checkpoints"
    _save_best(root, 1, 1.0)
    _stop_at_rename(kill_at, _interrupt, exchange, monkeypatch.setattr)
    with pytest.raises(KeyboardInterrupt):
        _save_best(root, 2, 2.0)
    monkeypatch.undo()
    assert (root / "best").is_dir()  # never a moment without it, even after the interrupt
    ck.remove_stale_tmp(str(root))  # the next start
    _assert_complete_best(root, {1.0, 2.0})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer outright")
@pytest.mark.parametrize("exchange,kill_at", [(True, 1), (True, 2), (False, 1), (False, 2), (False, 3)])
def test_killed_best_replacement_is_restored_on_next_start(tmp_path, exchange, kill_at):
    """A SIGKILL-like stop (no clean-up code runs) at each rename of the replacement; the
    next start's clean-up leaves a complete ``best`` with the old or the new weights."""
    root = tmp_path / "checkpoints"
    _save_best(root, 1, 1.0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns to pytest
        try:
            _stop_at_rename(kill_at, lambda: os._exit(9), exchange, setattr)
            _save_best(root, 2, 2.0)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) in (0, 9)
    ck.remove_stale_tmp(str(root))
    _assert_complete_best(root, {1.0, 2.0})


def test_best_replacement_swaps_atomically_where_offered(tmp_path):
    root = tmp_path / "checkpoints"
    _save_best(root, 1, 1.0)
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if not ck._exchange(str(a), str(b)):
        pytest.skip("this system or file system offers no atomic exchange")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()
    _save_best(root, 2, 2.0)
    assert ck.read_checkpoint_info(str(root / "best"))["metrics"]["PQ"] == 2.0
    assert _temps(root) == []


def test_stale_cleanup_touches_only_our_leftovers(tmp_path):
    root = tmp_path / "checkpoints"
    step = ck.save_checkpoint(str(root / "step-000001"), _small_model(), step=1)
    mine = {"notes.tmp": b"user notes", "draft.tmp-copy.txt": b"draft"}
    for name, data in mine.items():
        (root / name).write_bytes(data)
    (root / "results").mkdir()
    (root / "results" / "a.tmp").write_bytes(b"x")
    stale_dir = root / "step-000002.tmp-k2j4abcd"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"\0")
    stale_file = root / "info.json.ab12cd34.tmp"
    stale_file.write_bytes(b"{")
    removed = ck.remove_stale_tmp(str(root))
    assert sorted(removed) == sorted([str(stale_dir), str(stale_file)])
    for name, data in mine.items():
        assert (root / name).read_bytes() == data
    assert (root / "results" / "a.tmp").exists() and os.path.isdir(step)
    # pruning removes only complete step-N checkpoints of ours
    (root / "step-notes").mkdir()
    assert ck.prune_checkpoints(str(root), keep=0) == [step]
    assert (root / "step-notes").is_dir() and (root / "notes.tmp").exists()


# ----------------------------------------------------------------------------- devices


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a command builds a model before checking the device."""
    import axial_deeplab.engine.builders as builders
    import axial_deeplab.engine.predict as predict
    import axial_deeplab.engine.train as train

    def refuse(*a, **k):
        raise AssertionError("a model was built before the device was checked")

    for mod in (builders, predict, train):
        monkeypatch.setattr(mod, "build_model", refuse, raising=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint folder of the tiny panoptic model (untrained weights, real layout)."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = config_from_dict(_cfg_dict(root / "run"))
    md = dataset_metadata(build_dataset(cfg, "train"))
    model = build_model(cfg, md)
    path = ck.save_checkpoint(
        str(root / "run" / "checkpoints" / "step-000001"),
        model,
        step=1,
        config_text=dump_config(cfg),
        info={"task": "panoptic", "metadata": md.to_dict()},
    )
    img = root / "img.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (120, 30, 200)).save(img)
    return {"path": path, "cfg": cfg, "model": model, "image": str(img), "root": root}


def test_device_errors_in_train(tmp_path, no_gpu, no_model):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(config_from_dict(_cfg_dict(tmp_path / "run"))))
    code, _, err = _run(["train", "--config", str(cfg_path), "experiment.device=cuda"])
    assert code == 2
    _one_line_error(err, "experiment.device=cuda", "cpu")
    code, _, err = _run(["train", "--config", str(cfg_path), "experiment.device=tpu"])
    assert code == 2
    _one_line_error(err, "experiment.device", "tpu")


def test_device_errors_in_evaluate_and_predict(tiny_checkpoint, tmp_path, no_gpu, no_model):
    ckpt = tiny_checkpoint["path"]
    code, _, err = _run(["evaluate", "--checkpoint", ckpt, "experiment.device=cuda", "--no-progress"])
    assert code == 2
    _one_line_error(err, "experiment.device=cuda")
    for device in ("cuda", "cuda:1", "tpu"):
        code, _, err = _run(
            [
                "predict",
                "--checkpoint",
                ckpt,
                tiny_checkpoint["image"],
                "--output",
                str(tmp_path / device),
                "--device",
                device,
                "--no-progress",
            ]
        )
        assert code == 2, err
        line = _one_line_error(err, f"--device={device}")
        assert "cpu" in line
        assert not (tmp_path / device).exists()


def test_resolve_device_names():
    from axial_deeplab.engine.distributed import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"model\.device=gpu0: unknown device; choose auto, cpu, cuda"):
        resolve_device("gpu0", "model.device")
    with pytest.raises(UserError, match="cuda:x"):
        resolve_device("cuda:x")


# ----------------------------------------------------------------------------- dataset options


def test_misspelt_dataset_option_via_cli(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(config_from_dict(_cfg_dict(tmp_path / "run"))))
    code, _, err = _run(["train", "--config", str(cfg_path), "data.options.train.lenght=4"])
    assert code == 2
    _one_line_error(err, "data.options.train.lenght", "length")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_misspelt_coco_panoptic_option_names_key_and_valid_ones(tmp_path):
    base = _cfg_dict(
        data={
            "dataset": "coco_panoptic",
            "root": str(tmp_path),
            "options": {"train": {"image_dir": "img", "json_path": "a.json", "png_dir": "png", "jsn_path": "b.json"}},
        }
    )
    with pytest.raises(ConfigError, match=r"data\.options\.train\.jsn_path: .*json_path"):
        build_dataset(config_from_dict(base), "train")
    base["data"]["options"] = {"label_divsor": 3, "train": {"image_dir": "i", "json_path": "j", "png_dir": "p"}}
    with pytest.raises(ConfigError, match=r"data\.options\.label_divsor: .*label_divisor"):
        build_dataset(config_from_dict(base), "train")
    base = _cfg_dict(data={"options": {"imag_size": 32}})
    with pytest.raises(ConfigError, match=r"data\.options\.imag_size: .*image_size"):
        build_dataset(config_from_dict(base), "val")


# ----------------------------------------------------------------------------- reading checkpoints


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_corrupt_info_json_names_the_file(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint["path"], tmp_path / "ckpt")
    info = os.path.join(ckpt, "info.json")
    with open(info, "w") as f:
        f.write('{"step": 1, "metadata": {"thing_ids": [1, 2')
    with pytest.raises(ValueError, match="info.json"):
        ck.read_checkpoint_info(ckpt)
    code, _, err = _run(
        ["predict", "--checkpoint", ckpt, tiny_checkpoint["image"], "--output", str(tmp_path / "out"), "--no-progress"]
    )
    assert code == 2
    _one_line_error(err, info)
    code, _, err = _run(["evaluate", "--checkpoint", ckpt, "--no-progress"])
    assert code == 2
    _one_line_error(err, info)


def test_corrupt_config_next_to_checkpoint_names_the_file(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint["path"], tmp_path / "ckpt")
    cfg = os.path.join(ckpt, "config.yaml")
    with open(cfg, "wb") as f:
        f.write(b"\xff\xfe\x00garbage")
    code, _, err = _run(["evaluate", "--checkpoint", ckpt, "--no-progress"])
    assert code == 2
    _one_line_error(err, cfg)


def test_checkpoint_of_another_width_is_refused_clearly(tiny_checkpoint, tmp_path):
    """A wrong --config (another width) in evaluate and predict: one line naming the
    weights file, the number of mismatched tensors and a first example."""
    wide = _cfg_dict(tmp_path / "run")
    wide["model"]["kwargs"]["aspp_channels"] = 24
    cfg_path = tmp_path / "wide.yaml"
    cfg_path.write_text(dump_config(config_from_dict(wide)))
    weights = os.path.join(tiny_checkpoint["path"], "model.safetensors")
    for argv in (
        ["evaluate", "--checkpoint", tiny_checkpoint["path"], "--config", str(cfg_path), "--no-progress"],
        [
            "predict",
            "--checkpoint",
            tiny_checkpoint["path"],
            "--config",
            str(cfg_path),
            tiny_checkpoint["image"],
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ],
    ):
        code, _, err = _run(argv)
        assert code == 2
        line = _one_line_error(err, weights, "checkpoint (", "vs model (", "--config")
        assert "tensor(s) have other shapes" in line and len(line) < 1200


def test_checkpoint_of_another_class_count_is_refused_clearly(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy_checkpoint(tiny_checkpoint["path"], tmp_path / "ckpt")
    weights = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(weights)
    n = tiny_checkpoint["model"].num_classes
    cut = {k: (v[: n - 1] if v.dim() and v.shape[0] == n and "semantic" in k else v) for k, v in tensors.items()}
    assert any(cut[k].shape != tensors[k].shape for k in tensors)
    save_file(cut, weights)
    with pytest.raises(ValueError, match=rf"{n - 1}.* vs model \({n}"):
        ck.load_model_weights(
            build_model(tiny_checkpoint["cfg"], dataset_metadata(build_dataset(tiny_checkpoint["cfg"], "val"))), ckpt
        )
    code, _, err = _run(
        ["predict", "--checkpoint", ckpt, tiny_checkpoint["image"], "--output", str(tmp_path / "out"), "--no-progress"]
    )
    assert code == 2
    _one_line_error(err, weights, "class count")
