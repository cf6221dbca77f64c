"""How the process uses its heap: glibc's malloc told to keep freed memory for reuse."""
from .atomic import LIBC

_MALLOPT = getattr(LIBC, "mallopt", None)  # glibc only
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the OS.

    Training steps and encoder batches allocate the same large tensors again and again (a
    training step keeps a (B, L, A) tensor per time step for its backward pass and frees them all
    at its end). By default glibc returns such memory once freed and the next step or batch
    page-faults it in again: up to 90 MiB of page faults per training step at VGG sizes, and a
    SqueezeNet feature batch ran at 0.6 of its speed (bench/RESULTS.md). Blocks up to 32 MiB
    (glibc's largest mmap threshold) now come from the heap, which is trimmed only past 1 GiB free;
    larger ones are still mapped and unmapped each time. Fixed thresholds also stop the heap from
    growing with the length of a run, as glibc's adaptive ones let it. A no-op without glibc.
    """
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, 32 << 20)
        _MALLOPT(M_TRIM_THRESHOLD, 1 << 30)
