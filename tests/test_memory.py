import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.io import memory

ROOT = Path(__file__).resolve().parent.parent
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import resource, sys
from pipeline.io.memory import configure_allocator
if sys.argv[1] != "default":
    configure_allocator(huge_pages=sys.argv[1] == "huge pages")
import torch
def step():  # {blocks} blocks of {mib} MiB, alive at once, then all freed
    blocks = [torch.ones({mib} << 18) for _ in range({blocks})]
    del blocks
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, blocks: int, mib: int) -> int:
    """Page faults of 3 steps of the probe in a fresh process: 'default', 'heap'
    (configure_allocator without huge pages) or 'huge pages'."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = subprocess.run(
        [sys.executable, "-c", PROBE.format(blocks=blocks, mib=mib), mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    return int(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_activations_are_mostly_reused(monkeypatch):
    """configure_allocator (run by train() and extract_features) fixes glibc's mmap threshold at
    its 32 MiB maximum and its trim threshold at 1 GiB: steps that free 156 MiB of 12 MiB blocks
    at their end (a VGG-sized training step's f_att activations, 13 x (64, 196, 512) bf16) then
    reuse it (no page faults here; the bound leaves room for other heaps' layouts). By default, in
    about half of fresh processes here, depending on the heap's layout, they faulted all of it
    back in, 4 KiB at a time."""
    calls = []
    monkeypatch.setattr(memory, "_MALLOPT", lambda option, value: calls.append((option, value)))
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")  # undone: left unset again after the test
    memory.configure_allocator(huge_pages=False)
    assert calls == [(memory.M_MMAP_THRESHOLD, 32 << 20), (memory.M_TRIM_THRESHOLD, 1 << 30)]
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    memory.configure_allocator(huge_pages=True)
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    assert faults("heap", 13, 12) < 3 * 39936 // 4  # 156 MiB: 39936 pages


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages")
def test_tensors_over_32_mib_fault_in_by_huge_pages():
    """Blocks over glibc's 32 MiB mmap threshold are mapped afresh each time whatever glibc is
    told: 25600 4-KiB faults per 100 MiB by default, a tenth of that or less on the huge pages
    that configure_allocator(huge_pages=True) has PyTorch ask for (562 here)."""
    default, configured = faults("default", 1, 100), faults("huge pages", 1, 100)
    assert default >= 3 * 25600 and configured < default // 10
