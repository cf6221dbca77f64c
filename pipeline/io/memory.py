"""How the process gets its memory: glibc's malloc keeps freed memory; feature extraction's large
CPU tensors sit on transparent huge pages."""

import os

from .atomic import LIBC

_MALLOPT = getattr(LIBC, "mallopt", None)  # glibc only
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def configure_allocator(huge_pages: bool) -> None:
    """Make the memory of large, short-lived tensors cheap to get again; call it before the
    process's first tensor (PyTorch reads its huge-page setting at its first CPU allocation).

    Training steps and encoder batches allocate the same large tensors over and over (a training
    step keeps a (B, L, A) tensor per time step for its backward pass and frees them all at its
    end). By default glibc returns such memory to the OS once freed, and the next step or batch
    page-faults it in again, 4 KiB at a time (docs/benchmarks.md). So:

    - glibc (``mallopt``): blocks up to 32 MiB (its largest mmap threshold) come from the heap,
      which is trimmed only past 1 GiB free; fixed thresholds also stop the heap from growing with
      the length of a run, as glibc's adaptive ones let it;
    - with ``huge_pages`` (feature extraction), PyTorch (``THP_MEM_ALLOC_ENABLE=1`` unless set
      already): CPU tensors of 2 MiB or more are 2 MiB-aligned and advised onto transparent huge
      pages, one page fault per 2 MiB instead of 512 for what is still mapped afresh
      (pytorch/pytorch#93888). Feature extraction runs faster with them, training steps slower,
      so training goes without (docs/benchmarks.md).

    A no-op for glibc's part elsewhere; the huge pages need the kernel's THP in 'madvise' or
    'always' mode.
    """
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, 32 << 20)
        _MALLOPT(M_TRIM_THRESHOLD, 1 << 30)
    if huge_pages:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
