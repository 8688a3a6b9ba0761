"""Registers the faster implementations of the axial-attention layer.

Imported by ``axial_deeplab.layers``. On CPU, ``impl="auto"`` picks
``"memory_efficient"``: inference runs the fused C kernel (:mod:`.cpu_kernel`, or the
chunked PyTorch path of :mod:`.fast_cpu` without a compiler) and training recomputes
the attention in its backward instead of storing it. ``"fast"`` is the same forward
with autograd's backward through the chunked PyTorch path (more memory, an independent
second backward that the tests also hold to the reference). ``"triton"`` (when Triton is
installed; the default on CUDA then) runs the forward as a Triton kernel.
"""
from __future__ import annotations

from .axial_attention import register_attention_impl
from .fast_cpu import axial_attention_fast
from .memory_efficient import axial_attention_memory_efficient
from .triton_kernels import axial_attention_triton, triton_available

register_attention_impl("fast", axial_attention_fast)
# Last registered wins for impl="auto".
register_attention_impl("memory_efficient", axial_attention_memory_efficient, auto_devices=("cpu",))
if triton_available():  # optional; on CPU only through Triton's interpreter (TRITON_INTERPRET=1)
    register_attention_impl("triton", axial_attention_triton, auto_devices=("cuda",))
