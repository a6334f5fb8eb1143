"""nanolstm: recurrent networks (LSTM, GRU, RNN) in NumPy with hand-written backpropagation."""

import os
import sys
from importlib.util import find_spec

# Two kinds of worker threads share the cores: OpenBLAS's, for the large products, and numba's (GNU
# OpenMP), for the products inside the time loops (fused.matmul_packed). Each spins after its work
# before it sleeps, OpenBLAS's for about 0.1 s and OpenMP's for a few ms, and a spinning thread holds
# a core that the other kind needs next. Both libraries read how long to spin from the environment,
# so the limits are set here, unless the user set them: OpenBLAS's threads sleep at once; OpenMP's
# spin 10,000 rounds (~0.2 ms), enough to bridge the cells between two steps' products. Only where
# the compiled kernels will run: without them the time loops multiply through the BLAS, whose
# threads are better left spinning between the steps' small products.
#
# numba loads OpenMP later, at its first parallel loop. OpenBLAS reads its variable when NumPy loads
# it; if NumPy came first, the OpenBLAS it loaded is asked to read it again and to restart its
# threads (_openblas_timeout_applied), if no other thread could be using it. Where that cannot be
# done, the time loops keep to the BLAS (functional.loop_product): the same results, slower.


def loaded_openblas():
    """The OpenBLAS libraries loaded in this process (NumPy's, and any other), as ctypes handles;
    found in /proc/self/maps, so on Linux only: elsewhere, and if they cannot be read, none."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {parts[5].strip() for parts in (line.split(maxsplit=5) for line in maps) if len(parts) == 6}
        return [ctypes.CDLL(path) for path in sorted(paths) if "openblas" in os.path.basename(path).lower()]
    except OSError:
        return []


def _openblas_timeout_applied(timeout):
    """Whether every OpenBLAS loaded in this process now has its threads sleep after 2^timeout
    cycles (at least 2^4), timeout being OPENBLAS_THREAD_TIMEOUT's value: those that read another
    value when they were loaded read the environment again (openblas_read_env) and stop their
    threads (blas_thread_shutdown_, which OpenBLAS itself calls before a fork) and start them again
    (blas_thread_init). Linux only (the loaded libraries are read from /proc/self/maps).

    Only while this is the process's only Python thread: stopping OpenBLAS's threads in the middle of
    another thread's product hangs both (seen: an import beside a loop of products never returned).
    With other threads running, the loops keep to the BLAS."""
    import threading

    libs = loaded_openblas()
    needed = ("openblas_thread_timeout", "openblas_read_env", "blas_thread_shutdown_", "blas_thread_init")
    if not libs or not all(hasattr(lib, name) for lib in libs for name in needed):
        return False
    stale = [lib for lib in libs if lib.openblas_thread_timeout() != timeout]
    if stale and threading.active_count() > 1:
        return False
    for lib in stale:
        lib.openblas_read_env()
        lib.blas_thread_shutdown_()
        lib.blas_thread_init()
    return all(lib.openblas_thread_timeout() == timeout for lib in libs)


# Memory. A training step allocates and frees the same arrays every time (states, logits,
# gradients: 3 MB at the benchmark's configuration a, 12 MB at b). glibc's malloc maps an array
# above its mmap threshold afresh and unmaps it when freed, and gives the top of its heap back to
# the kernel when more than its trim threshold lies free there. Both thresholds start at 128 KB and
# follow the largest mapped array freed so far (the trim at twice it), so a step that frees more
# than twice its largest array hands the memory back, and the next step takes it again, page by
# page: 514 page faults a step at a, 3,000 at b. Set here: arrays under 32 MB (the most that glibc's
# own rule would ever keep in the heap) from the heap, and up to 512 MB of it kept free, more than a
# step of the benchmark's configuration d frees (64 MB still left 2,000 faults a step at c). Then no
# step of a to d faults; tokens/s a 1.12-1.22x, b 1.05-1.07x, c and d 1.01-1.02x (bench/malloc.py;
# docs/speed.md).
# Linux with glibc only, and not where the user set any of malloc's parameters.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 512 << 20  # bytes
MALLOC_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _keep_freed_memory():
    """Whether glibc's malloc now serves arrays under 32 MB from its heap and keeps up to 512 MB of
    freed memory there (mallopt)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_VARS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        libc.gnu_get_libc_version  # glibc's, whose mallopt takes these parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


# NANOLSTM_PROCESS_SETTINGS=0 leaves the process as it is: neither the threads' nor malloc's
# settings (the benchmark runs PyTorch's processes so).
SETTINGS = os.environ.get("NANOLSTM_PROCESS_SETTINGS", "1") != "0"
MALLOC_SET = SETTINGS and _keep_freed_memory()
BLAS_TIMEOUT_IN_EFFECT = "numpy" not in sys.modules  # whether OpenBLAS has OPENBLAS_THREAD_TIMEOUT's value
THREAD_SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "1", "GOMP_SPINCOUNT": "10000"}
THREAD_ENV_SET = {}  # what was set here (the benchmark gives PyTorch's processes the user's own)
if SETTINGS and os.environ.get("NANOLSTM_NUMBA", "1") != "0" and find_spec("numba") is not None:
    for _name, _value in THREAD_SETTINGS.items():
        if _name not in os.environ:
            os.environ[_name] = THREAD_ENV_SET[_name] = _value
    if not BLAS_TIMEOUT_IN_EFFECT and os.environ["OPENBLAS_THREAD_TIMEOUT"].isdigit():
        BLAS_TIMEOUT_IN_EFFECT = _openblas_timeout_applied(int(os.environ["OPENBLAS_THREAD_TIMEOUT"]))

from nanolstm.errors import CheckpointError, DataError, NanolstmError
from nanolstm.functional import use_numba
from nanolstm.gradcheck import check_gradients, numerical_gradient, rel_error
from nanolstm.nn import (GRU, LSTM, RNN, CrossEntropyLoss, Dropout, Embedding, GRUCell, Linear, LSTMCell, Module,
                         RNNCell)
from nanolstm.data import Vocab
from nanolstm.model import LanguageModel, ModelConfig
from nanolstm.train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "Embedding", "Linear", "Dropout", "CrossEntropyLoss", "Module",
    "numerical_gradient", "rel_error", "check_gradients", "use_numba",
    "Vocab", "LanguageModel", "ModelConfig", "TrainConfig", "train",
    "NanolstmError", "DataError", "CheckpointError",
]
