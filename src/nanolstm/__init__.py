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


def _openblas_timeout_applied(timeout):
    """Whether every OpenBLAS loaded in this process now has its threads sleep after 2^timeout
    cycles (at least 2^4), timeout being OPENBLAS_THREAD_TIMEOUT's value: those that read another
    value when they were loaded read the environment again (openblas_read_env) and stop their
    threads (blas_thread_shutdown_, which OpenBLAS itself calls before a fork) and start them again
    (blas_thread_init). Linux only (the loaded libraries are read from /proc/self/maps).

    Only while this is the process's only Python thread: stopping OpenBLAS's threads in the middle of
    another thread's product hangs both (seen: an import beside a loop of products never returned).
    With other threads running, the loops keep to the BLAS."""
    import ctypes
    import threading

    try:
        with open("/proc/self/maps") as maps:
            paths = {parts[5].strip() for parts in (line.split(maxsplit=5) for line in maps) if len(parts) == 6}
        libs = [ctypes.CDLL(path) for path in paths if "openblas" in os.path.basename(path).lower()]
    except OSError:
        return False
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


BLAS_TIMEOUT_IN_EFFECT = "numpy" not in sys.modules  # whether OpenBLAS has OPENBLAS_THREAD_TIMEOUT's value
THREAD_ENV_SET = {}  # what was set here (the benchmark gives PyTorch's processes the user's own)
if os.environ.get("NANOLSTM_NUMBA", "1") != "0" and find_spec("numba") is not None:
    for _name, _value in [("OPENBLAS_THREAD_TIMEOUT", "1"), ("GOMP_SPINCOUNT", "10000")]:
        if _name not in os.environ:
            os.environ[_name] = THREAD_ENV_SET[_name] = _value
    if not BLAS_TIMEOUT_IN_EFFECT and os.environ["OPENBLAS_THREAD_TIMEOUT"].isdigit():
        BLAS_TIMEOUT_IN_EFFECT = _openblas_timeout_applied(int(os.environ["OPENBLAS_THREAD_TIMEOUT"]))

from nanolstm.errors import CheckpointError, DataError, NanolstmError
from nanolstm.functional import use_numba
from nanolstm.gradcheck import check_gradients, numerical_gradient, rel_error
from nanolstm.nn import GRU, LSTM, RNN, CrossEntropyLoss, Dropout, Embedding, Linear, Module
from nanolstm.data import Vocab
from nanolstm.model import LanguageModel, ModelConfig
from nanolstm.train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "LSTM", "GRU", "RNN", "Embedding", "Linear", "Dropout", "CrossEntropyLoss", "Module",
    "numerical_gradient", "rel_error", "check_gradients", "use_numba",
    "Vocab", "LanguageModel", "ModelConfig", "TrainConfig", "train",
    "NanolstmError", "DataError", "CheckpointError",
]
