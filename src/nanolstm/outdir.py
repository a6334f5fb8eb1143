"""The output folder of a training run: one trainer at a time, and files that are never half-written."""

import errno
import fcntl
import os

from nanolstm.errors import NanolstmError


def write_atomic(path, text):
    """Write text to path through a temporary file and a rename: readers see the old or the new file."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise NanolstmError(f"cannot write {path}: {e.strerror}; check free space and permissions") from None


class OutputLock:
    """An exclusive lock on a folder, held while a trainer writes into it.

    The lock is an flock on `folder/.lock`, which the kernel releases when the process ends however
    it ends, so a killed trainer never leaves a stale lock behind. The file holds the owner's pid so
    that a refused trainer can say who holds it.
    """

    def __init__(self, folder):
        self.path = os.path.join(folder, ".lock")
        self.fd = None

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise NanolstmError(f"cannot use {os.path.dirname(self.path)}: {e.strerror}; "
                                "choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise NanolstmError(f"{os.path.dirname(self.path)} is in use by a trainer (pid {holder}); "
                                    "wait for it to finish or choose another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the flock
        self.fd = None
