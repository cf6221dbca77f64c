"""What every benchmark shares: timing, the machine's description, the real images, peak memory."""

import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pipeline.io.paths import FLICKR8K, SQUEEZENET_WEIGHTS  # noqa: F401 - the sections import them from here
from pipeline.io.paths import REPOSITORY as ROOT


def sync() -> None:
    """Wait for queued GPU work (a timer stopped without it measures only the launches)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn, repeat: int = 1, warmup: int = 1) -> float:
    """Wall-clock seconds of one call of ``fn`` (the best of ``repeat``, after ``warmup`` calls),
    GPU work included."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def progress(line: str) -> None:
    """Print a table row on stderr as soon as it is measured (a section's table goes to stdout, and
    to RESULTS.md, only when the whole section is done)."""
    print(line, file=sys.stderr, flush=True)


def machine() -> str:
    """One line: CPU model, cores, torch version and thread count, accelerator if any."""
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def corpus_records(folder: Path, n_train: int, n_val: int = 0) -> tuple[list, list]:
    """The first ``n_train`` training and ``n_val`` validation records of the real Flickr8k images
    in ../shared/data, or of a synthetic corpus generated into ``folder`` where that data is absent."""
    from pipeline.features.datasets import load_flickr8k, load_karpathy, make_synthetic

    if FLICKR8K.exists():
        with warnings.catch_warnings():  # the token file's known quirks, reported by `cli.py features`
            warnings.simplefilter("ignore")
            records = load_flickr8k(FLICKR8K)
    else:
        records = load_karpathy(make_synthetic(folder, {"train": n_train, "val": max(n_val, 1), "test": 1}), folder)
    train = [r for r in records if r.split == "train"][:n_train]
    val = [r for r in records if r.split in ("dev", "val")][:n_val]
    return train, val


def run_measuring_memory(args: list[str]) -> tuple[float, float]:
    """Run ``python ARGS`` from the repository root; returns (wall seconds, peak RSS in MiB of that
    process: its VmHWM, polled; getrusage would report at least this process's own peak, which a
    child inherits at fork). Raises RuntimeError with its output if it fails."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peak_kib = 0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                pass
            time.sleep(0.05)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{log.read().decode(errors='replace')[-2000:]}"
            )
    return time.perf_counter() - start, peak_kib / 1024
