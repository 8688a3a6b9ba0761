"""The trainer's contract with its hooks, on a stand-in step (no model): hooks run in order after
every applied step, ``after_train`` always runs and says whether the run completed, a stop
request saves the last completed step once and raises TrainingInterrupted."""

import pytest

from axial_deeplab.engine.trainer import HookBase, TrainerBase, TrainingInterrupted


class _Checkpointer:
    def __init__(self):
        self.last, self.saved_step, self.saves = None, None, []

    def save_step(self, step):
        self.saves.append(step)
        self.last, self.saved_step = f"step-{step}", step


class _Counting(TrainerBase):
    def run_step(self, batch):
        self.step += 1
        return True


class _Record(HookBase):
    def __init__(self, name, events):
        self.name, self.events = name, events

    def before_train(self):
        self.events.append((self.name, "before", self.trainer.step))

    def after_step(self):
        self.events.append((self.name, "step", self.trainer.step))

    def after_train(self, completed):
        self.events.append((self.name, "end", completed))


def _trainer(start=0, max_steps=3, cls=_Counting):
    return cls(
        loader=range(max_steps - start),
        start_step=start,
        max_steps=max_steps,
        checkpointer=_Checkpointer(),
        run_dir="run",
    )


def test_hooks_run_in_order_after_each_step_and_see_the_end():
    events = []
    t = _trainer(start=1, max_steps=3)
    t.register_hooks([_Record("a", events), None, _Record("b", events)])
    t.train()
    assert events == [
        ("a", "before", 1),
        ("b", "before", 1),
        ("a", "step", 2),
        ("b", "step", 2),
        ("a", "step", 3),
        ("b", "step", 3),
        ("a", "end", True),
        ("b", "end", True),
    ]
    assert t.step == 3 and t.checkpointer.saves == []  # saving is a hook's job, not the loop's


def test_a_failing_hook_still_lets_every_hook_close():
    events = []

    class Boom(HookBase):
        def after_step(self):
            raise RuntimeError("boom")

    t = _trainer()
    t.register_hooks([_Record("a", events), Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        t.train()
    assert events[-1] == ("a", "end", False)


def test_a_stop_request_saves_the_last_step_once_and_raises():
    class StopAfterTwo(HookBase):
        def after_step(self):
            if self.trainer.step == 2:
                self.trainer.stop.requested = True

    events = []
    t = _trainer(max_steps=5)
    t.register_hooks([StopAfterTwo(), _Record("a", events)])
    with pytest.raises(TrainingInterrupted) as info:
        t.train()
    assert (info.value.step, info.value.checkpoint, info.value.run_dir) == (2, "step-2", "run")
    assert t.checkpointer.saves == [2] and events[-1] == ("a", "end", False)


def test_a_stop_at_an_already_saved_step_writes_nothing_more():
    class SavedThenStop(HookBase):
        def after_step(self):
            self.trainer.checkpointer.save_step(self.trainer.step)
            self.trainer.stop.requested = True

    t = _trainer(max_steps=5)
    t.register_hooks([SavedThenStop()])
    with pytest.raises(TrainingInterrupted) as info:
        t.train()
    assert info.value.step == 1 and t.checkpointer.saves == [1]


def test_processes_agreeing_to_stop_before_a_step_apply_nothing():
    class Refusing(TrainerBase):
        def run_step(self, batch):
            return False

    events = []
    t = _trainer(start=2, max_steps=5, cls=Refusing)
    t.checkpointer.last, t.checkpointer.saved_step = "step-2", 2  # resumed from step 2
    t.register_hooks([_Record("a", events)])
    with pytest.raises(TrainingInterrupted) as info:
        t.train()
    assert (info.value.step, info.value.checkpoint) == (2, "step-2") and t.checkpointer.saves == []
    assert ("a", "step", 2) not in events
