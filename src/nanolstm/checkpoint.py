"""One file per checkpoint: named arrays plus JSON metadata, written atomically, read without pickle.

File layout (all integers little-endian):

    MAGIC            8 bytes   b"NANOLSTM"
    format version   uint32    FORMAT_VERSION
    header length    uint64    H
    header           H bytes   UTF-8 JSON {"meta": {...}, "arrays": [{"name", "dtype", "shape",
                               "offset", "nbytes"}, ...]}, padded with spaces to a multiple of 8
    data section               raw C-order array bytes; "offset" counts from the start of this
                               section, and every array starts on an 8-byte boundary
    SHA-256          32 bytes  of everything before it

The loader checks the magic, the version and the hash before it looks at the header, then checks
every header field, so a damaged or hostile file gives a one-line CheckpointError and nothing in
the file is ever executed.
"""

import errno
import hashlib
import json
import math
import os
import struct
import sys
import time

import numpy as np

from .errors import CheckpointError

__all__ = ["MAGIC", "FORMAT_VERSION", "save", "load", "pause_for_test"]

MAGIC = b"NANOLSTM"
FORMAT_VERSION = 1

_PREAMBLE = struct.Struct("<8sIQ")  # magic, format version, header length
_HASH_SIZE = hashlib.sha256().digest_size  # 32
_ALIGN = 8
_MAX_DIM = 2**40  # larger than any real array dimension, small enough that numpy accepts it

# The dtypes a checkpoint may hold, as little-endian dtype strings ("|" marks single-byte types).
ALLOWED_DTYPES = frozenset(
    ["<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"])

# Test hook: when set to a byte count, the writer fails with "No space left on device" after
# writing that many bytes, as a full disk would.
_fault_after_bytes = None


def pause_for_test(stage):
    """Test hook, off unless the environment holds NANOLSTM_TEST_PAUSE=<stage>:<seconds>.

    At that stage ("write": half-way through every checkpoint write; "evaluate", "preview": as the
    trainer starts one), print "nanolstm test pause: <stage>" to stderr and sleep, so that a test can
    send a signal or kill -9 at a known moment instead of at a lucky one.
    """
    hook = os.environ.get("NANOLSTM_TEST_PAUSE")
    if hook and hook.partition(":")[0] == stage:
        print(f"nanolstm test pause: {stage}", file=sys.stderr, flush=True)
        time.sleep(float(hook.partition(":")[2] or 1))


def _padding(n):
    """Bytes needed after n bytes to reach the next multiple of _ALIGN."""
    return -n % _ALIGN


# ----------------------------------------------------------------------------------------------------
# writing


def save(path, arrays, meta):
    """Write arrays (dict name -> ndarray) and meta (a JSON-serialisable dict) to path, atomically.

    The file is written beside path under a temporary name, flushed to disk and then renamed over
    path, so a crash or a full disk leaves either the old checkpoint or the new one, never a mix.
    Raises CheckpointError if the file cannot be written, ValueError for a dtype that is not allowed.
    """
    path = os.fspath(path)
    # Everything that can fail for programming reasons (bad dtype, unserialisable meta) fails here,
    # before a file is touched.
    entries, blobs, offset = [], [], 0
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        dtype = arr.dtype.newbyteorder("<")
        if dtype.str not in ALLOWED_DTYPES:
            raise ValueError(f"array {name!r} has dtype {arr.dtype}, which a checkpoint cannot hold")
        # As flat bytes: little-endian, C order, and 0-d arrays included.
        blob = np.ascontiguousarray(arr, dtype=dtype).reshape(-1).view(np.uint8)
        entries.append({"name": str(name), "dtype": dtype.str, "shape": list(arr.shape),
                        "offset": offset, "nbytes": blob.nbytes})
        blobs.append(blob)
        offset += blob.nbytes + _padding(blob.nbytes)
    header = json.dumps({"meta": meta, "arrays": entries}).encode("utf-8")
    header += b" " * _padding(_PREAMBLE.size + len(header))

    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            writer.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)))
            writer.write(header)
            for i, blob in enumerate(blobs):
                if i == len(blobs) // 2 and os.environ.get("NANOLSTM_TEST_PAUSE"):
                    f.flush()  # so that the half-written file is on disk while the test looks
                    pause_for_test("write")
                writer.write(blob)
                writer.write(bytes(_padding(blob.nbytes)))
            writer.write(writer.sha.digest())  # the hash of every byte before it
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException as e:
        # Interrupted or failed: drop the partial file; whatever was at path is untouched.
        try:
            os.remove(tmp)
        except OSError:  # never made, or the folder will not let it go (read-only, removed, immutable)
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; "
                                  "check free space and permissions") from e
        raise


class _HashingWriter:
    """Writes to a file while hashing what was written and honouring _fault_after_bytes."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.written = 0

    def write(self, data):
        data = memoryview(data).cast("B")
        if _fault_after_bytes is not None and self.written + len(data) > _fault_after_bytes:
            # Write what "fits", as a real full disk would, then fail.
            self.f.write(data[:max(0, _fault_after_bytes - self.written)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.f.write(data)
        self.sha.update(data)
        self.written += len(data)


def _fsync_directory(directory):
    """Flush the directory entry so that the rename itself survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# reading


def load(path):
    """Read a checkpoint written by save; return (arrays, meta).

    arrays is a dict name -> writeable ndarray in native byte order, meta the dict given to save.
    Raises CheckpointError, with a one-line message beginning with the path, for any file that is
    missing, not a checkpoint, of a newer format, truncated, corrupted or malformed.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file; check the path") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file; "
                              "give the path of a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e.strerror or e}; "
                              "check the path and its permissions") from None

    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path}: not a nanolstm checkpoint (wrong magic bytes); "
                              "give a file written by nanolstm")
    # The version comes before the hash: a newer format may check its integrity differently.
    if len(data) >= _PREAMBLE.size:
        _, version, _ = _PREAMBLE.unpack_from(data)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer nanolstm (format {version}, this one "
                                  f"reads up to {FORMAT_VERSION}); upgrade nanolstm")
    if (len(data) < _PREAMBLE.size + _HASH_SIZE
            or hashlib.sha256(memoryview(data)[:-_HASH_SIZE]).digest() != data[-_HASH_SIZE:]):
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupted (checksum mismatch); "
                              "use another checkpoint")

    # The bytes are what the writer wrote, but a forged or buggy file can still carry a bad header:
    # every failure from here on becomes a CheckpointError.
    try:
        return _parse(data)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors.
        detail = " ".join(str(e).split())[:200]  # one line, and not a screenful
        raise CheckpointError(f"{path}: corrupted checkpoint header ({type(e).__name__}: {detail}); "
                              "use another checkpoint") from None


def _parse(data):
    """Arrays and meta from a checkpoint's bytes whose magic and hash are already verified."""
    _, version, header_len = _PREAMBLE.unpack_from(data)
    if version < 1:
        raise ValueError(f"unknown format version {version}")
    data_start = _PREAMBLE.size + header_len
    data_end = len(data) - _HASH_SIZE
    if data_start > data_end:
        raise ValueError("header length runs past the end of the file")

    header = json.loads(data[_PREAMBLE.size:data_start].decode("utf-8"))
    if not isinstance(header, dict) or set(header) != {"meta", "arrays"}:
        raise ValueError("header must be an object with exactly 'meta' and 'arrays'")
    meta, entries = header["meta"], header["arrays"]
    if not isinstance(meta, dict) or not isinstance(entries, list):
        raise ValueError("'meta' must be an object and 'arrays' a list")

    arrays = {}
    for entry in entries:
        name, dtype, shape, offset, nbytes = _check_entry(entry, data_end - data_start)
        if name in arrays:
            raise ValueError(f"array {name!r} appears twice")
        flat = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize,
                             offset=data_start + offset)
        if dtype.kind == "b" and flat.view(np.uint8).max(initial=0) > 1:
            raise ValueError(f"array {name!r} holds booleans other than 0 and 1")
        # astype copies into a writeable array that owns its memory, in native byte order.
        arrays[name] = flat.reshape(shape).astype(dtype.newbyteorder("="))
    return arrays, meta


def _check_entry(entry, data_size):
    """Validate one header entry against a data section of data_size bytes.

    Returns (name, dtype, shape, offset, nbytes); raises ValueError or TypeError if anything is off.
    """
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset", "nbytes"}:
        raise ValueError("an array entry must have exactly name, dtype, shape, offset, nbytes")
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    offset, nbytes = entry["offset"], entry["nbytes"]
    if not isinstance(name, str):
        raise TypeError("array name must be a string")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ValueError(f"array {name!r} has dtype {dtype!r}, which is not allowed")
    dtype = np.dtype(dtype)
    if not isinstance(shape, list) or len(shape) > 32:
        raise ValueError(f"array {name!r} shape must be a list of at most 32 sizes")
    for v in [*shape, offset, nbytes]:
        # bool is an int subclass; JSON true must not pass as 1.
        if type(v) is not int or v < 0:
            raise ValueError(f"array {name!r} has a size or offset that is not a non-negative integer")
    # Python integers, so an absurd shape cannot overflow; with nbytes bounded by the data section,
    # no non-empty shape can ask for more memory than the file holds.
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise ValueError(f"array {name!r} shape {shape} does not match its {nbytes} bytes")
    if max(shape, default=0) > _MAX_DIM:  # only an empty array could get this far with one
        raise ValueError(f"array {name!r} has an absurd shape {shape}")
    if offset + nbytes > data_size:
        raise ValueError(f"array {name!r} lies outside the data section")
    return name, dtype, tuple(shape), offset, nbytes
