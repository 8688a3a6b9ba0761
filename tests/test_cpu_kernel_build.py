"""The C kernel's build: its source ships as package data, and a build that fails warns once
with the compiler's own message while the layer keeps working on its PyTorch path."""

from __future__ import annotations

import fnmatch
import os
import shlex
import sys
import warnings

import pytest
import torch
from attention_testing import eval_layer, reference_eval

from axial_deeplab.layers import cpu_kernel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A "compiler" that records the source it was given and fails like gcc, with more lines than
# the warning keeps.
FAKE_COMPILER = r"""
import shutil, sys
src = next(a for a in sys.argv[1:] if a.endswith(".c"))
shutil.copy(src, sys.argv[-1] + ".seen.c")
sys.stderr.write(src + ":12:3: error: forced failure for the test\n")
for i in range(40):
    sys.stderr.write(f"note: line {i} of the compiler's output\n")
sys.exit(1)
"""


def _fresh_attempt(monkeypatch, tmp_path, cc: str):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("AXIAL_DEEPLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernel, "ENABLED", True)
    monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "tried": False, "pools": {}})


def _kernel_warnings(record):
    return [str(w.message) for w in record if "C kernel unavailable" in str(w.message)]


def test_failed_build_warns_once_with_the_compiler_message_and_the_layer_matches_the_reference(monkeypatch, tmp_path):
    script = tmp_path / "fake_cc.py"
    script.write_text(FAKE_COMPILER)
    _fresh_attempt(monkeypatch, tmp_path, f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}")
    layer = eval_layer(8, 8, heads=2, impl="fast", axis="width")
    x = torch.randn(2, 8, 3, 7)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # so a second warning would not be swallowed as a repeat
        assert not cpu_kernel.available()
        assert not cpu_kernel.available()  # one attempt per process
        with torch.no_grad():
            assert cpu_kernel.forward_eval(layer, x) is None
            y = layer(x)
    messages = _kernel_warnings(record)
    assert len(messages) == 1, messages
    message = messages[0]
    assert "error: forced failure for the test" in message
    assert "exited with status 1" in message
    assert "note: line 18 of" in message and "note: line 19 of" not in message  # trimmed to 20 lines
    assert "(21 more lines)" in message
    torch.testing.assert_close(y, reference_eval(layer, x), rtol=1e-5, atol=1e-5)
    assert os.listdir(tmp_path / "cache") == []  # the build directory went, with its files


def test_the_compiler_gets_the_shipped_source_byte_for_byte(monkeypatch, tmp_path):
    script = tmp_path / "fake_cc.py"
    # keep what the compiler saw outside the build directory, which is removed afterwards
    script.write_text(FAKE_COMPILER.replace('sys.argv[-1] + ".seen.c"', repr(str(tmp_path / "seen.c"))))
    _fresh_attempt(monkeypatch, tmp_path, f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}")
    with pytest.warns(UserWarning, match="forced failure"):
        assert not cpu_kernel.available()
    with open(cpu_kernel._SOURCE_PATH, "rb") as f:
        shipped = f.read()
    want = shipped
    # the other sources, compiled in the same unit under their own names and lines
    others = {
        "axial_band_moments_cpu.c": b"int axial_band_moments_f32(",
        "axial_rows_batchnorm_cpu.c": b"int axial_obn_",
    }
    for name, entry in others.items():
        with open(os.path.join(os.path.dirname(cpu_kernel._SOURCE_PATH), name), "rb") as f:
            text = f.read()
        assert entry in text
        want += b'\n#line 1 "' + name.encode() + b'"\n' + text
    assert (tmp_path / "seen.c").read_bytes() == want
    assert b"int axial_attention_rows_f32(" in shipped


def test_a_missing_compiler_binary_is_reported(monkeypatch, tmp_path):
    missing = str(tmp_path / "no-such-cc")
    _fresh_attempt(monkeypatch, tmp_path, missing)
    with pytest.warns(UserWarning, match="C kernel unavailable") as record:
        assert not cpu_kernel.available()
    message = str(record[0].message)
    assert missing in message and "No such file" in message


def test_the_kernel_sources_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["axial_deeplab"]
    csrc = os.path.dirname(cpu_kernel._SOURCE_PATH)
    files = sorted(os.listdir(csrc))
    assert os.path.basename(cpu_kernel._SOURCE_PATH) in files
    for name in files:
        assert any(fnmatch.fnmatch(f"csrc/{name}", p) for p in patterns), f"csrc/{name} is not shipped"
