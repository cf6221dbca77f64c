"""Atomic file writes: write to a temporary name beside the target, then rename.

A reader therefore sees either the old file or the complete new one, never a partial file, even
if the process is killed mid-write (rename is atomic on POSIX within one file system) or the disk
fills up (then a PipelineError says so, naming the file).
"""

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import PipelineError, param

TMP_MARK = ".tmp-"
FALLOC_FL_KEEP_SIZE = 1  # linux/falloc.h
LIBC = ctypes.CDLL(None, use_errno=True)  # the C library, for what the os module lacks
_FALLOCATE = getattr(LIBC, "fallocate", None)  # Linux only
if _FALLOCATE is not None:
    _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def temp_name(path: Path) -> Path:
    """The temporary name used while ``path`` is being written (unique to this process)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path to write; rename it to ``path`` only if the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was; a full disk
    raises PipelineError (:func:`disk_full_message`) in place of the writer's own error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if disk_full(e, path.parent):
            raise PipelineError(disk_full_message(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(error: Exception, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, came from a full disk or quota:
    ENOSPC/EDQUOT, or an I/O error without an errno (torch.save reports a full disk as a bare
    RuntimeError) with less than 1 MiB left there. Errors of other kinds never count."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def reserve_disk(path: Path, size: int) -> None:
    """Allocate ``size`` bytes of disk to the file ``path`` ahead of its writes, without changing
    its length (fallocate with FALLOC_FL_KEEP_SIZE; :func:`release_reserve` frees what is left),
    so that a full disk shows here as an OSError (ENOSPC). Where the file system or platform
    cannot allocate ahead, nothing is done."""
    if _FALLOCATE is None:
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        if _FALLOCATE(fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def release_reserve(path: Path) -> None:
    """Free the blocks :func:`reserve_disk` allocated beyond the end of ``path`` (truncating a
    file to its own length does that)."""
    os.truncate(path, path.stat().st_size)


def disk_full_message(path) -> str:
    """The one line for a write of ``path`` that failed on a full disk."""
    return (
        f"{path}: no space left on the device while writing it; nothing partial was kept and finished "
        f"files are intact: free some space and run the same command again (training: with {param('resume', True)})"
    )


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def json_text(obj) -> str:
    """``obj`` as the indented JSON text this pipeline writes (no NaN or infinity)."""
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n"


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj), encoding="utf-8")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def remove_stale_temps(folder, names) -> list[Path]:
    """Delete the temporary files (``NAME.tmp-PID``) that killed runs left in ``folder`` for the
    files it writes there, ``names`` (glob patterns: ``"best.pt"``, ``"shard-*.h5"``); returns
    what was removed. Any other file is left alone, whatever its name, and so is a temporary file
    whose writer process is still alive (another rank, say).
    """
    stale = []
    for p in Path(folder).glob(f"*{TMP_MARK}*"):
        pid = int(p.name.rsplit(TMP_MARK, 1)[1]) if is_temp_of(p, names) else None
        if pid is not None and p.is_file() and not (pid != os.getpid() and _alive(pid)):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


def is_temp_of(path, names) -> bool:
    """Whether ``path`` is named as a temporary file (``NAME.tmp-PID``, :func:`temp_name`) of one of
    ``names`` (glob patterns)."""
    name, mark, pid = Path(path).name.rpartition(TMP_MARK)
    return bool(mark) and pid.isdigit() and any(fnmatch.fnmatchcase(name, pattern) for pattern in names)
