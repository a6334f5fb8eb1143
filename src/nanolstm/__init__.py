"""nanolstm: recurrent networks (LSTM, GRU, RNN) in NumPy with hand-written backpropagation."""

import os
import sys

# OpenBLAS's threads spin for about 0.1 s after each product before they sleep, and on a machine
# with as many cores as threads they then hold the cores that the compiled time-loop products
# (fused.matmul_packed) run on. OPENBLAS_THREAD_TIMEOUT=1 makes them sleep at once; OpenBLAS reads
# it when it is loaded, so it is set here, before NumPy, unless the user chose a value. When NumPy
# was loaded first without it, the time loops keep to the BLAS (functional.loop_product).
BLAS_TIMEOUT_IN_EFFECT = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")

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
