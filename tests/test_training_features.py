"""Gradient accumulation, the EMA of the weights and CPU bf16 autocast:

* one optimizer step over 4 micro-batches equals one step on the 4x batch (float tolerance),
  on the tiny Axial-DeepLab with its real loss (BatchNorm in eval mode: in train mode each
  micro-batch is normalised with its own statistics, which is what accumulation means for BN)
  and on a GroupNorm classifier, alone and under DDP over 2 processes (gloo);
* the EMA equals a hand-computed average (float buffers averaged, counters copied), stays equal
  on every process, is kept as "best" when it scores higher;
* a run with accumulation, EMA and bf16 autocast (observed in the forward pass), crashed after
  a checkpoint and resumed, ends bit-for-bit where the uninterrupted run ends, EMA included.
"""

import copy
import json
import os
import types

import pytest
import torch
from engine_testing import tiny_run
from torch import nn

from axial_deeplab.engine import checkpoint as ck
from axial_deeplab.engine.config import ConfigError, config_from_dict
from axial_deeplab.engine.ema import EMA_FILE, ModelEma
from axial_deeplab.engine.hooks import PeriodicEval, RunCheckpointer
from axial_deeplab.engine.metrics_log import MetricsLogger, read_metrics
from axial_deeplab.engine.trainer import SimpleTrainer, split_batch
from axial_deeplab.errors import UserError


class _Checkpointer:
    last, saved_step, ema = None, None, None


def _trainer(model, compute_losses, k, lr=0.05, clip=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return SimpleTrainer(
        model,
        compute_losses,
        opt,
        sched,
        None,
        torch.device("cpu"),
        clip,
        grad_accum_steps=k,
        loader=[],
        start_step=0,
        max_steps=10,
        checkpointer=_Checkpointer(),
        run_dir="run",
    )


def _assert_same_weights(a: nn.Module, b: nn.Module, rtol=1e-5, atol=1e-6):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------------------- accumulation


def _group_norm_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def _classify(model):
    return lambda batch: {"total": nn.functional.cross_entropy(model(batch[0]), batch[1])}


def _classification_batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)]


def test_accumulation_on_a_group_norm_classifier_equals_the_big_batch():
    big, acc = _group_norm_net(), _group_norm_net()
    t_big, t_acc = _trainer(big, _classify(big), 1, clip=0.5), _trainer(acc, _classify(acc), 4, clip=0.5)
    for step in range(3):  # momentum, clipping and the schedule all act on the summed gradient
        batch = _classification_batch(seed=step)
        assert t_big.run_step(batch) and t_acc.run_step(batch)
        torch.testing.assert_close(t_acc.losses["total"], t_big.losses["total"], rtol=1e-5, atol=1e-6)
    _assert_same_weights(acc, big)
    assert t_acc.step == t_big.step == 3 and t_acc.lr == t_big.lr
    assert t_acc.batch[0].shape[0] == 4  # the hooks see the last micro-batch


def test_four_micro_batches_of_the_tiny_deeplab_equal_one_step_on_the_4x_batch():
    """The panoptic loss is a mean over images (per-image top-k, per-image weighted means), so
    with BatchNorm on its running statistics the gradient of 4 micro-batches is the batch's."""
    from axial_deeplab.data.collate import collate_panoptic
    from axial_deeplab.engine.builders import (
        build_dataset,
        build_loss,
        build_model,
        build_train_transform,
        dataset_metadata,
    )

    cfg = config_from_dict(tiny_run(data={"options": {"train": {"length": 8}}}, loss={"semantic_top_k": 0.3}))
    ds = build_dataset(cfg, "train")
    md = dataset_metadata(ds)
    transform = build_train_transform(cfg, md)
    torch.manual_seed(0)
    batch = collate_panoptic([transform(ds[i]) for i in range(8)])
    torch.manual_seed(0)
    big = build_model(cfg, md).train()
    for m in big.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # normalise with the running statistics, the same for any batch
    acc, start = copy.deepcopy(big), copy.deepcopy(big)
    loss_fn = build_loss(cfg, md)

    def losses_of(model):
        return lambda b: loss_fn(model(b["image"]), b)

    t_big, t_acc = _trainer(big, losses_of(big), 1, lr=0.01), _trainer(acc, losses_of(acc), 4, lr=0.01)
    assert t_big.run_step(batch) and t_acc.run_step(batch)
    for name in t_big.losses:
        torch.testing.assert_close(t_acc.losses[name], t_big.losses[name], rtol=1e-5, atol=1e-6, msg=name)
    _assert_same_weights(acc, big, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(big.parameters(), start.parameters()))  # the step did act


def test_split_batch_cuts_every_per_sample_entry():
    batch = {"image": torch.arange(8).view(4, 2), "name": ["a", "b", "c", "d"], "divisor": 1000}
    parts = split_batch(batch, 2)
    assert [p["name"] for p in parts] == [["a", "b"], ["c", "d"]] and parts[1]["image"].tolist() == [[4, 5], [6, 7]]
    assert parts[0]["divisor"] == 1000
    images, labels = split_batch((torch.zeros(6, 3), torch.arange(6)), 3)[2]
    assert labels.tolist() == [4, 5] and images.shape == (2, 3)
    with pytest.raises(ValueError, match="3 equal micro-batches"):
        split_batch(torch.zeros(4), 3)


# ----------------------------------------------------------------------------- EMA


def _bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_ema_equals_a_hand_computed_average_with_buffers_averaged_and_counters_copied():
    model = _bn_net()
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    decay = 0.75
    ema = ModelEma(model, decay)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}  # ema_0: the starting weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        loss = model(torch.randn(4, 3, 6, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    got = ema.module.state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    assert int(got["1.num_batches_tracked"]) == int(model[1].num_batches_tracked) == 5 and ema.updates == 5
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_best_keeps_the_ema_when_it_scores_higher(tmp_path):
    model = _bn_net()
    model(torch.randn(2, 3, 6, 6))
    ema = ModelEma(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the model and its EMA now differ
    checkpointer = RunCheckpointer(str(tmp_path), model, None, None, None, "", {}, keep=2, is_main=True, ema=ema)
    scores = {1: (10.0, 20.0), 2: (30.0, 25.0), 3: (5.0, 30.0)}  # step: (model's PQ, EMA's PQ)

    def evaluate(step, other=None):
        return {"PQ": scores[step][other is not None]}

    logger = MetricsLogger(str(tmp_path / "run"))
    hook = PeriodicEval(
        evaluate, 1, False, "PQ", logger, checkpointer, types.SimpleNamespace(write=print), True, ema=ema
    )
    best = tmp_path / "best"
    chosen = []
    for step in (1, 2, 3):
        hook.trainer = types.SimpleNamespace(step=step, max_steps=3)
        hook.after_step()
        info = json.loads((best / ck.INFO_FILE).read_text())
        chosen.append((info["weights"], info["step"], checkpointer.best_metric))
    assert chosen == [("ema", 1, 20.0), ("model", 2, 30.0), ("model", 2, 30.0)]  # a tie keeps the earlier
    rows = [(r["kind"], r["step"], r["PQ"]) for r in read_metrics(str(tmp_path / "run"))]
    assert ("eval_ema", 1, 20.0) in rows and ("eval", 2, 30.0) in rows
    fresh = _bn_net()
    fresh(torch.randn(2, 3, 6, 6))
    ck.load_model_weights(fresh, str(best))
    _assert_same_weights(fresh, model, rtol=0, atol=0)


# ----------------------------------------------------------------------------- DDP (2 processes, gloo)


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        net = _group_norm_net()
        ddp = nn.parallel.DistributedDataParallel(net)
        trainer = _trainer(ddp, _classify(ddp), 2, clip=0.5)
        images, labels = _classification_batch()
        share = slice(rank * 8, (rank + 1) * 8)
        assert trainer.run_step([images[share], labels[share]])
        bn = _bn_net()
        bn(torch.randn(2, 3, 6, 6))
        ema = ModelEma(bn, 0.5, distributed=True)
        bn.train()
        torch.manual_seed(100 + rank)  # each process sees other data: other BatchNorm statistics
        bn(torch.randn(4, 3, 6, 6))
        ema.update(bn)
        torch.save(
            {"net": net.state_dict(), "ema": ema.module.state_dict(), "bn": bn.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_under_ddp_accumulation_equals_the_global_batch_and_the_ema_is_the_same_everywhere(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = _group_norm_net()
    assert _trainer(single, _classify(single), 1, clip=0.5).run_step(_classification_batch())
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["net"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(r0["net"][k], r1["net"][k])
    assert not torch.equal(r0["bn"]["1.running_mean"], r1["bn"]["1.running_mean"])
    for k in r0["ema"]:
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k


# ----------------------------------------------------------------------------- train(): resume, bf16

RUN = tiny_run(
    data={"options": {"train": {"length": 8}, "val": {"length": 2}}},
    solver={
        "optimizer": "sgd",
        "lr": 0.002,
        "momentum": 0.9,
        "max_steps": 4,
        "batch_size": 4,
        "grad_accum_steps": 2,
        "ema_decay": 0.8,
        "amp": "bf16",
        "warmup_steps": 1,
    },
    train={"log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5, "eval_at_end": True},
)


class _Crash(Exception):
    pass


def _train(run_dir, crash_at=None, resume=False, **solver):
    """train() with a forward hook on the first convolution recording the dtype autocast gives it."""
    import axial_deeplab.engine.train as train_mod

    data = copy.deepcopy(RUN)
    data["experiment"]["output_dir"] = str(run_dir)
    data["solver"].update(solver)
    seen = []
    real_build = train_mod.build_model

    def build_and_watch(*args, **kw):
        model = real_build(*args, **kw)
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype, torch.is_autocast_enabled("cpu"))))
        return model

    def on_log(step, values):
        if step == crash_at:
            raise _Crash(step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "build_model", build_and_watch)
        result = train_mod.train(config_from_dict(data), resume=resume, on_log=on_log)
    return result, seen


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result, seen = _train(run_dir)
    return {"dir": run_dir, "result": result, "seen": seen, "losses": _losses(run_dir)}


def test_bf16_autocast_runs_on_cpu_in_training(uninterrupted):
    training = [(dtype, on) for is_training, dtype, on in uninterrupted["seen"] if is_training]
    assert len(training) == 4 * 2  # 4 steps of 2 micro-batches
    assert set(training) == {(torch.bfloat16, True)}


def test_accumulation_ema_and_bf16_resume_bit_for_bit(uninterrupted, tmp_path):
    ref = uninterrupted["result"]
    assert ref.step == 4 and ref.ema_model is not None and "PQ" in ref.final_ema_metrics
    last = ref.last_checkpoint
    assert os.path.isfile(os.path.join(last, EMA_FILE))
    assert ck.load_training_state(last)["extra"]["ema"] == {"decay": 0.8, "updates": 5}

    with pytest.raises(_Crash):
        _train(tmp_path, crash_at=3)  # dies after step 3; the last checkpoint is step 2
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path / "checkpoints"))] == ["step-000002"]
    resumed, _ = _train(tmp_path, resume=True)
    assert resumed.step == 4
    for k, v in ref.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k, v in ref.ema_model.state_dict().items():
        assert torch.equal(resumed.ema_model.state_dict()[k], v), k
    assert _losses(tmp_path) == uninterrupted["losses"]
    # the EMA saved in the checkpoint is the one in memory
    saved = copy.deepcopy(resumed.ema_model)
    ck.load_model_weights(saved, os.path.join(resumed.last_checkpoint, EMA_FILE))
    for k, v in saved.state_dict().items():
        assert torch.equal(v, resumed.ema_model.state_dict()[k]), k


def test_resume_may_change_grad_accum_steps_but_not_the_ema(uninterrupted):
    from axial_deeplab.engine.resume import resume_config_changes

    last = uninterrupted["result"].last_checkpoint
    data = copy.deepcopy(RUN)
    data["experiment"]["output_dir"] = str(uninterrupted["dir"])
    data["solver"]["grad_accum_steps"] = 4
    honoured, _ = resume_config_changes(config_from_dict(data), last)
    assert honoured == {"solver.grad_accum_steps": [2, 4]}
    data["solver"]["ema_decay"] = 0.9
    with pytest.raises(UserError, match=r"solver.ema_decay: 0.8 -> 0.9"):
        resume_config_changes(config_from_dict(data), last)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "solver, match",
    [
        ({"batch_size": 4, "grad_accum_steps": 3}, "grad_accum_steps=3 must divide solver.batch_size=4"),
        ({"grad_accum_steps": 0}, "grad_accum_steps must be >= 1"),
        ({"ema_decay": 1.0}, "ema_decay must be null or in"),
    ],
)
def test_bad_solver_settings_name_the_key(solver, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"solver": solver})


def test_amp_modes_on_cpu():
    from axial_deeplab.engine.train import amp_settings

    cpu = torch.device("cpu")

    def amp(mode):
        return amp_settings(config_from_dict({"solver": {"amp": mode}}), cpu)

    assert amp("bf16") == (True, torch.bfloat16, False)
    assert amp("auto") == amp("none") == (False, None, False)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        amp("fp16")


def test_fp16_on_cpu_is_refused_before_the_run_folder_is_made(tmp_path):
    with pytest.raises(ConfigError, match="solver.amp=fp16"):
        _train(tmp_path / "run", amp="fp16")
    assert not (tmp_path / "run" / "checkpoints").exists()
