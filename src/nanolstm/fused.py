"""The kernels of `nanolstm.functional`, compiled by numba, each with the signature and the in-place
semantics of the NumPy function it replaces:

- the four recurrent cells, all the gates of a unit in one pass and no temporaries;
- the embedding gradient's row sums (add_rows), the cross-entropy's two row kernels (loss),
  Adam's update (adam_update), and the sampler's draw of the next tokens (draw_tokens);
- the product by weights packed once (matmul_packed): of a time loop's steps, and of all steps at
  once; and the LSTM's and GRU's whole time loops on it, the batch's rows shared between the
  threads (loops);
- generation's sampling loop, steps and draws in one call for model.generate (sample).

The NumPy functions in functional.py and optim.py are the reference: tests/test_fused.py checks
these against them, every output and every array overwritten in place, and whole layers with
`use_numba` on and off. `nanolstm.use_numba(True)` swaps them in.

What it buys, measured by `python bench/breakdown.py` (float32, D=H=512, T=100, N=64, two OpenBLAS
threads, idle 2-core AMD EPYC), NumPy cells (--no-numba) -> these:

    the 100 forward cells     31.5 ms -> 12.5 ms   2.5x
    the 100 backward cells    25.9 ms ->  8.0 ms   3.2x
    the whole layer, forward and backward   583 ms -> 516 ms   1.13x

At H=512 the matrix products are ~90% of the pass, and the cells leave them untouched (those
figures are with OpenBLAS's products in the time loop; with matmul_packed below, the whole layer
takes 447 ms). float64, the dtype of the gradient checks, comes out about even.

Most of the gain is SIMD code, which LLVM only makes of the loops below because:
- each row is taken as 1-D slices, so the inner loop is unit-stride with non-negative indices;
- error_model="numpy": Python's error model tests every divisor for zero, to raise
  ZeroDivisionError, and that branch alone stops the vectoriser. No divisor here can be zero;
- float32 exp is computed here (Cephes' expf: a polynomial, 2^n set in the exponent bits) rather
  than by libm, whose scalar calls cannot be vectorised: at 17 ns a value for tanhf against NumPy's
  0.4 ns, a cell written with math.tanh ran four times slower than the NumPy one. tanh comes from
  the same exp, and near 0 from a polynomial of its own. Both polynomials are evaluated with fused
  multiply-adds (fastmath "contract" on exp and tanh alone: the cells' own arithmetic stays rounded
  step by step as NumPy's is), which took the forward LSTM cell from 50 to 40 us at 32 x 512.
  Against float64, every 7th float32: exp within 1.01 ulp on [-87, 0] (0.98 without the fused
  multiply-adds), sigmoid within 1.8e-7 relative (NumPy's float32 one: 2.6e-7); and every float32:
  tanh within 1.51 ulp, 0.73 below |x| = 0.625 (np.tanh: 1.35 on every 1009th). Its polynomial
  costs the forward LSTM cell about 10 us at 64 x 512 (80 -> 89 us): without it, tanh(1e-5) was a
  thousandth off and a float32 layer with zero biases and inputs of 1e-4 came out 1.6e-4 away from
  the NumPy one. float64 uses math.exp and math.tanh.

The cells are serial loops, not `parallel=True` with prange over the N rows. On a quiet machine
two threads took a draft of the bare H=512 cell from 84 to 67 us forward and 29 to 20 us backward;
but each of the 2T calls must wake the other thread, and under load, or with OpenBLAS's threads
spinning, that wait is the scheduler's: numba's OpenMP layer took the lstm pass above from 0.5 s to 2.4 s (~8 ms
a call), and its workqueue layer, with one BLAS thread, was no faster than serial (964 ms, 946).
The cells run on both cores all the same, inside the compiled time loops at the end of this file:
there each thread calls them on its own rows, and the threads meet once per loop, not once per step.

Compiled once per machine and dtype (`cache=True`): numba keeps the machine code in __pycache__ next
to this file or, when site-packages is read-only, in the user's cache directory (checked: a second
process then loads it from there, 0.3 s including the import).
"""

import math

import numba
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_jit = njit(cache=True, fastmath=False, nogil=True, error_model="numpy")


# ---------------------------------------------------------------------------------------------
# Vector width. On Intel CPUs with AVX-512, LLVM's x86 backend prefers 256-bit vectors (the older
# ones lowered their clock for 512-bit instructions), so numba's loops came out in AVX2 halves on
# the 2-core Xeon (Emerald Rapids) this project also runs on: the packed product's 8 x 32 block of
# sums then needs all 32 vector registers and spills, and ran at 55-60 GFLOP/s a core against
# OpenBLAS's ~110. Each kernel below marks the function LLVM compiles it into with LLVM's own
# attribute "prefer-vector-width"="512" (what clang's -mprefer-vector-width=512 sets), as numba has
# no option for it: 512-bit vectors where the CPU has them, on AMD and Intel alike; elsewhere LLVM
# takes the widest it has. The width changes no result: the loops are vectorised across independent
# columns, and every sum keeps its order.

_WIDE = '"prefer-vector-width"="512"'


@intrinsic
def _wide_vectors(typingctx):
    """Marks the LLVM function being compiled as preferring 512-bit vectors; generates no code."""

    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        try:  # llvmlite checks attribute names against a list of its own, without LLVM's strings
            attributes._known = attributes._known | {_WIDE}
            attributes.add(_WIDE)
        except (AttributeError, TypeError, ValueError):  # another llvmlite: the target's own width
            pass
        return context.get_dummy_value()

    return types.none(), codegen

# ---------------------------------------------------------------------------------------------
# exp of x <= 0, the only transcendental function here; in float32 written out so that it vectorises.
# Cephes' expf: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n by bits.

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln2 = hi + lo; n * hi is exact
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_EXP_MIN = np.float32(-87.0)  # exp(-87) = 1.6e-38, next to the smallest normal float32; below it: 0


@intrinsic
def _exp2_float32(typingctx, n):
    """2^n for a float32 n holding an integer in [-126, 127]: n + 127 shifted into the exponent bits."""
    if n != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(n), codegen


def _exp_float32(x):
    one, half, zero = np.float32(1), np.float32(0.5), np.float32(0)
    # NaN fails x >= _EXP_MIN too: n is always an integer in range, and a NaN x is handed back at the end
    xc = x if x >= _EXP_MIN else _EXP_MIN
    n = np.floor(xc * _LOG2E + half)
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + one
    return p * _exp2_float32(n) if x >= _EXP_MIN else (zero if x < _EXP_MIN else x)


def _exp(x):
    """exp(x) for x <= 0 in compiled code; numba replaces this stub by the version for x's type."""


@overload(_exp, jit_options={"fastmath": {"contract"}})
def _exp_typed(x):
    return _exp_float32 if x == types.float32 else (lambda x: math.exp(x))


# ---------------------------------------------------------------------------------------------
# Activations. exp is only ever taken of -|x| <= 0, so neither overflows at +-1e4 or beyond:
#   sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) below, with e = exp(-|x|)  (as functional.sigmoid)
#   tanh(x) = sign(x) (1 - e) / (1 + e), with e = exp(-2|x|), for |x| >= 0.625 (below: _tanh_float32)
# `one` is 1 in the arrays' dtype: a Python 1 would turn every float32 operation into a float64 one.


@_jit
def _sigmoid(x, one):
    e = _exp(-abs(x))
    return (one if x >= 0 else e) / (one + e)


# (1 - e) / (1 + e) alone would lose tanh's small values: near 0, 1 - e cancels to an absolute error of
# about 6e-8, which is 1e-3 of tanh(1e-5) and all of tanh(1e-8). Below |x| = 0.625, where 1 - e >= 0.71,
# float32 takes tanh(x) = x + x z P(z), z = x^2, with P fitted to tanh over [0, 0.625] by minimising
# the largest relative error (4.4e-9 before rounding); float64 takes libm's tanh.
_T0, _T1, _T2 = np.float32(-5.705563e-3), np.float32(2.0639593e-2), np.float32(-5.3739868e-2)
_T3, _T4 = np.float32(1.3331445e-1), np.float32(-3.333328e-1)
_TANH_SMALL = np.float32(0.625)


def _tanh_float32(x, one):
    e = _exp(-(one + one) * abs(x))
    t = (one - e) / (one + e)
    z = x * x
    small = x + (x * z) * ((((_T0 * z + _T1) * z + _T2) * z + _T3) * z + _T4)
    return small if abs(x) < _TANH_SMALL else (t if x >= 0 else -t)


def _tanh(x, one):
    """tanh(x) in compiled code; numba replaces this stub by the version for x's type."""


@overload(_tanh, jit_options={"fastmath": {"contract"}, "error_model": "numpy"})
def _tanh_typed(x, one):
    return _tanh_float32 if x == types.float32 else (lambda x, one: math.tanh(x))


# ---------------------------------------------------------------------------------------------
# LSTM: gate blocks i, f, g, o of H columns each; unit j of row n reads column j of every block.


@_jit
def lstm_cell_forward(a, hw, c_prev, c, h, tanh_c):
    """As functional.lstm_cell_forward. a (N, 4H) in: input-side pre-activations, out: i, f, g, o.
    hw (N, 4H) = h_{t-1} W_hh^T; c_prev (N, H) in; c, h, tanh_c (N, H) out."""
    _wide_vectors()
    N, H = c_prev.shape
    one = a.dtype.type(1)
    for n in range(N):
        a_i, a_f, a_g, a_o = a[n, :H], a[n, H : 2 * H], a[n, 2 * H : 3 * H], a[n, 3 * H : 4 * H]
        w_i, w_f, w_g, w_o = hw[n, :H], hw[n, H : 2 * H], hw[n, 2 * H : 3 * H], hw[n, 3 * H : 4 * H]
        c_prev_n, c_n, h_n, tanh_c_n = c_prev[n], c[n], h[n], tanh_c[n]
        for j in range(H):
            i, f = _sigmoid(a_i[j] + w_i[j], one), _sigmoid(a_f[j] + w_f[j], one)
            g, o = _tanh(a_g[j] + w_g[j], one), _sigmoid(a_o[j] + w_o[j], one)
            a_i[j], a_f[j], a_g[j], a_o[j] = i, f, g, o
            cj = f * c_prev_n[j] + i * g
            tc = _tanh(cj, one)
            c_n[j], tanh_c_n[j], h_n[j] = cj, tc, o * tc


@_jit
def lstm_cell_backward(dh, dc, a, c_prev, tanh_c, da):
    """As functional.lstm_cell_backward. dh (N, H) in; dc (N, H): dc_t in, dc_{t-1} out.
    a (N, 4H): i, f, g, o; c_prev, tanh_c (N, H) in. da (N, 4H) out."""
    _wide_vectors()
    N, H = dh.shape
    one = a.dtype.type(1)
    for n in range(N):
        a_i, a_f, a_g, a_o = a[n, :H], a[n, H : 2 * H], a[n, 2 * H : 3 * H], a[n, 3 * H : 4 * H]
        da_i, da_f, da_g, da_o = da[n, :H], da[n, H : 2 * H], da[n, 2 * H : 3 * H], da[n, 3 * H : 4 * H]
        dh_n, dc_n, c_prev_n, tanh_c_n = dh[n], dc[n], c_prev[n], tanh_c[n]
        for j in range(H):
            i, f, g, o = a_i[j], a_f[j], a_g[j], a_o[j]
            tc = tanh_c_n[j]
            do = dh_n[j] * tc
            dcj = dc_n[j] + dh_n[j] * o * (one - tc * tc)
            da_i[j] = dcj * g * i * (one - i)
            da_f[j] = dcj * c_prev_n[j] * f * (one - f)
            da_g[j] = dcj * i * (one - g * g)
            da_o[j] = do * o * (one - o)
            dc_n[j] = dcj * f


# ---------------------------------------------------------------------------------------------
# GRU: gate blocks r, z, n of H columns each.


@_jit
def gru_cell_forward(a, hw, b_hn, h_prev, h, hn):
    """As functional.gru_cell_forward. a (N, 3H) in: input-side pre-activations, out: r, z, n.
    hw (N, 3H) = h_prev W_hh^T; b_hn (H,); h_prev (N, H) in; h, hn (N, H) out."""
    _wide_vectors()
    N, H = h_prev.shape
    one = a.dtype.type(1)
    for n in range(N):
        a_r, a_z, a_n = a[n, :H], a[n, H : 2 * H], a[n, 2 * H : 3 * H]
        hw_r, hw_z, hw_n = hw[n, :H], hw[n, H : 2 * H], hw[n, 2 * H : 3 * H]
        h_prev_n, h_n, hn_n = h_prev[n], h[n], hn[n]
        for j in range(H):
            r = _sigmoid(a_r[j] + hw_r[j], one)
            z = _sigmoid(a_z[j] + hw_z[j], one)
            hnj = hw_n[j] + b_hn[j]
            nj = _tanh(a_n[j] + r * hnj, one)
            a_r[j], a_z[j], a_n[j] = r, z, nj
            hn_n[j] = hnj
            h_n[j] = (h_prev_n[j] - nj) * z + nj


@_jit
def gru_cell_backward(dh, a, hn, h_prev, dxa, dha):
    """As functional.gru_cell_backward. dh (N, H): dh_t in, the z * h_{t-1} part of dh_{t-1} out.
    a (N, 3H): r, z, n; hn, h_prev (N, H) in. dxa, dha (N, 3H) out."""
    _wide_vectors()
    N, H = dh.shape
    one = a.dtype.type(1)
    for n in range(N):
        a_r, a_z, a_n = a[n, :H], a[n, H : 2 * H], a[n, 2 * H : 3 * H]
        dxa_r, dxa_z, dxa_n = dxa[n, :H], dxa[n, H : 2 * H], dxa[n, 2 * H : 3 * H]
        dha_r, dha_z, dha_n = dha[n, :H], dha[n, H : 2 * H], dha[n, 2 * H : 3 * H]
        dh_n, hn_n, h_prev_n = dh[n], hn[n], h_prev[n]
        for j in range(H):
            r, z, nj = a_r[j], a_z[j], a_n[j]
            dhj = dh_n[j]
            dan = dhj * (one - z) * (one - nj * nj)
            dar = dan * hn_n[j] * r * (one - r)
            daz = dhj * (h_prev_n[j] - nj) * z * (one - z)
            dxa_r[j], dxa_z[j], dxa_n[j] = dar, daz, dan
            dha_r[j], dha_z[j], dha_n[j] = dar, daz, dan * r
            dh_n[j] = dhj * z


cells = {
    "lstm": (lstm_cell_forward, lstm_cell_backward),
    "gru": (gru_cell_forward, gru_cell_backward),
}


# ---------------------------------------------------------------------------------------------
# Embedding gradient: rows added into the table row of their index.


@_jit
def add_rows(idx, rows, out):
    """out[idx[m]] += rows[m] for every m, in order: idx (M,) ints, rows (M, D), out (V, D).
    As functional.embedding_backward's sort and np.add.reduceat, without the sorted copy of rows."""
    _wide_vectors()
    for m in range(idx.shape[0]):
        target, row = out[idx[m]], rows[m]
        for j in range(row.shape[0]):
            target[j] += row[j]


# ---------------------------------------------------------------------------------------------
# Cross-entropy: the log-sum-exp of each row of logits, and the gradient (softmax - onehot) * scale.
# NumPy makes five passes over the (M, V) logits forward and three backward, each with a temporary;
# these make one. At configuration a (M = 2048, V = 84) forward and backward took 0.64 ms of a 8.5 ms
# step (on the EPYC; the forward one now a lanes' max and sum, below).


_LANES = 16  # float32 numbers in a 512-bit vector


@_jit
def log_sum_exp(z, out):
    """As functional.log_sum_exp: z (M, V), out (M,). The max and the sum each in 16 lanes, every
    16th number of the row in each, so that a compare or an add does not wait on the one before: a
    row's max and sum are a few vector operations, not a chain of V compares and four of V / 4 adds
    as before (at configuration a's 2048 x 84 on the Xeon, 535 -> 336 us)."""
    _wide_vectors()
    M, V = z.shape
    padded = -(-V // _LANES) * _LANES
    e = np.zeros(padded, z.dtype)  # the row's exponentials, zero past V
    lanes = np.empty(_LANES, z.dtype)
    for m in range(M):
        row = z[m]
        # the max; a NaN may be passed over: it makes the sum below NaN all the same
        for lane in range(_LANES):
            lanes[lane] = row[0]
        for j in range(0, V - _LANES + 1, _LANES):
            for lane in range(_LANES):
                lanes[lane] = row[j + lane] if row[j + lane] > lanes[lane] else lanes[lane]
        top = row[0]
        for lane in range(_LANES):
            top = lanes[lane] if lanes[lane] > top else top
        for v in range(V - V % _LANES, V):
            top = row[v] if row[v] > top else top
        for v in range(V):
            e[v] = _exp(row[v] - top)
        for lane in range(_LANES):
            lanes[lane] = 0
        for j in range(0, padded, _LANES):
            for lane in range(_LANES):
                lanes[lane] += e[j + lane]
        for half in (8, 4, 2, 1):  # the lanes' sums in pairs
            for lane in range(half):
                lanes[lane] += lanes[lane + half]
        out[m] = top + np.log(lanes[0])


@_jit
def softmax_minus_onehot(z, lse, y, scale, out):
    """As functional.softmax_minus_onehot: z (M, V), lse (M,), y (M,) ints, scale (M,), out (M, V)."""
    _wide_vectors()
    M, V = z.shape
    for m in range(M):
        row, o, top, s = z[m], out[m], lse[m], scale[m]
        for v in range(V):
            o[v] = _exp(row[v] - top) * s
        o[y[m]] -= s


loss = (log_sum_exp, softmax_minus_onehot)


# ---------------------------------------------------------------------------------------------
# Drawing the next token of each stream from its logits, at a temperature (sample.next_tokens without
# top-k or top-p). NumPy takes a dozen passes over the (N, V) logits for it, each a call with its own
# overhead: 34 us a step for one stream of the 2x512 LSTM, whose step takes about 400; this takes
# one pass over each row, 3.5 us (and 31 against 79 for 32 streams).


@_jit
def draw_tokens(logits, temperature, u, out):
    """out[n] = the token drawn for row n of logits (N, V) at `temperature`, by u[n] in [0, 1): the
    first token whose cumulative probability exceeds u[n], as sample.next_tokens draws it (in
    float64, its sums unnormalised: they differ from NumPy's by rounding). A row with a NaN or +inf,
    or all -inf, has NaN sums and draws token 0, as there."""
    N, V = logits.shape
    cdf = np.empty(V)
    for n in range(N):
        top = -np.inf  # a NaN here, kept or passed over, makes the sums below NaN all the same
        for v in range(V):
            top = max(top, np.float64(logits[n, v]))
        total = 0.0
        for v in range(V):
            total += math.exp((np.float64(logits[n, v]) - top) / temperature)
            cdf[v] = total
        target = u[n] * total
        k = 0
        while k < V - 1 and cdf[k] <= target:  # NaN compares false: token 0
            k += 1
        out[n] = k


# ---------------------------------------------------------------------------------------------
# Adam's update of one parameter, as optim.Adam.update writes it in NumPy, operation for operation.


@njit(cache=True, parallel=True, error_model="numpy")
def adam_update(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, correction2, eps):
    """p, g, m, v flat, of one dtype, in place; the scalars in that dtype."""
    for i in prange(p.shape[0]):
        _wide_vectors()
        gi = g[i]
        mi = m[i] * beta1 + one_minus_beta1 * gi
        vi = v[i] * beta2 + one_minus_beta2 * (gi * gi)
        m[i], v[i] = mi, vi
        p[i] -= step_size * (mi / (np.sqrt(vi) / correction2 + eps))


# ---------------------------------------------------------------------------------------------
# The products of a time loop, x (M, K) @ w^T with w (N, K) the same in every step and M (the batch,
# or the streams of generation) small.
#
# BLAS repacks both operands of every product into its own blocked layout, and with few rows that
# copy of w is a large part of the work: OpenBLAS takes 0.26 ms for the 4 MB W_hh at H=512 whether
# M is 8 or 64 (0.59 ms in all at M=32). Here w is packed once per sequence, into panels of 32 of
# its rows laid out k by k, and each step only streams through them:
#
#   panels[p, k, j] = w[32 p + j, k]    (zero past the last row of w)
#
# A block of 8 rows of x times one panel is 8 x 32 sums, kept in 16 vector registers (the stack
# array below, which LLVM promotes to registers) while k runs over K: each k loads 32 numbers of
# the panel and 8 of x and does 256 multiply-adds. In matmul_packed the panels are shared out
# between the threads (numba's prange), so each thread reads its half of w once per step; in the
# time loops below each thread multiplies its own rows by all the panels (_matmul_rows). A last
# block of fewer than 8 rows is computed as 8 and stored in part; a single row (one stream of
# generation) has its sums split four ways over k instead, as one row of sums would wait on the
# latency of each addition.
#
# The panels start at a cache line (aligned_zeros), so that a panel row is two whole lines. Where
# NumPy put them, 16 to 48 bytes past one, each of the two 512-bit loads of a k straddled two lines:
# on the Xeon (Emerald Rapids) the kernel alone ran 4-11% slower at the time loops' sizes
# (32 x 512 x 2048, 32 x 2048 x 512 and 16 x 256 x 1024 on one thread, medians of 9 in turns), the
# LSTM's time loops of a, b and c 13-14% (medians of 6 alternating processes; the GRU's at c 6-13%),
# and training steps of LSTM c 9% (median of 6 pairs; b even, within its noise). Aligning the
# loops' other arrays (the steps' pre-activations and states, read by the cells) gained nothing
# beyond the noise.
#
# On the 2-core EPYC of docs/speed.md (AVX-512), 512 x 2048 weights: 0.62 ms for 64 rows (216 GFLOP/s,
# OpenBLAS 0.93 ms), 0.31 ms for 32 (OpenBLAS 0.45-0.59), 33 us for one row (OpenBLAS's
# matrix-vector product 45 us).
#
# The products over all steps at once (x W_ih^T before a loop, da W_ih after it: thousands of rows)
# are cut into chunks of 64 rows instead, shared out between the threads, each chunk multiplied by
# all the panels: its 64 rows stay in the core's cache while the panels stream past (shared out
# panel by panel over all the rows, x did not stay in cache: 162 GFLOP/s against OpenBLAS's 192 at
# 6400 x 512 x 2048). In chunks, 207-224 GFLOP/s against OpenBLAS's 189-207 (default kernel) for
# the products of configurations c and d, about even at b's 3200 x 256 x 1024, on the EPYC (Zen 4).
# On the Xeon (Emerald Rapids) OpenBLAS's AVX-512 kernel was the faster at them (below:
# large_products_packed), and there they stay with it, unless OpenBLAS runs a narrower kernel.
# Blocking the chunks otherwise did not close that gap there: the panels in groups of 16 (1 MB,
# kept in the core's 2 MB cache while all rows pass) or k in halves, each 5-25% slower than plain
# chunks; x copied into blocks of 8 rows laid out k by k, 3-8% faster on one thread and slower on
# two. The weight gradients, da^T x, stay with the BLAS: read as da^T in place (a block's 8 rows are
# 8 neighbours in a row of da, the rows 8 KB apart), with chunks of k inside chunks of output rows,
# the kernel's best was 198-202 GFLOP/s against OpenBLAS's 203-205 at d's sizes; with da packed
# chunk by chunk, 174-185 against 199-204 (docs/speed.md, "Tried and left out").


def threads_on_openmp():
    """Whether numba's parallel loops will run on its OpenMP threading layer, which keeps its threads
    awake (spinning, GOMP_SPINCOUNT) for a moment between two loops. Its workqueue layer puts them
    to sleep after each loop, and the products of a time loop then ran at half speed (104 against
    199 GFLOP/s at H=256, N=32); TBB's layer, which numba prefers when TBB is installed, is untried."""
    import importlib

    from numba import config

    if config.THREADING_LAYER not in ("default", "omp"):
        return False
    for layer in (["tbbpool"] if config.THREADING_LAYER == "default" else []) + ["omppool"]:
        try:
            importlib.import_module(f"numba.np.ufunc.{layer}")
        except ImportError:
            continue
        return layer == "omppool"
    return False


# CPUs (LLVM's names) on which the products over all steps at once ran faster in chunks by
# matmul_packed than by OpenBLAS: AMD's Zen 4, whose cores take a 512-bit multiply-add as two halves
# and on which OpenBLAS runs its kernel for Intel's (SkylakeX). On Intel's Emerald Rapids that
# kernel was the faster (185-290 GFLOP/s against 150-223 at d's 8192 x 512 x 2048, both cores);
# on a CPU not measured the BLAS takes them.
PACKED_LARGE_PRODUCTS_CPUS = frozenset({"znver4"})

# OpenBLAS's kernels with 512-bit vectors, by the names openblas_get_corename gives them (lower case).
# Where OpenBLAS runs another (OPENBLAS_CORETYPE=Haswell, or a build without these) on a CPU that
# has 512-bit vectors, its products run at half the CPU's rate, and matmul_packed takes the
# products over all steps: on Emerald Rapids with the Haswell kernel, training steps of c 1.01-1.25x
# and of d 1.20-1.23x faster so (alternating processes).
OPENBLAS_512_BIT_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
_CORENAME_FUNCTIONS = ("openblas_get_corename", "scipy_openblas_get_corename64_",
                       "scipy_openblas_get_corename", "openblas_get_corename64_")  # NumPy's wheels rename


def openblas_kernels():
    """The kernel each loaded OpenBLAS runs ("Haswell", "SkylakeX", ...; None where it does not say)."""
    import ctypes

    from nanolstm import loaded_openblas

    kernels = []
    for lib in loaded_openblas():
        corename = next((getattr(lib, name) for name in _CORENAME_FUNCTIONS if hasattr(lib, name)), None)
        if corename is not None:
            corename.restype = ctypes.c_char_p
        kernels.append(corename().decode() if corename is not None else None)
    return kernels


def large_products_packed():
    """Whether functional.product takes the products over all steps by matmul_packed: on the CPUs
    where that was measured faster than the BLAS, and where OpenBLAS runs a kernel narrower than the
    CPU's 512-bit vectors."""
    from llvmlite import binding

    if binding.get_host_cpu_name() in PACKED_LARGE_PRODUCTS_CPUS:
        return True
    kernels = openblas_kernels()
    return (bool(binding.get_host_cpu_features().get("avx512f")) and bool(kernels)
            and all(k is not None and k.lower() not in OPENBLAS_512_BIT_KERNELS for k in kernels))


_NR = 32  # columns of the output per panel
_MR = 8  # rows of x per block
_CHUNK = 64  # rows of x per chunk of a large product


_LINE = 64  # bytes in a cache line


def aligned_zeros(shape, dtype):
    """np.zeros(shape, dtype), its first byte at the start of a cache line. NumPy's arrays start where
    malloc puts them, on any 16-byte boundary; a panel row of 32 float32 there is two 512-bit loads
    that each straddle two cache lines."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    buffer = np.zeros(size + _LINE, np.uint8)
    start = -buffer.ctypes.data % _LINE
    return buffer[start : start + size].view(dtype).reshape(shape)


def pack(w, panels=None):
    """w (N, K) float32 -> panels (ceil(N / 32), K, 32) for matmul_packed, cache-line aligned; into
    panels, zeros of that shape, if given."""
    N, K = w.shape
    whole, rest = divmod(N, _NR)
    panels = aligned_zeros((whole + (rest > 0), K, _NR), w.dtype) if panels is None else panels
    w_t = w.T  # (K, N): panel p is columns 32p to 32p + 31 of it
    panels[:whole] = w_t[:, : whole * _NR].reshape(K, whole, _NR).transpose(1, 0, 2)
    if rest:
        panels[whole, :, :rest] = w_t[:, whole * _NR :]
    return panels


@intrinsic
def _block_on_stack(typingctx):
    """A pointer to _MR * _NR float32 on the stack of the calling function: a block's sums. Unlike an
    array from np.empty (on the heap), LLVM can keep it in registers."""

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=_MR * _NR)

    return types.CPointer(types.float32)(), codegen


@njit(fastmath=True, error_model="numpy", inline="always")
def _multiply_block(x, i0, w, acc, bias, j0):
    """acc (8, 32) = rows i0 to i0 + 7 of x (M, K) times the panel w (K, 32), plus bias[j0:j0 + 32]
    on every row (0 past its end: an empty bias adds nothing). Past the last row of x the last row
    is repeated; the caller does not store those sums."""
    M, K = x.shape
    r0, r1, r2, r3 = i0, min(i0 + 1, M - 1), min(i0 + 2, M - 1), min(i0 + 3, M - 1)
    r4, r5, r6, r7 = min(i0 + 4, M - 1), min(i0 + 5, M - 1), min(i0 + 6, M - 1), min(i0 + 7, M - 1)
    for j in range(_NR):
        b = bias[j0 + j] if j0 + j < bias.shape[0] else 0
        for i in range(_MR):
            acc[i, j] = b
    for k in range(K):
        x0, x1, x2, x3 = x[r0, k], x[r1, k], x[r2, k], x[r3, k]
        x4, x5, x6, x7 = x[r4, k], x[r5, k], x[r6, k], x[r7, k]
        for j in range(_NR):
            wkj = w[k, j]
            acc[0, j] += x0 * wkj
            acc[1, j] += x1 * wkj
            acc[2, j] += x2 * wkj
            acc[3, j] += x3 * wkj
            acc[4, j] += x4 * wkj
            acc[5, j] += x5 * wkj
            acc[6, j] += x6 * wkj
            acc[7, j] += x7 * wkj


@njit(fastmath=True, error_model="numpy", inline="always")
def _store_block(acc, out, i0, j0):
    """The sums of a block into out at row i0, column j0, as far as out reaches."""
    for i in range(min(_MR, out.shape[0] - i0)):
        for j in range(min(_NR, out.shape[1] - j0)):
            out[i0 + i, j0 + j] = acc[i, j]


@njit(cache=True, fastmath=True, error_model="numpy")
def _matmul_rows(x, panels, out, bias):
    """out = x @ w^T + bias (empty: none), as matmul_packed but on the calling thread alone: the
    product of one thread's rows in a time loop, or of one chunk of a large product's rows."""
    _wide_vectors()
    acc = carray(_block_on_stack(), (_MR, _NR))
    for p in range(panels.shape[0]):
        for i0 in range(0, x.shape[0], _MR):
            _multiply_block(x, i0, panels[p], acc, bias, p * _NR)
            _store_block(acc, out, i0, p * _NR)


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def matmul_packed(x, panels, out):
    """out (M, N) = x (M, K) @ w^T, w packed by pack(w); all float32 and C-contiguous.

    fastmath lets LLVM keep the sums in registers and use fused multiply-adds; the order of the
    additions is then not NumPy's, and results differ from x @ w.T by rounding only.
    """
    M, K = x.shape
    no_bias = np.empty(0, x.dtype)
    if M >= 2 * _CHUNK:  # a large product: chunks of rows, each by all the panels
        for c in prange(-(-M // _CHUNK)):
            _wide_vectors()
            lo, hi = c * _CHUNK, min(M, (c + 1) * _CHUNK)
            _matmul_rows(x[lo:hi], panels, out[lo:hi], no_bias)
        return
    for p in prange(panels.shape[0]):  # a step's product: the panels shared out
        _wide_vectors()
        w = panels[p]  # (K, 32)
        acc = carray(_block_on_stack(), (_MR, _NR))
        if M == 1:  # a single row (one stream of generation): k split four ways, so that four
            # rows of sums, not one, take turns in the multiply-add units
            for i in range(4):
                for j in range(_NR):
                    acc[i, j] = 0
            for k in range(0, K - 3, 4):
                x0, x1, x2, x3 = x[0, k], x[0, k + 1], x[0, k + 2], x[0, k + 3]
                for j in range(_NR):
                    acc[0, j] += x0 * w[k, j]
                    acc[1, j] += x1 * w[k + 1, j]
                    acc[2, j] += x2 * w[k + 2, j]
                    acc[3, j] += x3 * w[k + 3, j]
            for k in range(K - K % 4, K):
                x0 = x[0, k]
                for j in range(_NR):
                    acc[0, j] += x0 * w[k, j]
            for j in range(_NR):
                acc[0, j] = (acc[0, j] + acc[1, j]) + (acc[2, j] + acc[3, j])
            _store_block(acc, out, 0, p * _NR)
            continue
        for i0 in range(0, M, _MR):
            _multiply_block(x, i0, w, acc, no_bias, 0)
            _store_block(acc, out, i0, p * _NR)


# ---------------------------------------------------------------------------------------------
# Whole time loops, on packed weights. The rows of a batch are independent sequences: row n of h_t
# depends on row n of h_{t-1} and on nothing else. So the loop is not parallel step by step, with the
# threads meeting after each step's product, but row by row: each thread takes its share of the
# rows through all T steps, products and cells, and the threads meet once, at the end. Each thread
# reads all of W_hh at every step (from the shared cache: 4 MB at H=512), where the product shared
# out panel by panel reads half; in exchange the cells run on both cores, and no step waits for the
# slower thread or for a thread to wake. At configuration a (H=128, N=32) the forward and backward
# loops take 3.6 ms instead of 5.6 step by step; at c (H=512, N=64) 133 instead of 148. Split by
# units instead (each thread the panels and cells of its units, all rows, meeting at a spin barrier
# after every step), the loops came out slower on the Xeon (docs/speed.md, "Tried on the Xeon").
#
# Same signatures as the reference loops in functional.py, with W_hh packed first. Neither adds its
# biases in a pass of its own over all steps: the LSTM's are where each step's sums of h W_hh^T
# start (_matmul_rows), the GRU's are added as each step's input rows are read (_input_rows).


@njit(cache=True, error_model="numpy")
def _gather_rows(a_t, table, ids, t, r0, r1):
    """Rows r0 to r1 of a step's input side looked up, a_t[n] = table[ids[t, n]], when the loop
    gathers them (ids has T rows; it has none when a was given whole)."""
    if ids.shape[0]:
        for n in range(r0, r1):
            a_t[n] = table[ids[t, n]]


@njit(cache=True, error_model="numpy")
def _input_rows(a_t, table, ids, t, r0, r1, bias):
    """Rows r0 to r1 of a step's input side with the bias added: a_t[n] = table[ids[t, n]] + bias
    when the loop gathers them, else a_t[n] += bias; one pass, which leaves them in cache for the
    cell. The GRU's, whose input-side bias cannot start the sums of h W_hh^T as the LSTM's does (the
    product's n block is multiplied by r)."""
    gathered = ids.shape[0] > 0
    for n in range(r0, r1):
        row = table[ids[t, n]] if gathered else a_t[n]
        for j in range(a_t.shape[1]):
            a_t[n, j] = row[j] + bias[j]


@njit(cache=True, error_model="numpy")
def _add_into(out, rows):
    """out += rows, both (R, H), number by number (add_rows, above, is the embedding gradient's sum
    by index). As numba's array expression (out += rows on two slices) it took the LSTM's backward
    loop at configuration a 5% longer (2.0-2.5 ms against 1.9-2.3, medians of 400 in turns). The
    same sums, in the same order."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] += rows[i, j]


def _gather_args(a, gather):
    """The (table, ids) of a loop's gather argument, or empty ones that _gather_rows skips."""
    return gather if gather is not None else (np.empty((0, a.shape[2]), a.dtype), np.empty((0, 0), np.intp))


def _shares(N, batch_sizes):
    """How the threads share N rows -> (bounds, batch_sizes): thread k takes rows bounds[k] to
    bounds[k + 1], and step t runs the first batch_sizes[t] rows (all N, when None is given).

    As many threads as numba has, but each with at least one block of 8 rows. Rows of equal
    lengths are split evenly; sequences of different lengths (longest first) so that each thread has
    about as many row-steps to run: the first thread fewer rows, which run longer."""
    parts = max(1, min(numba.get_num_threads(), -(-N // _MR)))
    if batch_sizes is None or N == 0:
        return np.array([N * k // parts for k in range(parts + 1)]), np.empty(0, np.int64)
    steps = np.asarray(batch_sizes, np.int64)
    done = np.cumsum(np.sum(steps[:, None] > np.arange(N), axis=0))  # row-steps of rows 0 .. r
    cuts = np.searchsorted(done, done[-1] * np.arange(1, parts) / parts) + 1
    return np.concatenate([[0], np.minimum(cuts, N), [N]]), steps


@njit(cache=True, error_model="numpy")
def _running(r0, r1, batch_sizes, t):
    """The end of a thread's rows r0 to r1 that run at step t (r0 or less: none do); batch_sizes
    empty: all of them, at every step."""
    return min(r1, batch_sizes[t]) if batch_sizes.shape[0] else r1


@njit(cache=True, parallel=True, error_model="numpy")
def _lstm_loop_forward(a, table, ids, bias, hs, cs, tanh_cs, ms, panels, panels_hr, bounds, batch_sizes):
    """With projections (panels_hr, W_hr packed, has panels) the cell's output m_t goes to ms[t] and
    h_t = m_t W_hr^T; without, ms is hs[1:], so that the cell writes h_t where it belongs."""
    T, N, G = a.shape
    no_bias = np.empty(0, a.dtype)
    for part in prange(bounds.shape[0] - 1):
        _wide_vectors()
        r0 = bounds[part]
        hw = np.empty((bounds[part + 1] - r0, G), a.dtype)
        for t in range(T):
            r1 = _running(r0, bounds[part + 1], batch_sizes, t)
            if r1 <= r0:  # this thread's sequences have all ended
                break
            _gather_rows(a[t], table, ids, t, r0, r1)
            _matmul_rows(hs[t, r0:r1], panels, hw[: r1 - r0], bias)
            lstm_cell_forward(a[t, r0:r1], hw[: r1 - r0], cs[t, r0:r1], cs[t + 1, r0:r1], ms[t, r0:r1],
                              tanh_cs[t, r0:r1])
            if panels_hr.shape[0]:
                _matmul_rows(ms[t, r0:r1], panels_hr, hs[t + 1, r0:r1], no_bias)  # h_t = m_t W_hr^T


@njit(cache=True, parallel=True, error_model="numpy")
def _lstm_loop_backward(dout, dh, dc, a, cs, tanh_cs, da, dhs, panels, panels_hr, bounds, batch_sizes,
                        db_parts):
    """With projections (panels_hr, W_hr^T packed, has panels) each step's whole dh_t goes to dhs[t],
    for dW_hr, and the cell's gradient is dm_t = dh_t W_hr; without, the cell's is dh_t itself."""
    T, N, G = a.shape
    no_bias = np.empty(0, a.dtype)
    projected = panels_hr.shape[0] > 0
    for part in prange(bounds.shape[0] - 1):
        _wide_vectors()
        r0 = bounds[part]
        dm = np.empty((bounds[part + 1] - r0 if projected else 0, cs.shape[2]), a.dtype)
        db = db_parts[part]  # this thread's rows' sum of da, in float64
        for t in range(T - 1, -1, -1):
            r1 = _running(r0, bounds[part + 1], batch_sizes, t)
            if r1 <= r0:  # this thread's sequences have not begun to run, backwards
                continue
            _add_into(dh[r0:r1], dout[t, r0:r1])
            dm_t = dh[r0:r1]
            if projected:
                dhs[t, r0:r1] = dh[r0:r1]
                dm_t = dm[: r1 - r0]
                _matmul_rows(dh[r0:r1], panels_hr, dm_t, no_bias)  # dm_t = dh_t W_hr
            lstm_cell_backward(dm_t, dc[r0:r1], a[t, r0:r1], cs[t, r0:r1], tanh_cs[t, r0:r1], da[t, r0:r1])
            for i in range(r0, r1):
                for j in range(G):
                    db[j] += da[t, i, j]
            _matmul_rows(da[t, r0:r1], panels, dh[r0:r1], no_bias)


@njit(cache=True, parallel=True, error_model="numpy")
def _gru_loop_forward(a, table, ids, bias, hs, hns, b_hn, panels, bounds, batch_sizes):
    T, N, G = a.shape
    no_bias = np.empty(0, a.dtype)
    for part in prange(bounds.shape[0] - 1):
        _wide_vectors()
        r0 = bounds[part]
        hw = np.empty((bounds[part + 1] - r0, G), a.dtype)
        for t in range(T):
            r1 = _running(r0, bounds[part + 1], batch_sizes, t)
            if r1 <= r0:
                break
            _input_rows(a[t], table, ids, t, r0, r1, bias)
            _matmul_rows(hs[t, r0:r1], panels, hw[: r1 - r0], no_bias)
            gru_cell_forward(a[t, r0:r1], hw[: r1 - r0], b_hn, hs[t, r0:r1], hs[t + 1, r0:r1], hns[t, r0:r1])


@njit(cache=True, parallel=True, error_model="numpy")
def _gru_loop_backward(dout, dh, a, hns, hs, dxa, dha, panels, bounds, batch_sizes):
    T, N, H = dout.shape
    no_bias = np.empty(0, dh.dtype)
    for part in prange(bounds.shape[0] - 1):
        _wide_vectors()
        r0 = bounds[part]
        dh_hw = np.empty((bounds[part + 1] - r0, H), dh.dtype)
        for t in range(T - 1, -1, -1):
            r1 = _running(r0, bounds[part + 1], batch_sizes, t)
            if r1 <= r0:
                continue
            _add_into(dh[r0:r1], dout[t, r0:r1])
            gru_cell_backward(dh[r0:r1], a[t, r0:r1], hns[t, r0:r1], hs[t, r0:r1], dxa[t, r0:r1],
                              dha[t, r0:r1])
            _matmul_rows(dha[t, r0:r1], panels, dh_hw[: r1 - r0], no_bias)
            _add_into(dh[r0:r1], dh_hw[: r1 - r0])


def _no_panels(w):
    """Packed weights with no panels: a loop without projections."""
    return np.empty((0, w.shape[1], _NR), w.dtype)


def lstm_loop_forward(a, bias, hs, cs, tanh_cs, w_hh, gather=None, batch_sizes=None):
    """As functional.lstm_loop_forward: float32, C-contiguous arrays."""
    _lstm_loop_forward(a, *_gather_args(a, gather), bias, hs, cs, tanh_cs, hs[1:], pack(w_hh), _no_panels(w_hh),
                       *_shares(a.shape[1], batch_sizes))


def lstm_loop_backward(dout, dh, dc, a, cs, tanh_cs, da, w_hh, batch_sizes=None):
    """As functional.lstm_loop_backward: returns the bias gradient, summed in float64."""
    return _lstm_backward_packed(dout, dh, dc, a, cs, tanh_cs, da, np.empty((0,) + dh.shape, dh.dtype),
                                 pack(w_hh.T), _no_panels(w_hh.T), batch_sizes)


def lstmp_loop_forward(a, bias, hs, cs, tanh_cs, ms, w_hh, w_hr, gather=None, batch_sizes=None):
    """As functional.lstmp_loop_forward."""
    _lstm_loop_forward(a, *_gather_args(a, gather), bias, hs, cs, tanh_cs, ms, pack(w_hh), pack(w_hr),
                       *_shares(a.shape[1], batch_sizes))


def lstmp_loop_backward(dout, dh, dc, a, cs, tanh_cs, da, dhs, w_hh, w_hr, batch_sizes=None):
    """As functional.lstmp_loop_backward: returns the bias gradient, summed in float64."""
    return _lstm_backward_packed(dout, dh, dc, a, cs, tanh_cs, da, dhs, pack(w_hh.T), pack(w_hr.T), batch_sizes)


def _lstm_backward_packed(dout, dh, dc, a, cs, tanh_cs, da, dhs, panels, panels_hr, batch_sizes):
    """The compiled backward loop on packed weights, the rows shared between the threads; returns the
    bias gradient, each thread's share summed in float64."""
    bounds, steps = _shares(a.shape[1], batch_sizes)
    db_parts = np.zeros((len(bounds) - 1, a.shape[2]))
    _lstm_loop_backward(dout, dh, dc, a, cs, tanh_cs, da, dhs, panels, panels_hr, bounds, steps, db_parts)
    return db_parts.sum(axis=0).astype(a.dtype)


def gru_loop_forward(a, bias, hs, hns, b_hn, w_hh, gather=None, batch_sizes=None):
    """As functional.gru_loop_forward."""
    _gru_loop_forward(a, *_gather_args(a, gather), bias, hs, hns, b_hn, pack(w_hh), *_shares(a.shape[1], batch_sizes))


def gru_loop_backward(dout, dh, a, hns, hs, dxa, dha, w_hh, batch_sizes=None):
    """As functional.gru_loop_backward."""
    _gru_loop_backward(dout, dh, a, hns, hs, dxa, dha, pack(w_hh.T), *_shares(a.shape[1], batch_sizes))


loops = {
    "lstm": (lstm_loop_forward, lstm_loop_backward),
    "lstmp": (lstmp_loop_forward, lstmp_loop_backward),
    "gru": (gru_loop_forward, gru_loop_backward),
}


# ---------------------------------------------------------------------------------------------
# Sampling: model.generate's steps and draws in one compiled call. A step of one stream is
# bound by reading the weights (12.8 MB at 2x512); around its four products, model.step and
# next_tokens in Python (a dozen calls, each dispatched, and each product a parallel region started
# from Python) took another 50-120 us: 375-450 us a step, 313-370 for its products alone (medians
# and minima of 400 steps, two runs). Here each step calls the same kernels, in the same
# order, on the same numbers as model.step and sample.next_tokens do: the products matmul_packed's,
# the cells above, the draw draw_tokens, the biases added in float32 as NumPy adds them. So the
# same tokens come out, to the bit. These are not parallel=True functions: numba would make each
# array expression in them a parallel region of its own; the parallelism is matmul_packed's.
#
# The weights come packed and stacked by layer (pack_stack): w_ih (L - 1, ...) and bias (L - 1, G)
# for the layers above the first, whose input side is a row of table, the V x G*H input table.


def pack_stack(ws):
    """pack() of each of the equally shaped ws, stacked: (len(ws), panels, K, 32)."""
    N, K = ws[0].shape if ws else (0, 0)
    stacked = aligned_zeros((len(ws), -(-N // _NR), K, _NR), np.float32)
    for w, panels in zip(ws, stacked):
        pack(w, panels)
    return stacked


@njit(cache=True, error_model="numpy")
def _step_input(layer, tokens, table, x, w_ih, bias, a):
    """a (N, G) = the input side of a layer's pre-activations at a step, as model.step makes it: the
    rows of table for the tokens in the first layer; x (N, H) W_ih^T + bias above it."""
    N, G = a.shape
    if layer == 0:
        for n in range(N):
            a[n] = table[tokens[n]]
    else:
        matmul_packed(x, w_ih[layer - 1], a)
        for n in range(N):
            for j in range(G):
                a[n, j] += bias[layer - 1, j]


@njit(cache=True, error_model="numpy")
def _decode(h, dec, b_dec, logits):
    """logits (N, V) = h (N, H) W_dec^T + b_dec."""
    matmul_packed(h, dec, logits)
    for n in range(logits.shape[0]):
        for v in range(logits.shape[1]):
            logits[n, v] += b_dec[v]


def sample(*args):
    """_sample(*args), numba's threads started first. A compiled function that is not parallel=True
    but calls one that is (here matmul_packed) does not start them when it is loaded from numba's
    cache (numba issue 8578), and the parallel region then crashes the process: once matmul_packed
    had been cached by an earlier process, the first generation compiled and cached this loop, and
    every later one, loading it, stopped on a segmentation fault. numba.get_num_threads starts the
    threads if nothing has yet; after that it costs about 2 microseconds a call."""
    numba.get_num_threads()
    _sample(*args)


@njit(cache=True, error_model="numpy")
def _sample(table, w_ih, bias, w_hh, c, b_hn, dec, b_dec, h, logits, tokens, given, temperature, u):
    """For each row t of tokens (T, N): unless t < given, draw it from logits (N, V) by u[t - given]
    at temperature; then step the model on it from the state h (L, N, H), and c (L, N, H) for an
    LSTM, both updated in place, and put the next logits in logits. An LSTM's if c has its layers;
    a GRU's if c is empty, with b_hn (L, H), each layer's part of b_hh inside r * (...)."""
    _wide_vectors()
    L, N, H = h.shape
    lstm = c.shape[0] > 0
    a, hw = np.empty((N, table.shape[1]), h.dtype), np.empty((N, table.shape[1]), h.dtype)
    new, scratch = np.empty((N, H), h.dtype), np.empty((N, H), h.dtype)
    for t in range(tokens.shape[0]):
        if t >= given:
            draw_tokens(logits, temperature, u[t - given], tokens[t])
        for layer in range(L):
            _step_input(layer, tokens[t], table, h[layer - 1], w_ih, bias, a)
            matmul_packed(h[layer], w_hh[layer], hw)
            # the new c or h into `new`, then copied: the cells' loops are vectorised only on arrays
            # that do not overlap
            if lstm:
                lstm_cell_forward(a, hw, c[layer], new, h[layer], scratch)
                c[layer] = new
            else:
                gru_cell_forward(a, hw, b_hn[layer], h[layer], new, scratch)
                h[layer] = new
        _decode(h[L - 1], dec, b_dec, logits)
