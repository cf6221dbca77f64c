import subprocess
import sys
from pathlib import Path

import pytest

FREED_MEMORY_PROBE = """
import resource, sys, torch
from pipeline.memory import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def step():  # a VGG-sized training step's f_att activations: 13 time steps of (64, 196, 512) bf16
    blocks = [torch.ones(12 << 18) for _ in range(13)]  # 13 x 12 MiB, alive at once, then all freed
    del blocks
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_are_reused_without_page_faults(monkeypatch):
    """keep_freed_memory (run by train() and extract_features) fixes glibc's mmap threshold at its
    32 MiB maximum and its trim threshold at 1 GiB; then steps that free 156 MiB at their end
    reuse it rather than fault it in again. (Without it, in about half of fresh processes here,
    depending on the heap's layout, each such step faulted its 37000 4-KiB pages back in.)"""
    from pipeline import memory

    calls = []
    monkeypatch.setattr(memory, "_MALLOPT", lambda option, value: calls.append((option, value)))
    memory.keep_freed_memory()
    assert calls == [(memory.M_MMAP_THRESHOLD, 32 << 20), (memory.M_TRIM_THRESHOLD, 1 << 30)]
    for _ in range(2):  # fresh processes
        run = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, "keep"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, check=True)
        assert int(run.stdout) < 3 * 500
