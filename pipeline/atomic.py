"""Atomic file writes: write to a temporary name beside the target, then rename.

A reader therefore sees either the old file or the complete new one, never a partial file, even
if the process is killed mid-write (rename is atomic on POSIX within one file system).
"""
import contextlib
import json
import os
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    """The temporary name used while ``path`` is being written (unique to this process)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path to write; rename it to ``path`` only if the block succeeds.

    On an exception (including a full disk) the temporary file is removed and ``path`` is left as
    it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder) -> list[Path]:
    """Delete temporary files left in ``folder`` by killed runs; returns what was removed.

    A temporary file whose writer process is still alive (another rank, say) is left alone.
    """
    stale = []
    for p in Path(folder).glob(f"*{TMP_MARK}*"):
        pid = p.name.rsplit(TMP_MARK, 1)[1]
        if p.is_file() and not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale
