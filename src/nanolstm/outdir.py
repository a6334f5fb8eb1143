"""The output folder of a training run: one trainer at a time, and files that are never half-written."""

import errno
import fcntl
import os
import re

from nanolstm.errors import NanolstmError

# The temporary names under which write_atomic, checkpoint.save and the plot write a trainer's files
# before renaming them into place; a trainer killed mid-write leaves one behind.
_TEMPORARY = re.compile(r"\.(last\.ckpt|best\.ckpt|metrics\.jsonl)\.tmp-\d+|\.loss\.png\.tmp")


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
        try:
            os.remove(tmp)
        except OSError:  # never made, or the folder will not let it go: the next trainer's lock will
            pass
        raise NanolstmError(f"cannot write {path}: {e.strerror}; check free space and permissions") from None


class OutputLock:
    """An exclusive lock on a folder, held while a trainer writes into it.

    The lock is an flock on `folder/.lock`, which the kernel releases when the process ends however
    it ends, so a killed trainer never leaves a stale lock behind. The file holds the owner's pid so
    that a refused trainer can say who holds it. Taking the lock removes the half-written temporary
    files a killed trainer left: no one else writes them while we hold it.
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
        folder = os.path.dirname(self.path) or "."
        for name in os.listdir(folder):
            if _TEMPORARY.fullmatch(name):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:  # a folder that lets nothing go will fail the first write, and say so
                    pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the flock
        self.fd = None
