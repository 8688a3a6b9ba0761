"""Recompute a module's activations in the backward instead of keeping them.

Why: in training an axial-attention layer keeps, for its backward, the projection before its
BatchNorm (after it too, except on the eager CPU path, which forms it again), the attention's
own inputs and outputs, the similarity-BN moments' copies
of the queries and keys (float64 Grams among them) and the two retrievals before the output
BatchNorm: several times its input. In an Axial-DeepLab-S training step these are most of the
activation memory (about two thirds of what the graph holds at the end of the forward at
1x257x257). With recompute the layer keeps only its input (which the block's preceding ReLU
keeps anyway) and the backward replays the layer's forward once, at the price of that forward's
time; an axial block replays its height and width layers as one, so the height layer's output
is not kept either.

How: an autograd Function runs ``fn`` with gradients off (the attention still takes its
training path and batch statistics: the path is chosen by ``module.training``), keeps the input,
and in the backward replays ``fn`` with gradients on and differentiates the replay with respect
to the input and the module's parameters (``torch.autograd.grad``: gradients are returned, not
accumulated behind autograd's back, so ``autograd.grad(loss, params)`` works as usual). Unlike
``torch.utils.checkpoint``'s non-reentrant mode, which drops only what goes through
``save_for_backward``, this keeps nothing of the first forward's graph, so tensors an
autograd Function stores as plain ``ctx`` attributes (the moments' PyTorch forms do) are not
kept either. The RNG state (drop path, dropout) and autocast state are replayed as they were,
and BatchNorm's running statistics, which the replay would update a second time, are put back
after it: a training step with recompute equals one without (outputs, gradients, buffers).
Double backward through a recomputed module is not supported.

The replay reuses the first forward's batch statistics (:func:`reused`: the qkv and output
BatchNorms' means and variances, the local-span similarity moments): it runs on the same input,
so they are the same numbers, and their passes over the activations need not be made again
(~1.5% of a recomputed Axial-DeepLab-S step at 2x3x257x257). The global-span moments' Grams are
computed again: kept from the forward to the replay they added 67 MiB (in float64) to that
step's 377 MiB peak for ~3% of its time.
Each value is checked against the site and shapes that recorded it; a replay that takes another
path stops with an error rather than reading another layer's statistics.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["run_recomputed", "recompute_applies", "replaying", "reused"]


_REPLAYING = threading.local()
_TAPE = threading.local()


class _Tape:
    """Values in call order, each with its key: written by a recomputed module's first forward,
    read back by its replays (``position`` None while recording)."""

    def __init__(self):
        self.entries: List[Tuple[object, object]] = []
        self.position: Optional[int] = None


class _using_tape:
    """This thread's tape for the duration: recorded into (``read`` False) or read from."""

    def __init__(self, tape: _Tape, read: bool):
        self.tape, self.read = tape, read
        self.outer: Optional[_Tape] = None

    def __enter__(self):
        self.outer = getattr(_TAPE, "tape", None)
        self.tape.position = 0 if self.read else None
        _TAPE.tape = self.tape

    def __exit__(self, *exc):
        _TAPE.tape = self.outer
        return False


def reused(key, compute: Callable[[], object]):
    """``compute()``; inside a recomputed module, its first forward's value in the replay.

    For batch statistics, whose passes over the activations a replay need not make again: the
    first forward records ``compute()``'s value, the replay returns it (the same numbers: same
    input, same kernels). ``key`` (the site and its operands' shapes) must be the one recorded at
    that point, else the replay took another path and this raises. Outside a recomputed module,
    and while tracing, just ``compute()``."""
    tape = getattr(_TAPE, "tape", None)
    if tape is None or torch.compiler.is_compiling():
        return compute()
    if tape.position is None:
        value = compute()
        tape.entries.append((key, value))
        return value
    if tape.position >= len(tape.entries) or tape.entries[tape.position][0] != key:
        recorded = tape.entries[tape.position][0] if tape.position < len(tape.entries) else "nothing"
        raise RuntimeError(
            f"recomputed activations: the replay asked for {key!r} where the first forward recorded "
            f"{recorded!r} (the module took another path in its replay)"
        )
    tape.position += 1
    return tape.entries[tape.position - 1][1]


def replaying() -> bool:
    """Whether this thread is inside a backward's replay of a recomputed forward."""
    return bool(getattr(_REPLAYING, "depth", 0))


def recompute_applies(module: nn.Module) -> bool:
    """Whether a call now would keep activations worth dropping: a training module with gradients
    on, in eager mode (torch.compile and tracing see the plain forward; Inductor makes its own
    choice of what to keep), and not inside another module's replay (whose graph lives only
    for its own backward: recomputing inside it again would only add a forward)."""
    return (
        module.training
        and not getattr(_REPLAYING, "depth", 0)
        and torch.is_grad_enabled()
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


class _State:
    """What the replay needs: the call, its module, and the RNG and autocast state of the first run."""

    def __init__(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        self.module, self.fn = module, fn
        self.device = x.device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng: Optional[torch.Tensor] = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self.autocast: List[Tuple[str, bool, torch.dtype]] = [
            (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in sorted({"cpu", x.device.type})
        ]
        self.tape = _Tape()

    def first_run(self, x: torch.Tensor) -> torch.Tensor:
        """``fn(x)``, its batch statistics recorded for the replays."""
        with _using_tape(self.tape, read=False):
            return self.fn(x)

    def replay(self, x: torch.Tensor, grad: torch.Tensor, wanted: Callable[[torch.Tensor], List[torch.Tensor]]):
        """Gradients of ``fn``'s replay on ``x`` with respect to ``wanted(x)``; the module's buffers
        are put back afterwards (not before: BatchNorm's backward reads the running statistics
        its forward saved, and a copy into them would bump their version)."""
        buffers = [b for b in self.module.buffers() if b is not None]
        kept = [b.detach().clone() for b in buffers]
        devices = [self.device] if self.cuda_rng is not None else []
        try:
            with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
                torch.set_rng_state(self.cpu_rng)
                if self.cuda_rng is not None:
                    torch.cuda.set_rng_state(self.cuda_rng, self.device)
                _REPLAYING.depth = getattr(_REPLAYING, "depth", 0) + 1
                try:
                    with torch.enable_grad(), _autocast(self.autocast), _using_tape(self.tape, read=True):
                        out = self.fn(x)
                finally:
                    _REPLAYING.depth -= 1
            if self.tape.position != len(self.tape.entries):
                raise RuntimeError(
                    f"recomputed activations: the replay of {type(self.module).__name__} used "
                    f"{self.tape.position} of the {len(self.tape.entries)} statistics its first forward "
                    "recorded (the module took another path in its replay)"
                )
            inputs = wanted(x)
            if not out.requires_grad:
                return [None] * len(inputs)
            return list(torch.autograd.grad(out, inputs, grad, allow_unused=True))
        finally:
            # only those the replay changed (BatchNorm's running statistics change in place without
            # a version bump): a copy into another would bump its version, which the outer graph
            # checks where it saved that buffer (a block's first BatchNorm, outside the replay)
            with torch.no_grad():
                for b, v in zip(buffers, kept):
                    if not torch.equal(b, v):
                        b.copy_(v)


class _autocast:
    """Re-enter the recorded autocast state of each device type."""

    def __init__(self, states):
        self.contexts = [torch.autocast(t, dtype=dtype, enabled=on) for t, on, dtype in states]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
        return False


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state: _State, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        # gradients are off here (autograd.Function.forward): no graph, nothing kept but x. A
        # module in eval mode runs with them on (its graph dropped at once), as the attention
        # would otherwise take its inference path, whose rounding the replay would not share.
        if state.module.training:
            out = state.first_run(x)
        else:
            with torch.enable_grad():
                out = state.fn(x.detach()).detach()
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"run_recomputed: {type(state.module).__name__} must return one tensor, got {type(out)}")
        ctx.state = state
        ctx.save_for_backward(x)
        # A view of an intermediate (the attention's output is a permuted one) would forbid the
        # in-place ReLU after it; detached, it is a plain tensor. One of x is copied, so that an
        # in-place op on the output cannot change the kept input.
        if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            return out.clone()
        return out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        state: _State = ctx.state
        params = list(state.module.parameters())
        want_x, want_p = ctx.needs_input_grad[1], ctx.needs_input_grad[2:]

        def wanted(xd: torch.Tensor) -> List[torch.Tensor]:
            return ([xd] if want_x else []) + [p for p, need in zip(params, want_p) if need]

        got = state.replay(x.detach().requires_grad_(want_x), grad, wanted)
        g_x = got.pop(0) if want_x else None
        return (None, g_x, *(got.pop(0) if need else None for need in want_p))


def run_recomputed(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with only ``x`` kept for the backward, which replays ``fn``. ``fn`` may read ``x``
    and ``module``'s parameters (gradients reach those alone) and must return one tensor; its
    buffers (BatchNorm running statistics and counters) are restored after the replay. Any module
    works (timm-style ``set_grad_checkpointing`` runs whole blocks through it); random ops inside
    ``fn`` (drop path) replay alike, as the RNG state is kept."""
    return _Recompute.apply(_State(module, fn, x), x, *module.parameters())
