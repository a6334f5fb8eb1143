"""The math of every layer: pure functions, each forward directly above its backward.

Arrays in, arrays and a cache out; no classes, no state. `dX` always means dLoss/dX, and every
backward mirrors its forward line for line, in reverse.

Shapes: T time steps, N batch, D input features, H hidden units, V vocabulary, G gates per unit
(4 for the LSTM in the order i, f, g, o; 3 for the GRU in the order r, z, n; 1 for the plain RNN).

The recurrent layers split each time step in two: one matrix product `h @ W_hh.T` and the gate
arithmetic around it, the "cell". The cells and time loops below are the readable NumPy reference;
`nanolstm.fused` replaces them by compiled kernels of the same signature whenever numba is installed
(`use_numba`). Everything that does not depend on the previous step (the input products of all T
steps, the weight gradients of all T steps) is one large matrix product outside the time loop.
"""

import os
from typing import NamedTuple

import numpy as np

# ---------------------------------------------------------------------------------------------
# Activations, stable for any input: no overflow, no NaN, at +-1e4 or beyond.


def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp is only ever taken of -|x| <= 0."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1, e) / (1 + e)


def softmax(x):
    """softmax over the last axis; the max is subtracted first so exp never overflows."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Embedding: a lookup, never a one-hot vector times a matrix.


def embedding_forward(idx, weight):
    """idx: integer array of any shape S; weight (V, E). Returns out (*S, E) and the cache."""
    return weight[idx], (idx, weight.shape)


def embedding_backward(dout, cache):
    """dout (*S, E) -> dweight (V, E); rows of repeated indices add up.

    The rows of each index are summed as one run: sorted by index, then np.add.reduceat, which is
    about six times faster than adding row by row with np.add.at (1.1 ms -> 0.17 ms for 2048 x 64).
    """
    idx, shape = cache
    idx = idx.reshape(-1)
    rows = dout.reshape(-1, shape[1])
    dweight = np.zeros(shape, dtype=dout.dtype)
    if idx.size == 0:
        return dweight
    if _compiled.get("add_rows") is not None and dout.dtype in (np.float32, np.float64):
        _compiled["add_rows"](idx, rows, dweight)  # fused.add_rows: row by row, compiled
        return dweight
    order = np.argsort(idx, kind="stable")
    present, starts = np.unique(idx[order], return_index=True)
    dweight[present] = np.add.reduceat(rows[order], starts, axis=0)
    return dweight


# ---------------------------------------------------------------------------------------------
# The input side of a recurrent layer: x W_ih^T + bias for all steps at once. Its input may be an
# embedding not yet looked up (Lookup): one-hot tokens times the embedding times W_ih^T is a row of
# (embedding W_ih^T), so the product is taken over the V rows of the table rather than the T*N of
# the batch, and the batch picks rows of it (the LSTM's and GRU's time loops pick each step's rows
# as the step begins: loop_input_side). Backward sums the gradient rows by token first.


class Lookup(NamedTuple):
    """The input x = weight[ids] of a layer, not built: weight (V, D), ids (T, N) in [0, V)."""

    weight: np.ndarray
    ids: np.ndarray

    @property
    def shape(self):
        return self.ids.shape + self.weight.shape[1:]

    @property
    def dtype(self):
        return self.weight.dtype


def fold_lookup(vocab_size, tokens):
    """Whether to hand a first recurrent layer its embedding as a Lookup: when the table has at most
    as many rows as the batch has tokens, and the sum of gradient rows by token is compiled. NumPy's
    np.add.reduceat is slow on rows G*H wide (96 ms for 6400 x 2048, where the products it saves
    take 24), so without numba the layer takes the embedded input as it is."""
    return _compiled.get("add_rows") is not None and vocab_size <= tokens


def input_side_forward(x, w_ih, bias, out=None, ran=None):
    """x (T, N, D) or a Lookup; w_ih (G*H, D); bias (G*H,) or None -> a (T, N, G*H), written into
    out when given (a C-contiguous array of that shape and x's dtype), else a new array.
    ran: None, or which rows run at each step (T, N) (`steps_run`); only those rows of x are read,
    and only those of out written."""
    T, N = x.shape[:2]
    if out is None:
        out = np.empty((T, N, w_ih.shape[0]), x.dtype)
    if isinstance(x, Lookup):
        if ran is not None:
            raise ValueError("a Lookup runs every row of every step: no batch_sizes")
        table, ids = input_side_table(x, w_ih, bias)
        return np.take(table, ids, axis=0, out=out, mode="clip")  # "clip": unbuffered; ids are in range
    if ran is not None:  # the rows that run, gathered into one product
        a = product(x[ran], w_ih)
        if bias is not None:
            a += bias
        out[ran] = a
        return out
    product(x.reshape(T * N, x.shape[2]), w_ih, out.reshape(T * N, w_ih.shape[0]))
    if bias is not None:
        out += bias
    return out


def input_side_table(x, w_ih, bias):
    """A Lookup's input side before the batch picks its rows: table (P, G*H), the rows of
    weight W_ih^T + bias that the batch uses (P <= V), and ids (T, N) renumbered into them, so that
    the input side of step t, row n is table[ids[t, n]]."""
    present, ids = _rows_used(x)
    table = x.weight[present] @ w_ih.T
    if bias is not None:
        table += bias
    return table, ids


def loop_input_side(x, w_ih, bias, out, ran=None):
    """The input side for the LSTM's and GRU's time loops: (out, None) with out written as by
    input_side_forward, or for a Lookup (out, (table, ids)) as input_side_table gives them, out
    left for the loop to fill step by step (`gather` of the loops): each step's rows are then
    picked just before the step's cell reads them, by the thread that runs the cell."""
    if isinstance(x, Lookup) and ran is None:
        return out, input_side_table(x, w_ih, bias)
    return input_side_forward(x, w_ih, bias, out, ran), None


def input_side_backward(da, x, w_ih, ran=None):
    """da (T, N, G*H) -> dx (T, N, D), or for a Lookup the gradient of its weight (V, D); dw_ih.
    ran: as input_side_forward's; only those rows of da are read, and dx is zero in the others."""
    T, N, GH = da.shape
    if ran is not None:
        da_run, x_run = da[ran], x[ran]
        dx = np.zeros(x.shape, da.dtype)
        dx[ran] = product(da_run, w_ih.T)
        return dx, da_run.T @ x_run
    da2 = da.reshape(T * N, GH)
    if isinstance(x, Lookup):
        present, local = _rows_used(x)
        dtable = embedding_backward(da2, (local, (len(present), GH)))  # (P, G*H)
        dweight = np.zeros(x.weight.shape, da.dtype)
        dweight[present] = dtable @ w_ih
        return dweight, dtable.T @ x.weight[present]
    D = x.shape[2]
    return product(da2, w_ih.T).reshape(T, N, D), da2.T @ x.reshape(T * N, D)


def _rows_used(x):
    """A Lookup's rows that its ids use, in order, and the ids renumbered into them. Only those rows
    enter a product: as with the input built, a row the batch does not use has no part in it (an
    infinite one would make NaN of 0 * inf)."""
    used = np.bincount(x.ids.reshape(-1), minlength=x.weight.shape[0]) > 0
    return np.flatnonzero(used), (np.cumsum(used) - 1)[x.ids]


def steps_run(batch_sizes, N):
    """Which rows run at each step, (T, N) booleans, for a batch of sequences of different lengths
    sorted longest first (PyTorch's packed sequences): at step t the first batch_sizes[t] rows run,
    the sequences not yet ended. None for None: every row runs at every step."""
    if batch_sizes is None:
        return None
    return np.arange(N) < np.asarray(batch_sizes)[:, None]


def _rows_that_ran(a, ran):
    """(T, N, X) -> (rows, X): the rows that ran at each step, in order; all of them, as a view,
    when ran is None."""
    return a.reshape(-1, a.shape[2]) if ran is None else a[ran]


def _ends(hs, ran):
    """hs (T + 1, N, X) with h0 in row 0 and h_t in row t + 1 -> each row's state after its own
    last step (N, X); the states after step T when ran is None."""
    if ran is None:
        return hs[-1]
    return hs[ran.sum(axis=0), np.arange(hs.shape[1])]


def _finish_outputs(out, ran):
    """out (T, N, X) -> out, zero in the steps past each sequence's end (PyTorch's padding of a
    packed sequence's output)."""
    if ran is not None:
        out[~ran] = 0
    return out


def _scratch(work, name, shape, dtype):
    """An array for one of a pass's large intermediates (T x N x G*H), taken from `work` when it
    holds one of that shape and dtype, and left there for the next call.

    `work` is a dict the caller keeps from one call to the next (nn's recurrent layers do), or None
    for a new array. A fresh array is memory the kernel has to hand over page by page as it is first
    written: arrays this large (over glibc's 32 MB) are mapped anew by every np.empty and given back
    when freed. Reused, they spare a step of configuration c about 30 ms (4%).
    """
    if work is None:
        return np.empty(shape, dtype)
    buf = work.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = work[name] = np.empty(shape, dtype)
    return buf


# ---------------------------------------------------------------------------------------------
# Linear: out = x W^T + b on (..., in) arrays.


def linear_forward(x, weight, bias=None):
    """x (..., I); weight (O, I); bias (O,) or None. Returns out (..., O) and the cache."""
    # as one (M, I) x (I, O) product: NumPy would multiply a (T, N, I) x stack by stack, T small products
    out = (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        out += bias
    return out, (x, weight, bias is not None)


def linear_backward(dout, cache):
    """dout (..., O) -> dx (..., I), dweight (O, I), dbias (O,) or None."""
    x, weight, has_bias = cache
    d2 = dout.reshape(-1, dout.shape[-1])  # (M, O)
    dweight = d2.T @ x.reshape(-1, x.shape[-1])  # (O, I)
    dbias = d2.sum(axis=0) if has_bias else None
    dx = (d2 @ weight).reshape(x.shape)  # (..., I)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# Dropout, inverted: kept units are scaled by 1/(1-p) at training time, so evaluation does nothing.


def dropout_mask(shape, p, rng, dtype):
    """A mask of 0 and 1/(1-p) drawn from rng; p = 1 drops everything."""
    if p >= 1:
        return np.zeros(shape, dtype=dtype)
    return (rng.random(shape) >= p).astype(dtype) / dtype.type(1 - p)


# ---------------------------------------------------------------------------------------------
# Cross-entropy of logits against integer targets, averaged over the positions not ignored.


def log_sum_exp(z, out):
    """out (M,) = log sum_v exp(z[m, v]) for each row of z (M, V), the row's max taken out first so
    that exp never overflows."""
    top = z.max(axis=1)
    np.log(np.exp(z - top[:, None]).sum(axis=1), out=out)
    out += top


def softmax_minus_onehot(z, lse, y, scale, out):
    """out (M, V) = (softmax(z) - onehot(y)) * scale[:, None], with lse = log_sum_exp(z): the
    gradient of the cross-entropy of each row, scaled."""
    np.exp(z - lse[:, None], out=out)
    out[np.arange(y.size), y] -= 1
    out *= scale[:, None]


def cross_entropy_forward(logits, targets, ignore_index=None):
    """logits (..., V); targets (...) integers. Returns the mean loss (a 0-d array) and the cache,
    which holds the logits themselves: leave them unchanged until backward.

    Positions whose target equals ignore_index count for nothing. With no position left the mean is
    NaN, as in PyTorch. -log softmax(z)[y] is log_sum_exp(z) - z[y]: one pass over the logits,
    never the whole (M, V) table of log-probabilities.
    """
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (M, V)
    y = targets.reshape(-1)  # (M,)
    keep = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    count = int(keep.sum())
    y = np.where(keep, y, 0)  # an ignored position's target may be anything: read column 0 instead
    lse = np.empty(y.size, logits.dtype)
    _loss_kernels(logits.dtype)[0](z, lse)
    picked = z[np.arange(y.size), y] - lse  # (M,): log softmax at the targets
    total = -picked[keep].sum(dtype=logits.dtype)
    loss = total / logits.dtype.type(count) if count else np.array(np.nan, logits.dtype)
    return np.asarray(loss, logits.dtype), (z, lse, y, keep, count, logits.shape)


def cross_entropy_backward(cache, dloss=1.0):
    """dlogits (..., V) = (softmax - onehot(target)) / count at kept positions, 0 elsewhere."""
    z, lse, y, keep, count, shape = cache
    if count == 0:
        return np.zeros(shape, z.dtype)
    dz = np.empty_like(z)
    _loss_kernels(z.dtype)[1](z, lse, y, (keep * (dloss / count)).astype(z.dtype), dz)
    return dz.reshape(shape)


# ---------------------------------------------------------------------------------------------
# The product of each step by one weight, h_{t-1} (N, H) @ W_hh^T forward and da_t (N, G*H) @ W_hh
# backward, has few rows, and a time loop takes T of them with the same weight. A BLAS repacks the
# weight at every call, a large part of the work at so few rows; `nanolstm.fused` packs it once per
# loop and multiplies by the packed panels (1.4x faster at H=512, N=64, and more at smaller sizes;
# fused.py says how). That kernel runs on numba's threads, so it is used only where NumPy's BLAS
# threads are known to go to sleep as soon as a product ends (blas_threads_sleep: OpenBLAS's
# otherwise spin for ~0.1 s after each product, on the cores the kernel needs), and where numba's
# threads are OpenMP's, which stay awake between two steps (fused.threads_on_openmp). Under the same
# conditions the LSTM's and GRU's whole time loops are compiled (fused.loops, chosen by _loop): each
# thread takes its share of the batch's rows through all the steps, products and cells.
#
# Without it, the BLAS takes the product with the weight transposed and copied row by row, which
# OpenBLAS multiplies faster than the transposed view (1.15x for a forward pass at H=128, N=32); with
# one row (one stream of generation) it is a matrix-vector product, fastest on the view.


def blas_threads_sleep():
    """Whether NumPy's BLAS is OpenBLAS with its threads set to sleep at once after a product
    (OPENBLAS_THREAD_TIMEOUT, which `import nanolstm` sets, and makes an OpenBLAS loaded before it
    read again)."""
    import nanolstm

    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")
    if not (nanolstm.BLAS_TIMEOUT_IN_EFFECT and timeout.isdigit() and int(timeout) <= 10):
        return False  # OpenBLAS spins 2^timeout cycles, at least 2^4, by default 2^28
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:  # an older NumPy, or one whose build says nothing of its BLAS
        return False
    return "openblas" in str(blas).lower()


def product(x, w, out=None):
    """out (M, N) = x (M, K) @ w^T for w (N, K), out a new array when not given: a product over all
    the steps of a sequence at once. By fused.matmul_packed (in chunks of 64 rows of x) where it
    beats the BLAS (fused.large_products_packed: on AMD's Zen 4, and where OpenBLAS runs a kernel
    without the CPU's 512-bit vectors) while the time loops' products are packed, and x and out are
    float32 and C-contiguous; else by the BLAS. On the 2-core EPYC (Zen 4) the packed kernel took d's
    x W_ih^T and da W_ih at 207-224 GFLOP/s against OpenBLAS's 192-207; on the 2-core Xeon (Emerald
    Rapids) OpenBLAS's own AVX-512 kernel was the faster, 185-290 against 150-223, and a training
    step of d 1.10x faster with it; with OpenBLAS's Haswell kernel there, 1.20-1.23x slower
    (docs/speed.md)."""
    out = np.empty((x.shape[0], w.shape[0]), x.dtype) if out is None else out
    if (_compiled.get("packed_products") and x.dtype == w.dtype == out.dtype == np.float32
            and x.flags.c_contiguous and out.flags.c_contiguous):
        _compiled["matmul_packed"](x, _compiled["pack"](w), out)
    else:
        np.matmul(x, w.T, out=out)
    return out


def loop_product(w, rows):
    """A function (x, out=None) -> out = x @ w^T for x (rows, K) and w (N, K), out (rows, N), a new
    array when not given: the product by w of every step of a loop, prepared once."""
    packed = _compiled.get("matmul_packed")
    if packed is not None and w.dtype == np.float32 and _compiled.get("packed_loops"):
        panels = _compiled["pack"](w)

        def product(x, out=None):
            out = np.empty((x.shape[0], w.shape[0]), x.dtype) if out is None else out
            if x.dtype == out.dtype == np.float32:
                packed(x, panels, out)
            else:  # another dtype beside float32 weights: as NumPy would, not in float32
                np.matmul(x, w.T, out=out)
            return out

        return product
    w_t = np.ascontiguousarray(w.T) if rows > 1 else w.T
    return lambda x, out=None: np.matmul(x, w_t, out=out)


# ---------------------------------------------------------------------------------------------
# LSTM, one layer. With a = x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh split into four blocks of H:
#   i = sigmoid(a_i)   f = sigmoid(a_f)   g = tanh(a_g)   o = sigmoid(a_o)
#   c_t = f * c_{t-1} + i * g
#   h_t = o * tanh(c_t)


def lstm_cell_forward(a, hw, c_prev, c, h, tanh_c):
    """The gate arithmetic of one step, in place.

    a (N, 4H): the input side of the pre-activations, x_t W_ih^T + b_ih + b_hh, in; overwritten with
    the activations i, f, g, o (backward needs them). hw (N, 4H) in: h_{t-1} W_hh^T.
    c_prev (N, H) in; c, h, tanh_c (N, H) out.
    """
    H = c_prev.shape[1]
    a += hw
    a[:, : 2 * H] = sigmoid(a[:, : 2 * H])
    a[:, 2 * H : 3 * H] = np.tanh(a[:, 2 * H : 3 * H])
    a[:, 3 * H :] = sigmoid(a[:, 3 * H :])
    i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
    np.multiply(f, c_prev, out=c)
    c += i * g
    np.tanh(c, out=tanh_c)
    np.multiply(o, tanh_c, out=h)


def lstm_cell_backward(dh, dc, a, c_prev, tanh_c, da):
    """Backward of one step's gate arithmetic, in place.

    dh (N, H): dh_t in. dc (N, H): dc_t from step t+1 in, dc_{t-1} out.
    a (N, 4H): the activations i, f, g, o; c_prev, tanh_c (N, H) as saved by forward.
    da (N, 4H) out: the gradient of the pre-activations.
    """
    H = dh.shape[1]
    i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
    do = dh * tanh_c
    dc += dh * o * (1 - tanh_c * tanh_c)
    di = dc * g
    df = dc * c_prev
    dg = dc * i
    da[:, :H] = di * i * (1 - i)
    da[:, H : 2 * H] = df * f * (1 - f)
    da[:, 2 * H : 3 * H] = dg * (1 - g * g)
    da[:, 3 * H :] = do * o * (1 - o)
    dc *= f


def lstm_loop_forward(a, bias, hs, cs, tanh_cs, w_hh, gather=None, batch_sizes=None):
    """The time loop of lstm_forward, in place: a (T, N, 4H) the input side of the pre-activations,
    x W_ih^T, in, the activations out; bias (4H,) = b_ih + b_hh, added at each step (where the
    step's numbers are in cache, not in a pass of its own over all of a); hs, cs (T + 1, N, H) with
    h0, c0 in row 0, h_t and c_t written to row t + 1; tanh_cs (T, N, H) out. gather: None, or
    (table, ids) from loop_input_side, a's input side then looked up at each step.
    batch_sizes: None, or (T,) integers: step t runs only the first batch_sizes[t] rows (sequences
    of different lengths, longest first), and leaves the others' places as they were."""
    T, N = a.shape[:2]
    cell_forward = _cell("lstm", a.dtype)[0]
    hw = np.empty((N, a.shape[2]), a.dtype)
    times_w_hh_t = loop_product(w_hh, N)
    for t in range(T):
        n = N if batch_sizes is None else int(batch_sizes[t])  # the rows still running
        if gather is not None:
            np.take(gather[0], gather[1][t], axis=0, out=a[t], mode="clip")
        times_w_hh_t(hs[t, :n], hw[:n])
        hw[:n] += bias
        cell_forward(a[t, :n], hw[:n], cs[t, :n], cs[t + 1, :n], hs[t + 1, :n], tanh_cs[t, :n])


def lstm_loop_backward(dout, dh, dc, a, cs, tanh_cs, da, w_hh, batch_sizes=None):
    """The time loop of lstm_backward, in place: dout (T, N, H) in; dh, dc (N, H): dh_T, dc_T in,
    dh0, dc0 out; a, cs, tanh_cs as the forward loop left them; da (T, N, 4H) out. Returns the bias
    gradient, the sum of da over all steps and rows (4H,). batch_sizes: as the forward loop's; a
    row's dh and dc then wait, unchanged, for the row's last step, and da is written only where a
    row ran."""
    T, N = dout.shape[:2]
    cell_backward = _cell("lstm", a.dtype)[1]
    times_w_hh = loop_product(w_hh.T, N)
    for t in reversed(range(T)):
        n = N if batch_sizes is None else int(batch_sizes[t])
        dh[:n] += dout[t, :n]
        cell_backward(dh[:n], dc[:n], a[t, :n], cs[t, :n], tanh_cs[t, :n], da[t, :n])
        times_w_hh(da[t, :n], dh[:n])  # dh_{t-1}
    return _rows_that_ran(da, steps_run(batch_sizes, N)).sum(axis=0)


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, work=None, batch_sizes=None):
    """One LSTM layer over a whole sequence.

    x (T, N, D); h0, c0 (N, H); w_ih (4H, D); w_hh (4H, H); b_ih, b_hh (4H,).
    Returns out (T, N, H), h_T (N, H), c_T (N, H) and the cache. work: None, or a dict kept between
    calls in which the pre-activations' array is kept for the next call (_scratch); the cache holds
    it until then.

    batch_sizes: None, or (T,) integers for a batch of sequences of different lengths, as PyTorch's
    packed sequences have them: the rows sorted longest first, and step t running only the first
    batch_sizes[t] (non-increasing, batch_sizes[0] = N). Each row's steps past its length are then
    not computed, and x is not read there; out is zero there, and h_T, c_T are each row's state
    after its own last step.
    """
    T, N, D = x.shape
    H = w_hh.shape[1]
    ran = steps_run(batch_sizes, N)
    a, gather = loop_input_side(x, w_ih, None, _scratch(work, "a", (T, N, 4 * H), x.dtype), ran)
    hs = np.empty((T + 1, N, H), x.dtype)  # hs[t+1] is h_t; hs[0] is h0
    cs = np.empty((T + 1, N, H), x.dtype)
    tanh_cs = np.empty((T, N, H), x.dtype)
    hs[0], cs[0] = h0, c0
    _loop("lstm", x.dtype)[0](a, b_ih + b_hh, hs, cs, tanh_cs, w_hh, gather, batch_sizes)
    cache = (x, hs, cs, tanh_cs, a, w_ih, w_hh, batch_sizes)
    return _finish_outputs(hs[1:], ran), _ends(hs, ran), _ends(cs, ran), cache


def lstm_backward(dout, dh_T, dc_T, cache, work=None):
    """dout (T, N, H); dh_T, dc_T (N, H) -> dx (T, N, D), dh0, dc0 (N, H), and
    (dw_ih, dw_hh, db_ih, db_hh) shaped as the parameters. work: as lstm_forward's, for the
    gradient of the pre-activations; it may be one dict for all layers. With batch_sizes, dout is
    not read past each row's length, dx is zero there, and dh_T, dc_T enter at each row's last step."""
    x, hs, cs, tanh_cs, a, w_ih, w_hh, batch_sizes = cache
    T, N, D = x.shape
    ran = steps_run(batch_sizes, N)
    da = _scratch(work, "da", a.shape, a.dtype)  # (T, N, 4H)
    dh = np.array(dh_T, x.dtype)  # copies: the loop updates both in place
    dc = np.array(dc_T, x.dtype)
    db = _loop("lstm", x.dtype)[1](np.ascontiguousarray(dout, x.dtype), dh, dc, a, cs, tanh_cs, da, w_hh,
                                   batch_sizes)
    dx, dw_ih = input_side_backward(da, x, w_ih, ran)
    dw_hh = _rows_that_ran(da, ran).T @ _rows_that_ran(hs[:T], ran)
    return dx, dh, dc, (dw_ih, dw_hh, db, db.copy())


# ---------------------------------------------------------------------------------------------
# LSTM with projections (PyTorch's proj_size P < H). The cell is the LSTM's; what it would output,
# o * tanh(c_t), here m_t (N, H), is projected down to P units, and that is both the layer's output
# and what the next step's W_hh (4H, P) multiplies:
#   h_t = m_t W_hr^T        W_hr (P, H)
# Backward: dm_t = dh_t W_hr, the LSTM cell's backward from dm_t, and dW_hr = sum_t dh_t^T m_t, one
# product after the loop. With numba, fused.py runs these loops compiled whole, as the LSTM's.


def lstmp_loop_forward(a, bias, hs, cs, tanh_cs, ms, w_hh, w_hr, gather=None, batch_sizes=None):
    """lstm_loop_forward with projections: hs (T + 1, N, P) with h0 in row 0; ms (T, N, H) out, the
    cell's outputs before the projection."""
    T, N = a.shape[:2]
    cell_forward = _cell("lstm", a.dtype)[0]
    hw = np.empty((N, a.shape[2]), a.dtype)
    times_w_hh_t, times_w_hr_t = loop_product(w_hh, N), loop_product(w_hr, N)
    for t in range(T):
        n = N if batch_sizes is None else int(batch_sizes[t])
        if gather is not None:
            np.take(gather[0], gather[1][t], axis=0, out=a[t], mode="clip")
        times_w_hh_t(hs[t, :n], hw[:n])
        hw[:n] += bias
        cell_forward(a[t, :n], hw[:n], cs[t, :n], cs[t + 1, :n], ms[t, :n], tanh_cs[t, :n])
        times_w_hr_t(ms[t, :n], hs[t + 1, :n])  # h_t = m_t W_hr^T


def lstmp_loop_backward(dout, dh, dc, a, cs, tanh_cs, da, dhs, w_hh, w_hr, batch_sizes=None):
    """lstm_loop_backward with projections: dout (T, N, P); dh (N, P); dhs (T, N, P) out, each
    step's whole dh_t, for dW_hr."""
    T, N = dout.shape[:2]
    cell_backward = _cell("lstm", a.dtype)[1]
    dm = np.empty(cs.shape[1:], a.dtype)
    times_w_hh, times_w_hr = loop_product(w_hh.T, N), loop_product(w_hr.T, N)
    for t in reversed(range(T)):
        n = N if batch_sizes is None else int(batch_sizes[t])
        np.add(dh[:n], dout[t, :n], out=dhs[t, :n])
        times_w_hr(dhs[t, :n], dm[:n])  # dm_t = dh_t W_hr
        cell_backward(dm[:n], dc[:n], a[t, :n], cs[t, :n], tanh_cs[t, :n], da[t, :n])
        times_w_hh(da[t, :n], dh[:n])  # dh_{t-1}
    return _rows_that_ran(da, steps_run(batch_sizes, N)).sum(axis=0)


def lstmp_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, work=None, batch_sizes=None):
    """One LSTM layer with projections over a whole sequence.

    x (T, N, D); h0 (N, P); c0 (N, H); w_ih (4H, D); w_hh (4H, P); b_ih, b_hh (4H,); w_hr (P, H).
    Returns out (T, N, P), h_T (N, P), c_T (N, H) and the cache. work, batch_sizes: as
    lstm_forward's.
    """
    T, N, D = x.shape
    P, H = w_hr.shape
    ran = steps_run(batch_sizes, N)
    a, gather = loop_input_side(x, w_ih, None, _scratch(work, "a", (T, N, 4 * H), x.dtype), ran)
    hs = np.empty((T + 1, N, P), x.dtype)  # hs[t+1] is h_t; hs[0] is h0
    cs = np.empty((T + 1, N, H), x.dtype)
    tanh_cs = np.empty((T, N, H), x.dtype)
    ms = np.empty((T, N, H), x.dtype)
    hs[0], cs[0] = h0, c0
    _loop("lstmp", x.dtype)[0](a, b_ih + b_hh, hs, cs, tanh_cs, ms, w_hh, w_hr, gather, batch_sizes)
    cache = (x, hs, cs, tanh_cs, ms, a, w_ih, w_hh, w_hr, batch_sizes)
    return _finish_outputs(hs[1:], ran), _ends(hs, ran), _ends(cs, ran), cache


def lstmp_backward(dout, dh_T, dc_T, cache, work=None):
    """dout (T, N, P); dh_T (N, P); dc_T (N, H) -> dx (T, N, D), dh0 (N, P), dc0 (N, H), and
    (dw_ih, dw_hh, db_ih, db_hh, dw_hr) shaped as the parameters. work: as lstm_backward's."""
    x, hs, cs, tanh_cs, ms, a, w_ih, w_hh, w_hr, batch_sizes = cache
    T, N, D = x.shape
    P, H = w_hr.shape
    ran = steps_run(batch_sizes, N)
    da = _scratch(work, "da", a.shape, a.dtype)  # (T, N, 4H)
    dhs = np.empty((T, N, P), x.dtype)
    dh = np.array(dh_T, x.dtype)  # copies: the loop updates both in place
    dc = np.array(dc_T, x.dtype)
    db = _loop("lstmp", x.dtype)[1](np.ascontiguousarray(dout, x.dtype), dh, dc, a, cs, tanh_cs, da, dhs, w_hh,
                                    w_hr, batch_sizes)
    dx, dw_ih = input_side_backward(da, x, w_ih, ran)
    dw_hh = _rows_that_ran(da, ran).T @ _rows_that_ran(hs[:T], ran)
    dw_hr = _rows_that_ran(dhs, ran).T @ _rows_that_ran(ms, ran)
    return dx, dh, dc, (dw_ih, dw_hh, db, db.copy(), dw_hr)


# ---------------------------------------------------------------------------------------------
# GRU, one layer, as PyTorch defines it (the hidden-side bias of n sits inside the reset product):
#   r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
#   z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
#   n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
#   h_t = (1 - z) * n + z * h_{t-1}


def gru_cell_forward(a, hw, b_hn, h_prev, h, hn):
    """The gate arithmetic of one step, in place.

    a (N, 3H): input-side pre-activations with b_ih and the r, z part of b_hh already added; in,
    overwritten with the activations r, z, n. hw (N, 3H) = h_prev W_hh^T, no bias. b_hn (H,).
    h_prev (N, H) in; h (N, H) out; hn (N, H) out: h_prev W_hn^T + b_hn, which backward needs.
    """
    H = h_prev.shape[1]
    a[:, : 2 * H] = sigmoid(a[:, : 2 * H] + hw[:, : 2 * H])
    r, z = a[:, :H], a[:, H : 2 * H]
    np.add(hw[:, 2 * H :], b_hn, out=hn)
    a[:, 2 * H :] = np.tanh(a[:, 2 * H :] + r * hn)
    n = a[:, 2 * H :]
    np.subtract(h_prev, n, out=h)
    h *= z
    h += n


def gru_cell_backward(dh, a, hn, h_prev, dxa, dha):
    """Backward of one step's gate arithmetic, in place.

    dh (N, H): dh_t in; out: the part of dh_{t-1} that flows straight through z * h_{t-1}.
    a (N, 3H): the activations r, z, n; hn, h_prev (N, H) as saved by forward.
    dxa (N, 3H) out: gradient of the input-side pre-activations. dha (N, 3H) out: gradient of
    h_prev W_hh^T + b_hh.
    """
    H = dh.shape[1]
    r, z, n = a[:, :H], a[:, H : 2 * H], a[:, 2 * H :]
    dn = dh * (1 - z)
    dz = dh * (h_prev - n)
    dan = dn * (1 - n * n)
    dr = dan * hn
    dxa[:, :H] = dr * r * (1 - r)
    dxa[:, H : 2 * H] = dz * z * (1 - z)
    dxa[:, 2 * H :] = dan
    dha[:, : 2 * H] = dxa[:, : 2 * H]
    dha[:, 2 * H :] = dan * r
    dh *= z


def gru_input_bias(b_ih, b_hh):
    """The biases that add to the input side: b_ih, and b_hh but for b_hn, which cannot be folded in
    (it is multiplied by r)."""
    H = b_hh.shape[0] // 3
    return b_ih + np.concatenate([b_hh[: 2 * H], np.zeros(H, b_hh.dtype)])


def gru_loop_forward(a, bias, hs, hns, b_hn, w_hh, gather=None, batch_sizes=None):
    """The time loop of gru_forward, in place: a (T, N, 3H) the input side x W_ih^T in, the
    activations out; bias (3H,) = gru_input_bias(b_ih, b_hh), added to each step's rows as the step
    begins (where they are in cache, not in a pass of its own over all of a); hs (T + 1, N, H) with
    h0 in row 0, h_t written to row t + 1; hns (T, N, H) out. gather, batch_sizes: as
    lstm_loop_forward's."""
    T, N = a.shape[:2]
    cell_forward = _cell("gru", a.dtype)[0]
    hw = np.empty((N, a.shape[2]), a.dtype)
    times_w_hh_t = loop_product(w_hh, N)
    for t in range(T):
        n = N if batch_sizes is None else int(batch_sizes[t])
        if gather is not None:
            np.take(gather[0], gather[1][t], axis=0, out=a[t], mode="clip")
        a[t, :n] += bias
        times_w_hh_t(hs[t, :n], hw[:n])
        cell_forward(a[t, :n], hw[:n], b_hn, hs[t, :n], hs[t + 1, :n], hns[t, :n])


def gru_loop_backward(dout, dh, a, hns, hs, dxa, dha, w_hh, batch_sizes=None):
    """The time loop of gru_backward, in place: dout (T, N, H) in; dh (N, H): dh_T in, dh0 out;
    a, hns, hs as the forward loop left them; dxa, dha (T, N, 3H) out. batch_sizes: as
    lstm_loop_backward's."""
    T, N, H = dout.shape
    cell_backward = _cell("gru", a.dtype)[1]
    dh_hw = np.empty((N, H), a.dtype)
    times_w_hh = loop_product(w_hh.T, N)
    for t in reversed(range(T)):
        n = N if batch_sizes is None else int(batch_sizes[t])
        dh[:n] += dout[t, :n]
        cell_backward(dh[:n], a[t, :n], hns[t, :n], hs[t, :n], dxa[t, :n], dha[t, :n])
        times_w_hh(dha[t, :n], dh_hw[:n])
        dh[:n] += dh_hw[:n]  # dh_{t-1}


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, work=None, batch_sizes=None):
    """One GRU layer over a whole sequence.

    x (T, N, D); h0 (N, H); w_ih (3H, D); w_hh (3H, H); b_ih, b_hh (3H,).
    Returns out (T, N, H), h_T (N, H) and the cache. work, batch_sizes: as lstm_forward's.
    """
    T, N, D = x.shape
    H = w_hh.shape[1]
    ran = steps_run(batch_sizes, N)
    a, gather = loop_input_side(x, w_ih, None, _scratch(work, "a", (T, N, 3 * H), x.dtype), ran)
    hs = np.empty((T + 1, N, H), x.dtype)
    hns = np.empty((T, N, H), x.dtype)
    hs[0] = h0
    _loop("gru", x.dtype)[0](a, gru_input_bias(b_ih, b_hh), hs, hns, b_hh[2 * H :], w_hh, gather, batch_sizes)
    cache = (x, hs, hns, a, w_ih, w_hh, batch_sizes)
    return _finish_outputs(hs[1:], ran), _ends(hs, ran), cache


def gru_backward(dout, dh_T, cache, work=None):
    """dout (T, N, H); dh_T (N, H) -> dx (T, N, D), dh0 (N, H), (dw_ih, dw_hh, db_ih, db_hh).
    work: as lstm_backward's."""
    x, hs, hns, a, w_ih, w_hh, batch_sizes = cache
    T, N, D = x.shape
    ran = steps_run(batch_sizes, N)
    dxa = _scratch(work, "dxa", a.shape, a.dtype)  # (T, N, 3H)
    dha = _scratch(work, "dha", a.shape, a.dtype)  # (T, N, 3H)
    dh = np.array(dh_T, x.dtype)
    _loop("gru", x.dtype)[1](np.ascontiguousarray(dout, x.dtype), dh, a, hns, hs, dxa, dha, w_hh, batch_sizes)
    dha_run = _rows_that_ran(dha, ran)
    dx, dw_ih = input_side_backward(dxa, x, w_ih, ran)
    dw_hh = dha_run.T @ _rows_that_ran(hs[:T], ran)
    return dx, dh, (dw_ih, dw_hh, _rows_that_ran(dxa, ran).sum(axis=0), dha_run.sum(axis=0))


# ---------------------------------------------------------------------------------------------
# Plain RNN, one layer:  h_t = tanh(x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)  (or relu).


def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh", work=None, batch_sizes=None):
    """x (T, N, D); h0 (N, H); w_ih (H, D); w_hh (H, H); b_ih, b_hh (H,).
    Returns out (T, N, H), h_T (N, H) and the cache. work, batch_sizes: as lstm_forward's."""
    T, N, D = x.shape
    H = w_hh.shape[1]
    ran = steps_run(batch_sizes, N)
    a = input_side_forward(x, w_ih, b_ih + b_hh, _scratch(work, "a", (T, N, H), x.dtype), ran)
    hs = np.empty((T + 1, N, H), x.dtype)
    hw = np.empty((N, H), x.dtype)
    times_w_hh_t = loop_product(w_hh, N)
    hs[0] = h0
    for t in range(T):
        n = N if batch_sizes is None else int(batch_sizes[t])  # the rows still running
        times_w_hh_t(hs[t, :n], hw[:n])
        hw[:n] += a[t, :n]
        if nonlinearity == "tanh":
            np.tanh(hw[:n], out=hs[t + 1, :n])
        else:
            np.maximum(hw[:n], 0, out=hs[t + 1, :n])
    cache = (x, hs, w_ih, w_hh, nonlinearity, batch_sizes)
    return _finish_outputs(hs[1:], ran), _ends(hs, ran), cache


def rnn_backward(dout, dh_T, cache, work=None):
    """dout (T, N, H); dh_T (N, H) -> dx (T, N, D), dh0 (N, H), (dw_ih, dw_hh, db_ih, db_hh).
    work: as lstm_backward's."""
    x, hs, w_ih, w_hh, nonlinearity, batch_sizes = cache
    T, N, D = x.shape
    H = w_hh.shape[1]
    ran = steps_run(batch_sizes, N)
    da = _scratch(work, "da", (T, N, H), x.dtype)
    dh = np.array(dh_T, x.dtype)
    times_w_hh = loop_product(w_hh.T, N)
    for t in reversed(range(T)):
        n = N if batch_sizes is None else int(batch_sizes[t])
        dh[:n] += dout[t, :n]
        h = hs[t + 1, :n]
        if nonlinearity == "tanh":
            np.multiply(dh[:n], 1 - h * h, out=da[t, :n])
        else:
            np.multiply(dh[:n], h > 0, out=da[t, :n])
        times_w_hh(da[t, :n], dh[:n])
    da_run = _rows_that_ran(da, ran)
    dx, dw_ih = input_side_backward(da, x, w_ih, ran)
    dw_hh = da_run.T @ _rows_that_ran(hs[:T], ran)
    db = da_run.sum(axis=0)
    return dx, dh, (dw_ih, dw_hh, db, db.copy())


# ---------------------------------------------------------------------------------------------
# One step of each layer, for generation, where the input of a step is only known after the step
# before it. a (N, G*H) holds the input-side pre-activations with the biases that can be folded in
# (for the first layer of a language model, a row of a table precomputed for every token).


def lstm_step(a, h, c, times_w_hh_t, h_new=None, c_new=None):
    """a (N, 4H), consumed; h, c (N, H); times_w_hh_t = loop_product(W_hh, N) -> h, c of the next
    step, written into h_new, c_new (N, H) where given (not h, c), else new arrays."""
    h_new = np.empty_like(h) if h_new is None else h_new
    c_new = np.empty_like(c) if c_new is None else c_new
    _cell("lstm", a.dtype)[0](a, times_w_hh_t(h), c, c_new, h_new, np.empty_like(c))
    return h_new, c_new


def gru_step(a, h, times_w_hh_t, b_hh, h_new=None):
    """a (N, 3H) with b_ih and the r, z part of b_hh added, consumed; h (N, H);
    times_w_hh_t = loop_product(W_hh, N) -> next h, written into h_new (N, H) where given (not h),
    else a new array."""
    H = h.shape[1]
    h_new = np.empty_like(h) if h_new is None else h_new
    _cell("gru", a.dtype)[0](a, times_w_hh_t(h), b_hh[2 * H :], h, h_new, np.empty_like(h))
    return h_new


def rnn_step(a, h, times_w_hh_t, nonlinearity="tanh"):
    """a (N, H) with both biases added, consumed; h (N, H); times_w_hh_t = loop_product(W_hh, N)
    -> next h."""
    a += times_w_hh_t(h)
    return np.tanh(a, out=a) if nonlinearity == "tanh" else np.maximum(a, 0, out=a)


# ---------------------------------------------------------------------------------------------
# Which cell kernels the sequence functions call: the NumPy reference above, or compiled ones.

_reference_cells = {
    "lstm": (lstm_cell_forward, lstm_cell_backward),
    "gru": (gru_cell_forward, gru_cell_backward),
}
_cells = dict(_reference_cells)
_reference_loops = {
    "lstm": (lstm_loop_forward, lstm_loop_backward),
    "lstmp": (lstmp_loop_forward, lstmp_loop_backward),
    "gru": (gru_loop_forward, gru_loop_backward),
}
# other compiled kernels in use: fused.add_rows, .loss, .adam_update, .pack, .matmul_packed, .loops,
# .draw_tokens;
# and whether the time loops' products (packed_loops) and the products over all steps
# (packed_products) are fused.matmul_packed's
_compiled = {}


_reference_loss = (log_sum_exp, softmax_minus_onehot)


def _loss_kernels(dtype):
    """The cross-entropy's two row kernels: fused.loss, compiled, for float32 and float64 when numba
    is in use; else the NumPy ones above."""
    return _compiled.get("loss", _reference_loss) if dtype in (np.float32, np.float64) else _reference_loss


def _cell(kind, dtype):
    """The (forward, backward) cells for kind; the compiled ones know float32 and float64 only."""
    if dtype not in (np.float32, np.float64):
        return _reference_cells[kind]
    return _cells[kind]


def _loop(kind, dtype):
    """The (forward, backward) time loops for kind: fused.loops, parallel over the batch's rows on
    packed weights, where the packed products are in use (float32, loop_product's conditions); else
    the loops above, step by step."""
    if dtype == np.float32 and _compiled.get("packed_loops"):
        return _compiled["loops"][kind]
    return _reference_loops[kind]


def use_numba(enable=True):
    """Switch the cell kernels to numba's compiled ones (True) or the NumPy reference (False).

    Returns whether the compiled kernels are now in use: False when numba is not installed.
    """
    if enable:
        try:
            from nanolstm import fused
        except ImportError:
            enable = False
        else:
            _cells.update(fused.cells)
            _compiled.update(add_rows=fused.add_rows, pack=fused.pack, matmul_packed=fused.matmul_packed,
                             loops=fused.loops, loss=fused.loss, adam=fused.adam_update,
                             draw=fused.draw_tokens, pack_stack=fused.pack_stack,
                             sample=fused.sample,
                             packed_loops=blas_threads_sleep() and fused.threads_on_openmp())
            _compiled["packed_products"] = _compiled["packed_loops"] and fused.large_products_packed()
    if not enable:
        _cells.update(_reference_cells)
        _compiled.clear()
    return enable


# compiled cells by default wherever numba is installed; NANOLSTM_NUMBA=0 keeps the NumPy reference
use_numba(os.environ.get("NANOLSTM_NUMBA", "1") != "0")
