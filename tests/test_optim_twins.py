"""Our weight-decay groups and Lookahead run side by side with timm's, so the documented differences
(and the equalities that remain) stay measured rather than assumed."""

import copy

import pytest
import torch
from torch import nn

import axial_deeplab
from axial_deeplab.engine.optim import Lookahead, param_groups_weight_decay

timm_optim = pytest.importorskip("timm.optim", reason="timm (dev extra) is not installed")


from test_engine_optim import _Net  # noqa: E402  (the same small net the optimizer tests use)


def _ids(groups, weight_decay):
    return {id(p) for g in groups if g["weight_decay"] == weight_decay for p in g["params"]}


@pytest.mark.parametrize("make", [_Net, lambda: axial_deeplab.create_model("axial_resnet_tiny")], ids=["net", "tiny"])
def test_weight_decay_groups_equal_timm_with_tables_excluded(make):
    torch.manual_seed(0)
    model = make()
    ours = param_groups_weight_decay(model, 1e-4)
    timm_groups = timm_optim.param_groups_weight_decay(model, 1e-4, no_weight_decay_list=("*_table",))
    assert _ids(ours, 1e-4) == _ids(timm_groups, 1e-4)
    assert _ids(ours, 0.0) == _ids(timm_groups, 0.0)
    # timm's default decays the 2-D relative-position tables; that is the only difference
    timm_default = timm_optim.param_groups_weight_decay(model, 1e-4)
    tables = {id(p) for n, p in model.named_parameters() if n.endswith("_table")}
    assert tables and _ids(timm_default, 1e-4) - _ids(ours, 1e-4) == tables


@pytest.mark.parametrize("make", [_Net, lambda: axial_deeplab.create_model("axial_resnet_tiny")], ids=["net", "tiny"])
def test_weight_decay_groups_with_tables_decayed_equal_timm_default(make):
    torch.manual_seed(0)
    model = make()
    ours = param_groups_weight_decay(model, 1e-4, decay_tables=True)
    timm_default = timm_optim.param_groups_weight_decay(model, 1e-4)
    assert _ids(ours, 1e-4) == _ids(timm_default, 1e-4)
    assert _ids(ours, 0.0) == _ids(timm_default, 0.0)
    assert len(_ids(ours, 1e-4)) + len(_ids(ours, 0.0)) == len(list(model.parameters()))


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    data = [(torch.randn(8, 6), torch.randn(8, 3)) for _ in range(20)]
    return model, data


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


K, ALPHA = 4, 0.5


def _ours_timm_schedule(model, data):
    """Ours started after k plain RAdam steps: the trajectory timm's Lookahead follows."""
    base = torch.optim.RAdam(model.parameters(), lr=1e-2)
    _train(model, base, data[:K])
    opt = Lookahead(base, k=K, alpha=ALPHA)
    _train(model, opt, data[K:])
    return opt


def test_timm_lookahead_first_sync_is_a_no_op_ours_pulls_back():
    model_t, data = _problem()
    model_o = copy.deepcopy(model_t)
    model_p = copy.deepcopy(model_t)
    init = _params(model_t)
    _train(model_t, timm_optim.Lookahead(torch.optim.RAdam(model_t.parameters(), lr=1e-2), alpha=ALPHA, k=K), data[:K])
    _train(model_o, Lookahead(torch.optim.RAdam(model_o.parameters(), lr=1e-2), k=K, alpha=ALPHA), data[:K])
    _train(model_p, torch.optim.RAdam(model_p.parameters(), lr=1e-2), data[:K])
    fast = _params(model_p)
    _assert_same(_params(model_t), fast)  # timm: slow weights start at the k-th fast weights
    expected = [s + ALPHA * (f - s) for s, f in zip(init, fast)]  # paper: slow weights start at the init
    for p, e in zip(_params(model_o), expected):
        torch.testing.assert_close(p, e, rtol=0, atol=1e-6)


def test_lookahead_equals_timm_once_anchored_at_the_same_slow_weights():
    model_t, data = _problem()
    model_o = copy.deepcopy(model_t)
    _train(model_t, timm_optim.Lookahead(torch.optim.RAdam(model_t.parameters(), lr=1e-2), alpha=ALPHA, k=K), data)
    _ours_timm_schedule(model_o, data)
    _assert_same(_params(model_t), _params(model_o))


def test_lookahead_state_dict_round_trip_side_by_side():
    """Save mid-window (step 10 of k=4), load into fresh copies, finish: both implementations resume
    exactly and still agree with each other."""
    split = 10
    model_t, data = _problem()
    model_o = copy.deepcopy(model_t)
    full_t = copy.deepcopy(model_t)
    _train(full_t, timm_optim.Lookahead(torch.optim.RAdam(full_t.parameters(), lr=1e-2), alpha=ALPHA, k=K), data)

    opt_t = timm_optim.Lookahead(torch.optim.RAdam(model_t.parameters(), lr=1e-2), alpha=ALPHA, k=K)
    _train(model_t, opt_t, data[:split])
    opt_o = _ours_timm_schedule(model_o, data[:split])
    saved = [
        (copy.deepcopy(m.state_dict()), copy.deepcopy(o.state_dict())) for m, o in ((model_t, opt_t), (model_o, opt_o))
    ]

    resumed = []
    for (weights, state), kind in zip(saved, ("timm", "ours")):
        model, _ = _problem()
        model.load_state_dict(weights)
        base = torch.optim.RAdam(model.parameters(), lr=1e-2)
        opt = timm_optim.Lookahead(base, alpha=ALPHA, k=K) if kind == "timm" else Lookahead(base, k=K, alpha=ALPHA)
        opt.load_state_dict(state)
        _train(model, opt, data[split:])
        resumed.append(_params(model))
    _assert_same(resumed[0], _params(full_t))
    _assert_same(resumed[1], _params(full_t))
