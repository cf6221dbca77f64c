"""What a command may write, and where: one process per output folder, writability checked
before any work, and files that were not written by this pipeline never replaced.

- :func:`folder_lock` holds an advisory lock (``flock``) on an output folder for the length of a
  command. The lock is taken on the folder itself, so no lock file is written; the kernel drops it
  when its holder exits, however it exits (kill -9 included), so a dead holder never blocks a rerun.
  A second command on a held folder stops at once, naming the holder's PID and command line.
- :func:`check_writable` makes an output folder (and its parents) and tries a file there, so a
  read-only or misnamed folder is reported before anything is computed.
- :func:`refuse_foreign` is the one message for an output path that holds a file this pipeline did
  not write; :func:`write_owned` and :func:`check_owned` keep, for outputs that cannot carry a mark
  of their own (a COCO results list), a record of what was written and its SHA-256.
- :func:`os_error_message` words any OSError that reaches the command line as one line.
"""

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path

from .atomic import atomic_path, file_sha256, write_json
from .errors import PipelineError, param

OWNER = "show-attend-tell"  # the mark this pipeline leaves in the files it writes (PNG metadata, JSON keys)


def lock_holder(folder) -> str:
    """Who holds the lock on ``folder``: 'PID N (its command line)' from /proc/locks (Linux), or
    'another process' where that cannot be told."""
    try:
        st = os.stat(folder)
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
                pid = fields[4]
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"PID {pid} ({command.strip()[:160]})"
    except OSError:
        pass
    return "another process"


@contextlib.contextmanager
def folder_lock(folder, name: str = "out", hold: bool = True):
    """Hold an exclusive advisory lock on ``folder`` (made if absent, with its missing parents; those
    still empty at the end, e.g. after a refusal, are removed again) for the block.

    hold: False yields without locking (a torchrun rank other than 0: its job's rank 0 holds the
    lock for all of them).
    Raises PipelineError at once if another process holds it, or if the folder cannot be made.
    """
    if not hold:
        yield
        return
    folder = Path(folder)
    made = check_writable(folder, name)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"{folder}: in use by {lock_holder(folder)}; wait for it to finish, or pass another {param(name)}"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock
        for path in made:  # a command refused before it wrote anything leaves no empty folder behind
            try:
                path.rmdir()  # only an empty folder: never anything written there
            except OSError:
                break


def check_writable(folder, name: str) -> list[Path]:
    """Make ``folder`` (and missing parents) and check that a file can be written there.

    Returns the folders it made, deepest first ([] where ``folder`` existed).
    Raises PipelineError naming the folder and the option that chose it (``name``)."""
    folder = Path(folder)
    whole = folder.absolute()
    made = list(itertools.takewhile(lambda p: not p.exists(), (whole, *whole.parents)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise PipelineError(
            f"{folder}: cannot write there ({e.strerror or e}); pass another {param(name)} or make it writable"
        ) from None
    return made


def refuse_foreign(path, what: str, name: str) -> None:
    """Raise the PipelineError for an output ``path`` (chosen by option ``name``) that holds a file
    not written by ``what``."""
    raise PipelineError(
        f"{path}: exists and was not written by {what}, so it is left as it is; move it away or pass "
        f"another {param(name)}"
    )


def os_error_message(error: OSError) -> str:
    """One line for an OSError met outside the checks: the path, what happened, what to do."""
    where = error.filename or "a file"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "choose a folder you can write to, or change its permissions"
    elif error.errno in (errno.ENOENT, errno.ENOTDIR):
        advice = "check the path (a file or folder may have been moved while the command ran)"
    else:
        advice = "check the path and the device, then run the same command again"
    return f"{where}: {error.strerror or error}; {advice}"


def _listed(record_path: Path) -> dict:
    """name -> SHA-256 digests that the record at ``record_path`` lists ({} if none or not ours)."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        files = record["files"] if record.get("written_by") == OWNER else {}
        return {name: list(digests) for name, digests in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def check_owned(record_path, paths, what: str, name: str) -> None:
    """Refuse (:func:`refuse_foreign`) the first of ``record_path`` and ``paths`` (files beside it)
    that exists but is not this pipeline's: a record that is not ours, or a file that the record
    does not list with its current SHA-256 (one the user wrote or edited)."""
    record_path = Path(record_path)
    if record_path.exists() and not _owned_record(record_path):
        refuse_foreign(record_path, what, name)
    listed = _listed(record_path)
    for path in map(Path, paths):
        if path.exists() and file_sha256(path) not in listed.get(path.name, []):
            refuse_foreign(path, what, name)


def _owned_record(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("written_by") == OWNER
    except (OSError, ValueError, AttributeError):
        return False


def write_owned(record_path, files: dict, record: dict) -> None:
    """Write ``files`` (path beside ``record_path`` -> text or bytes) and then ``record`` as JSON
    at ``record_path``, with ``written_by`` and the SHA-256 of each file, each write atomic.

    Before the files are replaced, the record lists both their old and new digests (and nothing
    of ``record``), so that a kill at any moment leaves every file listed with its contents, a
    reader of ``record`` finds none, and a rerun may replace them."""
    record_path = Path(record_path)
    old = _listed(record_path)
    data = {Path(p): text.encode("utf-8") if isinstance(text, str) else text for p, text in files.items()}
    new = {path.name: hashlib.sha256(content).hexdigest() for path, content in data.items()}
    pending = {name: sorted(set(old.get(name, [])) | {digest}) for name, digest in new.items()}
    write_json(record_path, {"written_by": OWNER, "complete": False, "files": pending})
    for path, content in data.items():
        with atomic_path(path) as tmp:
            tmp.write_bytes(content)
    write_json(record_path, dict(record, written_by=OWNER, files={name: [digest] for name, digest in new.items()}))
