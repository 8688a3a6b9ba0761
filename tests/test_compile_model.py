"""``experiment.compile``: how the engine hands a model to torch.compile. (The compiled numerics
are tested on the attention operators in tests/test_attention_op.py.)"""

import torch

from axial_deeplab.engine.builders import INFERENCE_COMPILE_OPTIONS, TRAINING_COMPILE_OPTIONS, compile_model
from axial_deeplab.engine.config import Config


class _Panoptic(torch.nn.Module):
    """Evaluated through predict_raw, like PanopticDeepLab; forward post-processes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def predict_raw(self, x):
        return {"semantic_logits": self.conv(x)}

    def forward(self, x):
        return [r.argmax(1) for r in self.predict_raw(x).values()]


def _cfg(on: bool) -> Config:
    cfg = Config()
    cfg.experiment.compile = on
    return cfg


def _spy(monkeypatch):
    calls = []

    def spy(fn, **kw):
        calls.append((fn, kw))
        return lambda *a: ("compiled", fn(*a))

    monkeypatch.setattr(torch, "compile", spy)
    return calls


def test_compile_off_returns_the_model_itself(monkeypatch):
    calls = _spy(monkeypatch)
    model = _Panoptic()
    assert compile_model(model, _cfg(False), inference=True) is model
    assert calls == []


def test_evaluate_compiles_predict_raw_too_with_freezing(monkeypatch):
    # torch.compile(model) compiles forward only; a panoptic model's evaluation calls
    # predict_raw, which would otherwise run eager behind the compiled wrapper
    calls = _spy(monkeypatch)
    model = _Panoptic()
    compiled = compile_model(model, _cfg(True), inference=True)
    assert len(calls) == 2
    assert calls[0] == (model, {"dynamic": True, "options": INFERENCE_COMPILE_OPTIONS})
    assert calls[1][0] == model.predict_raw and calls[1][1] == calls[0][1]
    assert INFERENCE_COMPILE_OPTIONS == {"freezing": True}
    x = torch.randn(1, 3, 4, 4)
    tag, raw = compiled.predict_raw(x)
    assert tag == "compiled"
    torch.testing.assert_close(raw["semantic_logits"], model.conv(x))


def test_training_compile_has_no_freezing(monkeypatch):
    # the weights change every step: constants folded once would go stale
    calls = _spy(monkeypatch)
    model = _Panoptic()
    compile_model(model, _cfg(True), dynamic=False)
    assert calls == [(model, {"dynamic": False, "options": TRAINING_COMPILE_OPTIONS})]
    assert "freezing" not in TRAINING_COMPILE_OPTIONS


def test_training_compile_forces_the_channels_last_backward_on_cpu_only(monkeypatch):
    calls = _spy(monkeypatch)
    model = _Panoptic()
    compile_model(model, _cfg(True))
    assert calls[-1][1]["options"] == {"force_layout_optimization": True}
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    compile_model(model, _cfg(True))
    assert calls[-1] == (model, {"dynamic": True})
