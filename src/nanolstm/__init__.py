"""nanolstm: recurrent networks (LSTM, GRU, RNN) in NumPy with hand-written backpropagation."""

import os
import sys
from importlib.util import find_spec

# Two kinds of worker threads share the cores: OpenBLAS's, for the large products, and numba's (GNU
# OpenMP), for the products inside the time loops (fused.matmul_packed). Each spins after its work
# before it sleeps, OpenBLAS's for about 0.1 s and OpenMP's for a few ms, and a spinning thread holds
# a core that the other kind needs next. Both libraries read how long to spin when they are loaded,
# so the limits are set here, before NumPy and numba, unless the user set them: OpenBLAS's threads
# sleep at once; OpenMP's spin 10,000 rounds (~0.2 ms), enough to bridge the cells between two
# steps' products. Only where the compiled kernels will run: without them the time loops multiply
# through the BLAS, whose threads are better left spinning between the steps' small products. With
# NumPy loaded first the time loops keep to the BLAS too (functional.loop_product).
BLAS_TIMEOUT_IN_EFFECT = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
THREAD_ENV_SET = {}  # what was set here (the benchmark gives PyTorch's processes the user's own)
if os.environ.get("NANOLSTM_NUMBA", "1") != "0" and find_spec("numba") is not None:
    for _name, _value in [("OPENBLAS_THREAD_TIMEOUT", "1"), ("GOMP_SPINCOUNT", "10000")]:
        if _name not in os.environ and (_name != "OPENBLAS_THREAD_TIMEOUT" or "numpy" not in sys.modules):
            os.environ[_name] = THREAD_ENV_SET[_name] = _value

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
