"""Numerical gradients by central differences, to check hand-written backward passes.

Use float64: with float32 the rounding error of f swamps the difference quotient.

    def loss():
        out, _ = layer.forward(x)
        return np.sum(out * dout)
    out, _ = layer.forward(x)
    dx, _ = layer.backward(dout)
    assert rel_error(dx, numerical_gradient(loss, x)) < 1e-6
"""

import numpy as np


def numerical_gradient(f, x, eps=1e-6):
    """d f() / d x by central differences. f takes no argument and returns a scalar computed from the
    array x, which is nudged in place one entry at a time and restored exactly afterwards."""
    grad = np.zeros(x.shape, np.float64)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous so that it can be nudged in place")
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = float(f())
        flat[i] = old - eps
        minus = float(f())
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def rel_error(a, b):
    """max |a - b| / max(|a| + |b|) over all entries: 0 for equal arrays, 1 for opposite ones.

    Taken over the whole array rather than entry by entry, so that entries that are zero up to
    rounding do not dominate."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    scale = np.max(np.abs(a) + np.abs(b), initial=0.0)
    return 0.0 if scale == 0 else float(np.max(np.abs(a - b)) / scale)


def check_gradients(f, arrays, grads, eps=1e-6):
    """Relative error of each analytic gradient against the numerical one.

    arrays: name -> array that f reads (nudged in place); grads: name -> the analytic gradient of f()
    with respect to it. Returns name -> relative error."""
    return {name: rel_error(grads[name], numerical_gradient(f, arrays[name], eps)) for name in grads}
