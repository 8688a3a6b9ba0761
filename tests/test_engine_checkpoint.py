"""Checkpoint folders: exact round trip, atomic replacement, stale leftovers, RNG states."""

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from axial_deeplab.engine import checkpoint as ck
from axial_deeplab.engine.optim import Lookahead
from axial_deeplab.engine.schedule import WarmupPolyLR
from axial_deeplab.fileio import atomic_write_json


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def _trained(steps=3):
    m = _model()
    m(torch.rand(2, 3, 6, 6))
    opt = Lookahead(torch.optim.RAdam(m.parameters(), lr=1e-2), k=2)
    sched = WarmupPolyLR(opt, max_steps=10, warmup_steps=2)
    for _ in range(steps):
        opt.zero_grad()
        m(torch.rand(2, 3, 6, 6)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return m, opt, sched


def test_round_trip_is_exact(tmp_path):
    m, opt, sched = _trained()
    path = ck.save_checkpoint(
        str(tmp_path / "checkpoints" / "step-000003"),
        m,
        opt,
        sched,
        step=3,
        extra_state={"best_metric": 12.5},
        config_text="a: 1\n",
        info={"note": "x"},
    )
    m2 = _model()
    m2(torch.rand(1, 3, 6, 6))
    ck.load_model_weights(m2, path)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    st = ck.load_training_state(path)
    assert st["step"] == 3 and st["extra"]["best_metric"] == 12.5
    opt2 = Lookahead(torch.optim.RAdam(m2.parameters(), lr=1e-2), k=2)
    opt2.load_state_dict(st["optimizer"])
    assert opt2.counter == opt.counter
    assert ck.read_checkpoint_info(path)["note"] == "x"
    assert ck.checkpoint_config_path(path).endswith("config.yaml")
    # run folder resolves to its newest checkpoint
    assert ck.resolve_checkpoint(str(tmp_path)) == path


def test_rng_state_restores_random_streams():
    state = ck.capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ck.restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_replace_existing_and_prune(tmp_path):
    root = tmp_path / "checkpoints"
    m, opt, sched = _trained(1)
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(str(root / f"step-{step:06d}"), m, opt, sched, step=step)
    ck.save_checkpoint(str(root / "step-000004"), m, opt, sched, step=4, info={"again": True})
    assert ck.read_checkpoint_info(str(root / "step-000004"))["again"] is True
    removed = ck.prune_checkpoints(str(root), keep=2)
    assert [os.path.basename(p) for p in removed] == ["step-000001", "step-000002"]
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(root))] == ["step-000003", "step-000004"]
    assert not [n for n in os.listdir(root) if ".tmp-" in n]


def test_incomplete_write_is_invisible_and_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    m, opt, sched = _trained(1)
    ck.save_checkpoint(str(root / "step-000001"), m, opt, sched, step=1)
    # what a kill in the middle of a write leaves behind
    stale = root / "step-000002.tmp-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 10)
    assert ck.latest_checkpoint(str(root)).endswith("step-000001")
    ck.remove_stale_tmp(str(root))
    assert not stale.exists()


def test_corrupt_weights_name_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        ck.load_model_weights(_model(), str(bad))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ck.resolve_checkpoint(str(tmp_path / "nowhere"))


def test_mismatched_weights_are_reported(tmp_path):
    m, opt, sched = _trained(1)
    path = ck.save_checkpoint(str(tmp_path / "step-000001"), m, opt, sched, step=1)
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="unexpected"):
        ck.load_model_weights(other, path)


def test_atomic_write_leaves_no_temp(tmp_path):
    p = tmp_path / "x" / "a.json"
    atomic_write_json(str(p), {"a": np.float32(1.5), "b": (1, 2)})
    assert p.read_text().strip().startswith("{")
    assert os.listdir(p.parent) == ["a.json"]
