"""Optimizer groups, Lookahead and the LR schedule against plain reference computations."""

import copy
import math
from typing import get_args

import pytest
import torch
from torch import nn

from axial_deeplab.engine.config import OptimizerName, ScheduleKind, SolverConfig, config_from_dict
from axial_deeplab.engine.optim import Lookahead, build_optimizer, param_groups_weight_decay
from axial_deeplab.engine.schedule import WarmupPolyLR, lr_factor
from axial_deeplab.layers import PositionSensitiveAxialAttention


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.attn = PositionSensitiveAxialAttention(8, 8, axis="height", num_heads=2, span=5)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.gn(self.attn(torch.relu(self.bn(self.conv(x)))))
        return self.head(x.mean((2, 3)))


def test_param_groups_exclude_norms_biases_and_tables():
    groups = {g["group_name"]: g for g in param_groups_weight_decay(_Net(), 1e-4)}
    no_decay = set(groups["no_decay"]["param_names"])
    decay = set(groups["decay"]["param_names"])
    assert {
        "bn.weight",
        "bn.bias",
        "gn.weight",
        "gn.bias",
        "head.bias",
        "attn.query_table",
        "attn.key_table",
        "attn.value_table",
        "attn.bn_qkv.weight",
        "attn.bn_similarity.bias",
    } <= no_decay
    assert {"conv.weight", "head.weight", "attn.qkv.weight"} == decay
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0
    n_params = len(list(_Net().parameters()))
    assert len(no_decay) + len(decay) == n_params


def _quadratic_problem():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    target = torch.randn(5)
    return w, target


def test_lookahead_matches_manual_reference():
    k, alpha, lr = 3, 0.5, 0.1
    w, target = _quadratic_problem()
    w_ref = w.detach().clone()
    opt = Lookahead(torch.optim.SGD([w], lr=lr), k=k, alpha=alpha)
    slow = w_ref.clone()
    for step in range(1, 11):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        # reference: plain SGD on fast weights, every k steps slow += alpha (fast - slow), fast = slow
        w_ref = w_ref - lr * 2 * (w_ref - target)
        if step % k == 0:
            slow = slow + alpha * (w_ref - slow)
            w_ref = slow.clone()
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-6, atol=1e-6)


def test_lookahead_state_dict_resumes_exactly():
    def make():
        w, target = _quadratic_problem()
        opt = Lookahead(torch.optim.RAdam([w], lr=0.05), k=4, alpha=0.5)
        return w, target, opt

    def train(w, target, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            opt.step()

    w1, t1, o1 = make()
    train(w1, t1, o1, 11)
    w2, t2, o2 = make()
    train(w2, t2, o2, 5)
    state = copy.deepcopy(o2.state_dict())
    weights = w2.detach().clone()
    w3, t3, o3 = make()
    with torch.no_grad():
        w3.copy_(weights)
    o3.load_state_dict(state)
    train(w3, t3, o3, 6)
    assert torch.equal(w1.detach(), w3.detach())


def test_decay_relative_tables_moves_only_the_tables():
    off = {g["group_name"]: set(g["param_names"]) for g in param_groups_weight_decay(_Net(), 1e-4)}
    on = {g["group_name"]: set(g["param_names"]) for g in param_groups_weight_decay(_Net(), 1e-4, decay_tables=True)}
    tables = {"attn.query_table", "attn.key_table", "attn.value_table"}
    assert on["decay"] == off["decay"] | tables and on["no_decay"] == off["no_decay"] - tables
    # the config key reaches the optimizer's groups; the default keeps the tables undecayed
    net = _Net()
    table_ids = {id(p) for n, p in net.named_parameters() if n.endswith("_table")}
    for flag, want in ((False, 0.0), (True, 1e-4)):
        opt = build_optimizer(net, SolverConfig(optimizer="adam", weight_decay=1e-4, decay_relative_tables=flag))
        got = {g["weight_decay"] for g in opt.param_groups for p in g["params"] if id(p) in table_ids}
        assert got == {want}
    assert SolverConfig().decay_relative_tables is False


def test_every_optimizer_name_builds():
    net = _Net()
    for name in get_args(OptimizerName):
        assert build_optimizer(net, SolverConfig(optimizer=name, lr=0.01)).param_groups
    with pytest.raises(ValueError, match="solver.optimizer: 'adagrad' is not one of 'adam', 'adamw'"):
        build_optimizer(net, SolverConfig(optimizer="adagrad"))


def test_build_optimizer_kinds():
    net = _Net()
    for name, cls in (("adam", torch.optim.Adam), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        opt = build_optimizer(net, SolverConfig(optimizer=name, lr=0.01, weight_decay=1e-4))
        assert isinstance(opt, cls)
    sgd = build_optimizer(net, SolverConfig(optimizer="sgd", lr=0.01))
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in sgd.param_groups)
    la = build_optimizer(net, SolverConfig(optimizer="radam_lookahead", lr=1e-3))
    assert isinstance(la, Lookahead) and isinstance(la.base, torch.optim.RAdam)


def test_poly_schedule_matches_torch_polynomial_lr():
    max_steps, power, base = 50, 0.9, 0.2
    p = nn.Parameter(torch.zeros(1))
    ours = torch.optim.SGD([p], lr=base)
    sched = WarmupPolyLR(ours, max_steps=max_steps, power=power)
    theirs = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    oracle = torch.optim.lr_scheduler.PolynomialLR(theirs, total_iters=max_steps, power=power)
    for _ in range(max_steps):
        assert math.isclose(ours.param_groups[0]["lr"], theirs.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-12)
        theirs.step()
        oracle.step()
        sched.step()


def test_warmup_is_linear_then_poly():
    def f(s):
        return lr_factor(s, max_steps=100, warmup_steps=10, warmup_start_factor=0.1, power=0.9)

    assert math.isclose(f(0), 0.1)
    assert math.isclose(f(5), (0.1 + 0.9 * 0.5) * (1 - 5 / 100) ** 0.9)
    assert math.isclose(f(10), (1 - 10 / 100) ** 0.9)
    assert f(100) == 0.0
    # learning rate keeps rising through the warm-up
    assert all(f(s) < f(s + 1) for s in range(0, 9))
    cos = lr_factor(50, max_steps=100, kind="cosine")
    assert math.isclose(cos, 0.5)


def test_every_schedule_kind_runs_and_others_are_refused():
    for kind in get_args(ScheduleKind):
        assert lr_factor(0, 10, kind=kind) == 1.0 and 0.0 <= lr_factor(7, 10, kind=kind) <= 1.0
    with pytest.raises(ValueError, match="'cosin' is not one of 'poly', 'cosine', 'constant'"):
        lr_factor(3, 10, kind="cosin")


def test_constant_schedule_keeps_the_base_lr_after_the_warmup():
    s = config_from_dict({"solver": {"schedule": "constant", "lr": 0.2, "end_lr": 0.05, "max_steps": 30}}).solver
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=s.lr)
    sched = WarmupPolyLR(
        opt, max_steps=s.max_steps, warmup_steps=4, warmup_start_factor=0.5, kind=s.schedule, end_lr=s.end_lr
    )
    lrs = []
    for _ in range(s.max_steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert [math.isclose(v, 0.2 * (0.5 + 0.5 * i / 4)) for i, v in enumerate(lrs[:4])] == [True] * 4
    assert lrs[4:] == [0.2] * (s.max_steps + 1 - 4)  # end_lr does not apply


def test_schedule_resume_sets_same_lr():
    p = nn.Parameter(torch.zeros(1))
    o1 = torch.optim.Adam([p], lr=1e-3)
    s1 = WarmupPolyLR(o1, max_steps=40, warmup_steps=5)
    for _ in range(17):
        s1.step()
    o2 = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-3)
    s2 = WarmupPolyLR(o2, max_steps=40, warmup_steps=5)
    s2.load_state_dict(s1.state_dict())
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"]


def test_lookahead_rejects_bad_arguments():
    w, _ = _quadratic_problem()
    with pytest.raises(ValueError, match="k must be"):
        Lookahead(torch.optim.SGD([w], lr=0.1), k=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(torch.optim.SGD([w], lr=0.1), alpha=1.5)
