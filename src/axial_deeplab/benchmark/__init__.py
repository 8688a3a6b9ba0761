"""Speed measurements: axial attention against the plain equation and a 3x3 conv.

The paper's weak point is speed: axial attention has about the multiply-adds of the 3x3
convolution it replaces but ran much slower "due to the lack of specialized kernels". The
suites here time, in one process and on the same inputs, the reference implementation
(the plain equation), every registered fast path and a 3x3 conv of the same width, for
height+width layer pairs (eval forward and train forward+backward), the attention core
alone against the copy bandwidth, whole models, the panoptic post-processing and, on
request, eager against ``torch.compile`` and ONNX Runtime. ``axial-deeplab benchmark``
runs them and prints median wall times, ratios to the conv and to the reference, and peak
memory; ``--json`` writes everything with the machine it ran on. The scripts in
``benchmarks/`` run single suites with finer control.

Layout:

- ``harness``: timing (medians of wall and CPU time), contenders timed in turns, peak
  memory, one :class:`Result` per row, the ratios between rows;
- ``report``: progress lines, tables, the machine description;
- ``attention``: the attention layers under test and switching their implementation;
- ``suites/``: one module per suite, each with a ``bench_*`` function (explicit
  arguments, for scripts and tests) and a ``SUITE`` the command runs;
- ``scripts``: the options and output the ``benchmarks/`` scripts share.

Adding a suite (e.g. one model against another):

1. write ``suites/<name>.py`` with ``bench_<name>(device, ..., repeats, log, clock)``
   returning :class:`Result` rows. Build each contender's call (``harness.module_step``
   wraps a module), time them side by side with ``harness.time_interleaved``, make the
   rows with ``harness.measure(..., timed=...)`` and log ``report.progress(row)`` for each;
   ``harness.fill_ratios`` sets the ratios to rows named "conv3x3" and "reference", or set
   your own fields;
2. end the module with ``SUITE = Suite("<name>", run)``, where ``run(settings)`` maps the
   command's ``Settings`` (device, quick, repeats, ...) to a call of
   ``bench_<name>``; give it ``table=`` (and ``footnote=``) if its rows need other columns
   than the common table's, ``default=False`` if it is too slow to run unasked;
3. add ``<name>.SUITE`` to ``SUITES`` in ``suites/__init__.py``: ``--only <name>`` then
   runs it, and its rows appear in the table and the JSON file.
"""

from __future__ import annotations

from .attention import attention_impls, layer_pair, set_attention_impl
from .harness import (
    Result,
    copy_bandwidth,
    failure_note,
    fill_ratios,
    measure,
    module_step,
    peak_memory_bytes,
    time_interleaved,
    time_runs,
)
from .report import format_table, machine_info, progress, table
from .scripts import add_script_arguments, apply_script_threads, report_script_rows
from .suites import SUITES, Settings, Suite
from .suites.core import bench_core, core_functions
from .suites.deploy import bench_deploy, format_deploy_table, max_rel_diff, onnxruntime_session
from .suites.layers import GPU_LAYER_SHAPES, LAYER_SHAPES, QUICK_LAYER_SHAPES, bench_layers
from .suites.models import MODEL_CASES, QUICK_MODEL_CASES, bench_models
from .suites.postprocess import bench_postprocess, synthetic_panoptic_outputs

__all__ = [
    "GPU_LAYER_SHAPES",
    "LAYER_SHAPES",
    "MODEL_CASES",
    "QUICK_LAYER_SHAPES",
    "QUICK_MODEL_CASES",
    "SUITES",
    "Result",
    "Settings",
    "Suite",
    "add_script_arguments",
    "apply_script_threads",
    "attention_impls",
    "bench_core",
    "bench_deploy",
    "bench_layers",
    "bench_models",
    "bench_postprocess",
    "copy_bandwidth",
    "core_functions",
    "failure_note",
    "fill_ratios",
    "format_deploy_table",
    "format_table",
    "layer_pair",
    "machine_info",
    "max_rel_diff",
    "measure",
    "module_step",
    "onnxruntime_session",
    "peak_memory_bytes",
    "progress",
    "report_script_rows",
    "set_attention_impl",
    "synthetic_panoptic_outputs",
    "table",
    "time_interleaved",
    "time_runs",
]
