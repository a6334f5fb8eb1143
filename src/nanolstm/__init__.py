"""nanolstm: recurrent networks (LSTM, GRU, RNN) in NumPy with hand-written backpropagation."""

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
