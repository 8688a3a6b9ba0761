"""Which attention path runs: one explicit dispatcher for ``PositionSensitiveAxialAttention``.

Each path is a :class:`Backend`: a name, a one-line description, ``can_run(layer, x)`` that
returns None or the reason it cannot run this layer on this input, and ``run(layer, x)``.
With ``impl="auto"`` the first path of the priority list for the input's device type and the
mode that can run is taken:

======================  ==============================================
device, mode            priority
======================  ==============================================
cpu (eval and train)    memory_efficient > fast > reference
cuda (eval and train)   triton > memory_efficient > reference
other devices           memory_efficient > reference
======================  ==============================================

The mode is ``eval`` when gradients are off and the layer is not training, ``train`` otherwise.
A path is forced, most specific first, by the layer's ``impl``, by :func:`attention_impl` (a
context manager, process-wide, nestable) or by the environment variable
``AXIAL_DEEPLAB_ATTENTION_IMPL``; a forced path that cannot run raises ValueError with the
reason (no silent fallback). :func:`explain` says, for a layer and an input, which path runs,
why each faster one was refused and which inner route the memory-efficient path takes.
``AXIAL_DEEPLAB_ATTENTION_DEBUG=1`` (or the logger ``axial_deeplab.attention`` at DEBUG) logs
the chosen path once per layer configuration, device, dtype and mode.

This module is a leaf: it imports no attention path. The built-in paths are registered by
:mod:`.builtin_paths`, imported on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "Backend",
    "register_backend",
    "unregister_backend",
    "register_unavailable",
    "register_attention_impl",
    "available_attention_impls",
    "get_backend",
    "priority",
    "select_backend",
    "explain",
    "attention_impl",
    "run",
    "tracing_refusal",
    "graph_recorder",
    "ENV_IMPL",
    "ENV_DEBUG",
    "logger",
]

ENV_IMPL = "AXIAL_DEEPLAB_ATTENTION_IMPL"
ENV_DEBUG = "AXIAL_DEEPLAB_ATTENTION_DEBUG"
logger = logging.getLogger("axial_deeplab.attention")

Refusal = Optional[str]  # None: can run; else why not


def _always(layer: PositionSensitiveAxialAttention, x) -> Refusal:
    return None


@dataclass(frozen=True)
class Backend:
    """One attention path.

    ``can_run(layer, x)``: None, or why the path cannot run (a forced path raises with it).
    ``auto_refusal(layer, x)``: a reason for ``impl="auto"`` to pass over a path that still runs
    when asked for by name (the Triton kernels on a device where their self-check failed: by
    name they warn and run the PyTorch path). ``routes(layer, x)``: the path's inner routes in
    the order it tries them, ``[(route, None or why not)]``, for :func:`explain`; ``notes``:
    more lines for it (the C kernel's state); ``route_descriptions``: route -> one line."""

    name: str
    description: str
    run: Callable
    can_run: Callable[..., Refusal] = _always
    auto_refusal: Optional[Callable[..., Refusal]] = None
    routes: Optional[Callable[..., List[Tuple[str, Refusal]]]] = None
    notes: Optional[Callable[..., List[str]]] = None
    route_descriptions: Optional[Dict[str, str]] = None


_BACKENDS: Dict[str, Backend] = {}
# (device type, mode) -> names, fastest first; "*" is the device type of any other device.
_PRIORITY: Dict[Tuple[str, str], List[str]] = {}
_DEFAULT_PRIORITY = {
    "cpu": ["memory_efficient", "fast", "reference"],
    "cuda": ["triton", "memory_efficient", "reference"],
    "*": ["memory_efficient", "reference"],
}
for _dev, _names in _DEFAULT_PRIORITY.items():
    for _mode in ("eval", "train"):
        _PRIORITY[(_dev, _mode)] = list(_names)
_UNAVAILABLE: Dict[str, str] = {}  # name -> why this installation lacks it
_FORCED: List[str] = []  # the attention_impl() stack, innermost last
_LOGGED: set = set()
_state = {"builtins": False, "env_logging": False}


def _ensure_builtins() -> None:
    # while torch.compile traces, the paths are registered (the package imports them): reading
    # the flag there would guard on it, and the first compiled call, which sets it, recompiles
    if torch.compiler.is_compiling():
        return
    if not _state["builtins"]:
        _state["builtins"] = True
        from . import builtin_paths  # noqa: F401  (registers the built-in paths)


# --------------------------------------------------------------------------- registration
def register_backend(backend: Backend) -> None:
    """Add (or replace) a path. Where it goes in the priority lists is set apart (a path in
    no list runs only when asked for by name)."""
    _BACKENDS[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)


def unregister_backend(name: str) -> None:
    """Remove a path from the registry and the priority lists (tests, plug-ins)."""
    _BACKENDS.pop(name, None)
    for names in _PRIORITY.values():
        if name in names:
            names.remove(name)


def register_unavailable(name: str, reason: str) -> None:
    """Record a path this installation lacks (e.g. Triton not installed): asking for it by name
    fails with ``reason``, and :func:`explain` names it where it would stand in a priority list."""
    if name not in _BACKENDS:
        _UNAVAILABLE[name] = reason


def register_attention_impl(
    name: str,
    fn: Callable,
    auto_devices: Sequence[str] = (),
    can_run: Callable[..., Refusal] = _always,
    description: Optional[str] = None,
) -> None:
    """Register ``fn(layer, x) -> y`` as the path ``name``. ``auto_devices`` lists device types
    whose ``impl="auto"`` should try it first (in both modes; the last one registered so comes
    first)."""
    if description is None:
        doc = (fn.__doc__ or "").strip().splitlines()
        description = doc[0] if doc else name
    register_backend(Backend(name, description, fn, can_run))
    for dev in auto_devices:
        for mode in ("eval", "train"):
            names = _PRIORITY.setdefault((dev, mode), list(_DEFAULT_PRIORITY["*"]))
            if name in names:
                names.remove(name)
            names.insert(0, name)


def available_attention_impls() -> List[str]:
    """Names accepted by ``impl=``, :func:`attention_impl` and ``AXIAL_DEEPLAB_ATTENTION_IMPL``
    (besides ``"auto"``)."""
    _ensure_builtins()
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    _ensure_builtins()
    try:
        return _BACKENDS[name]
    except KeyError:
        if name in _UNAVAILABLE:
            raise ValueError(f"attention impl {name!r} is not available: {_UNAVAILABLE[name]}") from None
        raise ValueError(
            f"unknown attention impl {name!r}; available: {['auto'] + available_attention_impls()}"
        ) from None


def mode_of(layer: PositionSensitiveAxialAttention) -> str:
    return "eval" if not torch.is_grad_enabled() and not layer.training else "train"


def priority(device_type: str, mode: str, include_unavailable: bool = False) -> List[str]:
    """The names ``impl="auto"`` tries, fastest first, for a device type and mode (with
    ``include_unavailable``, also the paths this installation lacks, where they would stand)."""
    _ensure_builtins()
    names = _PRIORITY.get((device_type, mode)) or _PRIORITY[("*", mode)]
    return [n for n in names if n in _BACKENDS or (include_unavailable and n in _UNAVAILABLE)]


def graph_recorder() -> Optional[str]:
    """ "ONNX export" or "torch.jit.trace" while one records a graph from Python calls (so a
    call it cannot see would be missing from the graph), else None. Cheap: the ONNX query
    (the slow one) is made only while tracing or compiling."""
    tracing = torch.jit.is_tracing()
    if (tracing or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export():
        return "ONNX export"
    return "torch.jit.trace" if tracing else None


def runs_eagerly(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` may skip a ``torch.library`` operator's dispatch for its plain
    implementation: a plain tensor (not fake, not a subclass) outside torch.compile / export."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def tracing_refusal(what: str) -> Refusal:
    """Why a path that ``what`` (e.g. "calls the C kernel through ctypes") cannot run while
    torch.jit.trace or ONNX export records the graph, or None when neither does."""
    recorder = graph_recorder()
    return None if recorder is None else f"{recorder} is running and this path {what}"


# --------------------------------------------------------------------------- forcing a path
@contextlib.contextmanager
def attention_impl(name: str) -> Iterator[None]:
    """Run every attention layer whose ``impl`` is ``"auto"`` through the path ``name`` inside
    the block (``"auto"``: the priority lists again); process-wide, restored on exit, nestable."""
    if name != "auto":
        get_backend(name)  # unknown names fail here, listing the known ones
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _requested(layer: PositionSensitiveAxialAttention) -> Tuple[str, str]:
    """(name, who asked): the layer's impl, else attention_impl(), else the environment."""
    if layer.impl != "auto":
        return layer.impl, "the layer's impl"
    if _FORCED:
        return _FORCED[-1], "attention_impl()"
    env = os.environ.get(ENV_IMPL, "").strip()
    if env:
        return env, ENV_IMPL
    return "auto", "default"


def _refusal(backend: Backend, layer, x, auto: bool) -> Refusal:
    reason = backend.can_run(layer, x)
    if reason is None and auto and backend.auto_refusal is not None:
        reason = backend.auto_refusal(layer, x)
    return reason


def select_backend(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> str:
    """The name of the path ``layer(x)`` runs; ValueError when a forced path cannot run."""
    name, source = _requested(layer)
    if name != "auto":
        backend = get_backend(name)
        reason = backend.can_run(layer, x)
        if reason is not None:
            raise ValueError(f"attention impl {name!r} (set by {source}) cannot run here: {reason}")
        return name
    for candidate in priority(x.device.type, mode_of(layer)):
        if _refusal(_BACKENDS[candidate], layer, x, auto=True) is None:
            return candidate
    return "reference"


def run(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through the selected path (the layer's forward)."""
    name = select_backend(layer, x)
    if not torch.compiler.is_compiling() and _debug_enabled():
        _log_once(layer, x, name)
    return _BACKENDS[name].run(layer, x)


# --------------------------------------------------------------------------- explaining
def _signature(layer: PositionSensitiveAxialAttention) -> str:
    text = layer.extra_repr()
    return f"{type(layer).__name__}({text})"


def _route(backend: Backend, layer, x) -> Tuple[Optional[str], List[Tuple[str, Refusal]]]:
    if backend.routes is None:
        return None, []
    routes = backend.routes(layer, x)
    chosen = next((r for r, why in routes if why is None), None)
    return chosen, routes


def explain(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> str:
    """Which path ``layer(x)`` runs and why: every candidate in priority order with "runs" or
    the reason it was refused, and the inner route of the path that runs. Never raises for a
    path that cannot run (it says what the forward would raise)."""
    _ensure_builtins()
    mode = mode_of(layer)
    name, source = _requested(layer)
    shape = tuple(int(d) for d in x.shape)
    lines = [
        f"{_signature(layer)}",
        f"input {shape} {x.dtype} on {x.device}, mode {mode} "
        f"({'gradients off' if not torch.is_grad_enabled() else 'gradients on'}, "
        f"layer {'training' if layer.training else 'in eval'})",
    ]
    width = max(len(n) for n in list(_BACKENDS) + list(_UNAVAILABLE)) + 2

    def describe(bname: str, status: str) -> None:
        backend = _BACKENDS[bname]
        runs = status == "runs"
        if backend.routes is not None and not runs and not status.startswith("could run"):
            forced = " (the forward raises ValueError)" if status.startswith("cannot") else ""
            status = status.split(":")[0] + ": no route can run" + forced  # the reasons follow, one per route
        lines.append(f"  {bname:<{width}}{status}")
        if backend.routes is not None and not status.startswith("could run"):
            chosen, routes = _route(backend, layer, x)
            for route, why in routes:
                mark = "runs" if route == chosen else f"refused: {why}" if why else "not tried (an earlier route runs)"
                lines.append(f"      route {route:<10}{mark}")
        if runs and backend.notes is not None:
            lines.extend(f"      {note}" for note in backend.notes(layer, x))

    if name != "auto":
        if name not in _BACKENDS:
            try:
                get_backend(name)
            except ValueError as e:
                lines.append(f"path {name!r} set by {source}: {e} (the forward raises ValueError)")
            return "\n".join(lines)
        reason = _BACKENDS[name].can_run(layer, x)
        lines.append(f"path forced to {name!r} by {source}")
        describe(name, "runs" if reason is None else f"cannot run: {reason} (the forward raises ValueError)")
        selected = name if reason is None else None
    else:
        order = priority(x.device.type, mode, include_unavailable=True)
        lines.append(f"impl='auto', priority for ({x.device.type}, {mode}): {' > '.join(order)}")
        selected = None
        for bname in order:
            if bname in _UNAVAILABLE:
                lines.append(f"  {bname:<{width}}refused: {_UNAVAILABLE[bname]}")
                continue
            reason = _refusal(_BACKENDS[bname], layer, x, auto=True)
            if reason is not None:
                describe(bname, f"refused: {reason}")
            elif selected is None:
                selected = bname
                describe(bname, "runs")
            else:
                describe(bname, "could run (lower priority)")
        if selected is None:
            selected = "reference"
            describe("reference", "runs")
    if selected is not None:
        chosen, _ = _route(_BACKENDS[selected], layer, x)
        about = _BACKENDS[selected].route_descriptions or {}
        lines.append(
            f"selected: {selected} (route {chosen}: {about.get(chosen, '')})".replace(": )", ")")
            if chosen
            else f"selected: {selected}: {_BACKENDS[selected].description}"
        )
    others = [n for n in sorted(_BACKENDS) if n != selected and not any(ln.startswith(f"  {n} ") for ln in lines)]
    if others:
        lines.append(f"also available by name: {', '.join(others)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- debug log
def _debug_enabled() -> bool:
    if os.environ.get(ENV_DEBUG, "").strip().lower() in ("1", "true", "yes", "on"):
        if not _state["env_logging"]:
            _state["env_logging"] = True
            if logger.level == logging.NOTSET or logger.level > logging.DEBUG:
                logger.setLevel(logging.DEBUG)
            if not logger.handlers:
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
                logger.addHandler(handler)
                logger.propagate = False
        return True
    return logger.isEnabledFor(logging.DEBUG)


def _log_once(layer: PositionSensitiveAxialAttention, x, name: str) -> None:
    mode = mode_of(layer)
    key = (_signature(layer), x.device.type, x.dtype, mode)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    chosen, _ = _route(_BACKENDS[name], layer, x)
    route = f" (route {chosen})" if chosen else ""
    logger.debug("%s on %s %s, %s: %s%s", key[0], x.device.type, str(x.dtype).replace("torch.", ""), mode, name, route)
