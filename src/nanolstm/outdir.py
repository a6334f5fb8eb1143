"""The output folder of a training run: one trainer at a time, and files that are never half-written."""

import errno
import fcntl
import os
import re
import stat

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
        folder = os.path.dirname(self.path) or "."
        try:
            # O_NOFOLLOW: a .lock planted as a link to another file must not get that file truncated
            # and overwritten with our pid; O_NONBLOCK: a FIFO planted there must not hang the open
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise NanolstmError(f"{self.path} is a symbolic link, not a trainer's lock; remove it or "
                                    "choose another --out") from None
            raise NanolstmError(f"cannot use {folder}: {e.strerror}; choose another --out") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a FIFO, a device, a hard link
                raise NanolstmError(f"{self.path} is not a trainer's lock (not a plain file of its own); "
                                    "remove it or choose another --out")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
                    raise NanolstmError(f"{folder} is in use by a trainer (pid {holder}); "
                                        "wait for it to finish or choose another --out") from None
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            names = os.listdir(folder)
        except OSError as e:  # no locks on this file system, no space for the pid, a folder we may not list
            os.close(fd)
            raise NanolstmError(f"cannot lock {folder}: {e.strerror or e}; choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        for name in names:
            if _TEMPORARY.fullmatch(name):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:  # a folder that lets nothing go will fail the first write, and say so
                    pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the flock
        self.fd = None
