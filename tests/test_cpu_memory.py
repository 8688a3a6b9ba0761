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

# Rounds of 1600 blocks of 64 KiB (under glibc's initial mmap threshold: from the heap), taken and
# freed: with glibc's adaptive thresholds the 100 MiB freed at the heap's top is handed back to the
# system (more than its largest trim threshold, 64 MiB), and the next rounds fault it in again;
# with fixed thresholds it stays. Faults counted over rounds 2-6.
_ROUNDS = textwrap.dedent(
    """
    import resource, sys, torch
    import axial_deeplab
    applied = axial_deeplab.keep_freed_memory() if sys.argv[1] == "keep" else None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def rounds(n):
        for _ in range(n):
            blocks = [torch.ones(16 << 10) for _ in range(1600)]
            del blocks
    rounds(1)
    before = faults()
    rounds(5)
    print(applied, faults() - before)
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
    # measured: ~28k pages (110 MiB) by default, 14 when kept
    assert default > 2000, default
    assert kept < 500, kept


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc thresholds exist on Linux with glibc only")
def test_keep_freed_memory_leaves_a_users_choice_alone():
    off, faults_off = _faults_per_round("keep", AXIAL_DEEPLAB_KEEP_FREED_MEMORY="0")
    theirs, _ = _faults_per_round("keep", MALLOC_TRIM_THRESHOLD_="4096")
    assert off == "False" and theirs == "False"
    assert faults_off > 2000  # glibc's defaults still rule


def test_keep_freed_memory_is_public_and_answers_the_same_twice():
    assert axial_deeplab.keep_freed_memory is cpu_memory.keep_freed_memory
    assert cpu_memory.keep_freed_memory() == cpu_memory.keep_freed_memory()
