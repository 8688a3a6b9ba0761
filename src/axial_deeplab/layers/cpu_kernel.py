"""Fused C kernel for the eval forward of axial attention on CPU.

Why: in PyTorch eager every pass over a chunk's L x L logits is a separate operator
(batched products, a transposed add, exp, sums), so the layer stays memory- and
dispatch-bound however it is chunked. This kernel computes, for a block of four query
rows, the three similarity terms from the compact tables, the softmax (exp2 with log2(e)
folded into the term scales) and both retrievals while the rows sit in L1 cache. It works
in offset ("skewed") coordinates u = p - o: the four rows share every load of the offset
tables and read the keys and values at a per-row shift. Two entry points:
:func:`forward_eval`, the whole layer in inference (BN folded into the projection, one
matrix product per image that reads the input in its own memory layout and writes
position-major qkv, output BN folded into the values, the value table and the kernel's store,
output written channels_last), and :func:`attend_eval`, the contract of :func:`.chunked.attend`,
used by the forward of the memory-efficient training function (it also returns each
row's log-sum-exp). The training backward (:func:`attention_backward`, and
:func:`backward_strided` for operands in any strided layout) recomputes each row's
attention from that log-sum-exp.

The C sources, ``axial_deeplab/csrc/axial_attention_cpu.c`` with the band moments
(``axial_band_moments_cpu.c``) and the output BatchNorm of training (``axial_rows_batchnorm_cpu.c``)
appended (package data), are compiled as one unit on
first use with the system C compiler (``$CC``, a command line such as ``"ccache gcc"``, else
``cc``/``gcc``/``clang``) into a cache directory (``$AXIAL_DEEPLAB_CACHE``, else
``$XDG_CACHE_HOME/axial_deeplab`` or ``~/.cache/axial_deeplab``), keyed by a hash of the
source, the compiler command, its flags and the CPU, and loaded with ctypes. Where torch runs
on OpenMP (Linux: its runtime, e.g. ``torch/lib/libgomp.so.1``, found in /proc/self/maps) the
kernel is built with ``-fopenmp`` and linked against that same runtime, and splits its rows into
one share per torch thread on torch's own OpenMP team: one pool of threads, not a second pool
fighting torch's spin-waiting workers for the cores. If that build fails, a warning says why and
the shares run on a Python thread pool (ctypes releases the GIL). Without a compiler,
or with ``AXIAL_DEEPLAB_NO_C_KERNEL=1``, the fast path uses its PyTorch implementation
instead (same results within float32 rounding); a build that fails warns once with the
compiler's message and falls back the same way.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .geometry import (
    LOG2E,
    apply_stride,
    attention_radius,
    eval_bn,
    folded_constants,
    folded_projection,
    layer_query_step,
    offset_table_rows,
)

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "available",
    "supports",
    "kernel_operands",
    "run_kernel",
    "attend_eval",
    "forward_eval",
    "eval_with_operands",
    "attention_backward",
    "backward_strided",
    "row_moments",
    "row_moments_backward",
    "ENABLED",
    "MAX_KEY_DEPTH",
]

# Tests switch this off to exercise the PyTorch implementation.
ENABLED = os.environ.get("AXIAL_DEEPLAB_NO_C_KERNEL", "") in ("", "0")
MAX_KEY_DEPTH = 256
_PAD = 8  # floats of zero padding after each offset-table row (one vector)

# The kernel's C source, shipped as package data; its header comment describes the layout.
_SOURCE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "axial_attention_cpu.c"
)

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# _Args and _BackArgs mirror the C structs AxialArgs and AxialBackArgs field for field.


class _Args(ctypes.Structure):
    _fields_ = (
        [(n, _I64) for n in ("Lq", "L", "qstep", "radius", "dk", "dv", "heads", "nseq", "n_inner")]
        + [("qkv", _PTR)]
        + [(n, _I64) for n in ("s_b", "s_n", "s_h", "s_c", "s_p")]
        + [
            ("scale", _PTR),
            ("rqe", _PTR),
            ("rke", _PTR),
            ("Jp", _I64),
            ("rvt", _PTR),
            ("rv_hs", _I64),
            ("out", _PTR),
            ("out2", _PTR),
        ]
        + [(n, _I64) for n in ("o_bs", "o_ns", "o_hs", "o_rs")]
        + [("beta", _PTR), ("lse", _PTR), ("bias", _PTR)]
    )


class _BackArgs(ctypes.Structure):
    _fields_ = (
        [(n, _I64) for n in ("L", "radius", "dk", "dv", "heads")]
        + [("qkv", _PTR)]
        + [(n, _I64) for n in ("s_n", "s_h", "s_c", "s_p")]
        + [("scale", _PTR)]
        + [(n, _I64) for n in ("use_qk", "use_qr", "use_kr", "use_rv")]
        + [
            ("rqe", _PTR),
            ("rke", _PTR),
            ("Jp", _I64),
            ("rvT", _PTR),
            ("lse", _PTR),
            ("delta", _PTR),
            ("gsv", _PTR),
            ("gsve", _PTR),
            ("g_n", _I64),
            ("g_h", _I64),
            ("g_c", _I64),
            ("g_o", _I64),
            ("gqkv", _PTR),
            ("osv", _PTR),
            ("osve", _PTR),
            ("yscale", _PTR),
            ("yshift", _PTR),
        ]
    )


_lock = threading.Lock()
_state = {"lib": None, "tried": False, "pools": {}, "openmp": False}
# Linux lists a process's libraries in /proc/self/maps; elsewhere the OpenMP build is not tried.
_PROC_MAPS = os.path.exists("/proc/self/maps")


def _cache_dir() -> str:
    root = os.environ.get("AXIAL_DEEPLAB_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "axial_deeplab")
    try:
        os.makedirs(root, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return tempfile.gettempdir()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> Optional[List[str]]:
    """The compiler command: ``$CC`` split as a shell would (``"ccache gcc"`` works), else the
    first of cc, gcc, clang on the PATH; None when there is none."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _first_lines(text: str, lines: int = 20) -> str:
    kept = text.strip().splitlines()
    more = len(kept) - lines
    return "\n".join(kept[:lines] + ([f"... ({more} more lines)"] if more > 0 else []))


def _build(
    compiler: List[str], flags: List[str], source: bytes, target: str, link: Optional[str] = None
) -> Optional[str]:
    """Compile ``source`` into ``target`` (replaced atomically, so concurrent processes see a
    whole file); None on success, else what went wrong with the compiler's message. With
    ``link`` (a shared library's path) the object is compiled first and then linked against that
    file alone: ``-fopenmp`` at the link would add the compiler's own OpenMP runtime, a second one
    beside the one torch has loaded."""
    try:
        work = tempfile.mkdtemp(prefix="build_", dir=os.path.dirname(target))
    except OSError as e:
        return f"no build directory: {e}"
    try:
        # a copy of exactly the hashed bytes, under the shipped name (its line numbers match)
        src = os.path.join(work, "axial_attention_cpu.c")
        out = os.path.join(work, "axial_attention_cpu.so")
        with open(src, "wb") as f:
            f.write(source)
        if link is None:
            commands = [[*compiler, *flags, src, "-o", out]]
        else:
            obj = os.path.join(work, "axial_attention_cpu.o")
            rpath = "-Wl,-rpath," + os.path.dirname(link)
            commands = [[*compiler, *flags, "-c", src, "-o", obj], [*compiler, "-shared", obj, link, rpath, "-o", out]]
        for cmd in commands:
            try:
                proc = subprocess.run(cmd, capture_output=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                return f"`{shlex.join(cmd)}` failed: {e}"
            if proc.returncode != 0:
                message = (proc.stderr or proc.stdout).decode(errors="replace")
                return f"`{shlex.join(cmd)}` exited with status {proc.returncode}:\n{_first_lines(message)}"
        os.replace(out, target)
        return None
    except OSError as e:
        return f"building {target}: {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _openmp_runtime():
    """``(path, "")`` of the OpenMP runtime that torch's parallel backend has loaded into this
    process (libgomp, libomp or libiomp5, as listed in /proc/self/maps), or ``(None, why not)``."""
    if not torch.backends.openmp.is_available():
        return None, "torch was built without OpenMP"
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError as e:
        return None, f"cannot list the loaded libraries ({e})"
    found = []
    for line in maps.splitlines():
        path = line.split(None, 5)[-1] if line.count(" ") >= 5 else ""
        if re.match(r"lib(gomp|omp|iomp5)([-.].*)?\.so(\..*)?$", os.path.basename(path)) and os.path.isfile(path):
            found.append(path)
    # other packages bring their own copies (scikit-learn's libgomp-<hash>.so): torch's is the one
    # its threads run on, in its wheel's lib folder; else (torch linked to a system runtime) the first
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    ours = [p for p in found if os.path.dirname(os.path.realpath(p)) == torch_lib]
    if ours or found:
        return (ours or found)[0], ""
    return None, "no OpenMP runtime (libgomp, libomp, libiomp5) is loaded in this process"


def _warn_unbuilt(reason: str) -> None:
    warnings.warn(
        f"axial attention C kernel unavailable, the layer uses its slower PyTorch path: {reason}\n"
        "(set CC to a working C compiler, or AXIAL_DEEPLAB_NO_C_KERNEL=1 to skip the build)",
        stacklevel=2,
    )


def _compile() -> Optional[ctypes.CDLL]:
    """The loaded kernel, built first unless a build of this source, compiler command, flags and
    CPU is cached. None without a compiler, or when the build fails (after one warning, from
    :func:`_library`'s single attempt per process, with the compiler's message)."""
    compiler = _compiler()
    if not compiler:
        return None
    try:
        with open(_SOURCE_PATH, "rb") as f:
            source = f.read()
        source += _extra_sources()
    except OSError as e:
        _warn_unbuilt(f"cannot read its C source ({e}); was the package installed with its data files?")
        return None
    common = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
    native = common + ["-march=native"]
    # first with OpenMP, linked against torch's runtime: the shares then run on torch's own threads
    runtime, openmp_error = _openmp_runtime() if _PROC_MAPS else (None, None)
    attempts = [(native + ["-fopenmp"], runtime)] if runtime else []
    attempts += [(native, None), (common, None)]  # the last for compilers without -march=native
    error = None
    for flags, link in attempts:
        key = hashlib.sha256(
            b"\0".join(
                [source, *(s.encode() for s in [*compiler, *flags, link or "", platform.machine(), _cpu_model()])]
            )
        ).hexdigest()[:16]
        target = os.path.join(_cache_dir(), f"axial_attention_{key}.so")
        if not os.path.exists(target):
            error = _build(compiler, flags, source, target, link)
            if error is not None:
                openmp_error = error if link else openmp_error
                continue
        try:
            lib = ctypes.CDLL(target)
        except OSError as e:
            error = f"cannot load {target}: {e}"
            openmp_error = error if link else openmp_error
            continue
        fn = lib.axial_attention_rows_f32
        fn.argtypes = [ctypes.POINTER(_Args), _I64, _I64, _PTR]
        fn.restype = ctypes.c_int
        fn = lib.axial_attention_scratch_floats
        fn.argtypes = [ctypes.POINTER(_Args)]
        fn.restype = _I64
        fn = lib.axial_attention_backward_scratch_floats
        fn.argtypes = [ctypes.POINTER(_BackArgs)]
        fn.restype = _I64
        fn = lib.axial_attention_backward_f32
        fn.argtypes = [ctypes.POINTER(_BackArgs), _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR]
        fn.restype = ctypes.c_int
        fn = lib.axial_moments_f32
        fn.argtypes = [_PTR] + [_I64] * 9 + [_PTR, _PTR]
        fn.restype = ctypes.c_int
        fn = lib.axial_moments_backward_f32
        fn.argtypes = [_PTR] + [_I64] * 5 + [_PTR] * 7 + [_I64, _I64, _PTR]
        fn.restype = ctypes.c_int
        _declare_shares(lib)
        _declare_band(lib)
        _declare_output_bn(lib)
        _state["openmp"] = bool(lib.axial_openmp())
        if openmp_error and not _state["openmp"]:
            warnings.warn(
                "axial attention C kernel built without OpenMP: its threads run beside torch's instead of on "
                f"them, which scales worse with torch.get_num_threads(): {openmp_error}",
                stacklevel=3,
            )
        return lib
    _warn_unbuilt(error)
    return None


def _declare_shares(lib: ctypes.CDLL) -> None:
    """Signatures of the entry points that split the work into shares themselves."""
    lib.axial_openmp.argtypes = []
    lib.axial_openmp.restype = ctypes.c_int
    lib.axial_attention_rows_shares.argtypes = [ctypes.POINTER(_Args), _I64, _I64, _PTR, _I64]
    lib.axial_attention_backward_shares.argtypes = [ctypes.POINTER(_BackArgs), _I64, _I64, _PTR, _I64, _PTR, _I64]
    lib.axial_moments_shares.argtypes = [_PTR] + [_I64] * 9 + [_PTR, _PTR]
    lib.axial_moments_backward_shares.argtypes = [_PTR] + [_I64] * 5 + [_PTR] * 7 + [_I64, _I64, _PTR]
    for name in ("rows", "backward", "moments", "moments_backward"):
        getattr(
            lib, f"axial_{'attention_' if name in ('rows', 'backward') else ''}{name}_shares"
        ).restype = ctypes.c_int


def _library() -> Optional[ctypes.CDLL]:
    if not ENABLED:
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["lib"] = _compile()
                except Exception as e:  # never let the optional kernel break the layer
                    warnings.warn(f"axial attention C kernel unavailable ({e}); using the PyTorch path")
                _state["tried"] = True
    return _state["lib"]


def available() -> bool:
    """True when the compiled kernel is loaded (compiling it on first call)."""
    return _library() is not None


def _pool(workers: int) -> ThreadPoolExecutor:
    # Keyed by process id too: a forked child (e.g. a data-loader worker) must not reuse
    # the parent's pool, whose threads do not exist in the child.
    key = (os.getpid(), workers)
    pool = _state["pools"].get(key)
    if pool is None:
        with _lock:
            pool = _state["pools"].get(key)
            if pool is None:
                pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="axial-attn")
                _state["pools"][key] = pool
    return pool


def _run_shares(share, workers: int) -> list:
    """``[share(i) for i in range(workers)]``, shares 1.. on the pool and share 0 on the calling
    thread (which would otherwise only wait): one thread handoff fewer per call, and no more
    threads awake than torch threads."""
    if workers == 1:
        return [share(0)]
    rest = [_pool(workers - 1).submit(share, i) for i in range(1, workers)]
    return [share(0)] + [f.result() for f in rest]


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _workers(total: int, min_share: int) -> int:
    """Shares of [0, total): one per torch thread, at least ``min_share`` items each."""
    return max(1, min(torch.get_num_threads(), total // max(1, min_share)))


def _share_bounds(total: int, workers: int, unit: int = 1, i: int = 0) -> Tuple[int, int]:
    """Share ``i`` of ``workers`` over [0, total), in whole units of ``unit`` items (the C
    ``*_shares`` entry points split the same way)."""
    units = total // unit
    end = total if i == workers - 1 else unit * (units * (i + 1) // workers)
    return unit * (units * i // workers), end


def _split(lib_fn, total: int, min_share: int, unit: int = 1) -> bool:
    """``lib_fn(i0, i1)`` over [0, total) in :func:`_workers` shares (whole ``unit`` s) on Python
    threads (ctypes releases the GIL, so they run in parallel): the path of a kernel built without
    OpenMP. True when all ran."""
    if total == 0:
        return True
    workers = _workers(total, min_share)
    return not any(_run_shares(lambda i: lib_fn(*_share_bounds(total, workers, unit, i)), workers))


def _run_split(lib, stem: str, args: tuple, outs: tuple, total: int, min_share: int, unit: int = 1) -> bool:
    """A kernel whose entry points are ``<stem>_f32(*args, i0, i1, *outs)`` and
    ``<stem>_shares(*args, total, workers, *outs)``, over [0, total): on torch's OpenMP threads
    when the kernel was built with OpenMP, else as :func:`_split` does (``unit``: as the C entry
    point splits). True when all ran."""
    if _state.get("openmp"):
        return not (total and getattr(lib, stem + "_shares")(*args, total, _workers(total, min_share), *outs))
    fn = getattr(lib, stem + "_f32")
    return _split(lambda i0, i1: fn(*args, i0, i1, *outs), total, min_share, unit)


def _scratch_stride(floats: int) -> int:
    """Floats between the starts of two shares' areas (scratch, accumulators) of ``floats`` each:
    whole pairs of 64-byte lines, with one pair between them. Shares on two cores that write one
    line, or the two lines of a pair (which a core's adjacent-line prefetcher fetches together),
    pass it between their caches on every write: the backward's table gradients laid end to end
    cost it a third of its time on two threads."""
    return -(-floats // 32) * 32 + 32


def _run_rows(lib, args: _Args, rows: int) -> bool:
    """The forward kernel over the rows, in :func:`_workers` shares of at least 64 rows: on torch's
    OpenMP threads when the kernel was built with OpenMP, else as :func:`_split` does."""
    scratch_size = lib.axial_attention_scratch_floats(ctypes.byref(args))
    if rows == 0:
        return True
    if _state.get("openmp"):
        workers, stride = _workers(rows, 64), _scratch_stride(scratch_size)
        scratch = torch.empty(workers * stride)
        return not lib.axial_attention_rows_shares(ctypes.byref(args), rows, workers, scratch.data_ptr(), stride)
    fn = lib.axial_attention_rows_f32

    def share(r0, r1):
        scratch = torch.empty(scratch_size)
        return fn(ctypes.byref(args), r0, r1, scratch.data_ptr())

    return _split(share, rows, 64)


def _tables(layer: PositionSensitiveAxialAttention, length: int):
    """Relative tables gathered over offsets -(L-1)..L-1 (clipped to the reach), zero-padded."""
    offsets = offset_table_rows(layer, length)
    rqe = rke = rvt = None
    if layer.use_query_rpe:
        rqe = F.pad(layer.query_table.detach().float()[:, offsets], (0, _PAD)).contiguous()
    if layer.use_key_rpe:
        rke = F.pad(layer.key_table.detach().float()[:, offsets], (0, _PAD)).contiguous()
    if layer.use_value_rpe:
        rvt = F.pad(layer.value_table.detach().float()[:, offsets].t(), (0, -layer.value_depth % 8)).contiguous()
    return rqe, rke, rvt


def supports(layer: PositionSensitiveAxialAttention, t: torch.Tensor) -> bool:
    return (
        t.dtype == torch.float32
        and t.device.type == "cpu"
        and layer.key_depth <= MAX_KEY_DEPTH
        and _library() is not None
    )


def kernel_operands(layer: PositionSensitiveAxialAttention, length: int, scales: torch.Tensor, alpha_r=None, beta=None):
    """The kernel's per-layer operands for sequences of ``length``: similarity scales
    (2, heads) in log2 units, q.r^q table (dk, Jp), per-head k.r^k tables (heads, dk, Jp)
    pre-scaled, value table (2L-1, dvp) or per head (scaled by ``alpha_r``) with its head
    stride, and ``beta`` padded to (heads, dvp). ``scales``: (3, heads) natural-unit
    multipliers of the similarity terms."""
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    dvp = -(-dv // 8) * 8
    s = scales.detach().float() * LOG2E
    rqe, rke, rvt = _tables(layer, length)
    jp = 2 * length - 1 + _PAD
    scale = torch.stack([s[0] * float(layer.use_qk), s[1]]).contiguous()
    rqe = rqe if rqe is not None else torch.zeros(dk, jp)
    rke = (rke[None] * s[2][:, None, None]).contiguous() if rke is not None else torch.zeros(heads, dk, jp)
    rv_hs = 0
    if rvt is None:
        rvt = torch.zeros(2 * length - 1, dvp)
    elif alpha_r is not None:
        rvt = rvt[None].repeat(heads, 1, 1)
        rvt[:, :, :dv] *= alpha_r.float().view(heads, 1, dv)
        rv_hs = (2 * length - 1) * dvp
    if beta is not None:
        beta = F.pad(beta.float().view(heads, dv), (0, dvp - dv)).contiguous()
    return scale, rqe, rke, jp, rvt, rv_hs, beta


def run_kernel(
    layer,
    qkv: torch.Tensor,
    q_strides,
    nseq: int,
    n_inner: int,
    length: int,
    step: int,
    operands,
    out: torch.Tensor,
    o_strides,
    out2=None,
    lse=None,
    bias=None,
) -> bool:
    """Run the kernel over every (sequence, head, query) row.

    qkv element (n, h, ch, p) of sequence n = nb * n_inner + ni sits at
    ``nb*s_b + ni*s_n + h*s_h + ch*s_c + p*s_p`` (``q_strides``), output element (n, h, i, c)
    at ``nb*o_bs + ni*o_ns + h*o_hs + i*o_rs + c`` (``o_strides``) of ``out``, and of
    ``out2`` for sve when given; without ``out2`` the kernel stores sv + sve (+ beta).
    ``operands``: from :func:`kernel_operands`. ``bias``: (heads * (2dk+dv),) float32 contiguous,
    added to qkv's channels as the kernel loads them, or None."""
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    lq = len(range(0, length, step))
    scale, rqe, rke, jp, rvt, rv_hs, beta = operands
    args = _Args(
        lq,
        length,
        step,
        attention_radius(layer),
        dk,
        dv,
        heads,
        nseq,
        max(1, n_inner),
        qkv.data_ptr(),
        *q_strides,
        scale.data_ptr(),
        rqe.data_ptr(),
        rke.data_ptr(),
        jp,
        rvt.data_ptr(),
        rv_hs,
        out.data_ptr(),
        _ptr(out2),
        *o_strides,
        _ptr(beta),
        _ptr(lse),
        _ptr(bias),
    )
    return _run_rows(_library(), args, nseq * heads * lq)


def attend_eval(
    layer: PositionSensitiveAxialAttention,
    qkv: torch.Tensor,
    scales: torch.Tensor,
    query_step: int = 1,
    return_lse: bool = False,
):
    """Same contract as :func:`.chunked.attend` (qkv (nh, 2dk+dv, L) -> sv, sve (nh, dv, Lq)
    [, lse]) for float32 CPU tensors without gradients; None when the kernel is unavailable."""
    if not supports(layer, qkv):
        return None
    heads, dv = layer.num_heads, layer.value_depth
    with torch.no_grad():
        qkv = qkv.contiguous()
        nh, c2h, length = qkv.shape
        n = nh // heads
        lq = len(range(0, length, query_step))
        sv = torch.empty(nh, lq, dv)
        sve = torch.empty(nh, lq, dv) if layer.use_value_rpe else None
        lse = torch.empty(nh, lq) if return_lse else None
        if not run_kernel(
            layer,
            qkv,
            (0, heads * c2h * length, c2h * length, length, 1),
            n,
            n,
            length,
            query_step,
            kernel_operands(layer, length, scales),
            sv,
            (0, heads * lq * dv, lq * dv, dv),
            out2=sve,
            lse=lse,
        ):
            return None
        sv = sv.transpose(1, 2)
        sve = sve.transpose(1, 2) if sve is not None else None
    if return_lse:
        return sv, sve, lse
    return sv, sve


def forward_eval(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The whole layer in inference (all BNs in eval, no autograd, float32, no autocast), or
    None when not applicable.

    The projection (BN and the output BN's value scale folded into its weights) is one
    matrix product per image, (HW, C_in) x (C_in, C_out), that reads NCHW and channels_last
    input where it lies (BLAS takes the NCHW one as a transposed operand at the same speed)
    and writes position-major qkv: the kernel loads every head of a sequence in one pass over
    its positions, each a contiguous run of channels, and fetches the next sequence's lines
    while it computes. The kernel writes a channels_last buffer, returned as an NCHW-shaped
    tensor in ``torch.channels_last`` memory format, so the next layer of a pair reads it in
    place. Constants folded from the parameters are kept until a parameter or statistic
    changes."""
    if (
        torch.is_grad_enabled()
        or not supports(layer, x)
        or torch.is_autocast_enabled("cpu")
        or not all(eval_bn(bn) for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output))
    ):
        return None
    height, width = x.shape[2:]
    cache = folded_constants(layer)
    if "projection" not in cache:
        cache["projection"] = folded_projection(layer)
    w, shift, alpha_r, beta, sim_scales = cache["projection"]

    step = layer_query_step(layer)
    length = height if layer.axis == "height" else width
    key = ("operands", length)
    if key not in cache:
        cache[key] = kernel_operands(layer, length, sim_scales, alpha_r=alpha_r, beta=beta)
    y = _eval_rows(layer, x, w, shift, cache[key], layer.axis == "height", step)
    if y is None:
        return None
    if step == 1 and layer.stride > 1:
        y = apply_stride(y, layer)
    return y


def _eval_rows(
    layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, operands, height_axis: bool, step: int
) -> Optional[torch.Tensor]:
    """The kernel part of :func:`forward_eval` on folded operands (``weight``, ``bias``: the
    projection; ``operands``: from :func:`kernel_operands`): (B, C, Lq, W) or (B, C, H, Lq) in
    channels_last memory format, or None when the kernel refused."""
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    batch, cin, height, width = x.shape
    hw, c2h = height * width, 2 * dk + dv
    c2 = heads * c2h
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    # qkv (B, H, W, c2), with 8 floats to spare after it (the kernel reads whole vectors of 8
    # channels); positions: (B, HW, C_in), a view of either layout. The bias is added by the
    # kernel as it loads each sequence (addmm would first copy it into every row of qkv: a pass
    # over the whole projection, ~4% of an Axial-DeepLab-S forward)
    positions = x.flatten(2).transpose(1, 2)
    qkv = torch.empty(batch * hw * c2 + 8)[: batch * hw * c2].view(batch, hw, c2)
    if positions.is_contiguous():  # channels_last: one product for the whole batch
        torch.mm(positions.reshape(batch * hw, cin), weight.t(), out=qkv.view(batch * hw, c2))
    else:
        for b in range(batch):
            torch.mm(positions[b], weight.t(), out=qkv[b])
    bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
    s_b, s_h, s_c = hw * c2, c2h, 1
    s_w, s_hgt = c2, width * c2  # strides of one step along W and along H

    c = heads * dv
    if height_axis:  # sequences along H, one per column
        length, n_inner = height, width
        lq = len(range(0, length, step))
        out = torch.empty(batch, lq, width, c)
        q_strides = (s_b, s_w, s_h, s_c, s_hgt)
        o_strides = (lq * width * c, c, dv, width * c)
    else:  # sequences along W, one per row
        length, n_inner = width, height
        lq = len(range(0, length, step))
        out = torch.empty(batch, height, lq, c)
        q_strides = (s_b, s_hgt, s_h, s_c, s_w)
        o_strides = (height * lq * c, lq * c, dv, c)
    if not run_kernel(
        layer, qkv, q_strides, batch * n_inner, n_inner, length, step, operands, out, o_strides, bias=bias
    ):
        return None
    return out.permute(0, 3, 1, 2)


_EVAL_OPERANDS: dict = {}


def eval_with_operands(
    layer,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    sim_scales: torch.Tensor,
    alpha_r: Optional[torch.Tensor],
    beta: torch.Tensor,
    height_axis: bool,
    step: int,
) -> Optional[torch.Tensor]:
    """:func:`forward_eval` for folded operands given as tensors (the body of the
    ``axial_deeplab::attention_eval`` operator; ``layer`` holds the geometry and the tables).
    The kernel operands built from them are kept while the same tables (storage and version)
    and equal small folded tensors come back, as they do on every call of an eager or a
    compiled model (which recomputes the folding); tensors made in inference mode (no version
    counter) are never kept."""
    length = x.shape[2] if height_axis else x.shape[3]
    tables = [t for t in (layer.query_table, layer.key_table, layer.value_table) if t is not None]
    small = (sim_scales, alpha_r, beta)
    if not tables or any(t.is_inference() for t in tables):
        operands = kernel_operands(layer, length, sim_scales, alpha_r=alpha_r, beta=beta)
        return _eval_rows(layer, x, weight, bias, operands, height_axis, step)
    key = (tuple((t.data_ptr(), t._version) for t in tables), length)
    hit = _EVAL_OPERANDS.get(key)
    if hit is not None and all(
        (a is None) == (b is None) and (a is None or torch.equal(a, b)) for a, b in zip(hit[1], small)
    ):
        operands = hit[2]
    else:
        operands = kernel_operands(layer, length, sim_scales, alpha_r=alpha_r, beta=beta)
        if len(_EVAL_OPERANDS) >= 256:
            _EVAL_OPERANDS.clear()
        # the tables are held so that their storage (part of the key) is not reused meanwhile
        _EVAL_OPERANDS[key] = (tables, tuple(None if t is None else t.detach().clone() for t in small), operands)
    return _eval_rows(layer, x, weight, bias, operands, height_axis, step)


def attention_backward(
    layer,
    qkv: torch.Tensor,
    scales: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    g_sv: torch.Tensor,
    g_sve: Optional[torch.Tensor],
):
    """Backward of :func:`attend_eval` (query step 1) by recomputation, one thread per share
    of the sequence-heads. qkv (nh, 2dk+dv, L); lse, delta (nh, L) with delta_o = sum_c
    g_sv*sv + g_sve*sve; g_sv, g_sve (nh, dv, L), read through their strides. Returns
    (g_qkv, g_scales (3, heads), g_query_table, g_key_table, g_value_table) or None when the
    kernel cannot take it."""
    if not supports(layer, qkv):
        return None
    heads = layer.num_heads
    with torch.no_grad():
        qkv = qkv.contiguous()
        nh, c2h, length = qkv.shape
        if g_sve is not None and g_sve.stride() != g_sv.stride():
            g_sv, g_sve = g_sv.contiguous(), g_sve.contiguous()
        g_qkv = torch.empty_like(qkv)
        q_strides = (heads * c2h * length, c2h * length, length, 1)
        g_strides = (heads * g_sv.stride(0), g_sv.stride(0), g_sv.stride(1), g_sv.stride(2))
        grads = backward_strided(
            layer, qkv, q_strides, nh // heads, length, scales, lse, delta, g_sv, g_sve, g_strides, g_qkv
        )
    return None if grads is None else (g_qkv, *grads)


def backward_strided(
    layer,
    qkv: torch.Tensor,
    q_strides,
    nseq: int,
    length: int,
    scales: torch.Tensor,
    lse: torch.Tensor,
    delta: Optional[torch.Tensor],
    g_sv: torch.Tensor,
    g_sve: Optional[torch.Tensor],
    g_strides,
    g_qkv: torch.Tensor,
    sv=None,
    sve=None,
    affine: Optional[torch.Tensor] = None,
):
    """The backward kernel on operands where they lie: qkv element (n, h, ch, p) at
    ``n*s_n + h*s_h + ch*s_c + p*s_p`` (``q_strides``) of ``qkv``; its gradient is written
    with the same strides into ``g_qkv`` (every element of the (n, h, ch, p) grid); the
    incoming gradients' element (n, h, c, o) at ``n*g_n + h*g_h + c*g_c + o*g_o``
    (``g_strides``, shared by ``g_sv`` and ``g_sve``); lse, delta contiguous (nseq*heads, L).
    With ``delta`` None the kernel forms delta_o = sum_c g_sv*sv + g_sve*sve itself from the
    forward's ``sv``, ``sve`` (same strides as the incoming gradients).
    ``affine`` (2, C2) float32 or None: ``qkv`` (position-major rows) is the projection before its
    BatchNorm and the attention's input was ``affine[0] * qkv + affine[1]`` per channel, applied by the
    kernel as it loads; ``g_qkv`` is then the gradient of that input.
    Returns (g_scales (3, heads), g_query_table, g_key_table, g_value_table), or None."""
    lib = _library()
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    nh = nseq * heads
    jp = 2 * length - 1 + _PAD
    rqe, rke, _ = _tables(layer, length)
    offsets = offset_table_rows(layer, length)
    if layer.use_value_rpe:
        rvT = F.pad(layer.value_table.detach().float()[:, offsets], (0, _PAD)).contiguous()
    else:
        rvT = torch.zeros(dv, jp)
    # a term switched off reads a zero table (its scale is 0 too): no test in the kernel's loops
    rqe = rqe if rqe is not None else torch.zeros(dk, jp)
    rke = rke if rke is not None else torch.zeros(dk, jp)
    scale = scales.detach().float().contiguous()
    lse = lse.contiguous()
    if delta is not None:
        delta = delta.contiguous()
    elif sv is None or (layer.use_value_rpe and sve is None):
        raise ValueError("backward_strided needs delta, or sv (and sve) to form it")
    args = _BackArgs(
        length,
        attention_radius(layer),
        dk,
        dv,
        heads,
        qkv.data_ptr(),
        *q_strides,
        scale.data_ptr(),
        int(layer.use_qk),
        int(layer.use_query_rpe),
        int(layer.use_key_rpe),
        int(layer.use_value_rpe),
        _ptr(rqe),
        _ptr(rke),
        jp,
        _ptr(rvT),
        lse.data_ptr(),
        _ptr(delta),
        g_sv.data_ptr(),
        _ptr(g_sve if layer.use_value_rpe else None),
        *g_strides,
        g_qkv.data_ptr(),
        _ptr(sv),
        _ptr(sve if layer.use_value_rpe else None),
        _ptr(None if affine is None else affine[0]),
        _ptr(None if affine is None else affine[1]),
    )
    workers = _workers(nh, 1)
    scratch_size = lib.axial_attention_backward_scratch_floats(ctypes.byref(args))
    # one block of table and scale gradients per share (g_rqe, g_rke, g_rvT, g_scale), summed below,
    # :func:`_scratch_stride` apart
    sizes = (dk * jp, dk * jp, dv * jp, 3 * heads)
    grads = torch.zeros(workers, _scratch_stride(sum(sizes)))
    parts = [grads[:, a : a + n] for a, n in zip(itertools.accumulate((0,) + sizes[:-1]), sizes)]
    if _state.get("openmp"):
        stride = _scratch_stride(scratch_size)
        scratch = torch.empty(workers * stride)
        if lib.axial_attention_backward_shares(
            ctypes.byref(args), nh, workers, scratch.data_ptr(), stride, grads.data_ptr(), grads.shape[1]
        ):
            return None
    else:
        fn = lib.axial_attention_backward_f32

        def share(i):
            scratch = torch.empty(scratch_size)
            return fn(
                ctypes.byref(args),
                nh * i // workers,
                nh * (i + 1) // workers,
                scratch.data_ptr(),
                *(t[i].data_ptr() for t in parts),
            )

        if any(_run_shares(share, workers)):
            return None
    g_rqe, g_rke, g_rvT, g_scales = (t.sum(0) for t in parts)
    g_rqe, g_rke, g_rvT = (t.view(d, jp)[:, : 2 * length - 1] for t, d in zip((g_rqe, g_rke, g_rvT), (dk, dk, dv)))
    g_scales = g_scales.view(3, heads)
    rows = layer.table_rows
    g_rq = torch.zeros(dk, rows).index_add_(1, offsets, g_rqe) if layer.use_query_rpe else None
    g_rk = torch.zeros(dk, rows).index_add_(1, offsets, g_rke) if layer.use_key_rpe else None
    g_rv = torch.zeros(dv, rows).index_add_(1, offsets, g_rvT) if layer.use_value_rpe else None
    return g_scales, g_rq, g_rk, g_rv


# --------------------------------------------------------------------------- similarity-BN moments
def _moments_operands(y: torch.Tensor, heads: int, dk: int):
    """``(lib, y, row stride, head stride)`` for the moments functions: the loaded kernel and ``y``
    contiguous, when they take ``y`` (float32 CPU rows, dk <= 256); else None."""
    if y.dtype != torch.float32 or y.device.type != "cpu" or y.dim() != 2 or dk > 256:
        return None
    lib = _library()
    if lib is None:
        return None
    y = y.detach().contiguous()
    return lib, y, y.shape[1], y.shape[1] // heads


# Products (float32 x float32 into float64) per share of the moments kernels: 4096 row-heads of the
# shallowest heads (dk 4); deeper heads' rows have dk^2 times the work, so they split into shares
# sooner (Axial-ResNet's dk 16 and 32 stages ran on one thread of two before).
_MOMENTS_SHARE = 131072


def row_moments(y: torch.Tensor, nseq: int, length: int, heads: int, dk: int, by_sequence: bool, by_position: bool):
    """Gram matrices of the queries and of the keys (q q^T, k k^T per (sequence n, position o,
    head h)) of the position-major float32 projection ``y`` (N*L, heads*(2dk+dv)), accumulated
    in float64: ``(gram (N, h, 2, dk, dk), xsum (N, h, 2dk))`` summed over positions when
    ``by_sequence``, ``(gram (h, L, 2, dk, dk), xsum (h, L, 2dk))`` summed over sequences when
    ``by_position`` (xsum: the sums of [q, k]; None for a family not asked for). None when the
    kernel cannot take ``y``."""
    operands = _moments_operands(y, heads, dk)
    if operands is None:
        return None
    lib, y, ys, hs = operands
    out = []
    for wanted, mode, blocks, inner in (
        (by_sequence, 0, (nseq, heads), length),
        (by_position, 1, (heads, length), nseq),
    ):
        if not wanted:
            out.append(None)
            continue
        gram = torch.zeros(*blocks, 2, dk, dk, dtype=torch.float64)
        xsum = torch.zeros(*blocks, 2 * dk, dtype=torch.float64)

        # each index i is `inner` rows of `heads` blocks of 2 dk^2 products
        total, min_share = (length if mode else nseq), -(-_MOMENTS_SHARE // (inner * heads * 2 * dk * dk))
        args = (y.data_ptr(), nseq, length, heads, hs, ys, dk, mode)
        if not _run_split(lib, "axial_moments", args, (gram.data_ptr(), xsum.data_ptr()), total, min_share):
            return None
        out.append((gram, xsum))
    return tuple(out)


def row_moments_backward(
    y: torch.Tensor,
    nseq: int,
    length: int,
    heads: int,
    dk: int,
    ws,
    cs,
    tp,
    bp,
    cp,
    affine: Optional[torch.Tensor] = None,
):
    """Gradient (same layout as ``y``) of the moments' objective: for each (n, o, h) and block
    t of x = [q, k] (t = 0 queries, 1 keys), g_t = x_t ws[n, h, t] + cs[n, h, t] +
    bp[h, t] * (x_t tp[o, t]) + cp[h, o, t] in the q and k channels, 0 in the value channels;
    ws (N, h, 2, dk, dk), cs (N, h, 2dk) (from the Grams over positions), tp (L, 2, dk, dk),
    bp (h, 2dk), cp (h, L, 2dk) (over sequences: position tables shared by the heads, a
    per-head column scale); either family may be None. ``affine`` (2, C2) float32 or None: ``y`` is
    the projection before its BatchNorm and x is read from ``affine[0] * y + affine[1]`` (as in
    :func:`backward_strided`). None when the kernel cannot take it."""
    operands = _moments_operands(y, heads, dk)
    if operands is None:
        return None
    lib, y, ys, hs = operands
    ws, cs, tp, bp, cp = (None if t is None else t.detach().float().contiguous() for t in (ws, cs, tp, bp, cp))
    g = torch.empty_like(y)

    scale, shift = (None, None) if affine is None else affine
    args = (y.data_ptr(), length, heads, hs, ys, dk, *(_ptr(t) for t in (ws, cs, tp, bp, cp, scale, shift)))
    rows = -(-_MOMENTS_SHARE // (heads * 4 * dk * dk))  # a row: per head ~4 dk^2 products (q, k by ws, tp)
    return g if _run_split(lib, "axial_moments_backward", args, (g.data_ptr(),), nseq * length, rows) else None


# --------------------------------------------------------------------------- the other C sources
# Compiled with the first into the same library (see their header comments).
_EXTRA_SOURCES = ("axial_band_moments_cpu.c", "axial_rows_batchnorm_cpu.c")


def _extra_sources() -> bytes:
    """The band-moments and output-BatchNorm sources, appended to the kernel's (their compiler
    messages keep their own names and lines)."""
    parts = []
    for name in _EXTRA_SOURCES:
        with open(os.path.join(os.path.dirname(_SOURCE_PATH), name), "rb") as f:
            parts.append(b'\n#line 1 "' + name.encode() + b'"\n' + f.read())
    return b"".join(parts)


# --------------------------------------------------------------------------- band moments (local span)


def _declare_band(lib: ctypes.CDLL) -> None:
    """Signatures of the band-moments entry points (one share, or split into shares)."""
    for name, inputs, outputs in (("moments", 5, 1), ("moments_backward", 6, 3)):
        for kind in ("f32", "shares"):
            fn = getattr(lib, f"axial_band_{name}_{kind}")
            fn.argtypes = [_PTR] * inputs + [_I64, _I64] + [_PTR] * outputs
            fn.restype = ctypes.c_int


def band_tables_by_band(d: int, r: int, heads: int) -> bool:
    """Whether the local-span moments form the table terms (q.r^q, k.r^k) from the band of 2r+1
    products per position and head rather than from (d x d) Gram matrices of the rows each
    position meets: for deep heads one at a time (d*d against the span), never for heads in groups
    of eight up to d = 32, which the C walk takes eight at a time in Gram form (the header of
    axial_band_moments_cpu.c)."""
    if heads % 8 == 0 and d <= 32:
        return False
    return d * d > 2 * (2 * r + 1)


def _band_operands(q: torch.Tensor, k: torch.Tensor, tables, use_qk: bool, r: int, by_band: bool, gq=None):
    """``(lib, dims, tables)`` for the band-moments functions, or None when they cannot take the
    operands (not float32 CPU, key depth over 256, no kernel)."""
    ok = q.dtype == k.dtype == torch.float32 and q.device.type == k.device.type == "cpu" and q.shape[2] <= 256
    shape = (q.shape[2], 2 * r + 1)
    if (
        not ok
        or q.shape != k.shape
        or any(t is not None and (t.dtype, t.device.type, t.shape) != (torch.float32, "cpu", shape) for t in tables)
    ):
        return None
    lib = _library()
    if lib is None:
        return None
    n, heads, d, length = q.shape
    strides = [*q.stride(), *k.stride(), *(gq.stride() if gq is not None else (0, 0, 0, 0))]
    use = [int(use_qk)] + [0 if t is None else 1 if by_band else 2 for t in tables]  # 2: by position Grams
    dims = torch.tensor([n, heads, d, length, r, *use, *strides], dtype=torch.int64)
    tabs = [None if t is None else t.detach().contiguous() for t in tables]
    return lib, dims, tabs


def band_moments(
    q: torch.Tensor, k: torch.Tensor, tables, use_qk: bool, r: int, by_band: bool = True
) -> Optional[torch.Tensor]:
    """Sums and sums of squares, (2, 3, N*heads) float64, of the three similarity terms over the
    in-span pairs |p - o| <= r of q, k (N, heads, d, L) (float32 views, any strides); ``tables``:
    the (d, 2r+1) query and key tables, None for a term switched off; ``by_band`` False: their
    terms from (d x d) Gram matrices of the rows each position meets (cheaper for small d). None
    when the kernel cannot take them."""
    operands = _band_operands(q, k, tables, use_qk, r, by_band)
    if operands is None:
        return None
    lib, dims, (tq, tk) = operands
    total = q.shape[0] * q.shape[1]
    out = torch.zeros(2, 3, total, dtype=torch.float64)
    args = (dims.data_ptr(), q.data_ptr(), k.data_ptr(), _ptr(tq), _ptr(tk))
    # shares of whole sequences (every head of one in one share, so a head takes the same path,
    # alone or in a group of eight, and gives the same bits whatever the number of threads)
    heads = q.shape[1]
    return out if _run_split(lib, "axial_band_moments", args, (out.data_ptr(),), total, 16, heads) else None


def band_moments_backward(q, k, tables, use_qk: bool, r: int, by_band: bool, coef: torch.Tensor, gq, gk):
    """Gradient of sum a_t sums_t + b_t sumsq_t (``coef`` (2, 3, heads): a and 2b) of
    :func:`band_moments`: written into ``gq`` and ``gk`` (float32, the same strides as each other);
    returns the tables' gradients (2, d, 2r+1) float64, or None when the kernel cannot take it."""
    operands = _band_operands(q, k, tables, use_qk, r, by_band, gq)
    if operands is None:
        return None
    lib, dims, (tq, tk) = operands
    total = q.shape[0] * q.shape[1]
    coef = coef.detach().to(torch.float32).contiguous()
    args = (dims.data_ptr(), q.data_ptr(), k.data_ptr(), _ptr(tq), _ptr(tk), coef.data_ptr())
    workers = _workers(total, 16) if total else 1
    g_tab = torch.zeros(workers, 2, q.shape[2], 2 * r + 1, dtype=torch.float64)  # one block per share
    if _state.get("openmp"):
        bad = total and lib.axial_band_moments_backward_shares(
            *args, total, workers, gq.data_ptr(), gk.data_ptr(), g_tab.data_ptr()
        )
        return None if bad else g_tab.sum(0)

    def share(i):
        i0, i1 = _share_bounds(total, workers, q.shape[1], i)  # whole sequences, as band_moments
        return lib.axial_band_moments_backward_f32(*args, i0, i1, gq.data_ptr(), gk.data_ptr(), g_tab[i].data_ptr())

    return None if any(_run_shares(share, workers)) else g_tab.sum(0)


# --------------------------------------------------------------------------- output BatchNorm on rows
_OUTPUT_BN_BLOCK = 256  # rows per float32 partial sum of :func:`output_bn_sums`


def _declare_output_bn(lib: ctypes.CDLL) -> None:
    """Signatures of the output-BatchNorm entry points (one share, or split into shares)."""
    for name, inputs in (("forward", 3), ("sums", 3), ("backward", 4)):
        for kind in ("f32", "shares"):
            fn = getattr(lib, f"axial_obn_{name}_{kind}")
            fn.argtypes = [_PTR] * inputs + [_I64, _I64, _PTR]
            fn.restype = ctypes.c_int


def _output_bn_dims(y: torch.Tensor, rows: torch.Tensor, grid, gradient: bool = False) -> Optional[torch.Tensor]:
    """dims of the C functions for y (M, 2C) and the (M, C) tensor ``rows`` viewed as ``grid``
    (B, S, T) rows, or None when they cannot take them (not float32 CPU, y not contiguous, no
    kernel, or an output whose channels are not at unit stride; a ``gradient`` is read at any)."""
    b, s, t = grid
    c = y.shape[1] // 2
    if not (
        y.dtype == rows.dtype == torch.float32
        and y.device.type == rows.device.type == "cpu"
        and y.is_contiguous()
        and rows.shape == (b, s, t, c)
        and (gradient or c <= 1 or rows.stride(3) == 1)
        and _library() is not None
    ):
        return None
    channel_stride = rows.stride(3) if c > 1 else 1
    return torch.tensor([b, s, t, c, *rows.stride()[:3], _OUTPUT_BN_BLOCK, channel_stride], dtype=torch.int64)


def output_bn_forward(y: torch.Tensor, coef: torch.Tensor, out: torch.Tensor, grid) -> bool:
    """out (seen as (B, S, T, C) rows) = a0 y[:, :C] + a1 y[:, C:] + shift, ``coef`` (3, C):
    a0, a1, shift. False when the kernel cannot take the operands (nothing written)."""
    dims = _output_bn_dims(y, out, grid)
    if dims is None:
        return False
    coef = coef.detach().to(torch.float32).contiguous()
    args = (dims.data_ptr(), y.data_ptr(), coef.data_ptr())
    return _run_split(_library(), "axial_obn_forward", args, (out.data_ptr(),), y.shape[0], 1024)


def output_bn_sums(y: torch.Tensor, g: torch.Tensor, grid) -> Optional[torch.Tensor]:
    """(3, C) float64: sum over rows of g y[:, :C], g y[:, C:] and g, with g (seen as (B, S, T, C)
    rows) the gradient of the output; None when the kernel cannot take the operands. Summed in
    float32 over blocks of 256 rows, then in float64 (the result does not depend on threads)."""
    dims = _output_bn_dims(y, g, grid, gradient=True)
    if dims is None:
        return None
    m, c = y.shape[0], y.shape[1] // 2
    blocks = -(-m // _OUTPUT_BN_BLOCK)
    part = torch.empty(blocks, 3, c, dtype=torch.float64)
    args = (dims.data_ptr(), y.data_ptr(), g.data_ptr())
    if not _run_split(_library(), "axial_obn_sums", args, (part.data_ptr(),), blocks, 4):
        return None
    return part.sum(0)


def output_bn_backward(y: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, grid) -> Optional[torch.Tensor]:
    """The input gradient (M, 2C): shift + b y + a g per half, ``coef`` (3, 2, C): a, b, shift;
    None when the kernel cannot take the operands."""
    dims = _output_bn_dims(y, g, grid, gradient=True)
    if dims is None:
        return None
    coef = coef.detach().to(torch.float32).contiguous()
    gy = torch.empty_like(y)
    args = (dims.data_ptr(), y.data_ptr(), g.data_ptr(), coef.data_ptr())
    return gy if _run_split(_library(), "axial_obn_backward", args, (gy.data_ptr(),), y.shape[0], 1024) else None
