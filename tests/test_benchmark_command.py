"""The benchmark harness and suites on tiny inputs, and the command's checks."""

from __future__ import annotations

import json

import torch

from axial_deeplab import benchmark as bench
from axial_deeplab.cli import main
from axial_deeplab.fileio import atomic_write_json


def test_layer_rows_compare_every_impl_with_conv_and_reference():
    rows = bench.bench_layers(torch.device("cpu"), shapes=[(1, 16, 6, 5)], repeats=1, log=lambda s: None)
    got = {(r.mode, r.impl): r for r in rows}
    # "banded" is the export decomposition (what an ONNX file computes)
    assert {impl for (mode, impl) in got if mode == "eval"} == {"conv3x3", "reference", "banded", "fast"}
    assert {impl for (mode, impl) in got if mode == "train"} == {
        "conv3x3",
        "reference",
        "banded",
        "fast",
        "memory_efficient",
    }
    for r in rows:
        assert r.median_ms > 0 and r.runs == 1 and r.note == ""
        assert r.peak_mib is not None and r.peak_mib >= 0
        assert abs(r.vs_conv - r.median_ms / got[(r.mode, "conv3x3")].median_ms) < 1e-9
        assert abs(r.vs_reference - got[(r.mode, "reference")].median_ms / r.median_ms) < 1e-9
    assert got[("train", "reference")].peak_mib > 0
    table = bench.format_table(rows)
    assert "conv3x3" in table and "memory_efficient" in table


def test_interleaved_timing_runs_in_turns_and_reports_failures():
    calls = []

    def step(name, fail_at=None):
        def run():
            calls.append(name)
            if len([c for c in calls if c == name]) == fail_at:
                raise MemoryError("planted")

        return run

    timed = bench.time_interleaved(
        {"a": step("a"), "b": step("b"), "c": step("c", fail_at=3)}, repeats=3, device=torch.device("cpu")
    )
    # one warm-up each, then rounds a, b, c; c fails in the second round and is left out after it
    assert calls == ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b"]
    assert [len(timed[n][2]) for n in ("a", "b")] == [3, 3] and timed["a"][0] >= 0
    assert isinstance(timed["c"], MemoryError)
    row = bench.measure("g", "case", "eval", "c", step("c"), 3, torch.device("cpu"), timed=timed["c"])
    assert row.median_ms is None and "MemoryError: planted" in row.note


def test_peak_memory_sees_a_large_temporary():
    def make():
        t = torch.ones(1 << 20)  # 4 MiB, freed when the function returns
        return float(t.sum())

    assert bench.peak_memory_bytes(make, torch.device("cpu")) >= 4 << 20


def test_unregistered_model_is_reported_as_skipped():
    rows = bench.bench_models(torch.device("cpu"), cases=[("no_such_model", (3, 8, 8), True)], log=lambda s: None)
    assert len(rows) == 1 and rows[0].note.startswith("skipped") and "no_such_model" in rows[0].note


def test_set_attention_impl_reaches_every_layer():
    pair = bench.layer_pair(16, impl="reference")
    assert bench.set_attention_impl(pair, "fast") == 2
    assert all(m.impl == "fast" for m in pair)


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_cli_rejects_bad_arguments(capsys):
    assert main(["benchmark", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main(["benchmark", "--impls", "no_such_impl"]) == 2
    assert "no_such_impl" in capsys.readouterr().err


def test_core_rows_report_bandwidth_fraction_and_mac_rate():
    rows = bench.bench_core(torch.device("cpu"), shapes=[(1, 16, 6, 5)], repeats=1, log=lambda s: None, bandwidth=1e9)
    assert [(r.case, r.impl) for r in rows] == [("1x16x6x5 height", "fast"), ("1x16x6x5 width", "fast")]
    for r in rows:
        assert r.median_ms > 0 and r.group == "attention core"
        # qkv (nh, 2dk+dv, L) in and two (nh, dv, L) retrievals out, over the given 1 GB/s yardstick.
        length = 6 if r.case.endswith("height") else 5
        nh = 8 * (30 // length)
        dk, dv = 1, 2  # 16 channels, 8 heads, key channels half the value channels
        moved = 4 * nh * length * ((2 * dk + dv) + 2 * dv)
        assert abs(r.gb_per_s - moved / (r.median_ms / 1e3) / 1e9) < 1e-9 * max(1.0, r.gb_per_s)
        assert abs(r.bandwidth_fraction - r.gb_per_s) < 1e-9 * max(1.0, r.gb_per_s)
        assert r.gmac_per_s > 0 and "GB/s" in r.note and "GMAC/s" in r.note


def test_copy_bandwidth_is_positive():
    assert bench.copy_bandwidth(torch.device("cpu"), mib=4, repeats=1) > 0


def test_profiler_lines_are_silenced_and_stderr_restored(capfd):
    bench.peak_memory_bytes(lambda: torch.ones(10), torch.device("cpu"))
    assert "profiler" not in capfd.readouterr().err
    import os

    os.write(2, b"still here\n")
    assert "still here" in capfd.readouterr().err


def test_python_dash_m_runs_the_command_and_its_errors():
    # benchmarks/gpu_check.sh uses `python -m axial_deeplab` on machines where the script is not installed.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "axial_deeplab", "benchmark", "--repeats", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--repeats must be at least 1" in proc.stderr


def test_script_report_prints_the_table_and_writes_every_row(tmp_path, capsys):
    rows = [bench.Result("layer pair", "1x16x6x5", "eval", "fast", median_ms=1.5, runs=1)]
    path = tmp_path / "rows.json"
    bench.report_script_rows(rows, str(path))
    assert "1x16x6x5" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert [(r["case"], r["impl"], r["median_ms"]) for r in saved] == [("1x16x6x5", "fast", 1.5)]


def test_no_tf32_turns_tf32_off_for_the_run_and_json_keeps_the_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # restored after the test
    out = tmp_path / "bench.json"
    assert (
        main(["benchmark", "--quick", "--only", "postprocess", "--repeats", "1", "--no-tf32", "--json", str(out)]) == 0
    )
    assert torch.backends.cudnn.allow_tf32 is False
    saved = json.loads(out.read_text())
    assert saved["machine"]["device"] == "cpu" and saved["triton_configs"] == {}
    assert [r["group"] for r in saved["results"]] == ["post-processing"]


def _tiny_classifier():
    """A stand-in for a model: the deploy rows are model-agnostic, and compiling and exporting
    a real (even narrow) Axial-ResNet takes half a minute; tests/test_export.py covers those."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


def test_deploy_rows_time_eager_compiled_and_onnxruntime_side_by_side(tmp_path):
    # the eager backend: torch.compile's tracing without Inductor's minutes of code generation
    rows = bench.bench_deploy(
        torch.device("cpu"),
        cases=[("tiny", (1, 3, 32, 32))],
        train_cases=[("tiny", (2, 3, 32, 32))],
        repeats=2,
        log=lambda s: None,
        compile_backend="eager",
        models={"tiny": _tiny_classifier},
        workdir=str(tmp_path),
    )
    got = {(r.mode, r.impl): r for r in rows}
    assert set(got) == {
        ("eval", "eager"),
        ("eval", "compiled"),
        ("eval", "onnxruntime"),
        ("train", "eager"),
        ("train", "compiled"),
    }
    for r in rows:
        assert r.group == "deploy" and r.median_ms > 0 and r.runs == 2 and len(r.times_ms) == 2
        eager = got[(r.mode, "eager")]
        assert abs(r.vs_eager - r.median_ms / eager.median_ms) < 1e-9
        assert "failed" not in r.note
    assert got[("eval", "eager")].setup_s is None and got[("eval", "eager")].vs_eager == 1.0
    for key in [("eval", "compiled"), ("train", "compiled"), ("eval", "onnxruntime")]:
        assert got[key].setup_s > 0
    assert "compile" in got[("eval", "compiled")].note and "export" in got[("eval", "onnxruntime")].note
    # each faster path is checked against eager, and the numbers agree
    for impl in ("compiled", "onnxruntime"):
        diff = float(got[("eval", impl)].note.split("max rel diff ")[1].split(";")[0])
        assert diff < 1e-4
    assert list(tmp_path.iterdir()) == []  # the ONNX file lived in a temporary folder, now gone
    table = bench.format_deploy_table(rows)
    assert "onnxruntime" in table and "x eager" in table and "setup s" in table


def test_deploy_reports_a_failed_compile_in_its_row(tmp_path):
    def broken(gm, example_inputs):
        raise RuntimeError("planted backend failure")

    rows = bench.bench_deploy(
        torch.device("cpu"),
        cases=[("tiny", (1, 3, 32, 32))],
        train_cases=[],
        repeats=1,
        log=lambda s: None,
        compile_backend=broken,
        with_onnx=False,
        models={"tiny": _tiny_classifier},
        workdir=str(tmp_path),
    )
    got = {r.impl: r for r in rows}
    assert got["eager"].median_ms > 0
    assert got["compiled"].median_ms is None and got["compiled"].setup_s is None
    assert got["compiled"].note.startswith("failed: BackendCompilerFailed")


def test_onnxruntime_session_uses_torch_thread_count(tmp_path):
    from axial_deeplab.engine.export import export_model

    path = str(tmp_path / "m.onnx")
    export_model(_tiny_classifier().eval(), "onnx", path, (3, 32, 32), dynamic=False)
    session = bench.onnxruntime_session(path, 2)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1


def test_max_rel_diff_compares_every_output():
    a = torch.ones(2, 3)
    assert bench.max_rel_diff([a, a], (a, a)) == 0.0
    assert abs(bench.max_rel_diff([a, a * 1.5], [a, a]) - 0.5) < 1e-7
    assert bench.max_rel_diff([a], [torch.ones(3, 2)]) == float("inf")


def test_the_command_runs_the_registered_suites_in_order():
    from axial_deeplab.commands import benchmark as command

    assert command.SECTIONS == ("layers", "core", "models", "whole_models", "span_scaling", "postprocess", "deploy")
    # the whole-model comparison, the span scaling and deploy only when asked
    assert command.DEFAULT_SECTIONS == ("layers", "core", "models", "postprocess")


def test_a_suite_with_its_own_table_prints_it_after_the_common_table(capsys):
    from axial_deeplab.commands import benchmark as command

    common = bench.Suite("a", run=lambda s: [])
    own = bench.Suite("b", run=lambda s: [], table=lambda rows: f"TABLE {len(rows)}", footnote="by {clock}")
    rows_a = [bench.Result("layer pair", "1x16x6x5", "eval", "fast", median_ms=1.5, runs=1)]
    rows_b = [bench.Result("deploy", "m", "eval", "eager", median_ms=2.0, runs=1)]
    command._print_tables([(common, rows_a), (own, rows_b)], clock="cpu")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("group") and "1x16x6x5" in out[2] and "deploy" not in "".join(out[:3])
    assert out[3:] == ["TABLE 1", "by cpu"]


def test_whole_model_rows_compare_each_model_with_its_conv_model():
    # the real models at tiny inputs, one thread (a check of the rows, not of the figures;
    # two threads on a shared 2-core machine can take minutes)
    from axial_deeplab.benchmark.suites import whole_models as wm

    rows = wm.bench_whole_models(torch.device("cpu"), wm.QUICK_CASES, threads=[1], repeats=1, log=lambda s: None)
    timed = [r for r in rows if r.group == "whole model"]
    expected = [
        (f"{b}x{c}x{h}x{w}", mode, name) for axial, conv, mode, (b, c, h, w) in wm.QUICK_CASES for name in (axial, conv)
    ]
    assert [(r.case, r.mode, r.impl) for r in timed] == expected and {r.threads for r in timed} == {1}
    assert any(r.impl == wm.RECOMPUTE for r in timed)  # the memory-saving variant is compared too
    for r, conv in zip(timed[0::2], timed[1::2]):  # each axial row, then its conv model's
        assert conv.impl in ("resnet50", "panoptic_deeplab_r50") and conv.vs_conv == 1.0
        for x in (r, conv):
            assert x.median_ms > 0 and x.runs == 1 and x.note == ""
        assert abs(r.vs_conv - r.median_ms / conv.median_ms) < 1e-9
        assert abs(r.peak_vs_conv - r.peak_mib / conv.peak_mib) < 1e-9
    # the training activation memory at 1025x2049, from the two panoptic training sizes
    estimates = {r.impl: r for r in rows if r.group == "memory estimate"}
    assert set(estimates) == {"axial_deeplab_s", "panoptic_deeplab_r50"}
    for r in estimates.values():
        assert r.case == "1x3x1025x2049" and r.peak_mib > 0 and "batch per 80 GB GPU" in r.note
    head = wm.format_whole_model_table(rows).splitlines()[0]
    assert head.split()[:5] == ["group", "case", "mode", "impl", "threads"]
    assert all(title in head for title in ("median ms", "cpu ms", "x conv", "peak MiB", "mem x cv"))


def test_whole_model_scaling_table_and_memory_estimate():
    from axial_deeplab.benchmark.suites import whole_models as wm

    def row(impl, threads, ms, peak=None, case="2x3x8x8"):
        return wm.ModelResult(
            "whole model",
            case,
            "train",
            impl,
            median_ms=ms,
            runs=1,
            threads=threads,
            peak_mib=peak,
            vs_conv=ms / {1: 100.0, 2: 60.0}[threads],
        )

    rows = [row("axial", 1, 200.0, 30.0), row("conv", 1, 100.0, 20.0), row("axial", 2, 120.0), row("conv", 2, 60.0)]
    lines = wm.scaling_table(rows).splitlines()
    assert lines[0] == "thread scaling"
    assert lines[1].split() == [
        "case",
        "mode",
        "model",
        "ms",
        "1T",
        "ms",
        "2T",
        "speedup",
        "x",
        "conv",
        "1T",
        "x",
        "conv",
        "2T",
    ]
    assert [line.split() for line in lines[3:]] == [
        ["2x3x8x8", "train", "axial", "200.0", "120.0", "1.67", "2.00", "2.00"],
        ["2x3x8x8", "train", "conv", "100.0", "60.0", "1.67", "1.00", "1.00"],
    ]
    # peak = fixed + per-pixel x pixels: 10 MiB + 1 KiB a pixel -> 1025 x 2049 KiB an image
    rows = [row("axial", 1, 1.0, 10 + 2 * 64 / 1024, "2x3x8x8"), row("axial", 1, 1.0, 10 + 4 * 256 / 1024, "4x3x16x16")]
    (est,) = wm.memory_estimates(rows, {"axial": 0}, gpu_bytes=10 * 2**30)
    assert abs(est.peak_mib - 1025 * 2049 / 1024) < 1e-6 and est.note.endswith("batch per 11 GB GPU: 4")


def test_span_scaling_rows_count_in_span_pairs_and_fill_the_table():
    from axial_deeplab.benchmark.suites import span_scaling

    # the pair count against a brute-force count of |p - o| <= r
    for length, span in ((9, 3), (9, 5), (9, None), (4, 17)):
        r = length if span is None else (span - 1) // 2
        brute = sum(abs(p - o) <= r for o in range(length) for p in range(length))
        assert span_scaling.pairs_per_sequence(length, span) == brute

    rows = span_scaling.bench_span_scaling(
        torch.device("cpu"), lengths=(9, 17), spans=(3, None), modes=("eval", "train"), repeats=1, log=lambda s: None
    )
    assert [(r.case, r.mode, r.impl) for r in rows][:4] == [
        ("L=9", "eval", "span 3"),
        ("L=9", "eval", "global"),
        ("L=9", "train", "span 3"),
        ("L=9", "train", "global"),
    ]
    assert len(rows) == 8 and all(r.median_ms and r.median_ms > 0 for r in rows)
    pairs = span_scaling.COLUMNS * span_scaling.pairs_per_sequence(17, None)
    ns = float(rows[-1].note.split()[0])
    assert abs(ns - rows[-1].median_ms * 1e6 / pairs) <= 0.05 + 1e-3 * ns
    text = span_scaling.format_span_table(rows)
    assert text.count("span 3") == 2 and "global" in text and " 17 " in text
