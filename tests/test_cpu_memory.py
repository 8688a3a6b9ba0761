"""keep_freed_memory: glibc keeps a training step's freed memory instead of page-faulting it in again."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import axial_deeplab
from axial_deeplab import cpu_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Rounds of 1600 blocks of 64 KiB (under glibc's initial mmap threshold: from the heap), taken
# with malloc, written and freed, with nothing else allocated in between: with glibc's adaptive
# thresholds the 100 MiB freed at the heap's top is handed back to the system (more than its
# largest trim threshold, 64 MiB) and every later round faults it in again; with fixed thresholds
# it stays. Faults counted over rounds 2-6.
_ROUNDS = textwrap.dedent(
    """
    import ctypes, resource, sys
    import axial_deeplab
    applied = axial_deeplab.keep_freed_memory() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    blocks = (ctypes.c_void_p * 1600)()
    def rounds(n):
        for _ in range(n):
            for i in range(1600):
                blocks[i] = libc.malloc(64 << 10)
                libc.memset(blocks[i], 1, 64 << 10)
            for i in reversed(range(1600)):
                libc.free(blocks[i])
    rounds(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(5)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults_per_round(mode: str, **env):
    run_env = {k: v for k, v in os.environ.items() if k != cpu_memory.ENV_KEEP_FREED_MEMORY}
    run_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, env=run_env, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc thresholds exist on Linux with glibc only")
def test_keep_freed_memory_stops_the_page_faults_of_repeated_steps():
    applied, kept = _faults_per_round("keep")
    _, default = _faults_per_round("default")
    assert applied == "True"
    # measured: 127870 pages (5 x 100 MiB) by default, 0 when kept
    assert default > 50000, default
    assert kept < 500, kept


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc thresholds exist on Linux with glibc only")
def test_keep_freed_memory_leaves_a_users_choice_alone():
    off, faults_off = _faults_per_round("keep", AXIAL_DEEPLAB_KEEP_FREED_MEMORY="0")
    theirs, _ = _faults_per_round("keep", MALLOC_TRIM_THRESHOLD_="4096")
    assert off == "False" and theirs == "False"
    assert faults_off > 50000  # glibc's defaults still rule


def test_keep_freed_memory_is_public_and_answers_the_same_twice():
    assert axial_deeplab.keep_freed_memory is cpu_memory.keep_freed_memory
    assert cpu_memory.keep_freed_memory() == cpu_memory.keep_freed_memory()


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc thresholds exist on Linux with glibc only")
def test_the_command_keeps_freed_memory():
    code = "from axial_deeplab import cli, cpu_memory; cli.main(['config', 'list']); print(cpu_memory._applied)"
    run_env = {k: v for k, v in os.environ.items() if k != cpu_memory.ENV_KEEP_FREED_MEMORY}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, check=True)
    assert out.stdout.split()[-1] == "True"
