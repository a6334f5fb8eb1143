"""Choosing the next token from logits: temperature, top-k, top-p (nucleus) and argmax.

Shapes: N streams, V vocabulary.
"""

import math

import numpy as np

from nanolstm import functional
from nanolstm.errors import NanolstmError
from nanolstm.functional import softmax


def check_sampling(temperature=1.0, top_k=None, top_p=None, vocab_size=None):
    """Raise NanolstmError, one line, for settings that make no sense."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise NanolstmError(f"--temperature must be a positive number, got {temperature}; "
                            "use --argmax for greedy decoding")
    if top_k is not None and (top_k < 1 or (vocab_size is not None and top_k > vocab_size)):
        raise NanolstmError(f"--top-k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise NanolstmError(f"--top-p must be in (0, 1], got {top_p}")


def plain_draw(vocab_size, top_k=None, top_p=None, argmax=False):
    """Whether these settings draw from the whole distribution at a temperature: no argmax, and no
    top-k or top-p that removes a token."""
    return not argmax and (top_k is None or top_k >= vocab_size) and (top_p is None or top_p >= 1)


def next_tokens(logits, rng, temperature=1.0, top_k=None, top_p=None, argmax=False):
    """logits (N, V) -> token ids (N,).

    argmax takes the most likely token. Otherwise the logits are divided by the temperature, all but
    the top_k most likely are dropped, then all but the smallest set whose probability reaches top_p,
    and one token is drawn from what is left. Without top_k and top_p, and with numba, the draw is
    fused.draw_tokens, one compiled pass over each row (a dozen NumPy calls otherwise: about a tenth
    of a step of one-stream generation); it takes the same numbers from rng and draws the same tokens,
    but for rounding within 1e-16 of a token's boundary.
    """
    draw = functional._compiled.get("draw")
    if draw is not None and plain_draw(np.shape(logits)[-1], top_k, top_p, argmax) and np.ndim(logits) == 2:
        # the common case, compiled (fused.draw_tokens): one pass over each row, the same draws
        logits = np.asarray(logits)
        if logits.dtype not in (np.float32, np.float64):
            logits = logits.astype(np.float64)
        tokens = np.empty(logits.shape[0], np.int64)
        draw(logits, float(temperature), rng.random(logits.shape[0]), tokens)
        return tokens
    logits = np.asarray(logits, np.float64)
    if argmax:
        return logits.argmax(axis=-1)
    # shifted first, so that an extreme logit or temperature gives -inf (probability 0), never inf - inf
    with np.errstate(over="ignore"):
        z = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    N, V = z.shape
    if top_k is not None and top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k : V - top_k + 1]  # (N, 1)
        z = np.where(z >= kth, z, -np.inf)
    p = softmax(z)  # (N, V)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the tokens ranked above each
        keep_sorted = before < top_p  # the most likely token is always kept
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0)
        p /= p.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random((N, 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), V - 1)
